//! Pod addresses outlive their pods until the node lets go of them: when a
//! pod with an address leaves the store (deleted, replaced), its address is
//! recorded in its Node's `status.releasing` and held — not handed to the
//! next pod — until the node's agent reports the pod gone with its network
//! (`Released`), or until [`QUARANTINE`] has passed (an agent that never
//! had the pod, or restarted, says nothing). A container that ignores
//! SIGTERM for its whole grace period so never shares its address with the
//! pod placed after it.
//!
//! The pass compares the holders it saw last time with the store, so an
//! address is noticed the first pass after its pod went; what it records is
//! in the store, so a scheduler restart keeps it.

use super::{log_err, pods};
use crate::cluster::Cluster;
use crate::store::{Expect, WriteDurability};
use flotilla_api::time::now_ms;
use flotilla_api::{Object, ReleasingAddress};
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest an address is held for a node that never confirms: the longest
/// grace period a container may have, and a margin.
pub const QUARANTINE: Duration =
    Duration::from_secs(flotilla_api::object::MAX_GRACE_PERIOD_SECS as u64 + 30);

/// A node's confirmation is kept this long waiting for the pass that
/// notices the pod's address went (it may come first).
const CONFIRMATION_KEPT: Duration = Duration::from_secs(120);

/// Most confirmations kept at once (a node sending `Released` for
/// made-up pods cannot grow the scheduler past this).
const MAX_CONFIRMATIONS: usize = 16_384;

/// An address holder: node and address → (pod uid, `namespace/name`).
pub type Holders = HashMap<(String, Ipv4Addr), (String, String)>;

/// What the pass remembers between runs.
#[derive(Default)]
pub struct AddressBook {
    /// Holders seen by the last pass.
    last: Option<Holders>,
    /// Addresses whose pods went, not yet recorded (their node's write failed).
    unrecorded: Vec<((String, Ipv4Addr), (String, String))>,
    /// (node, pod uid) the node confirmed gone, and when.
    confirmed: HashMap<(String, String), Instant>,
}

impl AddressBook {
    /// `node` reports the pod `uid` gone with its network. Ignored for a
    /// uid no scheduler made (over 64 bytes) and while the book is full.
    pub fn confirm(&mut self, node: &str, uid: &str) {
        if uid.len() > 64 {
            return;
        }
        if self.confirmed.len() >= MAX_CONFIRMATIONS {
            self.confirmed
                .retain(|_, at| at.elapsed() < Duration::from_secs(10));
            if self.confirmed.len() >= MAX_CONFIRMATIONS {
                return;
            }
        }
        self.confirmed
            .insert((node.to_string(), uid.to_string()), Instant::now());
    }
}

/// Records addresses whose pods went, forgets confirmed and expired ones;
/// returns, per node, the addresses still held for pods that went.
pub(super) fn track(cluster: &Cluster, all: &[Arc<Object>]) -> HashMap<String, HashSet<Ipv4Addr>> {
    let mut holders: Holders = HashMap::new();
    for p in pods(all) {
        if let (Some(n), Ok(ip)) = (&p.status.node, p.status.pod_ip.parse::<Ipv4Addr>()) {
            holders.insert(
                (n.clone(), ip),
                (
                    p.metadata.uid.clone(),
                    format!("{}/{}", p.metadata.namespace, p.metadata.name),
                ),
            );
        }
    }
    let mut book = cluster.addresses.lock().expect("poisoned");
    let mut gone = std::mem::take(&mut book.unrecorded);
    if let Some(last) = &book.last {
        gone.extend(
            last.iter()
                .filter(|(k, (uid, _))| holders.get(*k).map(|h| &h.0) != Some(uid))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    book.last = Some(holders);
    book.confirmed
        .retain(|_, at| at.elapsed() < CONFIRMATION_KEPT);
    let now = now_ms();
    let quarantine_ms = QUARANTINE.as_millis() as u64;
    let mut held: HashMap<String, HashSet<Ipv4Addr>> = HashMap::new();
    let mut writes = Vec::new();
    let mut written_for = Vec::new();
    for obj in cluster.store.list("nodes/") {
        let Object::Node(n) = &*obj else { continue };
        let name = &n.metadata.name;
        let mut list = n.status.releasing.clone();
        for ((node, ip), (uid, pod)) in &gone {
            if node == name && !list.iter().any(|r| &r.uid == uid) {
                list.push(ReleasingAddress {
                    ip: ip.to_string(),
                    pod: pod.clone(),
                    uid: uid.clone(),
                    since_ms: now,
                });
            }
        }
        list.retain(|r| {
            !book.confirmed.contains_key(&(name.clone(), r.uid.clone()))
                && now.saturating_sub(r.since_ms) < quarantine_ms
        });
        held.insert(
            name.clone(),
            list.iter().filter_map(|r| r.ip.parse().ok()).collect(),
        );
        if list != n.status.releasing {
            let mut nn = n.clone();
            nn.status.releasing = list;
            writes.push((
                Object::Node(nn),
                Expect::Version(n.metadata.resource_version),
            ));
            written_for.push(name.clone());
        }
    }
    if !writes.is_empty() {
        for (r, node) in cluster
            .store
            .put_many(writes, WriteDurability::Lazy)
            .into_iter()
            .zip(written_for)
        {
            if r.is_err() {
                // Raced with another write of the node: recorded next pass.
                book.unrecorded
                    .extend(gone.iter().filter(|((n, _), _)| *n == node).cloned());
            }
            log_err("recording releasing addresses", r);
        }
    }
    held
}
