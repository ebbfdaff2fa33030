//! Simulated agents: many nodes in one process, each with its own real QUIC
//! connection, certificate and heartbeats, but no workloads. A pod assigned
//! to a simulated node is reported Running at once. For scale tests of the
//! scheduler (`flotilla simulate`).

use crate::link::LinkConfig;
use crate::link::client::{self, ClientConfig, Workloads};
use crate::link::join::{self, JoinError, JoinToken};
use crate::logs::LogPaths;
use crate::pod::PodNews;
use flotilla_api::proto::{LogRequest, NodeInfo, SchedulerMsg};
use flotilla_api::time::now_ms;
use flotilla_api::{Capacity, Labels, MemberState, MemberStatus, PodPhase, PodStatus};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Settings of a fleet of simulated agents.
#[derive(Clone)]
pub struct SimConfig {
    pub server: SocketAddr,
    pub token: JoinToken,
    /// How many nodes; they are named `{prefix}-{index:05}`.
    pub count: usize,
    pub prefix: String,
    pub capacity: Capacity,
    pub labels: Labels,
    pub link: LinkConfig,
    /// Joins in flight at once.
    pub join_parallelism: usize,
}

/// A pod on a simulated node: nothing runs, the status says Running.
struct SimPod {
    status: PodStatus,
    on_disconnect: flotilla_api::OnDisconnect,
}

/// The [`Workloads`] of one simulated node.
pub struct SimNode {
    pods: HashMap<String, SimPod>,
    status_tx: mpsc::UnboundedSender<PodNews>,
}

impl SimNode {
    fn new(status_tx: mpsc::UnboundedSender<PodNews>) -> SimNode {
        SimNode {
            pods: HashMap::new(),
            status_tx,
        }
    }

    fn assign(&mut self, a: flotilla_api::proto::Assignment) {
        if self.pods.contains_key(&a.uid) {
            return;
        }
        let now = now_ms();
        let status = PodStatus {
            phase: PodPhase::Running,
            members: a
                .spec
                .members
                .iter()
                .map(|m| MemberStatus {
                    name: m.name.clone(),
                    state: MemberState::Running { since_ms: now },
                    restarts: 0,
                    last_termination: None,
                    ready: None,
                })
                .collect(),
            started_ms: now,
            ..PodStatus::default()
        };
        let _ = self
            .status_tx
            .send(PodNews::Status(a.uid.clone(), status.clone()));
        self.pods.insert(
            a.uid,
            SimPod {
                status,
                on_disconnect: a.spec.on_disconnect,
            },
        );
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }
}

impl Workloads for SimNode {
    fn handle(&mut self, msg: SchedulerMsg) {
        match msg {
            SchedulerMsg::Sync { pods, .. } => {
                let wanted: std::collections::HashSet<String> =
                    pods.iter().map(|a| a.uid.clone()).collect();
                self.pods.retain(|uid, _| wanted.contains(uid));
                for a in pods {
                    self.assign(a);
                }
            }
            SchedulerMsg::Assign(a) => self.assign(a),
            SchedulerMsg::Unassign { uid } => {
                self.pods.remove(&uid);
            }
            _ => {}
        }
    }

    fn statuses(&self) -> Vec<(String, PodStatus)> {
        self.pods
            .iter()
            .map(|(uid, p)| (uid.clone(), p.status.clone()))
            .collect()
    }

    fn log_paths(&self, _req: &LogRequest) -> Result<LogPaths, String> {
        Err("this is a simulated node: its pods write no logs".into())
    }

    fn lease_expired(&mut self) {
        self.pods.retain(|_, p| p.on_disconnect.is_keep());
    }
}

/// A running fleet of simulated agents.
pub struct SimFleet {
    /// How long each node's join took (TLS + CSR + signed certificate), in order.
    pub join_times: Vec<Duration>,
    pub nodes: Vec<Arc<Mutex<SimNode>>>,
    shutdown: watch::Sender<bool>,
    links: Vec<tokio::task::JoinHandle<Result<(), client::ClientError>>>,
}

impl SimFleet {
    /// Pods held by all simulated nodes together.
    pub fn pod_count(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| n.lock().expect("poisoned").pod_count())
            .sum()
    }

    /// Closes every link.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for l in self.links {
            let _ = l.await;
        }
    }
}

/// Node name of simulated node `i`.
pub fn node_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:05}")
}

/// Joins `cfg.count` nodes (with `join_parallelism` joins in flight) and
/// starts each node's link as soon as it has joined. `progress` is called
/// after each join with the number joined so far.
pub async fn start(cfg: SimConfig, mut progress: impl FnMut(usize)) -> Result<SimFleet, JoinError> {
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut fleet = SimFleet {
        join_times: Vec::with_capacity(cfg.count),
        nodes: Vec::with_capacity(cfg.count),
        shutdown,
        links: Vec::with_capacity(cfg.count),
    };
    let mut joins = tokio::task::JoinSet::new();
    let mut next = 0;
    while fleet.join_times.len() < cfg.count {
        while next < cfg.count && joins.len() < cfg.join_parallelism.max(1) {
            let (server, token, name) =
                (cfg.server, cfg.token.clone(), node_name(&cfg.prefix, next));
            joins.spawn(async move {
                // A busy scheduler may time a join out; try a few times, as
                // a real agent restarted by its supervisor would.
                let mut attempt = 0;
                loop {
                    let t = Instant::now();
                    let creds = join::join(server, &name, &token).await;
                    attempt += 1;
                    if matches!(creds, Err(JoinError::Connect { .. })) && attempt < 4 {
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                        continue;
                    }
                    break (name, t.elapsed(), creds);
                }
            });
            next += 1;
        }
        let (name, took, creds) = joins
            .join_next()
            .await
            .expect("joins in flight")
            .expect("join task panicked");
        let creds = creds?;
        fleet.join_times.push(took);
        progress(fleet.join_times.len());
        let (status_tx, status_rx) = mpsc::unbounded_channel();
        let node = Arc::new(Mutex::new(SimNode::new(status_tx)));
        let labels = cfg.labels.clone();
        let client_cfg = ClientConfig {
            server: cfg.server,
            others: Vec::new(),
            ca_pem: creds.ca_pem,
            cert_pem: creds.cert_pem,
            key_pem: creds.key_pem,
            node: NodeInfo {
                name,
                labels,
                allocatable: cfg.capacity,
                arch: std::env::consts::ARCH.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                runtimes: vec!["wasm".into()],
                pod_network: String::new(),
                gateway_tls: false,
            },
            link: cfg.link.clone(),
            creds_dir: None,
            tunnel: None,
            modules: None,
            gateway: None,
        };
        fleet.nodes.push(node.clone());
        fleet.links.push(tokio::spawn(client::run(
            client_cfg,
            node,
            status_rx,
            shutdown_rx.clone(),
        )));
    }
    Ok(fleet)
}
