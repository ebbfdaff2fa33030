//! Pod networking: sandbox setup against the same steps done with iproute2
//! commands, the service proxy against a direct connection, and the
//! cross-node tunnel against a raw quinn stream between the same two
//! namespaces. Everything runs in network namespaces the benchmark creates
//! (and removes); nothing touches the machine's own network.

use flotilla_api::net::Cidr;
use flotilla_api::proto::ServiceView;
use flotilla_api::{Protocol, ServicePort};
use flotilla_host::net::podnet::{NetMode, PodNetwork, PodThread};
use flotilla_host::net::proxy::{Proxy, ProxyLimits};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Sizes {
    /// Sandboxes made (and removed) per method.
    pub sandboxes: usize,
    /// Request/response round trips per latency run.
    pub round_trips: usize,
    /// Bytes sent per throughput run.
    pub bulk: usize,
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn pct(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("iproute2");
    assert!(st.success(), "ip {args:?}");
}

/// A named network namespace, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("fltb{}-{tag}", std::process::id() % 100_000);
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Ns(name)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn enter(path: &str) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: setns(2) on the calling thread with a namespace fd we own.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}");
}

/// A runtime whose threads (and the caller, for `block_on`) live in `ns`.
fn runtime_in(ns: &str) -> tokio::runtime::Runtime {
    let path = ns.to_string();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || enter(&path))
        .build()
        .unwrap()
}

pub fn net(sizes: &Sizes) {
    let node = Ns::new("node");
    let data = tempfile::tempdir().unwrap();
    // The whole node side runs on a thread inside the node namespace.
    let path = node.path();
    let data_dir = data.path().to_path_buf();
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&path);
            let rt = runtime_in(&path);
            let cidr: Cidr = "10.88.0.0/24".parse().unwrap();
            let network =
                PodNetwork::new(NetMode::Bridge, data_dir.join("netns"), Default::default())
                    .unwrap();
            network.set_cidr(cidr, None).unwrap();
            network.ensure_bridge().unwrap();
            setup(&network, cidr, sizes);
            rt.block_on(proxy(&network, cidr, sizes, &path));
        })
        .join()
        .unwrap();
    });
    tunnel(sizes);
}

/// Sandbox setup: flotilla (one thread, netlink) against the same steps as
/// `ip` commands (the way shell-based CNI plugins do it).
fn setup(network: &PodNetwork, cidr: Cidr, sizes: &Sizes) {
    let addrs: Vec<_> = cidr.pod_addresses().take(sizes.sandboxes).collect();
    let mut made = Vec::new();
    let mut gone = Vec::new();
    let mut threads = Vec::new();
    for (i, pod_ip) in addrs.iter().enumerate() {
        let uid = format!("bench-{i}");
        // As an agent does after each sandbox: spares ready for the next.
        network.refill();
        let t = Instant::now();
        let sb = network.sandbox(&uid, Some(*pod_ip)).unwrap();
        made.push(t.elapsed());
        let t = Instant::now();
        let thread = PodThread::start(&uid, sb.netns.as_deref()).unwrap();
        threads.push(t.elapsed());
        drop(thread);
        let t = Instant::now();
        network.release(&uid);
        gone.push(t.elapsed());
    }
    network.drain_pool();
    // Without spares (every namespace made on the spot), for comparison.
    let mut cold = Vec::new();
    for (i, pod_ip) in addrs.iter().enumerate().take(50) {
        let uid = format!("cold-{i}");
        let t = Instant::now();
        network.sandbox(&uid, Some(*pod_ip)).unwrap();
        cold.push(t.elapsed());
        network.release(&uid);
    }
    let mut theirs = Vec::new();
    for (i, pod_ip) in addrs.iter().enumerate() {
        let ns = format!("fltb{}-ref{i}", std::process::id() % 100_000);
        let veth = format!("vr{i}");
        let addr = format!("{pod_ip}/24");
        let gw = cidr.gateway().to_string();
        let t = Instant::now();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &veth, "master", "flt0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", &gw]);
        theirs.push(t.elapsed());
        ip(&["link", "del", &veth]);
        ip(&["netns", "del", &ns]);
    }
    println!(
        "## Pod network setup ({} sandboxes each: namespace, loopback, veth into the bridge, address, default route)\n",
        addrs.len()
    );
    println!("| | p50 | p99 | ratio (p50) |");
    println!("|---|---|---|---|");
    println!(
        "| flotilla sandbox (netlink; a spare namespace ready, as in steady state) | {} | {} | {:.2} of iproute2 |",
        ms(pct(&made, 0.5)),
        ms(pct(&made, 0.99)),
        pct(&made, 0.5).as_secs_f64() / pct(&theirs, 0.5).as_secs_f64()
    );
    println!(
        "| flotilla sandbox without spare namespaces (made on the spot) | {} | {} | {:.2} of iproute2 |",
        ms(pct(&cold, 0.5)),
        ms(pct(&cold, 0.99)),
        pct(&cold, 0.5).as_secs_f64() / pct(&theirs, 0.5).as_secs_f64()
    );
    println!(
        "| the same with 7 `ip` commands | {} | {} | 1 |",
        ms(pct(&theirs, 0.5)),
        ms(pct(&theirs, 0.99))
    );
    println!(
        "| pod thread start (wasm members' runtime, in the namespace) | {} | {} | |",
        ms(pct(&threads, 0.5)),
        ms(pct(&threads, 0.99))
    );
    println!(
        "| sandbox removal | {} | {} | |",
        ms(pct(&gone, 0.5)),
        ms(pct(&gone, 0.99))
    );
    println!("\ntarget: setup ≤ 2 ms\n");
}

