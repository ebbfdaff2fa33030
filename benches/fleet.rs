//! Fleet-scale benchmarks with simulated agents (`BENCH_ONLY=fleet`):
//! join time, the scheduler's per-node cost of heartbeats, and end-to-end
//! placement throughput. The scheduler is the release binary in its own
//! process; the simulated agents run in this one.
//!
//! Reference in the same run: a bare quinn echo server (this program
//! re-executed with `BENCH_ROLE=echo`, same transport settings as the
//! scheduler) answering the same number of connections at the same rate.

use crate::{Child, get_json, ms, pct, rss_kib};
use flotilla_host::link::LinkConfig;
use flotilla_host::link::join::JoinToken;
use flotilla_host::sim::{SimConfig, SimFleet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MSG: usize = 16;

/// Entry point of the re-executed reference server: prints its port, serves
/// until killed.
pub fn echo_server_main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let out = std::env::var("BENCH_ECHO_CERT").unwrap();
        std::fs::write(&out, cert.cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        tls.alpn_protocols = vec![b"echo".to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        sc.transport_config(flotilla_scheduler::tls::transport());
        let ep = quinn::Endpoint::server(sc, "127.0.0.1:0".parse().unwrap()).unwrap();
        println!("{}", ep.local_addr().unwrap().port());
        while let Some(inc) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                while let Ok((mut tx, mut rx)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut buf = [0u8; MSG];
                        while rx.read_exact(&mut buf).await.is_ok() {
                            if tx.write_all(&buf).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
    });
}

struct Echo {
    _child: Child,
    pid: u32,
    addr: std::net::SocketAddr,
    client: quinn::ClientConfig,
}

fn start_echo(dir: &Path) -> Echo {
    use std::io::BufRead;
    let cert_path = dir.join("echo.pem");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("BENCH_ROLE", "echo")
        .env("BENCH_ECHO_CERT", &cert_path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read_to_string(&cert_path).unwrap();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"echo".to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    client.transport_config(flotilla_scheduler::tls::transport());
    Echo {
        pid: child.id(),
        _child: Child(child),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        client,
    }
}

async fn echo_connect(echo: &Echo) -> (quinn::Endpoint, quinn::Connection) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(echo.client.clone());
    let conn = ep.connect(echo.addr, "localhost").unwrap().await.unwrap();
    (ep, conn)
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

/// CPU share of one core and RSS of `pid` over `window`.
fn load(pid: u32, window: Duration) -> (f64, u64) {
    let c0 = cpu_time(pid);
    std::thread::sleep(window);
    let c1 = cpu_time(pid);
    ((c1 - c0).as_secs_f64() / window.as_secs_f64(), rss_kib(pid))
}

pub struct Sched {
    _child: Child,
    pid: u32,
    pub quic: std::net::SocketAddr,
    pub url: String,
    /// `Bearer <admin token>`.
    pub auth: String,
    pub http: ureq::Agent,
}

impl Sched {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        get_json(&self.http, &self.url, &self.auth, path)
    }

    pub fn ready_nodes(&self) -> usize {
        self.get::<Vec<serde_json::Value>>("/v1/nodes")
            .iter()
            .filter(|n| n["status"]["ready"] == true)
            .count()
    }

    fn join_token(&self) -> JoinToken {
        JoinToken::parse(&self.join_token_text()).unwrap()
    }

    /// A new join token (`FLT1…`), as `flotilla host --token` takes it.
    pub fn join_token_text(&self) -> String {
        let created: serde_json::Value = self
            .http
            .post(&format!("{}/v1/tokens", self.url))
            .set("authorization", &self.auth)
            .send_json(serde_json::json!({"role": "view", "join": true, "ttl_secs": 3600}))
            .unwrap()
            .into_json()
            .unwrap();
        created["token"].as_str().unwrap().to_string()
    }
}

/// `flotilla scheduler` on loopback (plain HTTP API, admin token from the
/// config it writes), ready when it returns.
pub fn start_scheduler(dir: &Path, heartbeat: &str, node_timeout: &str) -> Sched {
    start_scheduler_with(dir, heartbeat, node_timeout, &[])
}

/// [`start_scheduler`] with more arguments (`--store etcd://…`).
pub fn start_scheduler_with(
    dir: &Path,
    heartbeat: &str,
    node_timeout: &str,
    extra: &[&str],
) -> Sched {
    let quic = format!(
        "127.0.0.1:{}",
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let mut args = vec![
        "scheduler",
        "--insecure-http",
        "--listen",
        "127.0.0.1:0",
        "--quic",
        &quic,
        "--heartbeat",
        heartbeat,
        "--node-timeout",
        node_timeout,
    ];
    args.extend_from_slice(extra);
    let child = crate::spawn_quiet(&args, dir);
    while !dir.join("api.addr").exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = std::fs::read_to_string(dir.join("api.addr")).unwrap();
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
    Sched {
        pid: child.0.id(),
        _child: child,
        quic: quic.parse().unwrap(),
        url,
        auth: format!(
            "Bearer {}",
            config["contexts"][0]["token"].as_str().unwrap()
        ),
        http: ureq::AgentBuilder::new().build(),
    }
}

pub fn fleet_config(s: &Sched, prefix: &str, count: usize, parallelism: usize) -> SimConfig {
    SimConfig {
        server: s.quic,
        token: s.join_token(),
        count,
        prefix: prefix.into(),
        capacity: flotilla_api::Capacity {
            cpu: 2000,
            memory: 4 << 30,
            ..Default::default()
        },
        labels: Default::default(),
        link: LinkConfig::default(),
        join_parallelism: parallelism,
    }
}

pub fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sizes: nodes for the heartbeat run, the larger node count, pods to place,
/// measuring window, sequential joins.
pub struct Sizes {
    pub nodes: usize,
    pub big_nodes: usize,
    pub pods: usize,
    pub window: Duration,
    pub joins: usize,
}

pub fn fleet(rt: &tokio::runtime::Runtime, sz: &Sizes) {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-fleet")
        .tempdir()
        .unwrap();
    let echo = start_echo(dir.path());

    // --- Join time: sequential, one at a time, against a reference handshake.
    let s = start_scheduler(&dir.path().join("a"), "500ms", "2500ms");
    let seq: SimFleet = rt
        .block_on(flotilla_host::sim::start(
            fleet_config(&s, "seq", sz.joins, 1),
            |_| {},
        ))
        .unwrap();
    let mut join = seq.join_times.clone();
    join.sort();
    rt.block_on(seq.shutdown());
    let mut hs = Vec::new();
    rt.block_on(async {
        for _ in 0..sz.joins {
            let t = Instant::now();
            let (ep, conn) = echo_connect(&echo).await;
            hs.push(t.elapsed());
            conn.close(0u32.into(), b"");
            ep.wait_idle().await;
        }
    });
    hs.sort();
    println!(
        "## Join (simulated agents, {} sequential joins)\n",
        sz.joins
    );
    println!("| measure | p50 | p99 | reference: bare QUIC handshake p50 | ratio (p50) |");
    println!("|---|---|---|---|---|");
    println!(
        "| token join: pinned-CA TLS + key + CSR → signed node certificate | {} | {} | {} | {:.1} |",
        ms(pct(&join, 0.5)),
        ms(pct(&join, 0.99)),
        ms(pct(&hs, 0.5)),
        pct(&join, 0.5).as_secs_f64() / pct(&hs, 0.5).as_secs_f64()
    );

    // --- Heartbeat cost with `nodes` agents at the default 0.5 s heartbeat.
    let (idle_cpu, idle_rss) = load(s.pid, Duration::from_secs(2));
    let t = Instant::now();
    let fleet = rt
        .block_on(flotilla_host::sim::start(
            fleet_config(&s, "sim", sz.nodes, 16),
            |_| {},
        ))
        .unwrap();
    let joined_in = t.elapsed();
    let mut par = fleet.join_times.clone();
    par.sort();
    wait(
        "all simulated nodes Ready",
        Duration::from_secs(120),
        || s.ready_nodes() == sz.nodes,
    );
    std::thread::sleep(Duration::from_secs(2));
    let (cpu, rss) = load(s.pid, sz.window);
    // Reference: the same number of connections, one 16-byte message and
    // reply every 0.5 s each.
    let (ref_cpu, ref_rss, ref_idle_rss) = rt.block_on(async {
        let idle_rss = rss_kib(echo.pid);
        let mut conns = Vec::new();
        let stop = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for i in 0..sz.nodes {
            let (ep, conn) = echo_connect(&echo).await;
            let (mut tx, mut rx) = conn.open_bi().await.unwrap();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                tick.reset_after(Duration::from_millis((i % 500) as u64));
                let mut buf = [0u8; MSG];
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.notified() => break,
                    }
                    if tx.write_all(&buf).await.is_err() || rx.read_exact(&mut buf).await.is_err() {
                        break;
                    }
                }
            }));
            conns.push((ep, conn));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (cpu, rss) = tokio::task::spawn_blocking({
            let (pid, w) = (echo.pid, sz.window);
            move || load(pid, w)
        })
        .await
        .unwrap();
        stop.notify_waiters();
        for t in tasks {
            t.abort();
        }
        for (_, c) in &conns {
            c.close(0u32.into(), b"");
        }
        (cpu, rss, idle_rss)
    });
    let per_node = |cpu: f64| cpu * 1e6 / sz.nodes as f64; // µs of CPU per node per second
    println!(
        "\n## Heartbeat cost on the scheduler ({} simulated agents, heartbeat 0.5 s, {:.0} s window)\n",
        sz.nodes,
        sz.window.as_secs_f64()
    );
    println!(
        "{} nodes joined in {:.1} s with 16 joins in flight (join p50 {}, p99 {}).\n",
        sz.nodes,
        joined_in.as_secs_f64(),
        ms(pct(&par, 0.5)),
        ms(pct(&par, 0.99))
    );
    println!("| | CPU (share of one core) | CPU per node | RSS | RSS per node |");
    println!("|---|---|---|---|---|");
    println!(
        "| flotilla scheduler | {:.1} % | {:.0} µs/s | {:.1} MiB (idle {:.1}) | {:.1} KiB |",
        cpu * 100.0,
        per_node(cpu),
        rss as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        (rss.saturating_sub(idle_rss)) as f64 / sz.nodes as f64
    );
    println!(
        "| reference: bare quinn echo | {:.1} % | {:.0} µs/s | {:.1} MiB (idle {:.1}) | {:.1} KiB |",
        ref_cpu * 100.0,
        per_node(ref_cpu),
        ref_rss as f64 / 1024.0,
        ref_idle_rss as f64 / 1024.0,
        (ref_rss.saturating_sub(ref_idle_rss)) as f64 / sz.nodes as f64
    );
    println!(
        "| ratio | {:.2} | | | {:.2} |",
        cpu / ref_cpu.max(1e-9),
        (rss.saturating_sub(idle_rss)) as f64
            / (ref_rss.saturating_sub(ref_idle_rss)).max(1) as f64
    );
    println!(
        "\n(scheduler idle before the fleet joined: {:.1} % CPU)",
        idle_cpu * 100.0
    );

    // --- End-to-end placement over this fleet.
    println!("\n## Placement end to end (simulated agents)\n");
    println!(
        "| nodes | heartbeat | pods | apply → all on their agents | pods/s | apply → all Running | pods/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    placement_row(&s, &fleet, sz.nodes, "0.5 s", sz.pods);
    rt.block_on(fleet.shutdown());
    drop(s);

    // --- The larger fleet: slower heartbeats, as large clusters use.
    let s = start_scheduler(&dir.path().join("b"), "5s", "30s");
    let fleet = rt
        .block_on(flotilla_host::sim::start(
            fleet_config(&s, "big", sz.big_nodes, 32),
            |_| {},
        ))
        .unwrap();
    wait(
        "all simulated nodes Ready",
        Duration::from_secs(300),
        || s.ready_nodes() == sz.big_nodes,
    );
    placement_row(&s, &fleet, sz.big_nodes, "5 s", sz.pods);
    let (cpu, rss) = load(s.pid, sz.window);
    println!(
        "\nWith {} nodes at a 5 s heartbeat, after placement: scheduler {:.1} % of one core, RSS {:.1} MiB.",
        sz.big_nodes,
        cpu * 100.0,
        rss as f64 / 1024.0
    );
    rt.block_on(fleet.shutdown());
    println!(
        "\nPlacement end to end: one Deployment applied over the API; the clock stops when its status counts every replica Running — pods created, placed, written to the store, sent to the agents as `Assign` frames and reported back Running.\n"
    );
}

