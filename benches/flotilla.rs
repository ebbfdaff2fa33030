//! The benchmark command: `cargo bench --bench flotilla` (or `scripts/bench`).
//! Prints a Markdown report; figures go into BENCHMARKS.md by hand.
//!
//! Each figure is measured beside a reference run in the same invocation where
//! one exists (bare wasmtime for member start).

mod cli;
#[path = "../tests/common/mod.rs"]
mod common;
mod fleet;
mod functions;
mod ha;
mod kv;
mod large;
mod net;
mod oci;
mod plugins;
mod rollout;
mod store;
mod volumes;

use flotilla_api::{Labels, Object, PodPhase};
use flotilla_host::executor::wasm::runtime::{RunSpec, WasmConfig, WasmRuntime};
use flotilla_host::link::LinkConfig;
use flotilla_host::logs::{LogPaths, LogSink};
use flotilla_host::node::{AgentConfig, start as start_agent};
use flotilla_scheduler::server::{SchedulerConfig, start as start_scheduler};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_nanos() as f64 / 1000.0)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_nanos() as f64 / 1e6)
}

fn arg_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::var_os("BENCH_ROLE").is_some_and(|r| r == "echo") {
        return fleet::echo_server_main();
    }
    // `cargo bench` passes --bench; under `cargo test` this runs as a quick smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let pods = arg_count("BENCH_PODS", if full { 1000 } else { 20 });
    let starts = arg_count("BENCH_STARTS", if full { 2000 } else { 50 });
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.split(',').any(|o| o == s);
    println!("# Flotilla benchmarks\n");
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel()
    );
    println!();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if full && want("failover") {
        failover(arg_count("BENCH_TRIALS", 20));
    }
    if want("restore") {
        restore(
            if full { 20 } else { 2 },
            arg_count("BENCH_RESTORE_TRIALS", if full { 20 } else { 1 }),
        );
    }
    if want("fleet") {
        fleet::fleet(
            &rt,
            &fleet::Sizes {
                nodes: arg_count("BENCH_NODES", if full { 1000 } else { 20 }),
                big_nodes: arg_count("BENCH_BIG_NODES", if full { 5000 } else { 30 }),
                pods: arg_count("BENCH_FLEET_PODS", if full { 10_000 } else { 100 }),
                window: Duration::from_secs(if full { 20 } else { 1 }),
                joins: if full { 50 } else { 5 },
            },
        );
    }
    if want("oci") {
        oci::oci(
            &rt,
            &oci::Sizes {
                layers: if full { 4 } else { 1 },
                layer_bytes: if full { 32 << 20 } else { 1 << 20 },
                pulls: if full { 5 } else { 1 },
                starts: arg_count("BENCH_CONTAINER_STARTS", if full { 30 } else { 2 }),
                shims: if full { 10 } else { 2 },
            },
        );
    }
    if want("net") {
        net::net(&net::Sizes {
            sandboxes: if full { 200 } else { 5 },
            round_trips: if full { 2000 } else { 50 },
            bulk: if full { 256 << 20 } else { 4 << 20 },
        });
    }
    if want("place") {
        placement(if full { 10_000 } else { 500 });
    }
    if want("plugins") {
        plugins::plugins(if full { 2000 } else { 50 }, if full { 2000 } else { 20 });
        fleet::placement_with_plugin(
            &rt,
            if full { 1000 } else { 20 },
            if full { 10_000 } else { 100 },
            if full { 3 } else { 1 },
        );
    }
    if want("store") {
        store::store(
            &rt,
            &store::Sizes {
                applies: if full { 1000 } else { 20 },
                nodes: if full { 1000 } else { 20 },
                pods: if full { 10_000 } else { 100 },
                rounds: if full { 3 } else { 1 },
            },
        );
    }
    if full && want("leader") {
        ha::leader(&rt, arg_count("BENCH_LEADER_TRIALS", 20));
    }
    if want("kv") {
        rt.block_on(kv::keyvalue(if full { 2000 } else { 20 }));
    }
    if full && want("large") {
        large::large(&rt, 3);
    }
    if want("start") {
        rt.block_on(member_start(starts));
    }
    if want("apply") {
        rt.block_on(apply_to_running(pods));
    }
    if want("quota") {
        rt.block_on(apply_with_quota(pods));
    }
    if want("volumes") {
        rt.block_on(volumes::start_with_volumes(pods));
        rt.block_on(volumes::config_propagation(if full { 1000 } else { 20 }));
    }
    drop(rt);
    if want("upload") {
        cli::upload_throughput(20, if full { 5 } else { 1 });
    }
    if want("run") {
        cli::run_vs_wasmtime(if full { 200 } else { 3 });
    }
    if want("functions") {
        functions::hello_vs_wasmtime_serve(if full { 10 } else { 1 });
    }
    if want("pyfunction") {
        functions::python_vs_wasmtime_serve(if full { 10 } else { 1 });
    }
    // A real cluster on the node's bridge: in full runs only.
    if full && want("scale0") {
        functions::scale_from_zero(20, 1000);
    }
    if want("preopen") {
        volumes::preopen_io(if full { 100 } else { 4 }, if full { 7 } else { 1 });
    }
    if want("rss") {
        rss_and_size(pods);
    }
    if want("probes") {
        probe_cost(
            if full { 1000 } else { 20 },
            Duration::from_secs(if full { 30 } else { 2 }),
        );
    }
    if want("rollout") {
        rollout::rolling_update(if full { 100 } else { 4 });
    }
    if want("autoscale") {
        rollout::autoscale_reaction(if full { 10 } else { 1 });
    }
    if want("metrics") {
        rollout::metrics_cost(
            if full { 1000 } else { 20 },
            Duration::from_secs(if full { 30 } else { 2 }),
        );
    }
    // Last: its 10,000 pods (in a process of their own) must not weigh on
    // the other sections' figures while the machine reclaims them.
    if want("many") {
        many_pods(if full { &[1000, 10_000] } else { &[20, 100] });
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| format!("Linux {}", s.trim()))
}

