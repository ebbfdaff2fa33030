//! Level-triggered controllers: each pass reads desired and observed state
//! from the store and acts; none depends on seeing every event.
//!
//! - deployments: keep `replicas` current pods per Deployment, replace finished
//!   ones, recreate pods of an outdated template, collect orphans;
//! - placement: bind Pending pods to nodes, or say why they cannot be;
//! - nodes: mark nodes without a recent heartbeat NotReady.

use crate::cluster::Cluster;
use crate::ipam::{self, Cidr};
use crate::placement::{NodeView, PodRequest, place};
use crate::store::{Expect, StoreError, WriteDurability};
use flotilla_api::manifest::digest_of;
use flotilla_api::{
    Capacity, Deployment, EventType, Labels, Object, OwnerRef, Pod, PodPhase, PodStatus,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The longest an agent waits between reconnect attempts (its link backoff cap).
pub const AGENT_MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Label naming the Deployment that owns a pod.
pub const DEPLOYMENT_LABEL: &str = "flotilla.dev/deployment";
/// Label carrying the hash of the template a pod was made from.
pub const TEMPLATE_HASH_LABEL: &str = "flotilla.dev/template-hash";

/// Runs the controllers until `shutdown` turns true.
pub async fn run(cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    let (_, mut changes) = cluster
        .store
        .watch_from(cluster.store.revision())
        .expect("watching from the current revision always works");
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    let mut due_flush = false;
    loop {
        // A pass is synchronous work over every object: it runs off the async
        // workers (which carry heartbeats). After a long pass the next one
        // waits as long as this one took, so controllers use at most half a
        // core under a flood of changes; short passes (a quiet or small
        // cluster) are not delayed at all. (A pass writes to the store, and
        // a write may wait behind an fsync for as long as the disk takes.)
        let c = cluster.clone();
        let took = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            reconcile(&c);
            t.elapsed()
        })
        .await
        .unwrap_or_default();
        if took > Duration::from_millis(5) {
            tokio::time::sleep(took).await;
        }
        tokio::select! {
            r = changes.recv() => {
                if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
                // Coalesce a burst of changes into one pass.
                while changes.try_recv().is_ok() {}
            }
            _ = cluster.kick.notified() => {}
            _ = tick.tick() => {}
            _ = flush.tick() => due_flush = true,
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if std::mem::take(&mut due_flush) {
            // An fsync can take seconds when the disk is busy: never on the
            // workers that answer heartbeats.
            let c = cluster.clone();
            let flushed = tokio::task::spawn_blocking(move || c.store.flush()).await;
            if let Ok(Err(e)) = flushed {
                tracing::error!("store flush failed: {e}");
            }
        }
    }
}

/// One pass of every controller.
pub fn reconcile(cluster: &Cluster) {
    deployments(cluster);
    schedule(cluster);
    nodes(cluster);
    crate::services::reconcile(cluster);
    crate::services::publish_peers(cluster);
}

/// The pods among stored objects, borrowed (a pass never clones what it only reads).
fn pods(objs: &[Arc<Object>]) -> impl Iterator<Item = &Pod> {
    objs.iter().filter_map(|o| match &**o {
        Object::Pod(p) => Some(p),
        _ => None,
    })
}

/// Hash of a pod template, to tell pods of an older template apart.
pub fn template_hash(d: &Deployment) -> String {
    let json = serde_json::to_vec(&d.spec.template).expect("templates serialize");
    digest_of(&json)[7..17].to_string()
}

fn log_err(what: &str, r: Result<impl Sized, StoreError>) {
    match r {
        Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
        Err(e) => tracing::warn!("{what}: {e}"),
    }
}