/// Measures [`place_e2e`] and prints it as a row of the placement table.
fn placement_row(s: &Sched, fleet: &SimFleet, nodes: usize, heartbeat: &str, pods: usize) {
    let (assigned, running) = place_e2e(s, fleet, "wide", pods);
    let rate = |d: Duration| pods as f64 / d.as_secs_f64();
    println!(
        "| {nodes} | {heartbeat} | {pods} | {} | {:.0} | {} | {:.0} |",
        ms(assigned),
        rate(assigned),
        ms(running),
        rate(running)
    );
}

/// Applies a Deployment of `n` replicas; time until every pod has reached
/// its simulated agent (placed, stored, `Assign` received), and until the
/// Deployment counts all Running (status reports written back).
fn place_e2e(s: &Sched, fleet: &SimFleet, name: &str, n: usize) -> (Duration, Duration) {
    let module = crate::upload(&s.http, &s.url, &s.auth, flotilla_samples::COUNTER_P1);
    let t = Instant::now();
    let assigned = apply_until_on_agents(s, fleet, "default", name, &module, n);
    wait("all replicas Running", Duration::from_secs(300), || {
        let d: serde_json::Value = s.get(&format!("/v1/deployments/default/{name}"));
        d["status"]["ready"].as_u64() == Some(n as u64)
    });
    (assigned, t.elapsed())
}