/// Agent-side start of a member from the cached artifact vs bare wasmtime.
async fn member_start(n: usize) {
    println!("## Member start from the cached artifact ({n} starts each)\n");
    println!(
        "| module | flotilla p50 | flotilla p99 | bare wasmtime p50 | bare p99 | ratio (p50) |"
    );
    println!("|---|---|---|---|---|---|");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WasmConfig::new(dir.path().join("cache"));
    cfg.max_instances = 64;
    let bare_cfg = WasmConfig {
        cache_dir: dir.path().join("bare"),
        ..cfg.clone()
    };
    let rt = Arc::new(WasmRuntime::new(cfg).unwrap());
    let env = Labels::new();
    for (label, path) in [
        ("hello, WASI p1 module", flotilla_samples::HELLO_P1),
        ("hello, WASI p2 component", flotilla_samples::HELLO_P2),
    ] {
        let prepared = rt.prepare(Path::new(path), "").await.unwrap();
        let log = LogSink::new(LogPaths::new(dir.path(), "bench"), 1 << 20);
        let mut ours = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let started = rt
                .start(
                    &prepared,
                    RunSpec {
                        preopens: &[],
                        blocking_io: false,
                        argv0: "m",
                        args: &[],
                        env: &env,
                        memory_limit: Some(64 << 20),
                        cpu_time: None,
                        cpu_millis: 0,
                        log: log.clone(),
                        network: false,
                        usage: None,
                        outgoing: Default::default(),
                        workload: &Default::default(),
                    },
                )
                .await
                .ok()
                .unwrap();
            ours.push(t.elapsed());
            drop(started);
        }
        ours.sort();
        let bare = bare_wasmtime(path, n, &bare_cfg).await;
        println!(
            "| {label} | {} | {} | {} | {} | {:.2} |",
            us(pct(&ours, 0.5)),
            us(pct(&ours, 0.99)),
            us(pct(&bare, 0.5)),
            us(pct(&bare, 0.99)),
            pct(&ours, 0.5).as_nanos() as f64 / pct(&bare, 0.5).as_nanos() as f64
        );
    }
    println!(
        "\nBoth sides: the same engine configuration (`flotilla_host::executor::wasm::runtime::engine_config`: pooling allocator, epoch interruption, the same sizes), a fresh Store with a WASI context, instantiate from an `InstancePre` and resolve the entry point (`_start` for modules, `wasi:cli/run` for components); the bare side sets no memory limit, CPU budget or log sinks.\n"
    );
}

struct Bare {
    p1: Option<wasmtime_wasi::p1::WasiP1Ctx>,
    ctx: Option<(wasmtime_wasi::WasiCtx, wasmtime::component::ResourceTable)>,
}

impl wasmtime_wasi::WasiView for Bare {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        let (ctx, table) = self.ctx.as_mut().unwrap();
        wasmtime_wasi::WasiCtxView { ctx, table }
    }
}

/// The reference: bare wasmtime with the agent's engine settings (pooling
/// allocator, same sizes), a plain WASI context, no limits or logs.
async fn bare_wasmtime(path: &str, n: usize, cfg: &WasmConfig) -> Vec<Duration> {
    let engine =
        wasmtime::Engine::new(&flotilla_host::executor::wasm::runtime::engine_config(cfg)).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::with_capacity(n);
    if bytes[6..8] == [1, 0] {
        let component = wasmtime::component::Component::new(&engine, &bytes).unwrap();
        let mut linker = wasmtime::component::Linker::<Bare>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        let pre = wasmtime_wasi::p2::bindings::CommandPre::new(
            linker.instantiate_pre(&component).unwrap(),
        )
        .unwrap();
        for _ in 0..n {
            let t = Instant::now();
            let ctx = wasmtime_wasi::WasiCtxBuilder::new().build();
            let mut store = wasmtime::Store::new(
                &engine,
                Bare {
                    p1: None,
                    ctx: Some((ctx, Default::default())),
                },
            );
            store.set_epoch_deadline(u64::MAX / 2);
            let cmd = pre.instantiate_async(&mut store).await.unwrap();
            out.push(t.elapsed());
            drop((cmd, store));
        }
    } else {
        let module = wasmtime::Module::new(&engine, &bytes).unwrap();
        let mut linker = wasmtime::Linker::<Bare>::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |b| b.p1.as_mut().unwrap()).unwrap();
        let pre = linker.instantiate_pre(&module).unwrap();
        for _ in 0..n {
            let t = Instant::now();
            let p1 = wasmtime_wasi::WasiCtxBuilder::new().build_p1();
            let mut store = wasmtime::Store::new(
                &engine,
                Bare {
                    p1: Some(p1),
                    ctx: None,
                },
            );
            store.set_epoch_deadline(u64::MAX / 2);
            let inst = pre.instantiate_async(&mut store).await.unwrap();
            // Ready to run, as the agent's start is: the entry point
            // resolved (the component side gets it from `CommandPre`).
            let start = inst.get_typed_func::<(), ()>(&mut store, "_start").unwrap();
            out.push(t.elapsed());
            drop((start, inst, store));
        }
    }
    out.sort();
    out
}

/// POST /v1/apply of one pod → the store shows it Running, for `n` pods in a row.
/// A scheduler and one agent in this process, over HTTPS and QUIC on
/// loopback, with an admin token; room for `pods` pods.
pub struct InProcess {
    pub dir: tempfile::TempDir,
    pub sched: flotilla_scheduler::server::Scheduler,
    pub agent: flotilla_host::node::AgentHandle,
    /// `Bearer …`
    pub auth: String,
}

impl InProcess {
    pub async fn start(pods: usize) -> InProcess {
        Self::start_on(pods, Default::default()).await
    }

