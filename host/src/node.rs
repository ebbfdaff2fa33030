//! Assembles a running agent: wasm runtime, pod reconciler and scheduler link.

use crate::agent::Agent;
use crate::executor::container::runtime::{ContainerConfig, ContainerRuntime};
use crate::executor::wasm::runtime::{PrepareError, WasmConfig, WasmRuntime};
use crate::image::{ImageStore, RegistryConfig};
use crate::link::LinkConfig;
use crate::link::client::{self, ClientConfig};
use crate::net::podnet::{NetMode, PodNetwork};
use crate::pod::PodEnv;
use flotilla_api::proto::NodeInfo;
use flotilla_api::{Capacity, Labels, RUNTIME_RUNC, RUNTIME_WASM};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Settings of one agent.
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub node_name: String,
    pub labels: Labels,
    /// Resources offered to pods; detected from the machine when `None`.
    pub capacity: Option<Capacity>,
    pub server: SocketAddr,
    /// Other schedulers to try when `server` fails (see
    /// [`ClientConfig::others`]).
    pub others: Vec<SocketAddr>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub link: LinkConfig,
    pub max_instances: u32,
    /// Where the node's certificate lives, for renewal (`None`: no renewal).
    pub creds_dir: Option<PathBuf>,
    /// Images and containers.
    pub executors: Executors,
    pub metrics: MetricsConfig,
}

/// How the agent measures and reports what members use.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// How often the figures go to the scheduler.
    pub interval: Duration,
    /// Where the node serves them in the Prometheus text format (`None`:
    /// nowhere).
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            interval: Duration::from_secs(15),
            listen: None,
        }
    }
}

/// Registry access and the container executor of an agent.
#[derive(Clone, Debug)]
pub struct Executors {
    pub registries: RegistryConfig,
    /// The runc binary; `None`: this node runs no containers.
    pub runc: Option<PathBuf>,
    /// The `flotilla` binary, which runs `flotilla shim`.
    pub shim_exe: Option<PathBuf>,
    /// Stored image bytes above which unused images are pruned.
    pub image_gc_bytes: u64,
    /// How pods get a network.
    pub network: NetMode,
    /// Route other nodes' pods directly where their node is on a connected
    /// network, instead of through the QUIC tunnel.
    pub direct_routes: bool,
    /// Filter pods' traffic to and from the node ([`crate::net::firewall`]).
    pub firewall: bool,
    /// Default cap on a container's writable layer (`resources.disk`).
    pub scratch_limit: u64,
    /// Containers run in user namespaces unless their pod says otherwise.
    pub user_namespaces: bool,
    /// Registry artifacts and images come through the scheduler's site
    /// cache, not from their registries.
    pub pull_via_scheduler: bool,
    /// Where the function gateway listens (`None`: no gateway).
    pub gateway: Option<SocketAddr>,
    /// Where it serves HTTPS, with the certificates of Secrets labelled
    /// `flotilla.dev/gateway-tls` (`None`: no HTTPS).
    pub gateway_tls: Option<SocketAddr>,
}

impl Default for Executors {
    fn default() -> Self {
        Executors {
            registries: RegistryConfig::default(),
            runc: None,
            shim_exe: None,
            image_gc_bytes: 8 << 30,
            network: NetMode::Host,
            direct_routes: false,
            firewall: true,
            scratch_limit: crate::executor::container::runtime::DEFAULT_SCRATCH_LIMIT,
            user_namespaces: false,
            pull_via_scheduler: false,
            gateway: None,
            gateway_tls: None,
        }
    }
}

/// The shim to run: `flotilla-shim` next to this program (small, quick to
/// start), else this program itself (`flotilla shim`).
fn shim_exe() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let small = me.with_file_name("flotilla-shim");
    Some(if small.is_file() { small } else { me })
}