/// Applies a Deployment `ns/name` of `n` replicas of `module` (a counter
/// claiming 10 millicores); the time until the agents hold `n` pods.
fn apply_until_on_agents(
    s: &Sched,
    fleet: &SimFleet,
    ns: &str,
    name: &str,
    module: &serde_json::Value,
    n: usize,
) -> Duration {
    let body = serde_json::json!({"objects": [{
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": n, "template": {"labels": {"app": name}, "spec": {"members": [
            {"name": "c", "module": module, "resources": {"cpu": 10}}]}}}
    }]});
    let t = Instant::now();
    s.http
        .post(&format!("{}/v1/apply", s.url))
        .set("authorization", &s.auth)
        .send_json(body)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while fleet.pod_count() < n {
        assert!(Instant::now() < deadline, "timed out: pods on agents");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.elapsed()
}

/// One round of end-to-end placement: [`apply_until_on_agents`], then the
/// Deployment deleted and its pods gone from the agents and the store, so
/// the next round starts from the same empty fleet.
pub fn round(
    s: &Sched,
    fleet: &SimFleet,
    ns: &str,
    name: &str,
    module: &serde_json::Value,
    pods: usize,
) -> Duration {
    let took = apply_until_on_agents(s, fleet, ns, name, module, pods);
    s.http
        .delete(&format!("{}/v1/deployments/{ns}/{name}", s.url))
        .set("authorization", &s.auth)
        .call()
        .unwrap();
    wait(
        "pods gone from the agents",
        Duration::from_secs(300),
        || fleet.pod_count() == 0,
    );
    wait("pods gone from the store", Duration::from_secs(300), || {
        s.get::<Vec<serde_json::Value>>(&format!("/v1/pods?namespace={ns}"))
            .is_empty()
    });
    took
}

