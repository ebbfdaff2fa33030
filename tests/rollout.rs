//! Issue 16 item 2: rolling updates of a Deployment behind a Service while
//! a client keeps sending requests to it (loopback, through the node port,
//! one request every 20 ms): every update, the rollback, a broken version
//! that halts, a paused rollout and a restart — and not one request fails.

mod common;

use common::{HostNetwork, Up, wait_until};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TCP: &str = flotilla_samples::TCP_P2;
const NODE_PORT: u16 = 31_874;
const LONG: Duration = Duration::from_secs(90);
/// The agent's directory of pod network namespaces (for diagnostics).
static NETNS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The web Deployment answering `version` on every request; `readiness`
/// is the port its readiness probe checks (8080 is where it listens).
fn web(version: &str, readiness: u16, deadline: &str) -> String {
    format!(
        r#"kind = "Deployment"
name = "web"
replicas = 4
strategy = {{ max_surge = 1, max_unavailable = 1 }}
progress_deadline = "{deadline}"
[template]
labels = {{ app = "web" }}
[[template.members]]
name = "http"
wasm = "{TCP}"
args = ["http", "8080", "-"]
env = {{ VERSION = "{version}", QUIET = "1" }}
ports = [8080]
readiness = {{ tcp = {{ port = {readiness} }}, period = 0.2 }}
"#
    )
}

/// One request through the node port: the body, or why there was none
/// (with, when it hung, the sockets of the node and of every pod then).
fn request() -> Result<String, String> {
    let started = std::time::Instant::now();
    match common::http_get(NODE_PORT, "/", Duration::from_secs(20)) {
        Ok((status, body)) if status.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        Ok((status, _)) => Err(format!("bad answer: {status}")),
        Err(e) if e.contains("os error 11") => Err(format!(
            "{e} (after {:?}); {}",
            started.elapsed(),
            sockets()
        )),
        Err(e) => Err(e),
    }
}

/// The node's sockets to pods and the node port, and those inside each
/// pod's namespace (the member's side), as `ss` shows them.
fn sockets() -> String {
    let ss = |netns: Option<&std::path::Path>| {
        let mut c = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("ss");
                c
            }
            None => std::process::Command::new("ss"),
        };
        c.arg("-tanoiH")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim_end().to_string())
            .unwrap_or_default()
    };
    let node: Vec<String> = ss(None)
        .lines()
        .filter(|l| l.contains("10.88.") || l.contains(&format!(":{NODE_PORT}")))
        .map(str::to_string)
        .collect();
    let mut out = format!("node sockets:\n{}", node.join("\n"));
    if let Some(dir) = NETNS.get()
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for e in entries.flatten() {
            out.push_str(&format!(
                "\n[pod {}]\n{}",
                e.file_name().to_string_lossy(),
                ss(Some(&e.path()))
            ));
        }
    }
    out
}

