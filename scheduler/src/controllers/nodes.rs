//! The node controller: nodes without a recent heartbeat are NotReady and
//! their pods Lost (Deployments replace theirs).

use super::{AGENT_MAX_BACKOFF, log_err};
use crate::cluster::Cluster;
use crate::store::{Expect, WriteDurability};
use flotilla_api::{EventType, Object, PodPhase};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

pub(super) fn nodes(cluster: &Cluster) {
    let now = Instant::now();
    // Nodes not heard from since this scheduler started leading get a grace
    // period: their agents may be deep in reconnect backoff after a long
    // outage, or still linked to the old leader.
    let since = cluster
        .leadership
        .leading_since()
        .map_or(cluster.started, |l| l.max(cluster.started));
    let in_grace = now.duration_since(since) < cluster.cfg.node_timeout + AGENT_MAX_BACKOFF;
    let fresh: HashMap<String, bool> = cluster
        .last_seen
        .lock()
        .expect("poisoned")
        .iter()
        .map(|(n, t)| (n.clone(), now.duration_since(*t) < cluster.cfg.node_timeout))
        .collect();
    let links: HashMap<String, String> = cluster
        .link_drops
        .lock()
        .expect("poisoned")
        .iter()
        .map(|(n, d)| (n.clone(), d.condition(now)))
        .collect();
    let mut dead = HashSet::new();
    for obj in cluster.store.list("nodes/") {
        let Object::Node(n) = &*obj else { continue };
        // One write per node and pass, whatever changed.
        let mut nn = n.clone();
        let mut events: Vec<(EventType, &str, String)> = Vec::new();
        let link = links.get(&n.metadata.name).cloned().unwrap_or_default();
        if link != n.status.link {
            match (n.status.link.is_empty(), link.is_empty()) {
                (true, false) => events.push((EventType::Warning, "LinkFlapping", link.clone())),
                (false, true) => events.push((
                    EventType::Normal,
                    "LinkStable",
                    format!("{}'s link is stable again", n.metadata.name),
                )),
                // Still flapping: the count and last reason are refreshed.
                _ => {}
            }
            nn.status.link = link;
        }
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
            nn.status.ready = true;
            events.push((
                EventType::Normal,
                "NodeReady",
                format!("{} is heard from again", n.metadata.name),
            ));
        } else if n.status.ready && !alive {
            nn.status.ready = false;
            events.push((
                EventType::Warning,
                "NodeNotReady",
                format!(
                    "no heartbeat from {} for {} ms",
                    n.metadata.name,
                    cluster.cfg.node_timeout.as_millis()
                ),
            ));
            dead.insert(n.metadata.name.clone());
        }
        if nn == *n {
            continue;
        }
        let o = Object::Node(nn);
        for (type_, reason, message) in events {
            cluster.event(&o, type_, reason, message);
        }
        log_err(
            "node status",
            cluster.store.put(
                o,
                Expect::Version(n.metadata.resource_version),
                WriteDurability::Sync,
            ),
        );
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