/// An echo server for latency and a sink (reports bytes read) for
/// throughput, on the pod's thread.
async fn serve_echo(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 256 * 1024];
            if mode[0] == b'e' {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            let mut total = 0u64;
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = s.write_all(&total.to_be_bytes()).await;
        });
    }
}

/// What one target measured: round-trip times, the median bulk transfer
/// time, connect + one round trip times.
type Measured = (Vec<Duration>, Duration, Vec<Duration>);

/// Bulk transfers per target (their median is reported).
const BULK_REPEATS: usize = 3;

/// Round trips of 64 bytes, connects, and bulk transfers to each target
/// (a network namespace file and an address in it), **alternated**: one
/// round trip to each in turn, one connect to each, one bulk transfer to
/// each, so a change in the machine's state meanwhile touches every
/// target alike. Sockets keep the namespace they were made in, so one
/// thread drives them all.
fn measure_set(targets: &[(&str, SocketAddr)], sizes: &Sizes) -> Vec<Measured> {
    let (rounds, bulk) = (sizes.round_trips, sizes.bulk);
    let targets: Vec<(String, SocketAddr)> =
        targets.iter().map(|(ns, a)| (ns.to_string(), *a)).collect();
    std::thread::scope(|s| {
        s.spawn(move || {
            let connect = |i: usize| {
                let (ns, addr) = &targets[i];
                enter(ns);
                let c = TcpStream::connect(addr).unwrap();
                c.set_nodelay(true).unwrap();
                c
            };
            let n = targets.len();
            let mut out: Vec<Measured> = (0..n)
                .map(|_| (Vec::with_capacity(rounds), Duration::ZERO, Vec::new()))
                .collect();
            let msg = [7u8; 64];
            let mut back = [0u8; 64];
            let mut conns: Vec<TcpStream> = (0..n)
                .map(|i| {
                    let mut c = connect(i);
                    c.write_all(b"e").unwrap();
                    c
                })
                .collect();
            for _ in 0..rounds {
                for (i, c) in conns.iter_mut().enumerate() {
                    let t = Instant::now();
                    c.write_all(&msg).unwrap();
                    c.read_exact(&mut back).unwrap();
                    out[i].0.push(t.elapsed());
                }
            }
            drop(conns);
            for _ in 0..(rounds / 10).max(5) {
                for (i, o) in out.iter_mut().enumerate() {
                    let t = Instant::now();
                    let mut c = connect(i);
                    c.write_all(b"e").unwrap();
                    c.write_all(&msg).unwrap();
                    c.read_exact(&mut back).unwrap();
                    o.2.push(t.elapsed());
                }
            }
            let chunk = vec![1u8; 256 * 1024];
            let mut bulks: Vec<Vec<Duration>> = vec![Vec::new(); n];
            for _ in 0..BULK_REPEATS {
                for (i, b) in bulks.iter_mut().enumerate() {
                    let mut c = connect(i);
                    c.write_all(b"s").unwrap();
                    let t = Instant::now();
                    let mut sent = 0;
                    while sent < bulk {
                        let k = chunk.len().min(bulk - sent);
                        c.write_all(&chunk[..k]).unwrap();
                        sent += k;
                    }
                    c.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut total = [0u8; 8];
                    c.read_exact(&mut total).unwrap();
                    assert_eq!(u64::from_be_bytes(total) as usize, bulk);
                    b.push(t.elapsed());
                }
            }
            for (o, mut b) in out.iter_mut().zip(bulks) {
                b.sort();
                o.1 = b[b.len() / 2];
            }
            out
        })
        .join()
        .unwrap()
    })
}

