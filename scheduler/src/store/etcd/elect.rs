//! Leader election on etcd, for several schedulers on one store.
//!
//! The leader key (`<prefix without its slash>.leader`, outside the objects'
//! range) holds the leader's [`Candidate`] and is attached to a lease of
//! [`LEASE_TTL`] that the leader renews every [`RENEW_EVERY`]. A candidate
//! wins by creating the key in a transaction (`create_revision == 0`); the
//! key's creation revision is its term. While it leads, every write of the
//! store also compares the leader key's creation revision with the term
//! (the fence), so once the lease has expired — the leader was killed, or
//! cut off from etcd — no write of the old leader can land, even one it
//! sends before it notices.
//!
//! Timing: a leader that has had no renewal answered for
//! [`STEP_DOWN_AFTER`] steps down by itself (before etcd can expire the
//! lease, so it never acts past its term). Followers watch the key and
//! campaign as soon as it is deleted. A leader killed with SIGKILL is
//! replaced once etcd expires its lease: at most `LEASE_TTL` after its last
//! renewal plus etcd's expiry check (500 ms) and a campaign; a leader that
//! shuts down revokes its lease, and another takes over at once.

use super::{EtcdStore, Fence};
use crate::leader::{Candidate, Leadership, Role};
use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Lifetime of the leader's lease.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often the leader renews it.
pub const RENEW_EVERY: Duration = Duration::from_millis(500);
/// With no renewal answered for this long, the leader steps down (a second
/// before etcd could expire the lease).
pub const STEP_DOWN_AFTER: Duration = Duration::from_secs(2);
/// A follower checks the key again at least this often, even if its watch
/// reported nothing.
const RECHECK: Duration = Duration::from_secs(5);

/// The leader key for the store under `prefix`.
pub fn leader_key(prefix: &str) -> String {
    format!("{}.leader", prefix.trim_end_matches('/'))
}

impl EtcdStore {
    /// Takes part in elections as `me` until `shutdown`, keeping
    /// `leadership` (and this store's fence) up to date. Returns at once;
    /// the work runs on the store's runtime (the handle says when it ended).
    pub fn campaign(
        &self,
        me: Candidate,
        leadership: Leadership,
        shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let election = Election {
            client: self.client.clone(),
            key: leader_key(&self.prefix),
            value: serde_json::to_string(&me).expect("a candidate serializes"),
            fence: self.fence.clone(),
            fence_lost: self.fence_lost.clone(),
            leadership,
        };
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        rt.spawn(election.run(shutdown))
    }
}

