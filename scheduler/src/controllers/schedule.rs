//! Placement: binds Pending pods to nodes (with addresses), or says why
//! they cannot be.

use super::{log_err, pods};
use crate::cluster::Cluster;
use crate::ipam::{self, Cidr};
use crate::kinds::volume::persistent_names;
use crate::placement::{Extension, NodeView, PodRequest, place_with};
use crate::store::{Expect, WriteDurability};
use flotilla_api::{Capacity, EventType, Kind, Object, Pod, PodPhase, PodStatus};
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
            e.0.pods += p.spec.slots();
            e.1 += 1;
        }
    }
    m
}

/// Binds the persistent Volumes of pods bound to a node to that node, if
/// they are not bound yet (level-triggered: a binding the last pass made
/// is completed here even after a crash).
fn bind_volumes(cluster: &Cluster, all: &[std::sync::Arc<Object>]) {
    for p in pods(all) {
        let Some(node) = &p.status.node else { continue };
        if p.status.phase.is_terminal() {
            continue;
        }
        for name in persistent_names(&p.spec) {
            let key = flotilla_api::object::key(Kind::Volume, &p.metadata.namespace, name);
            let Some(obj) = cluster.store.get(&key) else {
                continue;
            };
            let Object::Volume(v) = &*obj else { continue };
            if v.status.node.is_some() {
                continue;
            }
            let mut nv = v.clone();
            nv.status.node = Some(node.clone());
            match cluster.store.put(
                Object::Volume(nv),
                Expect::Version(v.metadata.resource_version),
                WriteDurability::Sync,
            ) {
                Ok(stored) => cluster.event(
                    &stored,
                    EventType::Normal,
                    "Bound",
                    format!(
                        "bound to node {node} (first used by pod {})",
                        p.metadata.name
                    ),
                ),
                Err(e) => log_err("binding volume", Err::<(), _>(e)),
            }
        }
    }
}

/// The node a pending pod's persistent Volumes hold it to, or why it
/// cannot be placed now (reason, message).
fn volume_node(
    cluster: &Cluster,
    p: &Pod,
    nodes: &[NodeView],
) -> Result<Option<String>, (&'static str, String)> {
    let mut on: Option<(String, &str)> = None;
    for name in persistent_names(&p.spec) {
        let key = flotilla_api::object::key(Kind::Volume, &p.metadata.namespace, name);
        let Some(obj) = cluster.store.get(&key) else {
            return Err(("VolumeNotFound", format!("volume \"{name}\" not found")));
        };
        let Object::Volume(v) = &*obj else { continue };
        let Some(node) = &v.status.node else { continue };
        if let Some((other, other_name)) = &on
            && other != node
        {
            return Err((
                "VolumeConflict",
                format!(
                    "volume \"{other_name}\" is on node {other} and volume \"{name}\" on node {node}; a pod runs on one node"
                ),
            ));
        }
        match nodes.iter().find(|n| n.name == *node) {
            Some(n) if n.ready && !n.unschedulable => {}
            Some(n) => {
                let state = if n.ready { "cordoned" } else { "not ready" };
                return Err((
                    "VolumeNodeUnavailable",
                    format!("volume \"{name}\" is on node {node}, which is {state}"),
                ));
            }
            None => {
                return Err((
                    "VolumeNodeUnavailable",
                    format!("volume \"{name}\" is on node {node}, which is gone"),
                ));
            }
        }
        on = Some((node.clone(), name));
    }
    Ok(on.map(|(n, _)| n))
}

/// Records why a pod stays Pending (an event, and its status if changed).
fn pending_because(cluster: &Cluster, p: &Pod, reason: &str, message: String) {
    let obj = Object::Pod(p.clone());
    cluster.event(
        &obj,
        EventType::Warning,
        "FailedScheduling",
        message.clone(),
    );
    if p.status.reason != reason || p.status.message != message {
        let mut np = p.clone();
        np.status.reason = reason.into();
        np.status.message = message;
        log_err(
            "pending reason",
            cluster.store.put(
                Object::Pod(np),
                Expect::Version(p.metadata.resource_version),
                WriteDurability::Lazy,
            ),
        );
    }
}

pub(super) fn schedule(cluster: &Cluster) {
    let store = &cluster.store;
    let all = store.list("pods/");
    bind_volumes(cluster, &all);
    let releasing = super::addresses::track(cluster, &all);
    let mut pending: Vec<&Pod> = pods(&all)
        .filter(|p| p.status.node.is_none() && p.status.phase == PodPhase::Pending)
        .collect();
    if pending.is_empty() {
        return;
    }
    pending.sort_by_key(|p| p.metadata.created_ms);
    let alloc = allocated(pods(&all));
    // Addresses held on each node: by every pod bound there that still
    // exists, and by pods gone from the store the node still holds.
    let mut held: HashMap<&str, HashSet<Ipv4Addr>> = releasing
        .iter()
        .map(|(n, ips)| (n.as_str(), ips.clone()))
        .collect();
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
    let mut requests: Vec<PodRequest> = Vec::with_capacity(pending.len());
    pending.retain(|p| match volume_node(cluster, p, &nodes) {
        Ok(on_node) => {
            requests.push(PodRequest {
                id: p.metadata.uid.clone(),
                cpu: p.spec.cpu(),
                memory: p.spec.memory(),
                slots: p.spec.slots(),
                node_selector: p.spec.node_selector.clone(),
                runtimes: p.spec.runtimes(),
                needs_ip: p.spec.needs_network(),
                on_node,
            });
            true
        }
        Err((reason, message)) => {
            pending_because(cluster, p, reason, message);
            false
        }
    });
    // Scheduler plugins filter and score the nodes the built-in checks
    // pass; without any, placement is the pure function alone.
    let bound: Vec<&Pod> = pods(&all)
        .filter(|p| p.status.node.is_some() && !p.status.phase.is_terminal())
        .collect();
    let mut pass = crate::plugins::scheduling::Pass::new(cluster, &nodes, &pending, &bound);
    let mut plan = place_with(
        &nodes,
        &requests,
        pass.as_mut().map(|p| p as &mut dyn Extension),
    );
    drop(pass);
    // Two pods placed in this pass may share a volume no node holds yet:
    // the first one's node gets it; the other waits for the next pass.
    let mut claimed: HashMap<(String, String), String> = HashMap::new();
    let by_uid: HashMap<&str, &Pod> = pending
        .iter()
        .map(|p| (p.metadata.uid.as_str(), *p))
        .collect();
    plan.bindings.retain(|(uid, node)| {
        let p = by_uid[uid.as_str()];
        let names: Vec<(String, String)> = persistent_names(&p.spec)
            .map(|n| (p.metadata.namespace.clone(), n.to_string()))
            .collect();
        if names
            .iter()
            .any(|k| claimed.get(k).is_some_and(|n| n != node))
        {
            return false;
        }
        for k in names {
            claimed.insert(k, node.clone());
        }
        true
    });
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
        pending_because(cluster, p, "Unschedulable", u.to_string());
    }
}