/// A client sending one request every 20 ms until stopped (at most
/// 30,000), keeping every outcome in order.
struct Traffic {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Result<String, String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start() -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stop, seen) = (stop.clone(), seen.clone());
            move || {
                for _ in 0..30_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = request();
                    seen.lock().unwrap().push(r);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Traffic {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Waits until the last `n` answers all came from `version`.
    fn wait_for(&self, version: &str, n: usize) {
        wait_until(
            LONG,
            &format!("{n} answers in a row from {version}"),
            || {
                let seen = self.seen.lock().unwrap();
                seen.len() >= n
                    && seen[seen.len() - n..]
                        .iter()
                        .all(|r| r.as_deref() == Ok(version))
            },
        );
    }

    /// Every failed request so far.
    fn failures(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| r.as_ref().err().cloned())
            .collect()
    }

    fn finish(mut self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn deployment(up: &Up) -> serde_json::Value {
    serde_json::from_str(&up.ok(&["get", "deploy", "web", "-o", "json"])).unwrap()
}

fn apply(up: &Up, text: &str) {
    let f = up.manifest("web.toml", text);
    up.ok(&["apply", "-f", &f]);
}

/// Waits until the rollout settles in `phase` at the current generation,
/// and checks every status seen on the way stayed within the strategy
/// (at most 5 pods; after the first, at least 3 ready while it rolls).
fn settle(up: &Up, phase: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_until(LONG, &format!("the rollout to be {phase}"), || {
        let d = deployment(up);
        let st = &d["status"];
        assert!(st["replicas"].as_u64().unwrap() <= 5, "over the surge: {d}");
        let settled = st["observed_generation"] == d["metadata"]["generation"]
            && st["rollout"]["phase"] == phase;
        last = d;
        settled
    });
    last
}

fn pod_names(up: &Up) -> Vec<String> {
    let mut v: Vec<String> = up
        .pods()
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

#[test]
fn rolling_updates_behind_a_service_lose_no_request() {
    // Pod addresses on the node's bridge; the guard removes the bridge and
    // the filter table afterwards.
    let _network = HostNetwork::taken();
    let up = Up::start_with(&["--pod-network", "bridge"]);
    let _ = NETNS.set(up.data_dir().join("agent/netns"));
    apply(&up, &web("v1", 8080, "10m"));
    let svc = up.manifest(
        "svc.toml",
        &format!(
            "kind = \"Service\"\nname = \"web\"\nselector = {{ app = \"web\" }}\nports = [{{ port = 80, target_port = 8080, node_port = {NODE_PORT} }}]\n"
        ),
    );
    up.ok(&["apply", "-f", &svc]);
    let d = settle(&up, "Complete");
    assert_eq!(d["status"]["revision"], 1, "{d}");
    wait_until(LONG, "the service to answer", || request().is_ok());

    let traffic = Traffic::start();
    traffic.wait_for("v1", 10);
    let first_mac = std::fs::read_to_string("/sys/class/net/flt0/address").unwrap();
    let first_mac = first_mac.trim();

    // 1. v2 rolls out within the strategy; `rollout status` follows it.
    let before = pod_names(&up);
    apply(&up, &web("v2", 8080, "10m"));
    let status = up.ok(&["rollout", "status", "deployment/web", "--timeout", "6m"]);
    assert!(
        status.contains("deployment/web rolled out: revision 2, 4 of 4 pods ready"),
        "{status}"
    );
    let d = settle(&up, "Complete");
    assert_eq!(d["status"]["updated"], 4, "{d}");
    traffic.wait_for("v2", 10);
    let after = pod_names(&up);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "every pod replaced: {before:?} → {after:?}"
    );
    let history = up.ok(&["rollout", "history", "web"]);
    let rows: Vec<Vec<&str>> = history
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{history}");
    assert_eq!(
        (rows[0][0], rows[1][0], rows[1][1]),
        ("1", "2", "*"),
        "{history}"
    );

    // 2. Undo: revision 1's template comes back, as revision 3.
    assert_eq!(
        up.ok(&["rollout", "undo", "deployment/web"]),
        "deployment/web rolled back to revision 1\n"
    );
    let d = settle(&up, "Complete");
    assert_eq!(d["status"]["revision"], 3, "{d}");
    assert_eq!(
        d["spec"]["template"]["spec"]["members"][0]["env"]["VERSION"], "v1",
        "{d}"
    );
    traffic.wait_for("v1", 10);

    // 3. A version that never becomes ready halts at max_unavailable: 3
    // old pods serving, 2 new ones (the surge), and the condition says why.
    apply(&up, &web("v3", 9999, "8s"));
    let d = settle(&up, "Halted");
    let st = &d["status"];
    assert_eq!(
        (st["updated"].as_u64(), st["updated_ready"].as_u64()),
        (Some(2), Some(0)),
        "{d}"
    );
    assert_eq!(
        (st["replicas"].as_u64(), st["ready"].as_u64()),
        (Some(5), Some(3)),
        "{d}"
    );
    let why = st["rollout"]["message"].as_str().unwrap();
    assert!(
        why.starts_with("no progress for 8s (progress_deadline): 0 of 4 updated pods ready; member http of pod web-")
            && why.ends_with("is running but not ready (its readiness probe has not passed)"),
        "{why}"
    );
    let out = up.cli(&["rollout", "status", "web"]);
    assert!(
        !out.status.success(),
        "a halted rollout fails `rollout status`"
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("deployment/web halted at revision 4: no progress"),
        "{said}"
    );
    assert!(up.ok(&["events"]).contains("RolloutHalted"));
    // Only v1 answers meanwhile.
    traffic.wait_for("v1", 20);
    up.ok(&["rollout", "undo", "web"]);
    let d = settle(&up, "Complete");
    assert_eq!(
        (
            d["status"]["revision"].as_u64(),
            d["status"]["replicas"].as_u64()
        ),
        (Some(5), Some(4)),
        "{d}"
    );

    // 4. Paused: a template change waits (the controller saw it and made
    // no pod of it) until resumed.
    up.ok(&["rollout", "pause", "web"]);
    let held = pod_names(&up);
    apply(&up, &web("v4", 8080, "10m"));
    let d = settle(&up, "Paused");
    assert_eq!(d["status"]["revision"], 5, "{d}");
    assert_eq!(pod_names(&up), held);
    let refused = up.cli(&["rollout", "undo", "web"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is paused"),
        "{refused:?}"
    );
    up.ok(&["rollout", "resume", "web"]);
    let d = settle(&up, "Complete");
    assert_eq!(d["status"]["revision"], 6, "{d}");
    traffic.wait_for("v4", 10);

    // 5. Restart: the same template, every pod new.
    let before = pod_names(&up);
    up.ok(&["rollout", "restart", "web"]);
    let d = settle(&up, "Complete");
    assert_eq!(d["status"]["revision"], 7, "{d}");
    let after = pod_names(&up);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} → {after:?}"
    );
    // A few more answers from the restarted pods.
    let n = traffic.count();
    wait_until(LONG, "answers from the restarted pods", || {
        traffic.count() >= n + 20
    });

    let failed = traffic.failures();
    let seen = traffic.finish();
    if !failed.is_empty() {
        let log = up.log();
        let stops: Vec<&str> = log
            .lines()
            .filter(|l| {
                [
                    "starting pod",
                    "stopping pod",
                    "endpoints",
                    "connections to the pod",
                    "proxied connection",
                    "service endpoint",
                    "registered",
                    "WARN",
                ]
                .iter()
                .any(|w| l.contains(w))
            })
            .collect();
        eprintln!(
            "agent log, pods starting and stopping:\n{}",
            stops.join("\n")
        );
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:#?}",
        failed.len(),
        seen.len()
    );
    // The bridge kept its hardware address while pods came and went: the
    // pods keep the gateway's in their neighbour tables, and a bridge that
    // followed its lowest port's would leave their answers addressed to a
    // port that is gone (the cause of the rare unanswered request before).
    let mac = std::fs::read_to_string("/sys/class/net/flt0/address").unwrap();
    assert_eq!(mac.trim(), "02:66:6c:58:00:01");
    assert_eq!(mac.trim(), first_mac, "the bridge's address changed");
    for v in ["v1", "v2", "v4"] {
        assert!(
            seen.iter().any(|r| r.as_deref() == Ok(v)),
            "no answer from {v}"
        );
    }
    assert!(
        !seen.iter().any(|r| r.as_deref() == Ok("v3")),
        "the never-ready version got no request"
    );
    eprintln!("{} requests, every one answered", seen.len());
}
