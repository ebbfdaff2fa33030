//! Issue 16: a rolling update of `n` wasm replicas behind a Service, under a
//! steady client, against the same update with `strategy = Recreate` (every
//! pod replaced at once, what a template change did before rollouts) in a
//! fresh `flotilla up` of the same invocation: wall time from the apply to
//! every new pod ready, and requests that failed meanwhile.

use super::{get_json, upload};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const NODE_PORT: u16 = 31_875;

/// `flotilla up` on the node's bridge (pods have addresses, services a
/// proxy), plain HTTP, its own data dir.
fn bridged_up(max_instances: usize, data: &Path) -> (std::process::Child, String, String) {
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
            "bridge",
        ])
        .arg("--data-dir")
        .arg(data)
        .env("FLOTILLA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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

/// One GET through the node port; whether it was answered 200.
fn request() -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", NODE_PORT)) else {
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
    if !bridge_before {
        let _ = Command::new("ip").args(["link", "del", "flt0"]).status();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "flotilla"])
            .stderr(Stdio::null())
            .status();
    }
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