impl Executors {
    /// Containers when runc is installed and we run as root, with this
    /// program as the shim; bridged pod networks as root, else the host's.
    pub fn detect(registries: RegistryConfig) -> Executors {
        let root = rustix::process::geteuid().is_root();
        Executors {
            registries,
            runc: crate::executor::container::runtime::find_runc().filter(|_| root),
            shim_exe: shim_exe(),
            network: if root { NetMode::Bridge } else { NetMode::Host },
            ..Executors::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("wasm runtime: {0}")]
    Runtime(#[from] PrepareError),
    #[error("agent link: {0}")]
    Client(#[from] client::ClientError),
    #[error("the pods' runtime: {0}")]
    Workloads(std::io::Error),
    #[error("image store: {0}")]
    Images(#[from] crate::image::ImageError),
    #[error("container executor: {0}")]
    Containers(std::io::Error),
    #[error("pod network: {0}")]
    Network(#[from] crate::net::podnet::NetError),
    #[error("module cache: {0}")]
    Modules(#[from] flotilla_api::content::ContentError),
    #[error("pod inputs: {0}")]
    Inputs(String),
    #[error("metrics port {0}: {1}")]
    Metrics(SocketAddr, std::io::Error),
    #[error("function gateway port {0}: {1}")]
    Gateway(SocketAddr, std::io::Error),
}

/// A running agent.
pub struct AgentHandle {
    pub agent: Arc<Mutex<Agent>>,
    shutdown: watch::Sender<bool>,
    link: tokio::task::JoinHandle<Result<(), client::ClientError>>,
    /// Dropped last: the pods' runtime.
    _workloads: Workloads,
}

/// The runtime pods run on ([`PodEnv::workloads`]): one worker per CPU,
/// apart from the runtime the link (and, all-in-one, the scheduler) run
/// on. Shut down without waiting when dropped (pods are stopped first by
/// [`AgentHandle::shutdown`]; a dropped handle leaves containers running
/// as a killed agent would).
struct Workloads(Option<tokio::runtime::Runtime>);

impl Workloads {
    fn start() -> std::io::Result<Workloads> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cpus)
            .thread_name("flotilla-pods")
            .enable_all()
            .build()
            .map(|rt| Workloads(Some(rt)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("running").handle().clone()
    }
}

impl Drop for Workloads {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// What this machine offers: all CPUs and 90% of memory.
pub fn detect_capacity() -> Capacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(1 << 20);
    Capacity {
        cpu: cpus * 1000,
        memory: mem_kib * 1024 / 10 * 9,
        pods: 0,
    }
}

/// Memory mappings one instance slot takes when every slot runs a member:
/// 2 for its pooled stack and guard page (taken at start-up, running or
/// not) and 4 for a running member (its linear memory split around the
/// accessible part, its copy-on-write image, its stack in use). Measured
/// (issue 14 item 16): 12,000 slots idle 24,075 mappings; 1,000 running
/// counters +4,085, 2,000 +8,085.
pub const MAPS_PER_INSTANCE: u64 = 6;
/// Mappings kept for the agent itself (code, heaps, threads' stacks).
pub const MAPS_RESERVED: u64 = 8192;

/// How many wasm instances fit in `max_map_count` mappings, and whether
/// `requested` must shrink to that (a process past the limit fails its
/// next allocation and aborts, scheduler and all).
pub fn instances_that_fit(requested: u32, max_map_count: Option<u64>) -> (u32, Option<String>) {
    let Some(maps) = max_map_count else {
        return (requested, None);
    };
    let fit = maps.saturating_sub(MAPS_RESERVED) / MAPS_PER_INSTANCE;
    if u64::from(requested) <= fit {
        return (requested, None);
    }
    let fit = fit.min(u64::from(u32::MAX)) as u32;
    (
        fit,
        Some(format!(
            "--max-instances {requested} needs about {} memory mappings ({MAPS_PER_INSTANCE} per wasm instance and {MAPS_RESERVED} for the agent) but vm.max_map_count is {maps}: offering {fit} pod slots; raise it (sysctl -w vm.max_map_count={}) for more",
            maps_needed(requested),
            maps_needed(requested)
        )),
    )
}

/// The mappings `instances` slots need, with the agent's own.
fn maps_needed(instances: u32) -> u64 {
    u64::from(instances) * MAPS_PER_INSTANCE + MAPS_RESERVED
}

/// Reads `vm.max_map_count`, raising it first (as root, like kubelet's own
/// kernel tunings) when `instances` need more mappings than it allows.
fn max_map_count_for(instances: u32) -> Option<u64> {
    const PATH: &str = "/proc/sys/vm/max_map_count";
    let now: u64 = std::fs::read_to_string(PATH).ok()?.trim().parse().ok()?;
    let needed = maps_needed(instances);
    if needed <= now || !rustix::process::geteuid().is_root() {
        return Some(now);
    }
    match std::fs::write(PATH, needed.to_string()) {
        Ok(()) => {
            tracing::warn!(
                "raised vm.max_map_count from {now} to {needed} for {instances} wasm instances"
            );
            Some(needed)
        }
        Err(e) => {
            tracing::debug!("cannot raise vm.max_map_count: {e}");
            Some(now)
        }
    }
}

pub async fn start(cfg: AgentConfig) -> Result<AgentHandle, AgentError> {
    let max_map_count = max_map_count_for(cfg.max_instances);
    let (max_instances, shrunk) = instances_that_fit(cfg.max_instances, max_map_count);
    match shrunk {
        Some(why) => tracing::warn!("{why}"),
        None => tracing::info!(
            "up to {max_instances} wasm instances (vm.max_map_count {})",
            max_map_count.map_or("unknown".to_string(), |m: u64| m.to_string())
        ),
    }
    let mut wasm_cfg = WasmConfig::new(cfg.data_dir.join("wasm-cache"));
    wasm_cfg.max_instances = max_instances;
    let runtime = Arc::new(WasmRuntime::new(wasm_cfg)?);
    let (status_tx, status_rx) = mpsc::unbounded_channel();
    let metrics_tx = status_tx.clone();
    let wake_tx = status_tx.clone();
    let images = Arc::new(ImageStore::open(
        cfg.data_dir.join("images"),
        cfg.executors.registries.clone(),
    )?);
    let modules_dir = cfg.data_dir.join("modules");
    let modules = Arc::new(crate::link::fetch::ModuleFetcher::new(
        flotilla_api::content::ContentStore::open(&modules_dir)?,
    ));
    if cfg.executors.pull_via_scheduler {
        images.pull_via(modules.clone());
    }
    let containers = match (&cfg.executors.runc, &cfg.executors.shim_exe) {
        (Some(runc), Some(shim)) => Some(Arc::new(
            ContainerRuntime::new(
                ContainerConfig {
                    runc: runc.clone(),
                    shim_exe: shim.clone(),
                    root: cfg.data_dir.join("containers"),
                    log_cap: 1 << 20,
                    scratch_limit: cfg.executors.scratch_limit,
                    user_namespaces: cfg.executors.user_namespaces,
                },
                images.clone(),
            )
            .map_err(AgentError::Containers)?,
        )),
        _ => None,
    };
    let network = Arc::new(PodNetwork::new(
        cfg.executors.network,
        cfg.data_dir.join("netns"),
        crate::net::podnet::NetOptions {
            direct_routes: cfg.executors.direct_routes,
            firewall: cfg.executors.firewall,
        },
    )?);
    let proxy = Arc::new(crate::net::proxy::Proxy::new(
        cfg.executors.network == NetMode::Bridge,
        Some(cfg.data_dir.join("service-vips")),
    ));
    // The DNS responder and the tunnel start with the bridge (which comes
    // with the first pod or service that needs it, or from an earlier run).
    let tunnel = (cfg.executors.network == NetMode::Bridge)
        .then(|| Arc::new(crate::net::tunnel::Tunnel::default()));
    {
        let (proxy, tunnel) = (proxy.clone(), tunnel.clone());
        let mut ready = network.bridge_ready();
        tokio::spawn(async move {
            loop {
                let bridge = *ready.borrow_and_update();
                if let Some(b) = bridge {
                    proxy.serve_dns(b.block.gateway());
                    if let (Some(t), Some(cluster)) = (&tunnel, b.cluster)
                        && let Err(e) = t.open(cluster, b.block)
                    {
                        tracing::error!("cross-node tunnel: {e}");
                    }
                }
                if ready.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let _ = std::fs::create_dir_all(&cfg.data_dir);
    let workloads = Workloads::start().map_err(AgentError::Workloads)?;
    let env = Arc::new(PodEnv {
        runtime,
        kv: Arc::new(crate::link::kv::LinkKv::new(modules.link())),
        modules: modules.clone(),
        images: Some(images.clone()),
        containers: containers.clone(),
        network: network.clone(),
        proxy: proxy.clone(),
        log_dir: cfg.data_dir.join("logs"),
        log_cap: 1 << 20,
        restart_min: Duration::from_millis(200),
        restart_max: Duration::from_secs(30),
        restart_reset: Duration::from_secs(10),
        status_tx,
        node_name: cfg.node_name.clone(),
        inputs: Arc::new(
            crate::inputs::InputStore::persistent(
                &cfg.data_dir.join("inputs.sealed"),
                &cfg.data_dir.join("inputs.key"),
            )
            .map_err(AgentError::Inputs)?,
        ),
        volumes_dir: cfg.data_dir.join("volumes"),
        volume_sys: Arc::new(crate::volume::Kernel),
        spare_threads: std::sync::Mutex::new(Vec::new()),
        prober: Arc::default(),
        meters: crate::metrics::Meters::new(crate::metrics::Cgroups::system()),
        workloads: workloads.handle(),
    });
    // Pods saved by the previous run start now, before the scheduler is
    // reached: a rebooted edge node runs its workloads even offline.
    let _ = std::fs::create_dir_all(&cfg.data_dir);
    let meters = env.meters.clone();
    let inputs = env.inputs.clone();
    let agent = Arc::new(Mutex::new(Agent::with_state(
        env,
        cfg.data_dir.join("pods.json"),
    )));
    let node = NodeInfo {
        name: cfg.node_name.clone(),
        labels: cfg.labels.clone(),
        // Pod slots: the instance pool's size, unless configured.
        allocatable: {
            let mut c = cfg.capacity.unwrap_or_else(detect_capacity);
            if c.pods == 0 {
                c.pods = u64::from(max_instances);
            }
            c
        },
        arch: std::env::consts::ARCH.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        runtimes: std::iter::once(RUNTIME_WASM)
            .chain(containers.as_ref().map(|_| RUNTIME_RUNC))
            .map(str::to_string)
            .collect(),
        pod_network: cfg.executors.network.to_string(),
        gateway_tls: cfg.executors.gateway_tls.is_some(),
    };
    // Containers left by pods that are not coming back are stopped, then
    // their networks removed: only networks there were at start-up (pods
    // the scheduler sends meanwhile make sandboxes of their own, which
    // this must not touch), and only if their pods are still not wanted.
    let keep = agent.lock().expect("poisoned").pod_uids();
    let stale = network.stale(&keep);
    let reap_containers = containers.clone();
    let reap_agent = agent.clone();
    tokio::spawn(async move {
        if let Some(rt) = reap_containers {
            rt.reap_orphans(&keep).await;
        }
        let keep = reap_agent.lock().expect("poisoned").pod_uids();
        let _ = tokio::task::spawn_blocking(move || network.release_stale(&stale, &keep)).await;
    });
    let gc_agent = agent.clone();
    tokio::spawn(crate::image::gc_loop(
        images,
        cfg.executors.image_gc_bytes,
        Duration::from_secs(60),
        move || gc_agent.lock().expect("poisoned").image_refs(),
    ));
    // Cached modules no pod here runs leave the disk (a pod that comes back
    // fetches its module again).
    {
        let (agent, modules) = (agent.clone(), modules.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.tick().await;
            loop {
                tick.tick().await;
                let keep = agent.lock().expect("poisoned").module_digests();
                let modules = modules.clone();
                let _ = tokio::task::spawn_blocking(move || modules.prune(&keep)).await;
            }
        });
    }
    // What members use: to the scheduler every interval, and on the
    // metrics port if there is one.
    {
        let (meters, tx, every) = (meters.clone(), metrics_tx, cfg.metrics.interval);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let m = meters.clone();
                let Ok(report) =
                    tokio::task::spawn_blocking(move || crate::metrics::sample(&m)).await
                else {
                    continue;
                };
                if tx.send(crate::pod::PodNews::Usage(report)).is_err() {
                    return;
                }
            }
        });
    }
    let mut gateway = None;
    if cfg.executors.gateway.is_some() || cfg.executors.gateway_tls.is_some() {
        let wake: crate::net::gateway::Wake = Arc::new(move |namespace, service| {
            let _ = wake_tx.send(crate::pod::PodNews::Wake(namespace, service));
        });
        let g = Arc::new(crate::net::gateway::Gateway::new(proxy.subscribe()).waking(wake));
        if let Some(addr) = cfg.executors.gateway {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| AgentError::Gateway(addr, e))?;
            tracing::info!(
                "function gateway on http://{}",
                listener.local_addr().map_or(addr, |a| a)
            );
            tokio::spawn(crate::net::gateway::serve(listener, g.clone()));
        }
        if let Some(addr) = cfg.executors.gateway_tls {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| AgentError::Gateway(addr, e))?;
            tracing::info!(
                "function gateway on https://{}",
                listener.local_addr().map_or(addr, |a| a)
            );
            let certs = Arc::new(crate::net::gateway_tls::Certificates::new(
                proxy.subscribe(),
                inputs.clone(),
            ));
            tokio::spawn(crate::net::gateway_tls::serve(
                listener,
                g.clone(),
                crate::net::gateway_tls::server_config(certs),
            ));
        }
        gateway = Some(g);
    }
    if let Some(addr) = cfg.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Metrics(addr, e))?;
        tracing::info!(
            "metrics on http://{}/metrics",
            listener.local_addr().map_or(addr, |a| a)
        );
        tokio::spawn(crate::metrics::serve(
            listener,
            meters,
            cfg.node_name.clone(),
            {
                let agent = agent.clone();
                Arc::new(move || agent.lock().expect("poisoned").pod_names())
            },
            gateway
                .clone()
                .map(|g| -> crate::metrics::RouteFigures { Arc::new(move || g.route_readings()) }),
        ));
    }
    let (shutdown, shutdown_rx) = watch::channel(false);
    let client_cfg = ClientConfig {
        server: cfg.server,
        others: cfg.others,
        ca_pem: cfg.ca_pem,
        cert_pem: cfg.cert_pem,
        key_pem: cfg.key_pem,
        node,
        link: cfg.link,
        creds_dir: cfg.creds_dir,
        tunnel,
        modules: Some(modules),
        gateway,
    };
    let link = tokio::spawn(client::run(
        client_cfg,
        agent.clone(),
        status_rx,
        shutdown_rx,
    ));
    Ok(AgentHandle {
        agent,
        shutdown,
        link,
        _workloads: workloads,
    })
}

impl AgentHandle {
    /// Stops the link and every pod.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.link.await;
        let (stops, network) = {
            let mut agent = self.agent.lock().expect("poisoned");
            (agent.stop_all(), agent.env().network.clone())
        };
        for s in stops {
            s.await;
        }
        let _ = tokio::task::spawn_blocking(move || network.drain_pool()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_held_to_the_mappings_the_kernel_allows() {
        // The default vm.max_map_count.
        let (n, why) = instances_that_fit(12_000, Some(65_530));
        assert_eq!(
            n,
            (65_530 - MAPS_RESERVED as u32) / MAPS_PER_INSTANCE as u32
        );
        let why = why.unwrap();
        assert!(
            why.contains("vm.max_map_count is 65530") && why.contains("offering 9556 pod slots"),
            "{why}"
        );
        assert!(why.contains("sysctl -w vm.max_map_count=80192"), "{why}");
        // The default --max-instances fits the default limit.
        assert_eq!(instances_that_fit(4096, Some(65_530)), (4096, None));
        assert_eq!(instances_that_fit(12_000, Some(262_144)), (12_000, None));
        // Unknown (no procfs): as asked.
        assert_eq!(instances_that_fit(12_000, None), (12_000, None));
    }
}