/// The service proxy (virtual IP → pod) against connecting to the pod.
async fn proxy(network: &PodNetwork, cidr: Cidr, sizes: &Sizes, node_ns: &str) {
    let ip = cidr.pod_addresses().next().unwrap();
    let sb = network.sandbox("bench-echo", Some(ip)).unwrap();
    let pod = PodThread::start("bench-echo", sb.netns.as_deref()).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = pod.spawn(async move {
        let l = tokio::net::TcpListener::bind("0.0.0.0:9000").await.unwrap();
        let _ = tx.send(());
        serve_echo(l).await
    });
    rx.await.unwrap();
    let view = |vip: &str| ServiceView {
        namespace: "default".into(),
        name: "echo".into(),
        cluster_ip: vip.into(),
        ports: vec![ServicePort {
            port: 80,
            target_port: Some(9000),
            protocol: Protocol::Tcp,
            node_port: None,
            name: String::new(),
        }],
        endpoints: vec![ip.to_string()],
        routes: Vec::new(),
    };
    // The proxy as agents run it (connection caps, idle timeout), and one
    // with no limits at all (the proxy before it had any), side by side.
    let proxy = Proxy::new(true, None);
    proxy.update(vec![view("10.96.0.2")]);
    let unlimited = Proxy::with_limits(true, None, ProxyLimits::unlimited());
    unlimited.update(vec![view("10.96.0.3")]);
    let mut all = tokio::task::block_in_place(|| {
        measure_set(
            &[
                (node_ns, SocketAddr::from((ip, 9000))),
                (node_ns, "10.96.0.2:80".parse().unwrap()),
                (node_ns, "10.96.0.3:80".parse().unwrap()),
            ],
            sizes,
        )
    })
    .into_iter();
    let (direct, proxied, uncapped) = (
        all.next().unwrap(),
        all.next().unwrap(),
        all.next().unwrap(),
    );
    drop(server);
    drop(pod);
    drop(proxy);
    drop(unlimited);
    network.release("bench-echo");
    let mib = sizes.bulk as f64 / (1 << 20) as f64;
    println!(
        "## Service proxy against a direct connection (node → pod on the same node; {} round trips of 64 B, {mib:.0} MiB bulk ×{BULK_REPEATS}, the three alternated)\n",
        sizes.round_trips
    );
    println!("| | RTT p50 | RTT p99 | connect + 1 RTT p50 | MiB/s |");
    println!("|---|---|---|---|---|");
    for (name, (rtt, bulk, conn)) in [
        ("direct to the pod", &direct),
        ("through the service VIP", &proxied),
        ("through a VIP of a proxy without limits", &uncapped),
    ] {
        println!(
            "| {name} | {} | {} | {} | {:.0} |",
            us(pct(rtt, 0.5)),
            us(pct(rtt, 0.99)),
            us(pct(conn, 0.5)),
            mib / bulk.as_secs_f64()
        );
    }
    println!(
        "\nratio proxy/direct: RTT p50 {:.2}, throughput {:.2}\n",
        pct(&proxied.0, 0.5).as_secs_f64() / pct(&direct.0, 0.5).as_secs_f64(),
        direct.1.as_secs_f64() / proxied.1.as_secs_f64()
    );
    println!(
        "cost of the proxy's limits (issue 14 item 7: connection caps, idle timeout), limited/unlimited: RTT p50 {:.3}, RTT p99 {:.3}, throughput {:.3} (target: within 5%)\n",
        pct(&proxied.0, 0.5).as_secs_f64() / pct(&uncapped.0, 0.5).as_secs_f64(),
        pct(&proxied.0, 0.99).as_secs_f64() / pct(&uncapped.0, 0.99).as_secs_f64(),
        uncapped.1.as_secs_f64() / proxied.1.as_secs_f64()
    );
}