/// Placement end to end with and without a scoring plugin (issue 18): the
/// real scheduler process, `nodes` simulated agents, a Deployment of `pods`
/// replicas applied over the API, the clock stopped when every replica is
/// on its agent. The least_loaded sample is a Plugin selecting namespace
/// `scored`; the same Deployment goes to `default` (no plugin) and to
/// `scored` in turn, `rounds` times each, each deleted (and its pods gone
/// from the agents) before the next, so both run against the same empty
/// fleet and store.
pub fn placement_with_plugin(
    rt: &tokio::runtime::Runtime,
    nodes: usize,
    pods: usize,
    rounds: usize,
) {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-plugin-e2e")
        .tempdir()
        .unwrap();
    let s = start_scheduler(&dir.path().join("s"), "500ms", "2500ms");
    let fleet: SimFleet = rt
        .block_on(flotilla_host::sim::start(
            fleet_config(&s, "p", nodes, 16),
            |_| {},
        ))
        .unwrap();
    wait("nodes ready", Duration::from_secs(120), || {
        s.ready_nodes() == nodes
    });
    let plugin = crate::upload(&s.http, &s.url, &s.auth, flotilla_samples::LEAST_LOADED_P2);
    s.http
        .post(&format!("{}/v1/apply", s.url))
        .set("authorization", &s.auth)
        .send_json(serde_json::json!({"objects": [{
            "kind": "Plugin", "metadata": {"name": "least-loaded"},
            "spec": {"module": plugin, "hook": "scheduler",
                     "selector": {"namespaces": ["scored"]}, "failure_policy": "Fail"}}]}))
        .unwrap();
    let module = crate::upload(&s.http, &s.url, &s.auth, flotilla_samples::COUNTER_P1);
    let run = |ns: &str| round(&s, &fleet, ns, "spread", &module, pods);
    let (mut plain, mut scored) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(run("default"));
        scored.push(run("scored"));
    }
    plain.sort();
    scored.sort();
    let (p, q) = (plain[rounds / 2], scored[rounds / 2]);
    let rate = |d: Duration| pods as f64 / d.as_secs_f64();
    println!(
        "## Placement end to end with a scoring plugin ({nodes} simulated nodes, a Deployment of {pods}, median of {rounds} rounds each, alternated)\n"
    );
    println!("| | apply → all on their agents | pods/s | share of no plugin | target |");
    println!("|---|---|---|---|---|");
    println!("| no plugin | {} | {:.0} | 100 % | — |", ms(p), rate(p));
    let share = rate(q) / rate(p) * 100.0;
    println!(
        "| least_loaded plugin | {} | {:.0} | **{:.0} %** | ≥ 50 % ({}) |",
        ms(q),
        rate(q),
        share,
        if share >= 50.0 { "met" } else { "**missed**" }
    );
    println!(
        "\nThe real scheduler process (`flotilla scheduler`), {nodes} simulated agents over QUIC; each round applies the Deployment over the API and stops the clock when every replica is on its agent (created, placed — with the plugin's pass: `begin` with the {nodes} nodes, then `filter` and `score` per pod — written, sent as `Assign`); then deletes it and waits until the agents and the store hold none.\n"
    );
    rt.block_on(fleet.shutdown());
}