struct Election {
    client: Client,
    key: String,
    value: String,
    fence: std::sync::Arc<std::sync::Mutex<Option<Fence>>>,
    fence_lost: std::sync::Arc<watch::Sender<i64>>,
    leadership: Leadership,
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// How a term ended.
enum Ended {
    Shutdown,
    Lost(String),
}

impl Election {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let outcome = tokio::select! {
                r = self.campaign_once() => r,
                _ = stopping(&mut shutdown) => return,
            };
            match outcome {
                Ok(Some((lease, term))) => {
                    backoff = Duration::from_millis(100);
                    *self.fence.lock().expect("poisoned") = Some(Fence {
                        key: self.key.clone(),
                        term,
                    });
                    tracing::info!(term, "this scheduler leads");
                    self.leadership.set(Role::Leader { term: term as u64 });
                    let ended = self.lead(lease, term, &mut shutdown).await;
                    // The fence stays at the term that ended: a write of a
                    // controller pass still under way fails rather than
                    // lands unfenced (a follower writes nothing of its own).
                    if let Ended::Lost(why) = &ended {
                        tracing::warn!(term, "stepped down: {why}");
                        self.leadership.set(Role::Follower { leader: None });
                    }
                    // Hand over at once rather than when the lease expires.
                    let mut c = self.client.clone();
                    let _ = tokio::time::timeout(RENEW_EVERY, c.lease_revoke(lease)).await;
                    if let Ended::Shutdown = ended {
                        self.leadership.set(Role::Follower { leader: None });
                        return;
                    }
                }
                Ok(None) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!("leader election: {e}; trying again");
                    self.leadership.set(Role::Follower { leader: None });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopping(&mut shutdown) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One attempt: `Some((lease, term))` if this scheduler won; `None`
    /// once the leader it followed is gone (or a recheck is due).
    async fn campaign_once(&self) -> Result<Option<(i64, i64)>, etcd_client::Error> {
        let mut c = self.client.clone();
        let lease = c.lease_grant(LEASE_TTL.as_secs() as i64, None).await?.id();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                self.key.clone(),
                self.value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(self.key.clone(), None)]);
        let resp = match c.txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                let _ = c.lease_revoke(lease).await;
                return Err(e);
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            return Ok(Some((lease, revision)));
        }
        let _ = c.lease_revoke(lease).await;
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let Some(kv) = current else {
            // Deleted between the compare and the read: campaign again.
            return Ok(None);
        };
        let leader: Option<Candidate> = serde_json::from_slice(kv.value()).ok();
        self.leadership.set(Role::Follower { leader });
        // Follow until the key is deleted (or changes hands).
        let mut events = c
            .watch(
                self.key.clone(),
                Some(WatchOptions::new().with_start_revision(revision + 1)),
            )
            .await?;
        let deadline = Instant::now() + RECHECK;
        loop {
            let msg = tokio::select! {
                m = events.message() => m?,
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
            };
            let Some(msg) = msg else { return Ok(None) };
            for ev in msg.events() {
                match ev.event_type() {
                    EventType::Delete => return Ok(None),
                    EventType::Put => {
                        let leader = ev
                            .kv()
                            .and_then(|kv| serde_json::from_slice::<Candidate>(kv.value()).ok());
                        self.leadership.set(Role::Follower { leader });
                    }
                }
            }
        }
    }

    /// Leads until the term ends: renewals stop being answered, the key
    /// is gone or another's, a fenced write found it so, or shutdown.
    async fn lead(&self, lease: i64, term: i64, shutdown: &mut watch::Receiver<bool>) -> Ended {
        let mut c = self.client.clone();
        let (mut keeper, mut answers) = match c.lease_keep_alive(lease).await {
            Ok(k) => k,
            Err(e) => return Ended::Lost(format!("cannot renew the lease: {e}")),
        };
        let mut events = match c
            .watch(
                self.key.clone(),
                Some(WatchOptions::new().with_start_revision(term + 1)),
            )
            .await
        {
            Ok(w) => w,
            Err(e) => return Ended::Lost(format!("cannot watch the leader key: {e}")),
        };
        // Fenced writes from now on (the current value, from an earlier
        // term, counts as seen).
        let mut lost = self.fence_lost.subscribe();
        let mut renew = tokio::time::interval(RENEW_EVERY);
        // When the renewal last answered was sent, and those in flight.
        let mut renewed = Instant::now();
        let mut sent: std::collections::VecDeque<Instant> = Default::default();
        loop {
            let step_down = renewed + STEP_DOWN_AFTER;
            tokio::select! {
                _ = renew.tick() => {
                    sent.push_back(Instant::now());
                    if sent.len() > 16 {
                        sent.pop_front();
                    }
                    if let Err(e) = keeper.keep_alive().await {
                        tracing::debug!("lease renewal not sent: {e}");
                    }
                }
                a = answers.message() => match a {
                    Ok(Some(a)) if a.ttl() > 0 => {
                        if let Some(at) = sent.pop_front() {
                            renewed = renewed.max(at);
                        }
                    }
                    Ok(Some(_)) => return Ended::Lost("the lease expired".into()),
                    Ok(None) => return Ended::Lost("the lease renewal stream ended".into()),
                    Err(e) => return Ended::Lost(format!("lease renewal failed: {e}")),
                },
                m = events.message() => match m {
                    Ok(Some(m)) => {
                        for ev in m.events() {
                            let ours = ev.kv().is_some_and(|kv| kv.create_revision() == term);
                            if ev.event_type() == EventType::Delete || !ours {
                                return Ended::Lost("the leader key was deleted".into());
                            }
                        }
                    }
                    Ok(None) | Err(_) => {
                        return Ended::Lost("the watch of the leader key ended".into());
                    }
                },
                _ = lost.changed() => {
                    return Ended::Lost("a write found the term over".into());
                }
                _ = tokio::time::sleep_until(step_down) => {
                    return Ended::Lost(format!(
                        "no lease renewal answered for {} s",
                        STEP_DOWN_AFTER.as_secs()
                    ));
                }
                _ = stopping(shutdown) => return Ended::Shutdown,
            }
        }
    }
}

/// What every scheduler of one store must share, recorded by the first.
#[derive(serde::Serialize, serde::Deserialize)]
struct ClusterIdentity {
    /// The cluster CA's certificate: agents and clients trust one CA
    /// whichever scheduler they reach.
    ca_pem: String,
    /// A value sealed with the Secrets key: the others must open it.
    probe: Vec<u8>,
}

const PROBE: &[u8] = b"flotilla cluster identity";

impl EtcdStore {
    /// Records this scheduler's CA and Secrets key as the store's if it is
    /// the first, else checks that they are the ones recorded: schedulers
    /// of one store must share `pki/` and `secrets.key` (copied from the
    /// first one's data dir).
    pub fn check_identity(&self, ca_pem: &str) -> Result<(), crate::store::StoreError> {
        use crate::store::StoreError;
        let key = format!("{}.cluster", self.prefix.trim_end_matches('/'));
        let probe = match &self.sealer {
            Some(s) => s
                .seal(&key, PROBE)
                .map_err(|e| StoreError::Backend(e.to_string()))?,
            None => Vec::new(),
        };
        let ours = serde_json::to_vec(&ClusterIdentity {
            ca_pem: ca_pem.to_string(),
            probe,
        })
        .expect("serializes");
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(key.clone(), ours, None)])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let resp = self.txn(txn)?;
        if resp.succeeded() {
            return Ok(());
        }
        let theirs = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .ok_or_else(|| StoreError::Backend(format!("{key} vanished; start again")))?;
        let theirs: ClusterIdentity =
            serde_json::from_slice(&theirs).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                why: e.to_string(),
            })?;
        let copy = "schedulers sharing one store must share the cluster CA and Secrets key: copy pki/ and secrets.key from the data dir of the scheduler that started first";
        if theirs.ca_pem.trim() != ca_pem.trim() {
            return Err(StoreError::Backend(format!(
                "this scheduler's cluster CA is not the one the other schedulers of this store use; {copy}"
            )));
        }
        if let Some(s) = &self.sealer
            && !theirs.probe.is_empty()
            && s.open(&key, &theirs.probe).is_err()
        {
            return Err(StoreError::Backend(format!(
                "this scheduler's Secrets key cannot open what the other schedulers of this store sealed; {copy}"
            )));
        }
        Ok(())
    }
}
