//! Issue 16: a rolling update of `n` wasm replicas behind a Service, under a
//! steady client, against the same update with `strategy = Recreate` (every
//! pod replaced at once, what a template change did before rollouts) in a
//! fresh `flotilla up` of the same invocation: wall time from the apply to
//! every new pod ready, and requests that failed meanwhile.

use super::{get_json, up_with, upload};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const NODE_PORT: u16 = 31_875;

/// `flotilla up` on the node's bridge (pods have addresses, services a
/// proxy), plain HTTP, its own data dir.
fn bridged_up(max_instances: usize, data: &Path) -> (super::UpChild, String, String) {
    up_with(max_instances, data, "bridge", &[])
}

/// One GET through the node port; whether it was answered 200.
fn request() -> bool {
    request_to(NODE_PORT)
}

fn request_to(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut got = String::new();
    s.read_to_string(&mut got).is_ok() && got.starts_with("HTTP/1.1 200")
}

struct Outcome {
    took: Duration,
    requests: usize,
    failed: usize,
}

fn deployment(
    n: usize,
    module: &serde_json::Value,
    version: &str,
    recreate: bool,
) -> serde_json::Value {
    let strategy = if recreate {
        serde_json::json!({"type": "Recreate"})
    } else {
        serde_json::json!({"max_surge": "25%", "max_unavailable": "25%"})
    };
    serde_json::json!({"kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": n, "strategy": strategy,
            "template": {"labels": {"app": "web"}, "spec": {"members": [{
                "name": "http", "module": module, "args": ["http", "8080", "-"],
                "env": {"VERSION": version, "QUIET": "1"},
                "ports": [{"port": 8080}],
                "readiness": {"tcp": {"port": 8080}, "period": "200ms"}}]}}}})
}

