//! `flotilla up`: the scheduler and one local agent in one process, joined
//! over QUIC on loopback like any other agent.

use crate::client::Client;
use crate::config::{ClientConfig, Context};
use crate::manifests;
use anyhow::{Context as _, Result};
use clap::Args;
use flotilla_api::{Kind, Object, PodPhase};
use flotilla_host::link::LinkConfig;
use flotilla_host::node::{AgentConfig, Executors, start as start_agent};
use flotilla_scheduler::server::{SchedulerConfig, start as start_scheduler};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct UpArgs {
    /// Where the store, certificates, compiled modules and logs live.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// API listen address (HTTPS).
    #[arg(long, alias = "listen", default_value = "127.0.0.1:7370")]
    api: SocketAddr,
    /// QUIC listen address for agents.
    #[arg(long, default_value = "127.0.0.1:7371")]
    quic: SocketAddr,
    /// The IP other schedulers' clients and agents reach this one at, when
    /// --api or --quic listens on 0.0.0.0 (needed with --store etcd://…:
    /// a follower sends them to the leader's address).
    #[arg(long)]
    advertise: Option<std::net::IpAddr>,
    /// Name of the local node.
    #[arg(long, default_value = "local")]
    node: String,
    /// Manifests to apply once the cluster is up (file, directory; repeatable).
    #[arg(short = 'f', long = "filename")]
    files: Vec<String>,
    /// Most wasm members the local agent runs at once.
    #[arg(long, default_value_t = 4096)]
    max_instances: u32,
    /// Silence after which a node is NotReady and its pods move (e.g. 2500ms, 10s).
    #[arg(long, default_value = "2500ms", value_parser = parse_millis)]
    node_timeout: Duration,
    /// How often agents send a heartbeat (at most 10s, at most half the node timeout).
    #[arg(long, default_value = "500ms", value_parser = parse_millis)]
    heartbeat: Duration,
    /// Serve the API over plain HTTP on loopback (development only; the admin
    /// config then carries a bearer token instead of a client certificate).
    #[arg(long)]
    insecure_http: bool,
    /// Lifetime of node certificates issued to joining agents, in seconds.
    #[arg(long, default_value_t = 86_400)]
    node_cert_ttl: u64,
    /// Pod addresses of the cluster; each node gets a /24 of it.
    #[arg(long, default_value = "10.88.0.0/16")]
    pod_cidr: flotilla_scheduler::ipam::Cidr,
    /// Registry credentials, plain-HTTP registries and the only loopback
    /// registries manifests may name, for the scheduler and the local agent
    /// (TOML, see README "Registries").
    #[arg(long, env = "FLOTILLA_REGISTRY_CONFIG")]
    registry_config: Option<PathBuf>,
    /// Run no containers on the local node (wasm only), even if runc is installed.
    #[arg(long)]
    no_containers: bool,
    /// How pods get a network: bridge (a namespace, an address and a veth
    /// into the node bridge flt0), loopback (a namespace with loopback only)
    /// or host (the node's network). Default: bridge as root, else host.
    #[arg(long, value_name = "MODE")]
    pod_network: Option<flotilla_host::net::podnet::NetMode>,
    /// Route to other nodes' pods directly where their node is on a directly
    /// connected network (faster, but plain); others go through the QUIC
    /// tunnel, which is also the default for all.
    #[arg(long)]
    direct_routes: bool,
    /// Leave pods' traffic unfiltered: neighbours may route into pods and
    /// pods may reach every service of the node (by default only DNS,
    /// service addresses and node ports; see README "Pod network").
    #[arg(long)]
    no_firewall: bool,
    /// What a container may write to its own filesystem (its writable
    /// layer) unless its member sets `resources.disk`; over it, the pod is
    /// evicted.
    #[arg(long, value_name = "BYTES", default_value = "10Gi", value_parser = flotilla_api::quantity::Bytes::parse)]
    container_scratch_limit: flotilla_api::quantity::Bytes,
    /// Run every pod's containers in a user namespace of its own (root in
    /// the container is an unprivileged host ID, a different range per
    /// pod) unless the pod sets `user_namespace = false`.
    #[arg(long)]
    user_namespaces: bool,
    /// Be the site's artifact cache: agents started with
    /// `--pull-via-scheduler` get registry artifacts and container images
    /// through this scheduler, which pulls each once and keeps it.
    #[arg(long)]
    pull_through: bool,
    /// Ports services may ask for as node ports (FIRST-LAST).
    #[arg(long, default_value = "30000-32767")]
    node_port_range: flotilla_api::net::PortRange,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    gateway: GatewayArgs,
    /// For the benchmark that measures the tunnel relay's source check
    /// (issue 14 item 2) against none: relay packets whatever their source.
    /// Never for a real cluster.
    #[arg(long, hide = true)]
    bench_unchecked_tunnel: bool,
}

