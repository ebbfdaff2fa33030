//! Level-triggered controllers: each pass reads desired and observed state
//! from the store and acts; none depends on seeing every event.
//!
//! - deployments: keep `replicas` pods per Deployment, replace finished ones,
//!   roll a changed template out within the strategy's limits (`rollout`),
//!   keep revisions and the rollout's condition, collect orphans;
//! - functions: each Function's Deployment (its pods serve the component
//!   per request) and Service, owned by it and collected with it;
//! - autoscale: each Autoscaler's Deployment scaled on what its pods use
//!   (at most once a second);
//! - jobs: run Jobs' pods to completion in `after` order, and scheduled
//!   Jobs' runs at their times;
//! - placement: bind Pending pods to nodes, or say why they cannot be;
//! - nodes: mark nodes without a recent heartbeat NotReady;
//! - addresses (run by placement): hold a gone pod's address until its node
//!   lets go of it.

pub mod addresses;
mod autoscale;
mod deployments;
pub mod functions;
pub mod jobs;
mod nodes;
pub mod rollout;
mod schedule;
pub mod services;

pub use deployments::template_hash;
pub use schedule::allocated;

use crate::cluster::Cluster;
use crate::store::StoreError;
use flotilla_api::{Object, Pod};
use std::sync::Arc;
use std::time::Duration;
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
    let mut role = cluster.leadership.subscribe();
    loop {
        // Only the leader acts (several schedulers may share the store).
        if !cluster.leadership.is_leader() {
            tokio::select! {
                _ = role.wait_for(|r| matches!(r, crate::leader::Role::Leader { .. })) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            // Whatever happened while following is in the store: drop the
            // backlog of changes and start with a full pass.
            use tokio::sync::broadcast::error::TryRecvError;
            while matches!(changes.try_recv(), Ok(_) | Err(TryRecvError::Lagged(_))) {}
        }
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
    autoscale::autoscale(cluster);
    functions::functions(cluster);
    deployments::deployments(cluster);
    jobs::jobs(cluster);
    schedule::schedule(cluster);
    nodes::nodes(cluster);
    services::reconcile(cluster);
    services::publish_peers(cluster);
}

/// The pods among stored objects, borrowed (a pass never clones what it only reads).
pub(crate) fn pods(objs: &[Arc<Object>]) -> impl Iterator<Item = &Pod> {
    objs.iter().filter_map(|o| match &**o {
        Object::Pod(p) => Some(p),
        _ => None,
    })
}

pub(crate) fn log_err(what: &str, r: Result<impl Sized, StoreError>) {
    match r {
        Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
        Err(e) => tracing::warn!("{what}: {e}"),
    }
}
