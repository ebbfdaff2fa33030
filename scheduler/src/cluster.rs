//! Shared scheduler state: the store, events, and live agent sessions.

use crate::audit::Audit;
use crate::auth::FailureLimiter;
use crate::events::{EventLog, Subject};
use crate::store::Store;
use flotilla_api::{EventType, Object};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Scheduler settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub data_dir: PathBuf,
    /// A node with no heartbeat for this long is NotReady.
    pub node_timeout: Duration,
    /// Heartbeat interval agents are told to use.
    pub heartbeat: Duration,
    /// Lifetime of node certificates issued at join and renewal.
    pub node_cert_ttl: Duration,
    /// The cluster's pod addresses, split into one block per node.
    pub pod_cidr: crate::ipam::Cidr,
    /// How long an uploaded module nothing references is kept.
    pub blob_grace: Duration,
    /// Serve nodes the registry artifacts and images of their pods from this
    /// scheduler's cache, pulling what it lacks (`--pull-through`).
    pub pull_through: bool,
    /// The node ports services may ask for.
    pub node_ports: flotilla_api::net::PortRange,
    /// How registries are reached when references are resolved at apply
    /// and by the site cache (`--registry-config`).
    pub registries: Arc<flotilla_registry::config::RegistryConfig>,
}

