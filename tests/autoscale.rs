//! Issue 16 item 4: an Autoscaler scales a CPU-bound Deployment (each
//! request spins 40 ms; each pod may use 200m) up while clients load it
//! through its Service, holds at `max` without flapping while the load
//! lasts, and scales back down to `min` once the load is gone and the
//! down window has passed — counting every decision.

mod common;

use common::{HostNetwork, Up, wait_until};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const NODE_PORT: u16 = 31_876;
const LONG: Duration = Duration::from_secs(120);

fn request() -> bool {
    common::http_get(NODE_PORT, "/", Duration::from_secs(20))
        .is_ok_and(|(status, _)| status.starts_with("HTTP/1.1 200"))
}

fn autoscaler(up: &Up) -> serde_json::Value {
    serde_json::from_str(&up.ok(&["get", "autoscaler", "busy", "-o", "json"])).unwrap()
}

fn replicas(up: &Up) -> u64 {
    let d: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "deploy", "busy", "-o", "json"])).unwrap();
    d["spec"]["replicas"].as_u64().unwrap()
}

/// The autoscaler's `Scaled` events, oldest first: `(from, to)`.
fn decisions(up: &Up) -> Vec<(u64, u64)> {
    let mut events: Vec<serde_json::Value> =
        serde_json::from_str(&up.ok(&["events", "-o", "json"])).unwrap();
    events.sort_by_key(|e| e["first_ms"].as_u64());
    events
        .iter()
        .filter(|e| e["reason"] == "Scaled" && e["kind"] == "Autoscaler")
        .filter_map(|e| {
            let m = e["message"].as_str()?;
            let (_, rest) = m.split_once(": ")?;
            let (from, rest) = rest.split_once(" → ")?;
            let to = rest.split(':').next()?;
            Some((from.parse().ok()?, to.parse().ok()?))
        })
        .collect()
}

#[test]
fn a_cpu_bound_deployment_scales_up_under_load_and_down_after_the_window() {
    let _network = HostNetwork::taken();
    let up = Up::start_with(&["--pod-network", "bridge", "--metrics-interval", "1s"]);
    let text = format!(
        r#"kind = "Deployment"
name = "busy"
replicas = 1
[template]
labels = {{ app = "busy" }}
[[template.members]]
name = "http"
wasm = "{tcp}"
args = ["http", "8080", "-"]
env = {{ BURN_MS = "40", QUIET = "1" }}
ports = [8080]
resources = {{ cpu = 200 }}
readiness = {{ tcp = {{ port = 8080 }}, period = 0.2 }}
---
kind = "Service"
name = "busy"
selector = {{ app = "busy" }}
ports = [{{ port = 80, target_port = 8080, node_port = {NODE_PORT} }}]
---
kind = "Autoscaler"
name = "busy"
target = "busy"
min = 1
max = 4
cpu = 50
scale_down_window = "10s"
"#,
        tcp = flotilla_samples::TCP_P2
    );
    let f = up.manifest("busy.toml", &text);
    up.ok(&["apply", "-f", &f]);
    wait_until(LONG, "the service to answer", request);
    // Idle at min: figures come in, nothing is scaled.
    wait_until(LONG, "idle figures", || {
        autoscaler(&up)["status"]["cpu"].is_u64()
    });
    assert_eq!(replicas(&up), 1);

    // Four clients, each sending a request, waiting for its answer, then
    // 10 ms (at most 20,000 requests each).
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if !request() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();
    wait_until(LONG, "scaled up to max (4)", || replicas(&up) == 4);
    let up_steps = decisions(&up);
    assert!(!up_steps.is_empty() && up_steps.len() <= 3, "{up_steps:?}");
    assert!(
        up_steps.iter().all(|(a, b)| b > a),
        "only rises under load: {up_steps:?}"
    );
    assert_eq!(up_steps.last().unwrap().1, 4, "{up_steps:?}");
    let a = autoscaler(&up);
    let why = a["status"]["last_decision"]["reason"].as_str().unwrap();
    assert!(
        why.starts_with("cpu ") && why.contains("% of requests (target 50%)"),
        "{why}"
    );

    // Still loaded: a dozen more evaluations on fresh figures change nothing.
    let mut seen = std::collections::HashSet::new();
    wait_until(LONG, "twelve more samples under load", || {
        let top: Vec<serde_json::Value> =
            serde_json::from_str(&up.ok(&["top", "pods", "-o", "json"])).unwrap();
        for p in &top {
            if let Some(s) = p["members"][0]["cpu_seconds"].as_f64() {
                seen.insert(s.to_bits());
            }
        }
        seen.len() >= 12 * 4
    });
    assert_eq!(decisions(&up), up_steps, "no flapping while loaded");
    assert_eq!(replicas(&up), 4);

    // The load goes: after the 10 s window, back to min, only falling
    // (a step per recommendation leaving the window).
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let stopped_ms = flotilla_api::time::now_ms();
    wait_until(LONG, "scaled down to min (1)", || replicas(&up) == 1);
    let all = decisions(&up);
    let down = &all[up_steps.len()..];
    assert_eq!(all[..up_steps.len()], up_steps[..], "{all:?}");
    assert!(
        !down.is_empty() && down.len() <= 3 && down.iter().all(|(a, b)| b < a),
        "only falls once the load is gone: {all:?}"
    );
    assert_eq!((down[0].0, down.last().unwrap().1), (4, 1), "{all:?}");
    let falls: Vec<u64> = {
        let mut evs: Vec<serde_json::Value> =
            serde_json::from_str(&up.ok(&["events", "-o", "json"])).unwrap();
        evs.retain(|e| e["reason"] == "Scaled" && e["kind"] == "Autoscaler");
        evs.iter()
            .filter_map(|e| e["first_ms"].as_u64())
            .filter(|&t| t >= stopped_ms)
            .collect()
    };
    // (The window's arithmetic is unit-tested: `autoscale::tests`.)
    assert_eq!(
        falls.len(),
        down.len(),
        "every fall came after the load stopped"
    );
    let a = autoscaler(&up);
    assert_eq!(a["status"]["decisions"].as_u64(), Some(all.len() as u64));
    let table = up.ok(&["get", "autoscalers"]);
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.starts_with("busy ") && row.contains("deployment/busy") && row.contains("1→1"),
        "{table}"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {} requests",
        sent.load(Ordering::Relaxed)
    );
    eprintln!(
        "decisions {all:?}; {} requests",
        sent.load(Ordering::Relaxed)
    );
}