fn deployments(cluster: &Cluster) {
    let store = &cluster.store;
    let all = store.list("pods/");
    let mut owned: HashMap<&str, Vec<&Pod>> = HashMap::new();
    for p in pods(&all) {
        if let Some(o) = &p.metadata.owner {
            owned.entry(o.uid.as_str()).or_default().push(p);
        }
    }
    for obj in store.list("deployments/") {
        let Object::Deployment(d) = &*obj else {
            continue;
        };
        let mine = owned.remove(d.metadata.uid.as_str()).unwrap_or_default();
        reconcile_deployment(cluster, &obj, d, mine);
    }
    // Pods whose owner is gone are garbage.
    for p in owned.into_values().flatten() {
        log_err(
            "collecting orphan",
            store.delete(&pod_key(p), Some(p.metadata.resource_version)),
        );
    }
}

fn pod_key(p: &Pod) -> String {
    flotilla_api::object::key(
        flotilla_api::Kind::Pod,
        &p.metadata.namespace,
        &p.metadata.name,
    )
}

fn reconcile_deployment(cluster: &Cluster, obj: &Object, d: &Deployment, pods: Vec<&Pod>) {
    let store = &cluster.store;
    let hash = template_hash(d);
    let mut current = Vec::new();
    for p in pods {
        let key = pod_key(p);
        if p.status.phase.is_terminal() {
            cluster.event(
                obj,
                EventType::Normal,
                "ReplacingPod",
                format!(
                    "pod {} ended {} ({}); replacing it",
                    p.metadata.name, p.status.phase, p.status.reason
                ),
            );
            log_err(
                "deleting finished pod",
                store.delete(&key, Some(p.metadata.resource_version)),
            );
        } else if p.metadata.labels.get(TEMPLATE_HASH_LABEL) != Some(&hash) {
            log_err(
                "deleting outdated pod",
                store.delete(&key, Some(p.metadata.resource_version)),
            );
        } else {
            current.push(p);
        }
    }
    let want = d.spec.replicas as usize;
    if current.len() > want {
        // Remove the least advanced, then the newest.
        current.sort_by_key(|p| {
            let rank = match p.status.phase {
                PodPhase::Pending => 0,
                PodPhase::Scheduled => 1,
                _ => 2,
            };
            (rank, std::cmp::Reverse(p.metadata.created_ms))
        });
        for p in current.drain(..current.len() - want) {
            log_err(
                "scaling down",
                store.delete(&pod_key(p), Some(p.metadata.resource_version)),
            );
        }
    }
    // The missing replicas in one store transaction.
    let new: Vec<(Object, Expect)> = (current.len()..want)
        .map(|_| (Object::Pod(new_pod(d, &hash)), Expect::Absent))
        .collect();
    let created = new.len();
    for r in store.put_many(new, WriteDurability::Lazy) {
        match r {
            Ok(pod) => cluster.event(
                obj,
                EventType::Normal,
                "CreatedPod",
                format!("created pod {}", pod.meta().name),
            ),
            Err(e) => tracing::warn!("creating pod for {}: {e}", d.metadata.name),
        }
    }
    let ready = current
        .iter()
        .filter(|p| p.status.phase == PodPhase::Running)
        .count() as u32;
    let status = flotilla_api::DeploymentStatus {
        replicas: (current.len() + created) as u32,
        ready,
        observed_generation: d.metadata.generation,
    };
    if status != d.status {
        let mut nd = d.clone();
        nd.status = status;
        log_err(
            "deployment status",
            store.put(
                Object::Deployment(nd),
                Expect::Version(d.metadata.resource_version),
                WriteDurability::Lazy,
            ),
        );
    }
}

fn new_pod(d: &Deployment, hash: &str) -> Pod {
    let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_string();
    let mut labels: Labels = d.spec.template.labels.clone();
    labels.insert(DEPLOYMENT_LABEL.into(), d.metadata.name.clone());
    labels.insert(TEMPLATE_HASH_LABEL.into(), hash.to_string());
    Pod {
        metadata: flotilla_api::ObjectMeta {
            name: format!("{}-{suffix}", d.metadata.name),
            namespace: d.metadata.namespace.clone(),
            labels,
            owner: Some(OwnerRef {
                kind: "Deployment".into(),
                name: d.metadata.name.clone(),
                uid: d.metadata.uid.clone(),
            }),
            ..Default::default()
        },
        spec: d.spec.template.spec.clone(),
        status: PodStatus::default(),
    }
}

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

