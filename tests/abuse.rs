//! Issue 14's abuse suite: what a peer without credentials, a node or a
//! tenant tries against a running `flotilla up`, one test per item, each
//! named by the item it covers and asserting the specific outcome. (Items
//! covered in other files: 1 in `cluster.rs`
//! `ten_thousand_services_sync_and_a_flapping_link_is_shown`; 2, 4, 10 and
//! the first-frame cap of 11 in `cluster.rs`; 6 and 8 in unit tests; the
//! rest of 12 in `flotilla-registry`'s tests and `oci.rs`.)

mod common;

use common::Up;
use std::time::Duration;

/// A number from `/proc/PID/status` (kB).
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The agents' QUIC address, from `up`'s banner.
fn quic_addr(up: &Up) -> std::net::SocketAddr {
    let log = up.log();
    let at = log
        .find("agents on quic://")
        .expect("up printed its banner")
        + 17;
    let end = log[at..].find([',', ' ']).unwrap();
    log[at..at + end].parse().unwrap()
}

/// The bound item 11 states: 1,000 idle unauthenticated connections, each
/// holding as much of a first frame as it may (64 KiB), raise the
/// scheduler's peak resident memory by at most this much. (At most 256 of
/// them are held at once, the rest are refused at the handshake.)
const IDLE_CONNECTIONS_RSS_BOUND_KIB: u64 = 64 << 10;

/// Item 11: a thousand unauthenticated QUIC peers that open a stream and
/// send most of a first frame, then nothing, neither grow the scheduler
/// past the bound nor cost the local node its Ready state; afterwards a
/// pod still starts.
#[test]
fn item_11_a_thousand_idle_unauthenticated_connections() {
    let up = Up::start();
    let pid = up.child.as_ref().unwrap().id();
    let addr = quic_addr(&up);
    // The scheduler keeps the cluster CA under `<data>/pki`.
    let ca = std::fs::read_to_string(up.data_dir().join("pki/ca.pem")).unwrap();
    let peak_before = status_kib(pid, "VmHWM:");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (held, refused) = rt.block_on(async {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // Keep-alives: a connection the scheduler still held would answer
        // them and never time out, so only a closed one can end below.
        let mut client = common::quic_client(&ca, None);
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(1)));
        client.transport_config(std::sync::Arc::new(transport));
        ep.set_default_client_config(client);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..1000 {
            let ep = ep.clone();
            tasks.spawn(async move {
                let conn = ep.connect(addr, "flotilla-scheduler").unwrap().await.ok()?;
                let (mut tx, rx) = conn.open_bi().await.ok()?;
                // A header announcing a frame just under the first-frame
                // cap, and 60 KiB of it: the most a stranger may make the
                // scheduler hold.
                let mut frame = vec![b'F', b'L', flotilla_api::proto::PROTOCOL_VERSION];
                frame.extend_from_slice(&((64u32 << 10) - 1).to_be_bytes());
                frame.extend(std::iter::repeat_n(b' ', 60 << 10));
                tx.write_all(&frame).await.ok()?;
                Some((conn, tx, rx))
            });
        }
        let mut held = Vec::new();
        let mut refused = 0;
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Some(c) => held.push(c),
                None => refused += 1,
            }
        }
        // Every held connection is closed by the scheduler (no Hello in
        // time), not left open.
        let mut silent = 0;
        for (conn, _, _) in &held {
            let why = tokio::time::timeout(Duration::from_secs(60), conn.closed())
                .await
                .expect("the scheduler closes an idle stranger's connection");
            match why {
                // The scheduler's close is a datagram: with a thousand
                // peers pushing 60 KiB each through loopback, a busy
                // machine can drop it, and a peer whose keep-alives then
                // go unanswered times out (or is reset). A connection the
                // scheduler still held would answer them.
                quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset => silent += 1,
                // "no Hello within 5 s", or on a busy machine, where the
                // stream can come late, "no control stream within 5 s".
                why => assert!(
                    why.to_string().contains("within 5 s"),
                    "closed for another reason: {why}"
                ),
            }
        }
        assert!(
            silent < held.len(),
            "no connection was closed by the scheduler; all {silent} timed out"
        );
        if silent > 0 {
            eprintln!(
                "item 11: {silent} of {} closes not heard (timed out instead)",
                held.len()
            );
        }
        ep.close(0u32.into(), b"");
        (held.len(), refused)
    });
    assert_eq!(held + refused, 1000);
    assert!(held >= 1, "no connection got as far as a stream");
    let peak_after = status_kib(pid, "VmHWM:");
    assert!(
        peak_after <= peak_before + IDLE_CONNECTIONS_RSS_BOUND_KIB,
        "peak RSS grew from {peak_before} kB to {peak_after} kB ({held} connections held, {refused} refused)"
    );
    eprintln!(
        "item 11: peak RSS {peak_before} kB → {peak_after} kB (+{} kB; bound +{IDLE_CONNECTIONS_RSS_BOUND_KIB} kB); {held} held, {refused} refused",
        peak_after.saturating_sub(peak_before)
    );
    // The local node never went NotReady, and new work still runs.
    let events = up.ok(&["events", "-o", "json"]);
    assert!(!events.contains("NodeNotReady"), "{events}");
    let nodes = up.ok(&["get", "nodes", "-o", "json"]);
    assert!(nodes.contains("\"ready\": true"), "{nodes}");
    let f = up.manifest(
        "after.toml",
        &common::pod("after", flotilla_samples::COUNTER_P2, ""),
    );
    up.ok(&["apply", "-f", &f]);
    up.wait_phase("after", "Running");
}