    /// Like [`InProcess::start`], with the scheduler's objects in `store`.
    pub async fn start_on(
        pods: usize,
        store: flotilla_scheduler::server::StoreBackend,
    ) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let sched = start_scheduler(SchedulerConfig {
            advertise: None,
            data_dir: dir.path().join("sched"),
            api_addr: "127.0.0.1:0".parse().unwrap(),
            quic_addr: "127.0.0.1:0".parse().unwrap(),
            node_timeout: Duration::from_secs(3),
            heartbeat: Duration::from_millis(500),
            insecure_http: false,
            node_cert_ttl: Duration::from_secs(86_400),
            pod_cidr: Default::default(),
            blob_grace: flotilla_scheduler::server::DEFAULT_BLOB_GRACE,
            pull_through: false,
            node_ports: flotilla_api::net::DEFAULT_NODE_PORTS,
            registries: Default::default(),
            store,
        })
        .await
        .unwrap();
        let cert = sched.issue_agent_cert("local").unwrap();
        let agent = start_agent(AgentConfig {
            data_dir: dir.path().join("agent"),
            node_name: "local".into(),
            labels: Labels::new(),
            capacity: None,
            server: sched.quic_addr,
            others: Vec::new(),
            ca_pem: sched.ca_pem().into(),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
            link: LinkConfig::default(),
            max_instances: (pods as u32 + 64).max(256),
            creds_dir: None,
            metrics: Default::default(),

            executors: Default::default(),
        })
        .await
        .unwrap();
        while sched.cluster.store.list("nodes/").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (token, _) = flotilla_scheduler::auth::create_token(
            sched.cluster.store.as_ref(),
            flotilla_api::Role::Admin,
            vec![],
            Duration::from_secs(3600),
            "bench",
        )
        .unwrap();
        InProcess {
            dir,
            sched,
            agent,
            auth: format!("Bearer {token}"),
        }
    }

    /// A kept-alive TLS 1.3 connection to the API (call off the runtime).
    pub fn https(&self) -> Https {
        Https::connect(self.sched.api_addr, self.sched.ca_pem(), &self.auth)
    }

    pub async fn stop(self) {
        self.agent.shutdown().await;
        self.sched.shutdown().await;
    }
}

async fn apply_to_running(n: usize) {
    println!("## apply → Running, all-in-one over HTTPS ({n} pods, one apply each)\n");
    let bed = InProcess::start(n).await;
    let store = bed.sched.cluster.store.clone();
    let (api, ca_pem, auth) = (
        bed.sched.api_addr,
        bed.sched.ca_pem().to_string(),
        bed.auth.clone(),
    );
    let lat = tokio::task::spawn_blocking(move || apply_latencies(store, api, &ca_pem, &auth, n))
        .await
        .unwrap();
    println!("| p50 | p90 | p99 | max | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | p50 ≤ 2 ms, p99 ≤ 10 ms |",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.9)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap())
    );
    println!(
        "\nEach sample: HTTPS POST of one Pod on a kept-alive TLS 1.3 connection (fsynced store write; the module uploaded once before) → placement → QUIC Assign → compile-cache hit → instantiate → status frame → store shows Running (seen through a store watch). Pods stay running; the last one starts beside {n} others.\n"
    );
    bed.stop().await;
}

/// `n` samples of apply → Running (after 20 not counted, which warm up the
/// compile cache and connections), sorted: one HTTPS POST of one Pod on a
/// kept-alive TLS 1.3 connection, the clock stopped when a watch of
/// `store` shows it Running. Call off the runtime.
pub fn apply_latencies(
    store: Arc<dyn flotilla_scheduler::store::Store>,
    api: std::net::SocketAddr,
    ca_pem: &str,
    auth: &str,
    n: usize,
) -> Vec<Duration> {
    let (_, mut rx) = store.watch_from(store.revision()).unwrap();
    // One TLS 1.3 connection to the API, verified against the cluster
    // CA, kept alive across requests (as a client library would).
    let mut https = Https::connect(api, ca_pem, auth);
    // Uploaded once, as the CLI would; the first pods fetch and compile it.
    let bytes = std::fs::read(flotilla_samples::COUNTER_P1).unwrap();
    let digest = flotilla_api::manifest::digest_of(&bytes);
    let module = serde_json::json!({"digest": digest, "size": bytes.len()});
    assert!(https.send("PUT", &format!("/v1/blobs/{digest}"), bytes) < 300);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let name = format!("bench-{i}");
        let body = serde_json::json!({"objects": [{
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"members": [{"name": "c", "module": module,
                "env": {"INTERVAL_MS": "600000"}, "resources": {"memory": "2Mi"}}]}
        }]});
        let t = Instant::now();
        assert_eq!(
            https.send("POST", "/v1/apply", serde_json::to_vec(&body).unwrap()),
            200
        );
        wait_running(&mut rx, &name);
        if i >= 20 {
            lat.push(t.elapsed());
        }
    }
    lat.sort();
    lat
}

/// The cost of quotas at apply (issue 14 item 15): applies alternate
/// between a namespace without a quota and one with a quota (caps high
/// enough never to refuse, a default memory to fill in), the same objects
/// each — Deployments of one member with no replicas, so no pod start
/// shares the machine with the measurement. Both namespaces grow to `n`
/// objects, which the quota check counts on every write.
async fn apply_with_quota(n: usize) {
    println!(
        "## apply with and without a namespace quota, all-in-one over HTTPS ({n} applies each, alternated)\n"
    );
    let bed = InProcess::start(2).await;
    let (api, ca_pem, auth) = (
        bed.sched.api_addr,
        bed.sched.ca_pem().to_string(),
        bed.auth.clone(),
    );
    let (plain, quota) = tokio::task::spawn_blocking(move || {
        let mut https = Https::connect(api, &ca_pem, &auth);
        let bytes = std::fs::read(flotilla_samples::COUNTER_P1).unwrap();
        let digest = flotilla_api::manifest::digest_of(&bytes);
        let module = serde_json::json!({"digest": digest, "size": bytes.len()});
        assert!(https.send("PUT", &format!("/v1/blobs/{digest}"), bytes) < 300);
        let q = serde_json::json!({"objects": [{"kind": "Quota",
            "metadata": {"name": "team", "namespace": "quota"},
            "spec": {"pods": 1_000_000, "cpu": 1_000_000_000u64, "memory": "1024Gi", "objects": 1_000_000,
                     "default_memory": "2Mi"}}]});
        assert_eq!(https.send("POST", "/v1/apply", serde_json::to_vec(&q).unwrap()), 200);
        let (mut plain, mut quota) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n + 20 {
            for (ns, out) in [("plain", &mut plain), ("quota", &mut quota)] {
                let body = serde_json::json!({"objects": [{
                    "kind": "Deployment",
                    "metadata": {"name": format!("d-{i}"), "namespace": ns},
                    "spec": {"replicas": 0, "template": {"labels": {"app": format!("d-{i}")},
                        "spec": {"members": [{"name": "c", "module": module}]}}}
                }]});
                let t = Instant::now();
                assert_eq!(
                    https.send("POST", "/v1/apply", serde_json::to_vec(&body).unwrap()),
                    200
                );
                if i >= 20 {
                    out.push(t.elapsed());
                }
            }
        }
        plain.sort();
        quota.sort();
        (plain, quota)
    })
    .await
    .unwrap();
    println!("| namespace | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (name, lat) in [("without a quota", &plain), ("with a quota", &quota)] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(pct(lat, 0.5)),
            ms(pct(lat, 0.9)),
            ms(pct(lat, 0.99)),
            ms(*lat.last().unwrap())
        );
    }
    println!(
        "\nratio with/without a quota: p50 {:.3}, p99 {:.3} (target: within 5%). Each sample: one HTTPS POST /v1/apply of a new Deployment (fsynced store write), on a kept-alive TLS 1.3 connection; the object size cap applies on both sides.\n",
        pct(&quota, 0.5).as_secs_f64() / pct(&plain, 0.5).as_secs_f64(),
        pct(&quota, 0.99).as_secs_f64() / pct(&plain, 0.99).as_secs_f64()
    );
    bed.stop().await;
}