fn schedule(cluster: &Cluster) {
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

fn nodes(cluster: &Cluster) {
    let now = Instant::now();
    // Nodes not heard from since this scheduler started get a grace period:
    // their agents may be deep in reconnect backoff after a long outage.
    let in_grace =
        now.duration_since(cluster.started) < cluster.cfg.node_timeout + AGENT_MAX_BACKOFF;
    let fresh: HashMap<String, bool> = cluster
        .last_seen
        .lock()
        .expect("poisoned")
        .iter()
        .map(|(n, t)| (n.clone(), now.duration_since(*t) < cluster.cfg.node_timeout))
        .collect();
    let mut dead = HashSet::new();
    for obj in cluster.store.list("nodes/") {
        let Object::Node(n) = &*obj else { continue };
        let alive = fresh.get(&n.metadata.name).copied().unwrap_or(in_grace);
        if !n.status.ready && !alive {
            dead.insert(n.metadata.name.clone());
        }
        // Level-triggered recovery: a connected node that is heard from again
        // is Ready, whatever a racing pass concluded before.
        if !n.status.ready
            && fresh.get(&n.metadata.name) == Some(&true)
            && cluster.connection(&n.metadata.name).is_some()
        {
            let mut nn = n.clone();
            nn.status.ready = true;
            let o = Object::Node(nn);
            cluster.event(
                &o,
                EventType::Normal,
                "NodeReady",
                format!("{} is heard from again", n.metadata.name),
            );
            log_err(
                "node status",
                cluster.store.put(
                    o,
                    Expect::Version(n.metadata.resource_version),
                    WriteDurability::Sync,
                ),
            );
            continue;
        }
        if n.status.ready && !alive {
            let mut nn = n.clone();
            nn.status.ready = false;
            let o = Object::Node(nn);
            cluster.event(
                &o,
                EventType::Warning,
                "NodeNotReady",
                format!(
                    "no heartbeat from {} for {} ms",
                    n.metadata.name,
                    cluster.cfg.node_timeout.as_millis()
                ),
            );
            log_err(
                "node status",
                cluster.store.put(
                    o,
                    Expect::Version(n.metadata.resource_version),
                    WriteDurability::Sync,
                ),
            );
            dead.insert(n.metadata.name.clone());
        }
    }
    evict(cluster, &dead);
}

/// Marks the pods of a NotReady node Lost: Deployments replace theirs on other
/// nodes; bare pods stay Lost (never silently re-run). If the node returns,
/// its agent is no longer sent them and stops them (fencing).
/// Marks the pods still bound to `dead` nodes Lost (one pass over the pods
/// for all of them).
fn evict(cluster: &Cluster, dead: &HashSet<String>) {
    if dead.is_empty() {
        return;
    }
    for obj in cluster.store.list("pods/") {
        let Object::Pod(p) = &*obj else { continue };
        let Some(node) = p.status.node.as_deref() else {
            continue;
        };
        if !dead.contains(node) || p.status.phase.is_terminal() {
            continue;
        }
        let mut np = p.clone();
        np.status.phase = PodPhase::Lost;
        np.status.reason = "NodeLost".into();
        np.status.message = format!("node {node} stopped responding");
        let o = Object::Pod(np);
        match cluster.store.put(
            o.clone(),
            Expect::Version(p.metadata.resource_version),
            WriteDurability::Sync,
        ) {
            Ok(_) => cluster.event(
                &o,
                EventType::Warning,
                "NodeLost",
                format!("node {node} stopped responding; pod marked Lost"),
            ),
            Err(e) => log_err("marking pod lost", Err::<(), _>(e)),
        }
    }
}
