//! Placement: binds Pending pods to nodes (with addresses), or says why
//! they cannot be.

use super::{log_err, pods};
use crate::cluster::Cluster;
use crate::ipam::{self, Cidr};
use crate::placement::{NodeView, PodRequest, place};
use crate::store::{Expect, WriteDurability};
use flotilla_api::{Capacity, EventType, Object, Pod, PodPhase, PodStatus};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

/// Requests of the pods bound to each node and not finished.
pub fn allocated<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
) -> BTreeMap<String, (Capacity, usize)> {
    let mut m: BTreeMap<String, (Capacity, usize)> = BTreeMap::new();
    for p in pods {
        if let Some(n) = &p.status.node
            && !p.status.phase.is_terminal()
        {
            let e = m.entry(n.clone()).or_default();
            e.0.cpu += p.spec.cpu();
            e.0.memory += p.spec.memory();
            e.1 += 1;
        }
    }
    m
}

pub(super) fn schedule(cluster: &Cluster) {
    let store = &cluster.store;
    let all = store.list("pods/");
    let mut pending: Vec<&Pod> = pods(&all)
        .filter(|p| p.status.node.is_none() && p.status.phase == PodPhase::Pending)
        .collect();
    if pending.is_empty() {
        return;
    }
    pending.sort_by_key(|p| p.metadata.created_ms);
    let alloc = allocated(pods(&all));
    // Addresses held on each node: by every pod bound there that still exists.
    let mut held: HashMap<&str, HashSet<Ipv4Addr>> = HashMap::new();
    for p in pods(&all) {
        if let (Some(n), Ok(ip)) = (&p.status.node, p.status.pod_ip.parse::<Ipv4Addr>()) {
            held.entry(n.as_str()).or_default().insert(ip);
        }
    }
    let mut blocks: HashMap<String, Cidr> = HashMap::new();
    let mut epochs = HashMap::new();
    let nodes: Vec<NodeView> = store
        .list("nodes/")
        .iter()
        .filter_map(|o| match &**o {
            Object::Node(n) => Some(n),
            _ => None,
        })
        .map(|n| {
            epochs.insert(n.metadata.name.clone(), n.status.epoch);
            // Pods get addresses on bridge-networked nodes only; elsewhere
            // they run without one and addresses do not limit placement.
            let block = n
                .status
                .pod_cidr
                .parse::<Cidr>()
                .ok()
                .filter(|_| n.status.pod_network == "bridge");
            if let Some(b) = block {
                blocks.insert(n.metadata.name.clone(), b);
            }
            let none = HashSet::new();
            let used = held.get(n.metadata.name.as_str()).unwrap_or(&none);
            NodeView {
                name: n.metadata.name.clone(),
                labels: n.metadata.labels.clone(),
                ready: n.status.ready,
                unschedulable: n.unschedulable,
                allocatable: n.status.allocatable,
                allocated: alloc.get(&n.metadata.name).map(|a| a.0).unwrap_or_default(),
                pods: alloc.get(&n.metadata.name).map_or(0, |a| a.1),
                runtimes: n.status.runtimes.clone(),
                free_ips: block.map_or(usize::MAX, |b| ipam::free_pod_ips(b, used)),
            }
        })
        .collect();
    let requests: Vec<PodRequest> = pending
        .iter()
        .map(|p| PodRequest {
            id: p.metadata.uid.clone(),
            cpu: p.spec.cpu(),
            memory: p.spec.memory(),
            node_selector: p.spec.node_selector.clone(),
            runtimes: p.spec.runtimes(),
            needs_ip: p.spec.needs_network(),
        })
        .collect();
    let plan = place(&nodes, &requests);
    let by_uid: HashMap<&str, &Pod> = pending
        .iter()
        .map(|p| (p.metadata.uid.as_str(), *p))
        .collect();
    // Every binding of the pass in one store transaction.
    let binds: Vec<(Object, Expect)> = plan
        .bindings
        .iter()
        .map(|(uid, node)| {
            let p = by_uid[uid.as_str()];
            let mut np = p.clone();
            // Placement counted free addresses, so the block has one.
            let pod_ip = match (p.spec.needs_network(), blocks.get(node)) {
                (true, Some(block)) => {
                    let used = held.entry(node.as_str()).or_default();
                    let ip = ipam::next_pod_ip(*block, used);
                    if let Some(ip) = ip {
                        used.insert(ip);
                    }
                    ip.map(|ip| ip.to_string()).unwrap_or_default()
                }
                _ => String::new(),
            };
            np.status = PodStatus {
                phase: PodPhase::Scheduled,
                node: Some(node.clone()),
                node_epoch: epochs.get(node).copied().unwrap_or(0),
                pod_ip,
                ..PodStatus::default()
            };
            (
                Object::Pod(np),
                Expect::Version(p.metadata.resource_version),
            )
        })
        .collect();
    for (r, (_, node)) in store
        .put_many(binds, WriteDurability::Lazy)
        .into_iter()
        .zip(&plan.bindings)
    {
        match r {
            Ok(obj) => cluster.event(
                &obj,
                EventType::Normal,
                "Scheduled",
                format!("assigned to node {node}"),
            ),
            Err(e) => log_err("binding pod", Err::<(), _>(e)),
        }
    }
    for u in plan.unschedulable {
        let p = by_uid[u.id.as_str()];
        let message = u.to_string();
        let obj = Object::Pod(p.clone());
        cluster.event(
            &obj,
            EventType::Warning,
            "FailedScheduling",
            message.clone(),
        );
        if p.status.reason != "Unschedulable" || p.status.message != message {
            let mut np = p.clone();
            np.status.reason = "Unschedulable".into();
            np.status.message = message;
            log_err(
                "pending reason",
                store.put(
                    Object::Pod(np),
                    Expect::Version(p.metadata.resource_version),
                    WriteDurability::Lazy,
                ),
            );
        }
    }
}