/// Where the scheduler keeps its objects.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// `redb` (store.redb in the data dir; the default) or an etcd cluster,
    /// `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]` (keys under /PREFIX/,
    /// default /flotilla/). Certificates, the secrets key, uploaded modules
    /// and key-value buckets stay in the data dir.
    #[arg(
        long,
        env = "FLOTILLA_STORE",
        default_value = "redb",
        value_name = "STORE"
    )]
    pub store: String,
    /// CA certificate (PEM) of the etcd members: connect with TLS.
    #[arg(long, value_name = "PEM")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd members that require one.
    #[arg(long, value_name = "PEM", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Key (PEM) of --etcd-cert.
    #[arg(long, value_name = "PEM", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl StoreArgs {
    pub fn backend(&self) -> Result<flotilla_scheduler::server::StoreBackend> {
        use flotilla_scheduler::server::StoreBackend;
        if self.store == "redb" {
            if self.etcd_ca.is_some() || self.etcd_cert.is_some() {
                anyhow::bail!("--etcd-ca and --etcd-cert are for --store etcd://…");
            }
            return Ok(StoreBackend::Redb);
        }
        let mut cfg = flotilla_scheduler::store::EtcdConfig::parse(&self.store)
            .map_err(|e| anyhow::anyhow!("--store: {e} (or redb, the default)"))?;
        cfg.ca.clone_from(&self.etcd_ca);
        cfg.cert.clone_from(&self.etcd_cert);
        cfg.key.clone_from(&self.etcd_key);
        Ok(StoreBackend::Etcd(cfg))
    }
}

/// `flotilla host`: an agent that joins a scheduler elsewhere.
#[derive(Args)]
pub struct HostArgs {
    /// The scheduler's QUIC address (IP:PORT); with several schedulers on
    /// one etcd store, their addresses separated by commas (tried in turn;
    /// a follower sends the agent to the leader).
    #[arg(long, value_delimiter = ',', required = true)]
    join: Vec<SocketAddr>,
    /// Join token from `flotilla token create --join` (needed on first start only).
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This node's name.
    #[arg(long)]
    name: String,
    /// Where the agent keeps its certificate, compiled modules and logs.
    #[arg(long)]
    data_dir: PathBuf,
    /// Node labels, KEY=VALUE (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Most wasm members this agent runs at once.
    #[arg(long, default_value_t = 4096)]
    max_instances: u32,
    /// Registry credentials, plain-HTTP registries and the only loopback
    /// registries manifests may name (TOML, see README "Registries").
    #[arg(long, env = "FLOTILLA_REGISTRY_CONFIG")]
    registry_config: Option<PathBuf>,
    /// Run no containers on this node (wasm only), even if runc is installed.
    #[arg(long)]
    no_containers: bool,
    /// How pods get a network: bridge, loopback or host (see `flotilla up --help`).
    #[arg(long, value_name = "MODE")]
    pod_network: Option<flotilla_host::net::podnet::NetMode>,
    /// Route to other nodes' pods directly where their node is on a directly
    /// connected network (faster, but plain); others go through the QUIC
    /// tunnel, which is also the default for all.
    #[arg(long)]
    direct_routes: bool,
    /// Leave pods' traffic unfiltered: neighbours may route into pods and
    /// pods may reach every service of the node (by default only DNS,
    /// service addresses and node ports; see README "Pod network").
    #[arg(long)]
    no_firewall: bool,
    /// What a container may write to its own filesystem (its writable
    /// layer) unless its member sets `resources.disk`; over it, the pod is
    /// evicted.
    #[arg(long, value_name = "BYTES", default_value = "10Gi", value_parser = flotilla_api::quantity::Bytes::parse)]
    container_scratch_limit: flotilla_api::quantity::Bytes,
    /// Run every pod's containers in a user namespace of its own (root in
    /// the container is an unprivileged host ID, a different range per
    /// pod) unless the pod sets `user_namespace = false`.
    #[arg(long)]
    user_namespaces: bool,
    /// Pull registry artifacts and container images through the scheduler
    /// (started with `--pull-through`) instead of from their registries:
    /// for nodes that cannot reach a registry.
    #[arg(long)]
    pull_via_scheduler: bool,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    gateway: GatewayArgs,
}