/// Registers the name `node` for a machine that is about to get its
/// certificate (at join, or when the scheduler issues one itself):
/// `Ok(false)` if the name is taken — a name is one machine's until an
/// admin deletes the node.
pub fn admit_node(store: &dyn Store, node: &str) -> Result<bool, crate::store::StoreError> {
    let n = flotilla_api::Node {
        metadata: flotilla_api::ObjectMeta {
            name: node.to_string(),
            ..Default::default()
        },
        ..Default::default()
    };
    match store.put(
        Object::Node(n),
        crate::store::Expect::Absent,
        crate::store::WriteDurability::Sync,
    ) {
        Ok(_) => Ok(true),
        Err(crate::store::StoreError::AlreadyExists(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// An agent's live connection.
pub struct Session {
    pub id: u64,
    pub conn: quinn::Connection,
    pub epoch: u64,
    /// Store changes of this node's pods, routed by the dispatcher.
    pub feed: tokio::sync::mpsc::UnboundedSender<Feed>,
}

/// What the dispatcher hands an agent session.
pub enum Feed {
    /// A change to a pod bound to the session's node.
    Change(crate::store::WatchEvent),
    /// Changes were missed: send the node's whole desired set again.
    Resync,
}

/// When the autoscale controller last looked, and each autoscaler's
/// recent recommendations `(ms, replicas)` by uid.
pub type AutoscaleMemory = (Option<Instant>, HashMap<String, Vec<(u64, u32)>>);

pub struct Cluster {
    pub store: Arc<dyn Store>,
    /// The keys Secrets are sealed with on disk (set once at start; unset
    /// in tests that keep the store plain).
    pub sealer: std::sync::OnceLock<Arc<flotilla_api::seal::Sealer>>,
    /// Uploaded modules (`<data>/blobs`), by digest.
    pub blobs: flotilla_api::content::ContentStore,
    pub events: EventLog,
    pub sessions: Mutex<HashMap<String, Session>>,
    /// When each node was last heard from. Kept across disconnects: a node is
    /// NotReady only after `node_timeout` of silence, not on a brief reconnect.
    pub last_seen: Mutex<HashMap<String, Instant>>,
    /// Addresses of gone pods until their nodes let go of them.
    pub addresses: Mutex<crate::controllers::addresses::AddressBook>,
    /// Recent ends of each node's sessions and why (see [`LinkDrops`]).
    pub link_drops: Mutex<HashMap<String, LinkDrops>>,
    pub cfg: ClusterConfig,
    /// Wakes the controllers (besides store changes).
    pub kick: Notify,
    /// Authentication failures per peer (rate limit).
    pub auth_failures: FailureLimiter,
    pub audit: Audit,
    /// The cluster CA, for issuing user certificates (set by the server).
    pub ca: Option<Arc<crate::pki::ClusterCa>>,
    /// When this scheduler started: agents get `node_timeout` to reconnect
    /// before their nodes can be declared NotReady.
    pub started: Instant,
    /// Pod status reports from agents, waiting to be written in one batch.
    pub reports: Mutex<Vec<StatusReport>>,
    /// What nodes and members use, as agents last reported it.
    pub usage: crate::usage::UsageBook,
    /// The autoscale controller's memory: when it last looked, and each
    /// autoscaler's recent recommendations `(ms, replicas)` by uid.
    pub autoscale: Mutex<AutoscaleMemory>,
    /// When each Function last had a request (for scale to zero).
    pub function_activity: Mutex<crate::controllers::functions::Activity>,
    /// Admission (and scheduler) plugins' engine and compiled components.
    pub plugins: crate::plugins::Plugins,
    /// Members' `wasi:keyvalue` buckets (`<data>/kv.redb`).
    pub kv: crate::kv::Buckets,
    /// Wakes the status writer.
    pub reported: Notify,
    /// Serializes registrations that hand out node address blocks.
    pub ipam: Mutex<()>,
    /// Which node holds each pod address block (by the block's first
    /// address), for relaying tunnelled packets.
    pub blocks: Mutex<HashMap<u32, String>>,
    /// The service table agents get (published by the services controller).
    pub services: tokio::sync::watch::Sender<Arc<Vec<flotilla_api::proto::ServiceView>>>,
    /// Bridged nodes' blocks and addresses, for agents' direct routes.
    /// Tunnelled packets dropped because their source was not in the
    /// sending node's block.
    pub spoofed_datagrams: std::sync::atomic::AtomicU64,
    /// Whether the relay checks tunnelled packets' sources (always, but for
    /// the benchmark that measures what the check costs).
    pub tunnel_source_check: std::sync::atomic::AtomicBool,
    /// Held while a service's node ports are checked and written, so two
    /// services never get the same one.
    pub node_port_claims: Mutex<()>,
    /// Held while a write is checked against its namespace's quotas and
    /// made, so two writes cannot both take the last of a quota; holds
    /// what each namespace claims.
    pub quota_claims: Mutex<crate::kinds::quota::Usage>,
    /// The site's artifact cache, with `pull_through`.
    pub mirror: Option<crate::mirror::Mirror>,
    pub peers: tokio::sync::watch::Sender<Arc<Vec<flotilla_api::proto::Peer>>>,
    /// The two tables above, encoded once for every session.
    pub table_frames: Arc<crate::outbox::TableFrames>,
    /// Whether this scheduler leads (always, unless several share an etcd
    /// store): only the leader runs controllers and keeps agents' links.
    pub leadership: crate::leader::Leadership,
}

/// A link is flapping when its sessions ended this many times …
pub const FLAP_DROPS: usize = 3;
/// … within this long.
pub const FLAP_WINDOW: Duration = Duration::from_secs(60);

/// When a node's recent sessions ended, and why the last one did.
#[derive(Debug, Default)]
pub struct LinkDrops {
    times: std::collections::VecDeque<Instant>,
    last: String,
}

impl LinkDrops {
    pub fn record(&mut self, at: Instant, why: String) {
        self.times.push_back(at);
        while self.times.len() > FLAP_DROPS * 4 {
            self.times.pop_front();
        }
        self.last = why;
    }

    /// What `NodeStatus::link` says at `now`: empty while the link is
    /// stable, else how often it dropped and the last reason.
    pub fn condition(&self, now: Instant) -> String {
        let recent = self
            .times
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < FLAP_WINDOW)
            .count();
        if recent < FLAP_DROPS {
            return String::new();
        }
        format!(
            "flapping: the link dropped {recent} times in the last {} s; last: {}",
            FLAP_WINDOW.as_secs(),
            self.last
        )
    }
}

/// A pod's status as its node reported it.
pub struct StatusReport {
    pub node: String,
    pub key: String,
    pub uid: String,
    pub report: flotilla_api::AgentReport,
}

/// A cluster for unit tests: `store`, blobs and data under `dir`, short
/// node timeouts, no CA.
#[cfg(test)]
pub(crate) fn for_tests(store: Arc<dyn Store>, dir: &std::path::Path) -> Arc<Cluster> {
    Cluster::new(
        store,
        flotilla_api::content::ContentStore::open(dir.join("blobs")).unwrap(),
        ClusterConfig {
            data_dir: dir.to_path_buf(),
            node_timeout: Duration::from_secs(3),
            heartbeat: Duration::from_millis(500),
            node_cert_ttl: Duration::from_secs(3600),
            pod_cidr: crate::ipam::DEFAULT_POD_CIDR,
            blob_grace: Duration::from_secs(3600),
            pull_through: false,
            node_ports: flotilla_api::net::DEFAULT_NODE_PORTS,
            registries: Default::default(),
        },
        None,
    )
}

impl Cluster {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: flotilla_api::content::ContentStore,
        cfg: ClusterConfig,
        ca: Option<Arc<crate::pki::ClusterCa>>,
    ) -> Arc<Cluster> {
        Arc::new(Cluster {
            kv: crate::kv::Buckets::new(cfg.data_dir.join("kv.redb")),
            sealer: std::sync::OnceLock::new(),
            store,
            blobs,
            events: EventLog::new(2048),
            sessions: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(HashMap::new()),
            link_drops: Mutex::new(HashMap::new()),
            addresses: Mutex::default(),
            auth_failures: FailureLimiter::new(10, Duration::from_secs(60)),
            audit: Audit::new(cfg.data_dir.join("audit.log")),
            ca,
            started: Instant::now(),
            mirror: cfg
                .pull_through
                .then(|| crate::mirror::Mirror::new(cfg.registries.clone())),
            spoofed_datagrams: std::sync::atomic::AtomicU64::new(0),
            tunnel_source_check: std::sync::atomic::AtomicBool::new(true),
            node_port_claims: Mutex::new(()),
            quota_claims: Mutex::new(Default::default()),
            cfg,
            kick: Notify::new(),
            reports: Mutex::new(Vec::new()),
            usage: Default::default(),
            autoscale: Mutex::default(),
            function_activity: Mutex::default(),
            plugins: Default::default(),
            reported: Notify::new(),
            ipam: Mutex::new(()),
            blocks: Mutex::new(HashMap::new()),
            services: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
            peers: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
            table_frames: Arc::default(),
            leadership: Default::default(),
        })
    }

    /// Records an event about a stored object.
    pub fn event(&self, obj: &Object, type_: EventType, reason: &str, message: String) {
        let m = obj.meta();
        self.events.record(
            &Subject {
                kind: obj.kind(),
                namespace: &m.namespace,
                name: &m.name,
                uid: &m.uid,
            },
            type_,
            reason,
            message,
        );
    }

    /// Notes that `node` was heard from now.
    pub fn touch(&self, node: &str) {
        self.last_seen
            .lock()
            .expect("poisoned")
            .insert(node.to_string(), Instant::now());
    }

    /// Notes that a session of `node` ended, and why.
    pub fn link_dropped(&self, node: &str, why: String) {
        self.link_drops
            .lock()
            .expect("poisoned")
            .entry(node.to_string())
            .or_default()
            .record(Instant::now(), why);
        self.kick.notify_one();
    }

    /// The live connection to `node`'s agent, if any.
    /// See [`admit_node`].
    pub fn admit_node(&self, node: &str) -> Result<bool, crate::store::StoreError> {
        admit_node(self.store.as_ref(), node)
    }

    pub fn connection(&self, node: &str) -> Option<quinn::Connection> {
        self.sessions
            .lock()
            .expect("poisoned")
            .get(node)
            .map(|s| s.conn.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_flapping_after_three_drops_within_the_window_and_stable_after_it() {
        let t0 = Instant::now();
        let mut d = LinkDrops::default();
        d.record(t0, "reset".into());
        d.record(t0 + Duration::from_secs(1), "reset".into());
        assert_eq!(d.condition(t0 + Duration::from_secs(2)), "");
        d.record(
            t0 + Duration::from_secs(2),
            "closed by peer: frame of 5000000 bytes exceeds the 4194304-byte limit".into(),
        );
        let c = d.condition(t0 + Duration::from_secs(3));
        assert_eq!(
            c,
            "flapping: the link dropped 3 times in the last 60 s; last: closed by peer: frame of 5000000 bytes exceeds the 4194304-byte limit"
        );
        // Drops older than the window no longer count.
        assert_eq!(d.condition(t0 + FLAP_WINDOW + Duration::from_secs(1)), "");
        // Old drops are not kept without bound.
        for i in 0..100 {
            d.record(t0 + Duration::from_millis(i), "x".into());
        }
        assert_eq!(d.times.len(), FLAP_DROPS * 4);
    }
}