/// Waits (up to 20 minutes) for the Deployment's latest generation to be
/// rolled out with `n` ready pods.
fn wait_complete(
    http: &ureq::Agent,
    url: &str,
    auth: &str,
    n: usize,
    child: &mut std::process::Child,
) {
    let end = Instant::now() + Duration::from_secs(1200);
    loop {
        let d: serde_json::Value = get_json(http, url, auth, "/v1/deployments/default/web");
        let st = &d["status"];
        if st["observed_generation"] == d["metadata"]["generation"]
            && st["rollout"]["phase"] == "Complete"
            && st["updated_ready"].as_u64() == Some(n as u64)
        {
            return;
        }
        assert!(Instant::now() < end, "rollout of {n} not done: {st}");
        assert!(child.try_wait().unwrap().is_none(), "flotilla up exited");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn update_once(n: usize, recreate: bool) -> Outcome {
    let bridge_before = Path::new("/sys/class/net/flt0").exists();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, auth) = bridged_up(2 * n + 64, &dir.path().join("data"));
    let http = ureq::AgentBuilder::new().build();
    let module = upload(&http, &url, &auth, flotilla_samples::TCP_P2);
    let apply = |obj: serde_json::Value| {
        http.post(&format!("{url}/v1/apply"))
            .set("authorization", &auth)
            .send_json(serde_json::json!({ "objects": [obj] }))
            .unwrap();
    };
    apply(deployment(n, &module, "v1", recreate));
    apply(serde_json::json!({"kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"},
            "ports": [{"port": 80, "target_port": 8080, "node_port": NODE_PORT}]}}));
    wait_complete(&http, &url, &auth, n, &mut child);
    let end = Instant::now() + Duration::from_secs(120);
    while !request() {
        assert!(Instant::now() < end, "the service never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client: a request every 10 ms (at most 200,000).
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = std::thread::spawn({
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        move || {
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if !request() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                sent.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    apply(deployment(n, &module, "v2", recreate));
    wait_complete(&http, &url, &auth, n, &mut child);
    let took = t.elapsed();
    // The last pods of the old revision are draining: give the client a
    // moment on the new ones before counting.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    clean_network(bridge_before);
    Outcome {
        took,
        requests: sent.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
    }
}

pub fn rolling_update(n: usize) {
    println!(
        "## Rolling update of {n} wasm replicas behind a Service (all-in-one, the real binary, bridged pod network)\n"
    );
    let rolling = update_once(n, false);
    let recreate = update_once(n, true);
    println!("| strategy | apply → all {n} new pods ready | requests (every 10 ms) | failed |");
    println!("|---|---|---|---|");
    for (name, o) in [
        (
            "RollingUpdate, max_surge 25 %, max_unavailable 25 %",
            &rolling,
        ),
        ("Recreate (reference: every pod at once)", &recreate),
    ] {
        println!(
            "| {name} | {:.2} s | {} | {} |",
            o.took.as_secs_f64(),
            o.requests,
            o.failed
        );
    }
    println!(
        "\nwall time, rolling / recreate: {:.2}; requests failed during the rolling update: {} (target 0){}\n",
        rolling.took.as_secs_f64() / recreate.took.as_secs_f64(),
        rolling.failed,
        if rolling.failed == 0 {
            ""
        } else {
            " — a miss"
        }
    );
    println!(
        "Each pod: the tcp sample's HTTP mode, a tcp readiness probe every 200 ms; the client connects through the node port on 127.0.0.1 for each request; the update changes one environment variable.\n"
    );
}

const BUSY_PORT: u16 = 31_877;

/// Removes the bridge and filter table a bridged `up` made, unless they
/// were there before.
fn clean_network(bridge_before: bool) {
    if !bridge_before {
        let _ = Command::new("ip").args(["link", "del", "flt0"]).status();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "flotilla"])
            .stderr(Stdio::null())
            .status();
    }
}

fn ready_replicas(http: &ureq::Agent, url: &str, auth: &str) -> (u64, u64) {
    let d: serde_json::Value = get_json(http, url, auth, "/v1/deployments/default/busy");
    (
        d["spec"]["replicas"].as_u64().unwrap_or(0),
        d["status"]["ready"].as_u64().unwrap_or(0),
    )
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(600);
    while !f() {
        assert!(Instant::now() < end, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 16: from a load step to the new replicas Running and ready, with
/// the Autoscaler (agents sampling every second) against the same scale-up
/// asked for by hand (`scale`) at the step, `trials` of each, one `up`.
pub fn autoscale_reaction(trials: usize) {
    println!(
        "## Autoscaler reaction (all-in-one, the real binary, bridged; {trials} trials each)\n"
    );
    let bridge_before = Path::new("/sys/class/net/flt0").exists();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, auth) = up_with(
        64,
        &dir.path().join("data"),
        "bridge",
        &["--metrics-interval", "1s"],
    );
    let http = ureq::AgentBuilder::new().build();
    let module = upload(&http, &url, &auth, flotilla_samples::TCP_P2);
    let apply = |objs: Vec<serde_json::Value>| {
        http.post(&format!("{url}/v1/apply"))
            .set("authorization", &auth)
            .send_json(serde_json::json!({ "objects": objs }))
            .unwrap();
    };
    let autoscaler = serde_json::json!({"kind": "Autoscaler",
        "metadata": {"name": "busy", "namespace": "default"},
        "spec": {"target": "busy", "min": 1, "max": 2, "cpu": 50,
            "scale_up_window": "0s", "scale_down_window": "3s"}});
    apply(vec![
        serde_json::json!({"kind": "Deployment",
            "metadata": {"name": "busy", "namespace": "default"},
            "spec": {"replicas": 1, "template": {"labels": {"app": "busy"}, "spec": {"members": [{
                "name": "http", "module": module, "args": ["http", "8080", "-"],
                "env": {"BURN_MS": "40", "QUIET": "1"},
                "ports": [{"port": 8080}], "resources": {"cpu": 200},
                "readiness": {"tcp": {"port": 8080}, "period": "200ms"}}]}}}}),
        serde_json::json!({"kind": "Service",
            "metadata": {"name": "busy", "namespace": "default"},
            "spec": {"selector": {"app": "busy"},
                "ports": [{"port": 80, "target_port": 8080, "node_port": BUSY_PORT}]}}),
    ]);
    wait_for("busy ready", || {
        ready_replicas(&http, &url, &auth) == (1, 1) && request_to(BUSY_PORT)
    });
    // Load: three clients, each a request then 10 ms, while `on`.
    let on = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (on, quit) = (on.clone(), quit.clone());
            std::thread::spawn(move || {
                for _ in 0..1_000_000 {
                    if quit.load(Ordering::Relaxed) {
                        break;
                    }
                    if on.load(Ordering::Relaxed) {
                        request_to(BUSY_PORT);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();
    let scale = |n: u32| {
        http.post(&format!("{url}/v1/deployments/default/busy/scale"))
            .set("authorization", &auth)
            .send_json(serde_json::json!({ "replicas": n }))
            .unwrap();
    };
    // By hand first (no autoscaler yet), then with it.
    let mut manual = Vec::new();
    for _ in 0..trials {
        on.store(true, Ordering::Relaxed);
        let t = Instant::now();
        scale(2);
        wait_for("manual scale-up", || {
            ready_replicas(&http, &url, &auth) == (2, 2)
        });
        manual.push(t.elapsed());
        on.store(false, Ordering::Relaxed);
        scale(1);
        wait_for("manual scale-down", || {
            ready_replicas(&http, &url, &auth) == (1, 1)
        });
    }
    apply(vec![autoscaler]);
    let mut auto = Vec::new();
    for _ in 0..trials {
        // Idle at one replica, with the idle figures in.
        wait_for("idle at min", || {
            ready_replicas(&http, &url, &auth) == (1, 1)
        });
        std::thread::sleep(Duration::from_secs(4));
        on.store(true, Ordering::Relaxed);
        let t = Instant::now();
        wait_for("autoscaled up", || {
            ready_replicas(&http, &url, &auth) == (2, 2)
        });
        auto.push(t.elapsed());
        on.store(false, Ordering::Relaxed);
    }
    quit.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(child.try_wait().unwrap().is_none(), "flotilla up exited");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    clean_network(bridge_before);
    manual.sort();
    auto.sort();
    let p50 = |v: &[Duration]| v[v.len() / 2];
    println!("| path | load step → 2nd replica ready, p50 | min | max |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("Autoscaler (cpu 50 %, metrics every 1 s)", &auto),
        ("`scale` by hand at the step (reference)", &manual),
    ] {
        println!(
            "| {name} | {:.2} s | {:.2} s | {:.2} s |",
            p50(v).as_secs_f64(),
            v[0].as_secs_f64(),
            v[v.len() - 1].as_secs_f64()
        );
    }
    println!(
        "\nautoscaler / by hand (p50): {:.2}. The difference is the time to notice: figures every `--metrics-interval`, a rate from two samples, an evaluation each second.\n",
        p50(&auto).as_secs_f64() / p50(&manual).as_secs_f64()
    );
}

/// Issue 16: what sampling members costs the agent: the `up` process's
/// CPU and memory with `n` idle wasm pods sampled every second, against
/// the same pods sampled every hour (the reference: no sample in the
/// window), each in a fresh `up` of this invocation.
pub fn metrics_cost(n: usize, window: Duration) {
    println!("## Metrics collection cost ({n} pods, all-in-one, the real binary)\n");
    let measure = |interval: &str| -> (Duration, u64) {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, url, auth) = up_with(
            n + 100,
            &dir.path().join("data"),
            "loopback",
            &["--metrics-interval", interval],
        );
        let http = ureq::AgentBuilder::new().build();
        let module = upload(&http, &url, &auth, flotilla_samples::TCP_P2);
        http.post(&format!("{url}/v1/apply"))
            .set("authorization", &auth)
            .send_json(serde_json::json!({"objects": [{"kind": "Deployment",
                "metadata": {"name": "idle", "namespace": "default"},
                "spec": {"replicas": n, "template": {"labels": {"app": "idle"},
                    "spec": {"members": [{"name": "tcp", "module": module,
                        "args": ["serve", "9090"], "ports": [{"port": 9090}]}]}}}}]}))
            .unwrap();
        wait_for("pods running", || {
            let d: serde_json::Value = get_json(&http, &url, &auth, "/v1/deployments/default/idle");
            d["status"]["ready"].as_u64() == Some(n as u64)
        });
        std::thread::sleep(Duration::from_secs(3));
        let before = super::cpu_time(child.id());
        std::thread::sleep(window);
        let used = super::cpu_time(child.id()) - before;
        let rss = super::rss_kib(child.id());
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
        (used, rss)
    };
    let (sampled, rss_sampled) = measure("1s");
    let (quiet, rss_quiet) = measure("1h");
    let share = |d: Duration| d.as_secs_f64() / window.as_secs_f64() * 100.0;
    let cost = share(sampled) - share(quiet);
    println!("| sampling | process CPU | RSS |");
    println!("|---|---|---|");
    println!(
        "| every 1 s | {:.2} % of one core | {:.1} MiB |",
        share(sampled),
        rss_sampled as f64 / 1024.0
    );
    println!(
        "| every 1 h (reference: none in the window) | {:.2} % | {:.1} MiB |",
        share(quiet),
        rss_quiet as f64 / 1024.0
    );
    println!(
        "\nper pod: {:.2} µs of CPU per sample ({:.3} % of a core for {n} pods sampled every second), {:+.1} KiB of memory; measured over {:.0} s once all pods ran.\n",
        (sampled.as_secs_f64() - quiet.as_secs_f64()).max(0.0) / window.as_secs_f64() / n as f64
            * 1e6,
        cost,
        (rss_sampled as f64 - rss_quiet as f64) / n as f64,
        window.as_secs_f64()
    );
}