/// Waits on a store watch until the pod `name` is Running.
pub fn wait_running(
    rx: &mut tokio::sync::broadcast::Receiver<flotilla_scheduler::store::WatchEvent>,
    name: &str,
) {
    loop {
        let ev = rx.blocking_recv().unwrap();
        if let Object::Pod(p) = &*ev.object
            && p.metadata.name == name
            && p.status.phase == PodPhase::Running
        {
            return;
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// RSS of the real `flotilla up` idle and with `n` long-running pods; binary size.
/// `flotilla up` (the real binary) over plain HTTP on loopback with
/// loopback-only pod networks and `max_instances` slots, data in `data`;
/// once its API is up: the process, the API's URL and its admin header.
fn insecure_up(max_instances: usize, data: &Path) -> (UpChild, String, String) {
    // The machine's own namespace: no bridge, no addresses.
    up_with(max_instances, data, "loopback", &[])
}

/// `flotilla up` (plain HTTP, loopback ports) with pod network `network`
/// and `extra` arguments; the process, the API's URL and its admin header.
fn up_with(
    max_instances: usize,
    data: &Path,
    network: &str,
    extra: &[&str],
) -> (UpChild, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "up",
            "--insecure-http",
            "--api",
            "127.0.0.1:0",
            "--quic",
            "127.0.0.1:0",
            "--max-instances",
            &max_instances.to_string(),
            "--pod-network",
            network,
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .env("FLOTILLA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = UpChild(child);
    let addr = data.join("api.addr");
    let end = Instant::now() + Duration::from_secs(120);
    while !addr.exists() {
        assert!(Instant::now() < end, "flotilla up did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = std::fs::read_to_string(&addr).unwrap();
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(data.join("config.toml")).unwrap()).unwrap();
    let auth = format!(
        "Bearer {}",
        config["contexts"][0]["token"].as_str().unwrap()
    );
    (child, url, auth)
}

/// A `flotilla up` a benchmark started: ended (by PID) when dropped, so a
/// failed assertion leaves no cluster running behind it.
struct UpChild(std::process::Child);

impl std::ops::Deref for UpChild {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for UpChild {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for UpChild {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Issue 14 item 16: a Deployment of `n` replicas on one all-in-one node
/// (the real binary), from apply until all run; the node's NotReady and
/// link-flapping events meanwhile. Each size gets a fresh `up`.
fn many_on_one_node(n: usize) -> (Duration, usize, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, auth) = insecure_up(n + 100, &dir.path().join("data"));
    let http = ureq::AgentBuilder::new().build();
    // The node is Ready before the clock starts.
    let end = Instant::now() + Duration::from_secs(60);
    while !get_json::<serde_json::Value>(&http, &url, &auth, "/v1/nodes/local")["status"]["ready"]
        .as_bool()
        .unwrap_or(false)
    {
        assert!(Instant::now() < end, "the node never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let module = upload(&http, &url, &auth, flotilla_samples::COUNTER_P2);
    let t = Instant::now();
    http.post(&format!("{url}/v1/apply"))
        .set("authorization", &auth)
        .send_json(serde_json::json!({"objects": [{"kind": "Deployment",
            "metadata": {"name": "many", "namespace": "default"},
            "spec": {"replicas": n, "template": {"labels": {"app": "many"},
                "spec": {"members": [{"name": "c", "module": module,
                    "env": {"INTERVAL_MS": "600000"}}]}}}}]}))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        let d: serde_json::Value = get_json(&http, &url, &auth, "/v1/deployments/default/many");
        if d["status"]["ready"].as_u64() == Some(n as u64) {
            break;
        }
        assert!(
            Instant::now() < end,
            "{n} pods did not all start: {}",
            d["status"]
        );
        assert!(child.try_wait().unwrap().is_none(), "flotilla up exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t.elapsed();
    let events: Vec<serde_json::Value> = get_json(&http, &url, &auth, "/v1/events");
    let bad = events
        .iter()
        .filter(|e| matches!(e["reason"].as_str(), Some("NodeNotReady" | "LinkFlapping")))
        .count();
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (took, bad, rss)
}

/// User plus system CPU time of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// CPU time so far of the threads of `pid` whose name starts with `prefix`
/// (`pod-`: each pod's own thread, i.e. its members' runs and their
/// runtime's wake-ups; `prober`: the agent's tcp prober), from each
/// thread's `schedstat` (nanoseconds: a thread that runs 80 µs a second
/// has no whole clock tick of `stat` time to show).
fn threads_cpu(pid: u32, prefix: &str) -> Duration {
    let mut sum = Duration::ZERO;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let named = std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.starts_with(prefix));
        if let (true, Ok(stat)) = (named, std::fs::read_to_string(t.join("schedstat")))
            && let Some(Ok(ns)) = stat.split_whitespace().next().map(str::parse::<u64>)
        {
            sum += Duration::from_nanos(ns);
        }
    }
    sum
}

/// utime + stime of a `/proc/…/stat` line.
fn stat_cpu(stat: &str) -> Duration {
    // Fields after the command's closing parenthesis; utime and stime are
    // the 12th and 13th of those.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf with a constant name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    Duration::from_secs_f64(ticks / hz)
}

/// The CPU `flotilla up` used over `window` with `n` pods of the tcp
/// sample, probed or not: the whole process, and the part its members'
/// runs used (their metered thread time, read from the agent's
/// `/metrics`), so the agent's own share is the difference.
struct Cpu {
    process: Duration,
    members: Duration,
    pod_threads: Duration,
    prober: Duration,
}

/// Sum of `flotilla_member_cpu_seconds_total` on an agent's `/metrics`.
fn members_cpu(http: &ureq::Agent, metrics: &str) -> Duration {
    let text = http.get(metrics).call().unwrap().into_string().unwrap();
    let secs: f64 = text
        .lines()
        .filter(|l| l.starts_with("flotilla_member_cpu_seconds_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Duration::from_secs_f64(secs)
}

fn cpu_with_pods(n: usize, window: Duration, probes: usize) -> Cpu {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let (mut child, url, auth) = up_with(
        n + 100,
        &dir.path().join("data"),
        "loopback",
        &["--metrics-addr", &metrics_addr],
    );
    let metrics = format!("http://{metrics_addr}/metrics");
    let http = ureq::AgentBuilder::new().build();
    let module = upload(&http, &url, &auth, flotilla_samples::TCP_P2);
    let mut member = serde_json::json!({"name": "tcp", "module": module,
        "args": ["serve", "9090"], "ports": [{"port": 9090}]});
    if probes >= 1 {
        member["liveness"] = serde_json::json!({"tcp": {"port": 9090}, "period": "1s"});
    }
    if probes >= 2 {
        member["readiness"] = serde_json::json!({"tcp": {"port": 9090}, "period": "1s"});
    }
    http.post(&format!("{url}/v1/apply"))
        .set("authorization", &auth)
        .send_json(serde_json::json!({"objects": [{"kind": "Deployment",
            "metadata": {"name": "probed", "namespace": "default"},
            "spec": {"replicas": n, "template": {"labels": {"app": "probed"},
                "spec": {"members": [member]}}}}]}))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        let d: serde_json::Value = get_json(&http, &url, &auth, "/v1/deployments/default/probed");
        if d["status"]["ready"].as_u64() == Some(n as u64) {
            break;
        }
        assert!(Instant::now() < end, "{n} pods not ready: {}", d["status"]);
        assert!(child.try_wait().unwrap().is_none(), "flotilla up exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Settled: starts done, then the window.
    std::thread::sleep(Duration::from_secs(3));
    let (before, members_before, pods_before, prober_before) = (
        cpu_time(child.id()),
        members_cpu(&http, &metrics),
        threads_cpu(child.id(), "pod-"),
        threads_cpu(child.id(), "prober"),
    );
    std::thread::sleep(window);
    let process = cpu_time(child.id()) - before;
    let members = members_cpu(&http, &metrics).saturating_sub(members_before);
    let pod_threads = threads_cpu(child.id(), "pod-").saturating_sub(pods_before);
    let prober = threads_cpu(child.id(), "prober").saturating_sub(prober_before);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    Cpu {
        process,
        members,
        pod_threads,
        prober,
    }
}

/// Issue 16: the agent's CPU for probing `n` pods every second (a tcp
/// liveness probe each, then a tcp liveness and a tcp readiness probe each,
/// made inside each pod's network namespace), against the same pods without
/// probes, in this invocation.
/// The members' own CPU (accepting the probes' connections) is shown apart:
/// it is the workload's, as a container's would be.
fn probe_cost(n: usize, window: Duration) {
    println!(
        "## Probe cost ({n} pods, each probed every second by one tcp probe, then by two; all-in-one, the real binary)\n"
    );
    let bare = cpu_with_pods(n, window, 0);
    let share = |d: Duration| d.as_secs_f64() / window.as_secs_f64() * 100.0;
    let agent = |c: &Cpu| share(c.process.saturating_sub(c.pod_threads));
    let metered = |c: &Cpu| share(c.process.saturating_sub(c.members));
    println!(
        "| pods | probes per pod | checks/s | process CPU, probed / no probes (reference) | pods' threads, probed / no probes | agent (process − pods' threads), probed / no probes | **probes' cost to the agent** | of it, the prober thread | cost if only metered member polls were the pods' | target |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for probes in [1, 2] {
        let probed = cpu_with_pods(n, window, probes);
        let checks = probes * n;
        let cost = (agent(&probed) - agent(&bare)).max(0.0);
        let per_check = |c: f64| c / 100.0 * 1e6 / checks as f64;
        let cost_metered = (metered(&probed) - metered(&bare)).max(0.0);
        println!(
            "| {n} | {probes} ({}) | {checks} | {:.2} % / {:.2} % of one core | {:.2} % / {:.2} % | {:.2} % / {:.2} % | **{cost:.2} % of one core** ({:.1} µs per check) | {:.2} % | {cost_metered:.2} % ({:.1} µs per check) | ≤ 5 % |",
            if probes == 1 {
                "tcp liveness"
            } else {
                "tcp liveness + readiness"
            },
            share(probed.process),
            share(bare.process),
            share(probed.pod_threads),
            share(bare.pod_threads),
            agent(&probed),
            agent(&bare),
            per_check(cost),
            share(probed.prober),
            per_check(cost_metered),
        );
    }
    println!(
        "\nMeasured over {:.0} s once all pods were ready, each configuration in a fresh `up`, from the kernel's figures: the one process's user + system time (`/proc/PID/stat`) (scheduler, agent and the wasm members), and apart from it the run time of each pod's own thread (`/proc/PID/task/*/schedstat` of the `pod-…` threads: its members' runs inside the pod's network namespace, with their runtime's wake-ups, as a container's process time would be its own). Each check is a connection the member accepts, so the pods' threads grow with probes too; what the probes cost the agent is the rest. The last column charges the pods only the member polls the agent meters (`flotilla_member_cpu_seconds_total`), leaving their runtime's wake-ups to the agent.\n",
        window.as_secs_f64()
    );
}

fn many_pods(sizes: &[usize]) {
    println!(
        "## Many pods on one node (all-in-one, the real binary; a Deployment of N counters, apply → all Running)\n"
    );
    println!("| pods | apply → all Running | per pod | NotReady or flapping events | RSS after |");
    println!("|---|---|---|---|---|");
    // The agent raises vm.max_map_count for the largest size (as root);
    // the machine gets its own value back afterwards.
    let maps = std::fs::read_to_string("/proc/sys/vm/max_map_count").ok();
    let mut per_pod = Vec::new();
    for &n in sizes {
        let (took, bad, rss) = many_on_one_node(n);
        per_pod.push(took.as_secs_f64() / n as f64);
        println!(
            "| {n} | {:.2} s | {:.0} µs | {bad} | {:.0} MiB |",
            took.as_secs_f64(),
            took.as_secs_f64() * 1e6 / n as f64,
            rss as f64 / 1024.0
        );
    }
    if let Some(m) = maps {
        let _ = std::fs::write("/proc/sys/vm/max_map_count", m);
    }
    if let [small, .., large] = per_pod[..] {
        println!(
            "\nper-pod time, largest/smallest: {:.2} (the node never left Ready: target 0 events above)\n",
            large / small
        );
    }
}

fn rss_and_size(n: usize) {
    println!("## Memory and size of `flotilla up` (the real binary)\n");
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, auth) = insecure_up(n + 64, &dir.path().join("data"));
    std::thread::sleep(Duration::from_secs(3));
    let idle = rss_kib(child.id());
    let http = ureq::AgentBuilder::new().build();
    let pid = child.id();
    // Polls up to 30 s for the process to come back near idle; the RSS then.
    let settle = || -> u64 {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let now = rss_kib(pid);
            if now <= idle + 10 * 1024 || Instant::now() > end {
                return now;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let delete = |name: &str| {
        let _ = http
            .delete(&format!("{url}/v1/pods/default/{name}"))
            .set("authorization", &auth)
            .call();
    };
    let gone = |name: &str| {
        let end = Instant::now() + Duration::from_secs(30);
        while http
            .get(&format!("{url}/v1/pods/default/{name}"))
            .set("authorization", &auth)
            .call()
            .is_ok()
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // One small one-shot module runs and its pod is deleted.
    let hello = upload(&http, &url, &auth, flotilla_samples::HELLO_P1);
    http.post(&format!("{url}/v1/apply"))
        .set("authorization", &auth)
        .send_json(serde_json::json!({"objects": [{"kind": "Pod", "metadata": {"name": "once", "namespace": "default"},
            "spec": {"members": [{"name": "c", "module": hello, "restart": "Never"}]}}]}))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while get_json::<serde_json::Value>(&http, &url, &auth, "/v1/pods/default/once")["status"]["phase"]
        != "Succeeded"
    {
        assert!(Instant::now() < end, "the one-shot pod did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after_one_peak = rss_kib(pid);
    delete("once");
    gone("once");
    let after_one = settle();
    let module = upload(&http, &url, &auth, flotilla_samples::COUNTER_P1);
    for batch in 0..n.div_ceil(100) {
        let objects: Vec<_> = (batch * 100..((batch + 1) * 100).min(n))
            .map(|i| serde_json::json!({
                "kind": "Pod",
                "metadata": {"name": format!("p{i}"), "namespace": "default"},
                "spec": {"members": [{"name": "c", "module": module, "env": {"INTERVAL_MS": "600000"}}]}
            }))
            .collect();
        http.post(&format!("{url}/v1/apply"))
            .set("authorization", &auth)
            .send_json(serde_json::json!({"objects": objects}))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pods: Vec<serde_json::Value> = get_json(&http, &url, &auth, "/v1/pods");
        let running = pods
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count();
        if running == n || Instant::now() > deadline {
            assert_eq!(running, n, "not all pods running");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let loaded = rss_kib(child.id());
    for i in 0..n {
        delete(&format!("p{i}"));
    }
    for i in 0..n {
        gone(&format!("p{i}"));
    }
    let after_all = settle();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let size = std::fs::metadata(env!("CARGO_BIN_EXE_flotilla"))
        .unwrap()
        .len();
    println!("| figure | measured | target |");
    println!("|---|---|---|");
    println!(
        "| RSS idle (scheduler + agent, no pods) | {:.1} MiB | ≤ 25 MiB |",
        idle as f64 / 1024.0
    );
    println!(
        "| RSS with {n} long-running wasm pods | {:.1} MiB | — |",
        loaded as f64 / 1024.0
    );
    println!(
        "| RSS per pod | {:.0} KiB | ≤ 200 KiB |",
        (loaded.saturating_sub(idle)) as f64 / n as f64
    );
    println!(
        "| RSS while one small one-shot module has just run | {:.1} MiB | — |",
        after_one_peak as f64 / 1024.0
    );
    println!(
        "| RSS ≤ 30 s after that pod is deleted | {:.1} MiB | ≤ idle + 10 MiB ({:.1} MiB) |",
        after_one as f64 / 1024.0,
        (idle + 10 * 1024) as f64 / 1024.0
    );
    println!(
        "| RSS ≤ 30 s after all {n} pods are deleted | {:.1} MiB | ≤ idle + 10 MiB ({:.1} MiB) |",
        after_all as f64 / 1024.0,
        (idle + 10 * 1024) as f64 / 1024.0
    );
    println!(
        "| release binary size | {:.1} MB | ≤ 30 MB |",
        size as f64 / 1e6
    );
}

/// The pure placement function over 1,000 and 5,000 nodes.
fn placement(pods: usize) {
    use flotilla_api::Capacity;
    use flotilla_scheduler::placement::{NodeView, PodRequest, place};
    println!("## Placement throughput (pure function, {pods} pods per round)\n");
    println!("| nodes | pods placed | time | pods/s | target |");
    println!("|---|---|---|---|---|");
    for n in [1_000usize, 5_000] {
        let nodes: Vec<NodeView> = (0..n)
            .map(|i| NodeView {
                name: format!("node-{i:05}"),
                labels: [("zone".to_string(), format!("z{}", i % 4))].into(),
                ready: i % 50 != 0,
                unschedulable: false,
                allocatable: Capacity {
                    cpu: 2000,
                    memory: 1 << 30,
                    ..Default::default()
                },
                allocated: Capacity {
                    cpu: (i as u64 * 37) % 1500,
                    memory: 0,
                    ..Default::default()
                },
                pods: i % 7,
                runtimes: if i % 2 == 0 {
                    vec!["wasm".into(), "runc".into()]
                } else {
                    vec!["wasm".into()]
                },
                free_ips: 253,
            })
            .collect();
        let reqs: Vec<PodRequest> = (0..pods)
            .map(|i| PodRequest {
                id: format!("p{i}"),
                cpu: 10 + (i as u64 % 5) * 10,
                memory: 16 << 20,
                slots: 1,
                node_selector: if i % 10 == 0 {
                    [("zone".to_string(), "z1".to_string())].into()
                } else {
                    Labels::new()
                },
                runtimes: if i % 20 == 0 {
                    vec!["runc", "wasm"]
                } else {
                    vec!["wasm"]
                },
                needs_ip: i % 3 == 0,
                on_node: None,
            })
            .collect();
        let t = Instant::now();
        let plan = place(&nodes, &reqs);
        let took = t.elapsed();
        println!(
            "| {n} | {} | {} | {:.0} | ≥ 10,000 |",
            plan.bindings.len(),
            ms(took),
            plan.bindings.len() as f64 / took.as_secs_f64()
        );
    }
    println!(
        "\nFilters (ready, cordon, selector, cpu, memory) and least-allocated scoring over every node for every pod; 2% of nodes NotReady, 10% of pods with a zone selector.\n"
    );
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], dir: &Path) -> Child {
    spawn_logging(args, dir, "info")
}

/// Like [`spawn`], logging warnings only (a fleet's joins are many lines).
fn spawn_quiet(args: &[&str], dir: &Path) -> Child {
    spawn_logging(args, dir, "warn")
}

fn spawn_logging(args: &[&str], dir: &Path, level: &str) -> Child {
    Child(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .env("FLOTILLA_LOG", level)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.with_extension("log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap(),
    )
}

/// Real processes: a scheduler and two hosts on loopback; a one-replica
/// Deployment; `kill -9` of the host running it; time until its replacement
/// is Running on the other host. Default settings (node timeout 3 s,
/// heartbeat 0.5 s).
fn failover(trials: usize) {
    println!(
        "## Failover: host killed (kill -9) → NotReady → replacement Running ({trials} trials)\n"
    );
    let dir = tempfile::Builder::new()
        .prefix("flotilla-failover")
        .tempdir()
        .unwrap();
    let _keep = std::env::var_os("BENCH_KEEP")
        .map(|_| eprintln!("failover logs in {}", dir.path().display()));
    let sched = fleet::start_scheduler(&dir.path().join("sched"), "500ms", "2500ms");
    let quic = sched.quic.to_string();
    let (http, url, auth) = (&sched.http, &sched.url, &sched.auth);
    let get = |path: &str| -> serde_json::Value { sched.get(path) };
    let token = sched.join_token_text();
    let host = |name: &str| {
        spawn(
            &[
                "host",
                "--join",
                &quic,
                "--name",
                name,
                "--token",
                &token,
                "--max-instances",
                "64",
            ],
            &dir.path().join(name),
        )
    };
    let mut hosts: std::collections::HashMap<String, Child> = ["ha", "hb"]
        .iter()
        .map(|n| (n.to_string(), host(n)))
        .collect();
    let ready = |name: &str| get(&format!("/v1/nodes/{name}"))["status"]["ready"] == true;
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("hosts ready", &|| {
        get_json::<Vec<serde_json::Value>>(http, url, auth, "/v1/nodes").len() == 2
            && ready("ha")
            && ready("hb")
    });
    let module = upload(http, url, auth, flotilla_samples::COUNTER_P1);
    http.post(&format!("{url}/v1/apply"))
        .set("authorization", auth)
        .send_json(serde_json::json!({"objects": [{"kind": "Deployment", "metadata": {"name": "svc", "namespace": "default"},
            "spec": {"replicas": 1, "template": {"spec": {"members": [{"name": "c", "module": module, "env": {"INTERVAL_MS": "600000"}}]}}}}]}))
        .unwrap();
    let running_on = || -> Option<String> {
        let pods: Vec<serde_json::Value> = get_json(http, url, auth, "/v1/pods");
        pods.iter()
            .find(|p| p["status"]["phase"] == "Running")
            .and_then(|p| p["status"]["node"].as_str().map(str::to_string))
    };
    let mut not_ready = Vec::new();
    let mut replaced = Vec::new();
    for _ in 0..trials {
        wait("a running replica", &|| running_on().is_some());
        let victim = running_on().unwrap();
        let other = if victim == "ha" { "hb" } else { "ha" };
        wait("the other host ready", &|| ready(other));
        let t0 = Instant::now();
        drop(hosts.remove(&victim));
        let mut saw_not_ready = None;
        loop {
            if saw_not_ready.is_none() && !ready(&victim) {
                saw_not_ready = Some(t0.elapsed());
            }
            if running_on().as_deref() == Some(other) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no failover");
            std::thread::sleep(Duration::from_millis(10));
        }
        replaced.push(t0.elapsed());
        not_ready.push(saw_not_ready.unwrap_or(t0.elapsed()));
        // The victim comes back (with its saved certificate) for the next round.
        hosts.insert(
            victim.clone(),
            spawn(
                &[
                    "host",
                    "--join",
                    &quic,
                    "--name",
                    &victim,
                    "--max-instances",
                    "64",
                ],
                &dir.path().join(&victim),
            ),
        );
        let back = Instant::now();
        while !ready(&victim) {
            if back.elapsed() > Duration::from_secs(30) {
                for f in [format!("{victim}.log"), "sched.log".to_string()] {
                    let text = std::fs::read_to_string(dir.path().join(&f)).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    eprintln!(
                        "--- {f}\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                panic!("{victim} did not come back");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    not_ready.sort();
    replaced.sort();
    println!("| measure | p50 | p99 | max | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| kill → NotReady | {} | {} | {} | ≤ 3 s |",
        ms(pct(&not_ready, 0.5)),
        ms(pct(&not_ready, 0.99)),
        ms(*not_ready.last().unwrap())
    );
    println!(
        "| kill → replacement Running | {} | {} | {} | p50 ≤ 3 s, p99 ≤ 5 s |",
        ms(pct(&replaced, 0.5)),
        ms(pct(&replaced, 0.99)),
        ms(*replaced.last().unwrap())
    );
    println!(
        "\nObserved through the API every 10 ms. For reference, Kubernetes' defaults take about 5 minutes to evict and Nomad tens of seconds.\n"
    );
}

/// Processes that keep every core busy until dropped (ended by PID).
struct Spinners {
    _procs: Vec<Child>,
}

impl Spinners {
    fn start(n: usize) -> Spinners {
        Spinners {
            _procs: (0..n)
                .map(|_| {
                    Child(
                        Command::new("sh")
                            .args(["-c", "while :; do :; done"])
                            .spawn()
                            .unwrap(),
                    )
                })
                .collect(),
        }
    }
}

/// Real processes: a host with `pods` wasm pods is killed with `kill -9`
/// and started again while its scheduler is down (edge autonomy: the pods
/// come back from the agent's local state); each sample is the time from
/// spawning the new agent process until every pod's member has written its
/// first line. Measured on an idle machine and with every core kept busy by
/// spinning processes, in the same run; the idle restore is the reference.
fn restore(pods: usize, trials: usize) {
    println!(
        "## Agent restart → pods back, offline ({pods} pods, {trials} restarts each, idle and busy)\n"
    );
    let dir = tempfile::Builder::new()
        .prefix("flotilla-restore")
        .tempdir()
        .unwrap();
    let sched = fleet::start_scheduler(&dir.path().join("sched"), "500ms", "30s");
    let quic = sched.quic.to_string();
    let token = sched.join_token_text();
    let data = dir.path().join("hr");
    let host = |token: Option<&str>| {
        let mut args = vec![
            "host",
            "--join",
            &quic,
            "--name",
            "hr",
            "--max-instances",
            "256",
        ];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        spawn(&args, &data)
    };
    let mut agent = host(Some(&token));
    let deadline = Instant::now() + Duration::from_secs(120);
    let running = || -> usize {
        let pods: Vec<serde_json::Value> = sched.get("/v1/pods");
        pods.iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count()
    };
    let module = upload(
        &sched.http,
        &sched.url,
        &sched.auth,
        flotilla_samples::COUNTER_P2,
    );
    sched
        .http
        .post(&format!("{}/v1/apply", sched.url))
        .set("authorization", &sched.auth)
        .send_json(serde_json::json!({"objects": [{"kind": "Deployment", "metadata": {"name": "r", "namespace": "default"},
            "spec": {"replicas": pods, "template": {"spec": {"members": [{"name": "c", "module": module, "env": {"INTERVAL_MS": "600000"}}]}}}}]}))
        .unwrap();
    while running() < pods {
        assert!(Instant::now() < deadline, "pods did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The scheduler goes away for good: restores are offline.
    drop(sched);
    let logs = data.join("logs");
    let current_logs = || -> Vec<PathBuf> {
        std::fs::read_dir(&logs)
            .unwrap()
            .flatten()
            .map(|d| d.path().join("c.log"))
            .collect()
    };
    assert_eq!(current_logs().len(), pods);
    let mut idle = Vec::new();
    let mut busy = Vec::new();
    for round in 0..2 * trials {
        let load = (round % 2 == 1)
            .then(|| Spinners::start(std::thread::available_parallelism().map_or(2, |n| n.get())));
        drop(std::mem::replace(
            &mut agent,
            Child(Command::new("true").spawn().unwrap()),
        ));
        // Dead agent: its members' logs are removed so each new run's first
        // line is seen as a new file.
        for l in current_logs() {
            let _ = std::fs::remove_file(l);
        }
        let t0 = Instant::now();
        agent = host(None);
        while !current_logs()
            .iter()
            .all(|l| std::fs::read(l).is_ok_and(|b| b.starts_with(b"count 0\n")))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "pods did not come back"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if load.is_some() { &mut busy } else { &mut idle }.push(t0.elapsed());
        drop(load);
    }
    drop(agent);
    idle.sort();
    busy.sort();
    println!("| machine | p50 | max | ratio to idle (p50) |");
    println!("|---|---|---|---|");
    println!(
        "| idle | {} | {} | 1.00 |",
        ms(pct(&idle, 0.5)),
        ms(*idle.last().unwrap())
    );
    println!(
        "| every core busy ({} spinning processes) | {} | {} | {:.2} |",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
        ms(pct(&busy, 0.5)),
        ms(*busy.last().unwrap()),
        pct(&busy, 0.5).as_secs_f64() / pct(&idle, 0.5).as_secs_f64()
    );
    println!(
        "\nFrom spawning the agent process (its start-up, loading the saved pods and compiled artifacts from disk) until every member printed its first line; polled every 5 ms. Fewer than 1,000 samples: max, not p99.\n"
    );
}

/// `GET` an API path as JSON, with the bench's bearer token.
fn get_json<T: serde::de::DeserializeOwned>(
    http: &ureq::Agent,
    url: &str,
    auth: &str,
    path: &str,
) -> T {
    http.get(&format!("{url}{path}"))
        .set("authorization", auth)
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

/// A keep-alive HTTPS connection to the API (TLS 1.3, the cluster CA).
pub struct Https {
    rt: tokio::runtime::Runtime,
    send: hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>,
    auth: String,
}

impl Https {
    pub fn connect(addr: std::net::SocketAddr, ca_pem: &str, auth: &str) -> Https {
        use rustls::pki_types::pem::PemObject;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let send = rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .unwrap();
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            send
        });
        Https {
            rt,
            send,
            auth: auth.to_string(),
        }
    }

    /// Sends one request and reads the whole answer; its status.
    pub fn send(&mut self, method: &str, path: &str, body: Vec<u8>) -> u16 {
        use http_body_util::BodyExt;
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1")
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .unwrap();
        let send = &mut self.send;
        self.rt.block_on(async {
            send.ready().await.unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            status
        })
    }
}

/// Uploads a sample module through the API (`PUT /v1/blobs/…`) and returns
/// the member's `module` source as JSON.
fn upload(http: &ureq::Agent, url: &str, auth: &str, path: &str) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let digest = flotilla_api::manifest::digest_of(&bytes);
    http.put(&format!("{url}/v1/blobs/{digest}"))
        .set("authorization", auth)
        .send_bytes(&bytes)
        .unwrap();
    serde_json::json!({"digest": digest, "size": bytes.len()})
}