/// Cross-node pod traffic: a real scheduler and two agents in their own
/// namespaces (processes), a pod on each node (so both take part in pod
/// networking), round trips and a bulk transfer from node a to b's pod;
/// through the tunnel, and with direct routes (a second cluster); against a
/// raw quinn stream between the same two namespaces (the link's transport
/// settings, no relay).
fn tunnel(sizes: &Sizes) {
    // Three clusters side by side, measured alternately: the tunnel as it
    // is, the tunnel with a relay that does not check sources (what the
    // check costs), and direct routes.
    let checked = Rig::start(false, &[]);
    let unchecked = Rig::start(false, &["--bench-unchecked-tunnel"]);
    let direct = Rig::start(true, &[]);
    let mut all = measure_set(
        &[
            (&checked.ns_a, checked.target()),
            (&unchecked.ns_a, unchecked.target()),
            (&direct.ns_a, direct.target()),
        ],
        sizes,
    )
    .into_iter();
    let (tunnelled, open, direct_m) = (
        all.next().unwrap(),
        all.next().unwrap(),
        all.next().unwrap(),
    );
    let raw = raw_quinn(
        &checked.ns_a,
        &checked.ns_b,
        &checked.lab.net.addr(1),
        sizes,
    );
    drop((checked, unchecked, direct));
    let mib = sizes.bulk as f64 / (1 << 20) as f64;
    println!(
        "## Cross-node pod traffic against raw quinn (node a → pod on node b; {} round trips of 64 B, {mib:.0} MiB bulk; the three clusters alternated)\n",
        sizes.round_trips
    );
    println!("| | RTT p50 | RTT p99 | MiB/s |");
    println!("|---|---|---|---|");
    let row = |name: &str, rtt: &[Duration], bulk: Duration| {
        println!(
            "| {name} | {} | {} | {:.0} |",
            us(pct(rtt, 0.5)),
            us(pct(rtt, 0.99)),
            mib / bulk.as_secs_f64()
        );
    };
    row(
        "TCP over the tunnel (TUN → QUIC datagram → relay → QUIC datagram → TUN)",
        &tunnelled.0,
        tunnelled.1,
    );
    row("the same, relay without the source check", &open.0, open.1);
    row(
        "TCP over a direct route (`--direct-routes`, plain)",
        &direct_m.0,
        direct_m.1,
    );
    row("raw quinn stream a → b (one hop)", &raw.0, raw.1);
    println!(
        "\nratio tunnel/raw quinn: throughput {:.2}, RTT p50 {:.2}\n",
        raw.1.as_secs_f64() / tunnelled.1.as_secs_f64(),
        pct(&tunnelled.0, 0.5).as_secs_f64() / pct(&raw.0, 0.5).as_secs_f64()
    );
    println!(
        "cost of the relay's source check (issue 14 item 2), checked/unchecked: throughput {:.3}, RTT p50 {:.3} (target: within 5%)\n",
        open.1.as_secs_f64() / tunnelled.1.as_secs_f64(),
        pct(&tunnelled.0, 0.5).as_secs_f64() / pct(&open.0, 0.5).as_secs_f64()
    );
}

/// A two-node cluster with a native echo/sink in a pod on b, reached from
/// a's namespace. Fields drop in order: the pod's runtime, the agents, the
/// lab.
struct Rig {
    _pod_rt: tokio::runtime::Runtime,
    _a: crate::common::lab::Proc,
    _b: crate::common::lab::Proc,
    ns_a: String,
    ns_b: String,
    pod_ip: std::net::Ipv4Addr,
    lab: crate::common::lab::Lab,
}

impl Rig {
    fn target(&self) -> SocketAddr {
        SocketAddr::from((self.pod_ip, 9000))
    }