/// Where an agent serves functions' routes.
#[derive(Args)]
pub struct GatewayArgs {
    /// Serve the function gateway on ADDR: HTTP requests go to the Function
    /// whose route matches their Host and path, e.g. 127.0.0.1:8088 or
    /// 0.0.0.0:80.
    #[arg(long, value_name = "ADDR")]
    gateway_addr: Option<std::net::SocketAddr>,
    /// Also serve it over HTTPS on ADDR (HTTP/1.1 and HTTP/2 by ALPN), with
    /// the certificate a Secret labelled flotilla.dev/gateway-tls=true
    /// holds (tls.crt, tls.key) for the host the client names (SNI), taken
    /// only from the namespace of the Function routing that host.
    #[arg(long, value_name = "ADDR")]
    gateway_tls_addr: Option<std::net::SocketAddr>,
}

/// How an agent measures and reports what members use.
#[derive(Args)]
pub struct MetricsArgs {
    /// How often the agent sends what its members use to the scheduler
    /// (`flotilla top`, `/metrics`; functions' request counts, from which
    /// the scheduler tells an idle function), e.g. 15s, 1m.
    #[arg(long, default_value = "15s", value_parser = flotilla_api::probe::Millis::parse)]
    metrics_interval: flotilla_api::probe::Millis,
    /// Serve the node's own metrics (Prometheus text, `GET /metrics`) on
    /// ADDR, e.g. 127.0.0.1:9464 or the node's address.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

impl MetricsArgs {
    fn config(&self) -> flotilla_host::node::MetricsConfig {
        flotilla_host::node::MetricsConfig {
            interval: self
                .metrics_interval
                .duration()
                .max(std::time::Duration::from_millis(100)),
            listen: self.metrics_addr,
        }
    }
}

/// `flotilla simulate`: many simulated agents (real links, no workloads).
#[derive(Args)]
pub struct SimulateArgs {
    /// The scheduler's QUIC address (IP:PORT).
    #[arg(long)]
    join: SocketAddr,
    /// Join token from `flotilla token create --join`.
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// How many nodes to simulate.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Node names are PREFIX-00000, PREFIX-00001, …
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// CPU each node offers, in millicores.
    #[arg(long, default_value_t = 2000)]
    cpu: u64,
    /// Memory each node offers (e.g. 4Gi).
    #[arg(long, default_value = "4Gi", value_parser = flotilla_api::quantity::Bytes::parse)]
    memory: flotilla_api::quantity::Bytes,
    /// Node labels, KEY=VALUE (repeatable; every node gets them).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 16)]
    join_parallelism: usize,
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Blocking work (compiles, fsyncs, sandboxes) is bounded by the cores,
    // not by the pods. A large idle pool never shrinks: the controllers'
    // periodic blocking passes wake its idle threads in turn, so none ever
    // reaches its keep-alive; a small pool keeps memory low after bursts.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("flotilla")
        .max_blocking_threads(8)
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()?)
}

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Runs an agent that joins (or rejoins) a remote scheduler.
pub fn host(args: HostArgs) -> Result<ExitCode> {
    init_tracing();
    runtime()?.block_on(async move {
        let pki = args.data_dir.join("pki");
        let creds = match flotilla_host::link::join::Credentials::load(&pki) {
            Some(c) => c,
            None => {
                let token = args.token.as_deref().context(
                    "this node has not joined yet: pass --token FLT1… (from `flotilla token create --join` on the scheduler)",
                )?;
                let token = flotilla_host::link::join::JoinToken::parse(token)?;
                // Any scheduler of the cluster can admit the node.
                let mut joined = None;
                for (i, at) in args.join.iter().enumerate() {
                    match flotilla_host::link::join::join(*at, &args.name, &token).await {
                        Ok(c) => {
                            joined = Some((c, *at));
                            break;
                        }
                        Err(e) if i + 1 < args.join.len() => {
                            eprintln!("cannot join at {at}: {e}; trying the next scheduler");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                let (creds, at) = joined.context("--join names no scheduler")?;
                creds.save(&pki)?;
                eprintln!("joined the cluster at {at} as node {}", args.name);
                creds
            }
        };
        let mut labels = flotilla_api::Labels::new();
        for l in &args.labels {
            let (k, v) = l.split_once('=').with_context(|| format!("label '{l}' is not KEY=VALUE"))?;
            labels.insert(k.to_string(), v.to_string());
        }
        flotilla_api::meta::check_node_labels(&labels).map_err(anyhow::Error::msg)?;
        let agent = start_agent(AgentConfig {
            data_dir: args.data_dir.clone(),
            node_name: args.name.clone(),
            labels,
            capacity: None,
            server: args.join[0],
            others: args.join[1..].to_vec(),
            ca_pem: creds.ca_pem,
            cert_pem: creds.cert_pem,
            key_pem: creds.key_pem,
            link: LinkConfig::default(),
            max_instances: args.max_instances,
            creds_dir: Some(pki),
            metrics: args.metrics.config(),
            executors: Executors {
                gateway: args.gateway.gateway_addr,
                gateway_tls: args.gateway.gateway_tls_addr,
                pull_via_scheduler: args.pull_via_scheduler,
                user_namespaces: args.user_namespaces,
                ..executors(
                    args.registry_config.as_deref(),
                    args.no_containers,
                    (
                        args.pod_network,
                        args.direct_routes,
                        args.no_firewall,
                        args.container_scratch_limit,
                    ),
                )?
            },
        })
        .await?;
        let at: Vec<String> = args.join.iter().map(|a| a.to_string()).collect();
        eprintln!("agent {} running; connecting to {}", args.name, at.join(","));
        wait_for_signal().await?;
        eprintln!("stopping…");
        agent.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs simulated agents until interrupted.
pub fn simulate(args: SimulateArgs) -> Result<ExitCode> {
    init_tracing();
    runtime()?.block_on(async move {
        anyhow::ensure!(args.count > 0, "--count must be at least 1");
        let token = flotilla_host::link::join::JoinToken::parse(&args.token)?;
        let mut labels = flotilla_api::Labels::new();
        for l in &args.labels {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("label '{l}' is not KEY=VALUE"))?;
            labels.insert(k.to_string(), v.to_string());
        }
        flotilla_api::meta::check_node_labels(&labels).map_err(anyhow::Error::msg)?;
        let count = args.count;
        let started = Instant::now();
        let fleet = flotilla_host::sim::start(
            flotilla_host::sim::SimConfig {
                server: args.join,
                token,
                count,
                prefix: args.prefix.clone(),
                capacity: flotilla_api::Capacity {
                    cpu: args.cpu,
                    memory: args.memory.0,
                    ..Default::default()
                },
                labels,
                link: LinkConfig::default(),
                join_parallelism: args.join_parallelism,
            },
            |done| {
                if done == count || done % 100 == 0 {
                    eprint!("\rjoined {done}/{count} simulated nodes");
                }
            },
        )
        .await?;
        let mut times = fleet.join_times.clone();
        times.sort();
        eprintln!(
            "\n{count} simulated nodes ({}-00000 …) joined in {:.2?} (join p50 {:.1?}, p99 {:.1?}); Ctrl-C stops them",
            args.prefix,
            started.elapsed(),
            times[times.len() / 2],
            times[(times.len() * 99 / 100).min(times.len() - 1)],
        );
        wait_for_signal().await?;
        eprintln!("stopping… ({} simulated pods)", fleet.pod_count());
        fleet.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs the scheduler alone (agents join with `flotilla host`).
pub fn scheduler(args: UpArgs) -> Result<ExitCode> {
    init_tracing();
    runtime()?.block_on(up(args, false))
}

/// The agent's executors: registries from the config file, runc if present
/// (and wanted); says why containers are off.
fn executors(
    registry_config: Option<&std::path::Path>,
    no_containers: bool,
    (pod_network, direct_routes, no_firewall, scratch): (
        Option<flotilla_host::net::podnet::NetMode>,
        bool,
        bool,
        flotilla_api::quantity::Bytes,
    ),
) -> Result<Executors> {
    let mut e = Executors::detect(crate::images::load_registries(registry_config)?);
    e.direct_routes = direct_routes;
    e.firewall = !no_firewall;
    e.scratch_limit = scratch.0;
    if let Some(mode) = pod_network {
        e.network = mode;
    }
    if no_containers {
        e.runc = None;
    } else if e.runc.is_none() {
        eprintln!(
            "note: containers are off on this node (runc not found, or not running as root); wasm pods run"
        );
    }
    Ok(e)
}

fn parse_millis(s: &str) -> Result<Duration, String> {
    flotilla_api::quantity::Millis::parse(s).map(|m| m.as_duration())
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".flotilla")
}

pub fn run(args: UpArgs) -> Result<ExitCode> {
    init_tracing();
    runtime()?.block_on(up(args, true))
}

async fn up(args: UpArgs, with_agent: bool) -> Result<ExitCode> {
    let began = Instant::now();
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let sched = start_scheduler(SchedulerConfig {
        advertise: args.advertise,
        data_dir: data_dir.clone(),
        api_addr: args.api,
        quic_addr: args.quic,
        node_timeout: args.node_timeout,
        heartbeat: args.heartbeat,
        insecure_http: args.insecure_http,
        node_cert_ttl: Duration::from_secs(args.node_cert_ttl),
        pod_cidr: args.pod_cidr,
        blob_grace: flotilla_scheduler::server::DEFAULT_BLOB_GRACE,
        pull_through: args.pull_through,
        node_ports: args.node_port_range,
        registries: crate::images::load_registries(args.registry_config.as_deref())?,
        store: args.store.backend()?,
    })
    .await?;
    if args.bench_unchecked_tunnel {
        tracing::warn!("--bench-unchecked-tunnel: the relay does not check packets' sources");
        sched
            .cluster
            .tunnel_source_check
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
    let agent = if !with_agent {
        None
    } else {
        // The local agent's certificate (which registers its node name).
        let cert = sched.issue_agent_cert(&args.node)?;
        Some(
            start_agent(AgentConfig {
                data_dir: data_dir.join("agent"),
                node_name: args.node.clone(),
                labels: Default::default(),
                capacity: None,
                server: sched.quic_addr,
                others: Vec::new(),
                ca_pem: sched.ca_pem().to_string(),
                cert_pem: cert.cert_pem,
                key_pem: cert.key_pem,
                link: LinkConfig::default(),
                max_instances: args.max_instances,
                creds_dir: None,
                metrics: args.metrics.config(),
                executors: Executors {
                    gateway: args.gateway.gateway_addr,
                    gateway_tls: args.gateway.gateway_tls_addr,
                    user_namespaces: args.user_namespaces,
                    ..executors(
                        args.registry_config.as_deref(),
                        args.no_containers,
                        (
                            args.pod_network,
                            args.direct_routes,
                            args.no_firewall,
                            args.container_scratch_limit,
                        ),
                    )?
                },
            })
            .await?,
        )
    };
    let scheme = if args.insecure_http { "http" } else { "https" };
    let host = if sched.api_addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        sched.api_addr.ip().to_string()
    };
    let url = format!("{scheme}://{host}:{}", sched.api_addr.port());
    let config_path = data_dir.join("config.toml");
    let ctx = admin_context(&sched, &url, args.insecure_http)?;
    let mut cfg = if config_path.exists() {
        ClientConfig::load(&config_path).unwrap_or_default()
    } else {
        ClientConfig::default()
    };
    cfg.current_context = ctx.name.clone();
    cfg.upsert(ctx.clone());
    cfg.save(&config_path)?;
    // Written last and atomically: its presence means the API is up.
    let tmp = data_dir.join("api.addr.tmp");
    std::fs::write(&tmp, &url)
        .and_then(|()| std::fs::rename(&tmp, data_dir.join("api.addr")))
        .context("writing api.addr")?;
    eprintln!(
        "flotilla is up in {} ms — API {url}, agents on quic://{}, data in {}",
        began.elapsed().as_millis(),
        sched.quic_addr,
        data_dir.display()
    );
    eprintln!("admin client config (mode 0600): {}", config_path.display());

    if !args.files.is_empty() {
        let files = args.files.clone();
        let applied = tokio::task::spawn_blocking(move || apply_and_wait(&ctx, &files)).await?;
        if let Err(e) = applied {
            eprintln!("error: {e:#}");
        }
    }
    // Name the CLI the way it was invoked (e.g. ./target/release/flotilla).
    let me = std::env::args().next().unwrap_or_else(|| "flotilla".into());
    let try_next = format!(
        "\nTry next (in another terminal):\n{}  {me} get pods -o wide\n  {me} logs <pod>            # e.g. a counter-… pod, add -f to follow\n  {me} describe pod <pod>\n  {me} scale deployment counter --replicas 3\n  {me} apply -f samples/manifests/crasher.toml && {me} get pods\n  {me} nodes; {me} events\nPress Ctrl-C to stop (state is kept in {}).\n",
        if config_path == crate::config::default_path() {
            String::new()
        } else {
            format!("  export FLOTILLA_CONFIG={}\n", config_path.display())
        },
        data_dir.display()
    );
    eprint!("{try_next}");

    wait_for_signal().await?;
    eprintln!("stopping…");
    if let Some(agent) = agent {
        agent.shutdown().await;
    }
    sched.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Applies manifests and waits (up to 30 s) until their pods run, with progress.
/// The admin context `up` writes: a client certificate, or a token over plain HTTP.
fn admin_context(
    sched: &flotilla_scheduler::server::Scheduler,
    url: &str,
    insecure: bool,
) -> Result<Context> {
    const YEAR: Duration = Duration::from_secs(365 * 86_400);
    let mut ctx = Context {
        name: "local".into(),
        server: url.to_string(),
        namespace: Some("default".into()),
        ca: Some(sched.ca_pem().to_string()),
        ..Default::default()
    };
    if insecure {
        let (token, _) = flotilla_scheduler::auth::create_token(
            sched.cluster.store.as_ref(),
            flotilla_api::Role::Admin,
            Vec::new(),
            YEAR,
            "flotilla up",
        )?;
        ctx.token = Some(token);
    } else {
        let cert = sched.issue_user_cert("admin", flotilla_api::Role::Admin, &[], YEAR)?;
        ctx.client_cert = Some(cert.cert_pem);
        ctx.client_key = Some(cert.key_pem);
    }
    Ok(ctx)
}

fn apply_and_wait(ctx: &Context, files: &[String]) -> Result<()> {
    let c = Client::new(ctx, None)?;
    let parsed = manifests::load_with_files(files)?;
    manifests::upload(&c, &parsed.files)?;
    let objects = parsed.objects;
    let res = c.apply(objects.clone())?;
    for r in &res.results {
        match &r.error {
            Some(e) => eprintln!(
                "error: {}/{}: {e}",
                r.kind.to_string().to_lowercase(),
                r.name
            ),
            None => eprintln!(
                "{}/{} {}",
                r.kind.to_string().to_lowercase(),
                r.name,
                r.action
            ),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    loop {
        let mut waiting = Vec::new();
        for o in &objects {
            let m = o.meta();
            match c.get(o.kind(), &m.namespace, &m.name) {
                Ok(Object::Pod(p))
                    if matches!(p.status.phase, PodPhase::Running | PodPhase::Succeeded) => {}
                Ok(Object::Deployment(d)) if d.status.ready >= d.spec.replicas => {}
                Ok(_) => waiting.push(format!(
                    "{}/{}",
                    o.kind().to_string().to_lowercase(),
                    m.name
                )),
                Err(_) => {}
            }
        }
        let line = if waiting.is_empty() {
            "all sample workloads are running".to_string()
        } else {
            format!("waiting for {}", waiting.join(", "))
        };
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("still waiting after 30 s; see `flotilla describe` for reasons");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pods = c.list(Kind::Pod, None, None)?;
    if !pods.is_empty() {
        eprint!("\n{}", crate::view::table(&pods, true, true));
    }
    Ok(())
}