/// User and system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Item 12: only the operator's registry config may point the scheduler or
/// a node at a registry on loopback. A manifest naming one — by address or
/// as `localhost` — gets a pod that fails with the reason (the apply is not
/// refused: a registry the scheduler may not ask is left to the node) and
/// the registry never hears a pull; with the registry listed in `up`'s
/// `--registry-config`, the same manifest runs.
#[test]
fn item_12_a_manifest_cannot_point_the_node_at_a_loopback_registry() {
    use common::registry::{Auth, Registry};
    let reg = Registry::start(Auth::Anonymous);
    let port = reg.addr.rsplit_once(':').unwrap().1.to_string();
    let reference = format!("{}/wasm/hello:1", reg.addr);
    let pod = |name: &str, r: &str| {
        format!(
            "kind = \"Pod\"\nname = \"{name}\"\nrestart = \"Never\"\n\n[[members]]\nname = \"hello\"\nwasm = \"oci://{r}\"\n"
        )
    };
    let pulls = || reg.log().matches("GET /v2/wasm/hello/manifests/").count();

    let mut up = Up::start();
    // The operator's own push names the registry itself: no entry needed.
    let pushed = up.cli(&["push", flotilla_samples::HELLO_P2, &reference]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let before = pulls();
    let by_name = format!("localhost:{port}/wasm/hello:1");
    for (name, r) in [("by-address", &reference), ("by-name", &by_name)] {
        let m = up.manifest(&format!("{name}.toml"), &pod(name, r));
        up.ok(&["apply", "-f", &m]);
    }
    for name in ["by-address", "by-name"] {
        up.wait_phase(name, "Failed");
        let shown = up.pod(name).unwrap().to_string();
        assert!(
            shown.contains("is on loopback; a manifest cannot name a registry on the node itself"),
            "{shown}"
        );
    }
    assert_eq!(pulls(), before, "the registry heard no pull");
    up.stop();

    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    let m = up.manifest("listed.toml", &pod("listed", &reference));
    up.ok(&["apply", "-f", &m]);
    up.wait_phase("listed", "Succeeded");
    assert!(pulls() > before, "pulled once listed");
}

/// Item 14: 50 wasm members spinning without a host call, 2 millicores
/// each, are held to their `cpu` (a tenth of a core in all, where unheld
/// they take whatever the machine gives: both cores idle, most of one on a
/// busy machine), and the node stays Ready while they spin: a pod applied
/// then still starts.
#[test]
fn item_14_fifty_spinning_wasm_members_are_held_to_their_cpu() {
    let up = Up::start();
    let pid = up.child.as_ref().unwrap().id();
    let f = up.manifest(
        "spin.toml",
        &common::deployment(
            "spin",
            50,
            flotilla_samples::SPINNER_P1,
            "resources = { cpu = 2 }",
        ),
    );
    up.ok(&["apply", "-f", &f]);
    common::wait_until(Duration::from_secs(60), "50 spinners running", || {
        up.pods()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count()
            == 50
    });
    // The process's CPU use over at least 5 s of real time: a rate, so a
    // busier machine can only make it smaller.
    let (c0, t0) = (cpu_seconds(pid), std::time::Instant::now());
    while t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let cores = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();
    eprintln!("item 14: 50 spinners at 2 millicores use {cores:.2} cores");
    assert!(
        cores <= 0.5,
        "50 members of 2 millicores used {cores:.2} cores"
    );
    let events = up.ok(&["events", "-o", "json"]);
    assert!(!events.contains("NodeNotReady"), "{events}");
    let f = up.manifest(
        "after.toml",
        &common::pod("after", flotilla_samples::COUNTER_P2, ""),
    );
    up.ok(&["apply", "-f", &f]);
    up.wait_phase("after", "Running");
    let nodes = up.ok(&["get", "nodes", "-o", "json"]);
    assert!(nodes.contains("\"ready\": true"), "{nodes}");
}

/// Item 15: a namespace's Quota caps what its objects claim together — a
/// pod, a Deployment or a scale past it is refused at the API with the
/// figures and nothing is stored — and fills in the memory limit of
/// members that declare none. Only admins write quotas.
#[test]
fn item_15_quotas_refuse_writes_past_them_and_fill_in_defaults() {
    let up = Up::start();
    let quota = up.manifest(
        "quota.toml",
        "kind = \"Quota\"\nname = \"team\"\npods = 2\ncpu = 300\nmemory = \"256Mi\"\nobjects = 3\ndefault_memory = \"32Mi\"\n",
    );
    let edit = up.ok(&["token", "create", "--role", "edit", "-n", "default"]);
    let out = up.cli(&["--token", edit.trim(), "apply", "-f", &quota]);
    assert!(!out.status.success(), "an edit user wrote a quota");
    up.ok(&["apply", "-f", &quota]);
    let counter = flotilla_samples::COUNTER_P2;
    let pod = |name: &str, cpu: u32| {
        up.manifest(
            &format!("{name}.toml"),
            &common::pod(name, counter, &format!("resources = {{ cpu = {cpu} }}")),
        )
    };
    let refused = |file: &str, want: &str| {
        let out = up.cli(&["apply", "-f", file]);
        assert!(!out.status.success(), "{file} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
    };
    up.ok(&["apply", "-f", &pod("a", 100)]);
    // The member declared no memory: it got the quota's default.
    let a = up.pod("a").unwrap();
    assert_eq!(
        a["spec"]["members"][0]["resources"]["memory"],
        32 << 20,
        "{a}"
    );
    up.ok(&["apply", "-f", &pod("b", 100)]);
    refused(
        &pod("c", 10),
        "quota 'team' allows 2 pods in this namespace; this would make it 3",
    );
    assert!(up.pod("c").is_none());
    up.ok(&["delete", "pod", "b"]);
    let web = |replicas: u32, cpu: u32| {
        up.manifest(
            "web.toml",
            &common::deployment(
                "web",
                replicas,
                counter,
                &format!("resources = {{ cpu = {cpu} }}"),
            ),
        )
    };
    refused(
        &web(1, 250),
        "allows 300m millicores of cpu in this namespace; this would make it 350m",
    );
    up.ok(&["apply", "-f", &web(1, 100)]);
    let out = up.cli(&["scale", "deployment", "web", "--replicas", "3"]);
    assert!(!out.status.success(), "scaled past the quota");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("allows 2 pods") && err.contains("would make it 4"),
        "{err}"
    );
    // Objects (the quota is not one): a, web and one ConfigMap make 3.
    up.ok(&["create", "configmap", "one", "--from-literal", "k=v"]);
    let out = up.cli(&["create", "configmap", "two", "--from-literal", "k=v"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("allows 3 objects"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let desc = up.ok(&["describe", "quota", "team"]);
    assert!(desc.contains("pods         2         2"), "{desc}");
    assert!(desc.contains("cpu          200m      300m"), "{desc}");
}

/// Item 16: a node's own load must not take it down. 10,000 pods on the
/// all-in-one node reach Running (the scheduler, the agent and every pod in
/// one process) while the node never leaves Ready: its link's heartbeats
/// overtake the status reports queued behind them, and pods run on a
/// runtime of their own, so neither the link nor the scheduler waits
/// behind starting members. The process stays up, and a pod applied after
/// still starts.
#[test]
fn item_16_ten_thousand_pods_on_one_node_never_cost_it_its_readiness() {
    // The agent raises vm.max_map_count for 10,100 slots (as root); the
    // machine gets its own value back when the test ends, however it ends.
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/vm/max_map_count", &self.0);
        }
    }
    let _restore = Restore(std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap());
    // A 5 s node timeout instead of 2.5 s: the claim is about the node's
    // own load; on a machine whose other tenants also stall its disk (a
    // CI run beside a release build), the scheduler's writes can take
    // longer than 2.5 s now and then, which is not what this test is about.
    let mut up = Up::start_with(&["--max-instances", "10100", "--node-timeout", "5s"]);
    let maps: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(maps >= 10_100 * 6, "vm.max_map_count {maps}");
    let f = up.manifest(
        "many.toml",
        &common::deployment(
            "many",
            10_000,
            flotilla_samples::COUNTER_P2,
            "env = { INTERVAL_MS = \"600000\" }",
        ),
    );
    up.ok(&["apply", "-f", &f]);
    let ready = || -> u64 {
        let d: serde_json::Value =
            serde_json::from_str(&up.ok(&["get", "deployment", "many", "-o", "json"])).unwrap();
        d["status"]["ready"].as_u64().unwrap_or(0)
    };
    // Polled once a second (each poll is a CLI process on a busy machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(150) * common::slack();
    loop {
        let n = ready();
        if n == 10_000 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out with {n} of 10,000 pods running"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        up.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "flotilla up exited"
    );
    // Never NotReady, never a lost pod or a flapping link.
    let events = up.ok(&["events", "-o", "json"]);
    for bad in ["NodeNotReady", "LinkFlapping", "\"Lost\""] {
        assert!(
            !events.contains(bad),
            "{bad} in {}",
            &events[..events.len().min(4000)]
        );
    }
    let nodes = up.ok(&["get", "nodes", "-o", "json"]);
    assert!(nodes.contains("\"ready\": true"), "{nodes}");
    assert!(!nodes.contains("flapping"), "{nodes}");
    let f = up.manifest(
        "after.toml",
        &common::pod("after", flotilla_samples::COUNTER_P2, ""),
    );
    up.ok(&["apply", "-f", &f]);
    up.wait_phase("after", "Running");
    assert!(up.child.as_mut().unwrap().try_wait().unwrap().is_none());
    drop(up);
}