    fn start(direct: bool, sched_extra: &[&str]) -> Rig {
        use crate::common::lab::*;
        let lab = Lab::start(&["a", "b"], sched_extra);
        let extra: &[&str] = if direct { &["--direct-routes"] } else { &[] };
        let a = lab.agent_with(0, extra);
        let b = lab.agent_with(1, extra);
        crate::common::wait_until(Duration::from_secs(30), "nodes ready", || {
            lab.ready("a") && lab.ready("b")
        });
        for node in ["a", "b"] {
            lab.apply(
                &format!("pod-{node}.toml"),
                &format!(
                    "kind = \"Pod\"\nname = \"target-{node}\"\nnode_selector = {{ \"flotilla.dev/hostname\" = \"{node}\" }}\n[[members]]\nname = \"idle\"\nwasm = \"{}\"\nargs = [\"serve\", \"9001\"]\nports = [9000]\n",
                    flotilla_samples::TCP_P2
                ),
            );
        }
        let mut pod = None;
        crate::common::wait_until(Duration::from_secs(30), "pods running", || {
            let pods = lab.pods();
            let running = pods
                .iter()
                .filter(|p| p["status"]["phase"] == "Running")
                .count();
            pod = pods
                .into_iter()
                .find(|p| p["metadata"]["name"] == "target-b");
            running == 2
        });
        let pod = pod.unwrap();
        let pod_ip: std::net::Ipv4Addr = pod["status"]["pod_ip"].as_str().unwrap().parse().unwrap();
        let uid = pod["metadata"]["uid"].as_str().unwrap();
        let pod_ns = lab.data("b").join("netns").join(uid);
        // A native echo/sink inside the pod's namespace (the pod's own
        // member must not be what is measured).
        let pod_rt = runtime_in(pod_ns.to_str().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        pod_rt.spawn(async move {
            let l = tokio::net::TcpListener::bind("0.0.0.0:9000").await.unwrap();
            tx.send(()).unwrap();
            serve_echo(l).await
        });
        rx.recv().unwrap();
        let ns_a = format!("/run/netns/{}", lab.net.ns(0));
        let ns_b = format!("/run/netns/{}", lab.net.ns(1));
        // The node's packets to b's pod: through the tunnel or the direct route.
        crate::common::wait_until(Duration::from_secs(20), "a reaches b's pod", || {
            !tcp_exchange(&lab.net, 0, &format!("{pod_ip}:9000"), "e12345678").is_empty()
        });
        Rig {
            _pod_rt: pod_rt,
            _a: a,
            _b: b,
            ns_a,
            ns_b,
            pod_ip,
            lab,
        }
    }
}

/// Round trips and a bulk transfer over one quinn stream, client in `ns_a`,
/// server in `ns_b` listening on `addr_b`.
fn raw_quinn(ns_a: &str, ns_b: &str, addr_b: &str, sizes: &Sizes) -> (Vec<Duration>, Duration) {
    use std::sync::Arc;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = || Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
    ));
    sc.transport_config(flotilla_scheduler::tls::transport());
    let server_addr: SocketAddr = format!("{addr_b}:7400").parse().unwrap();
    let server_rt = runtime_in(ns_b);
    // Sockets are made by the runtime's worker threads (inside the
    // namespace), not by the thread calling block_on.
    let ep = server_rt
        .block_on(server_rt.spawn(async move { quinn::Endpoint::server(sc, server_addr).unwrap() }))
        .unwrap();
    server_rt.spawn(async move {
        while let Some(inc) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                while let Ok((mut tx, mut rx)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut mode = [0u8; 1];
                        if rx.read_exact(&mut mode).await.is_err() {
                            return;
                        }
                        let mut buf = vec![0u8; 256 * 1024];
                        if mode[0] == b'e' {
                            let mut msg = [0u8; 64];
                            while rx.read_exact(&mut msg).await.is_ok() {
                                if tx.write_all(&msg).await.is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                        let mut total = 0u64;
                        while let Ok(Some(n)) = rx.read(&mut buf).await {
                            total += n as u64;
                        }
                        let _ = tx.write_all(&total.to_be_bytes()).await;
                        let _ = tx.finish();
                        let _ = tx.stopped().await;
                    });
                }
            });
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let mut ctls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ctls.alpn_protocols = vec![b"bench".to_vec()];
    let mut cc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(ctls).unwrap(),
    ));
    cc.transport_config(flotilla_scheduler::tls::transport());
    let client_rt = runtime_in(ns_a);
    let (rounds, bulk) = (sizes.round_trips, sizes.bulk);
    let out = client_rt
        .block_on(client_rt.spawn(async move {
            let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(cc);
            let conn = ep.connect(server_addr, "localhost").unwrap().await.unwrap();
            let (mut tx, mut rx) = conn.open_bi().await.unwrap();
            tx.write_all(b"e").await.unwrap();
            let msg = [7u8; 64];
            let mut back = [0u8; 64];
            let mut rtt = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let t = Instant::now();
                tx.write_all(&msg).await.unwrap();
                rx.read_exact(&mut back).await.unwrap();
                rtt.push(t.elapsed());
            }
            let (mut tx, mut rx) = conn.open_bi().await.unwrap();
            tx.write_all(b"s").await.unwrap();
            let chunk = vec![1u8; 256 * 1024];
            let t = Instant::now();
            let mut sent = 0;
            while sent < bulk {
                let n = chunk.len().min(bulk - sent);
                tx.write_all(&chunk[..n]).await.unwrap();
                sent += n;
            }
            tx.finish().unwrap();
            let mut total = [0u8; 8];
            rx.read_exact(&mut total).await.unwrap();
            assert_eq!(u64::from_be_bytes(total) as usize, bulk);
            let took = t.elapsed();
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
            (rtt, took)
        }))
        .unwrap();
    drop(server_rt);
    out
}
