//! Functions (issue 17): the `http` sample served the way a function pod
//! serves it (the agent's engine and per-request server, a fresh instance
//! per request) against `wasmtime serve -Scli` of the same component (a
//! fresh instance per request too, its default engine with the pooling
//! allocator) — both on loopback, both loaded by Debian's `wrk` with the
//! same threads, connections and duration, one after the other in this
//! invocation. wrk's latency percentiles count every request.

use flotilla_api::Labels;
use flotilla_host::executor::wasm::http::{HttpFunction, Limits, Outgoing, serve};
use flotilla_host::executor::wasm::runtime::{WasmConfig, WasmRuntime};
use flotilla_host::logs::{LogPaths, LogSink};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// What one wrk run measured.
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

fn latency_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

/// Parses wrk's `--latency` report.
fn parse(out: &str) -> Option<Load> {
    let mut load = Load {
        rps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        requests: 0,
        errors: 0,
    };
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => load.rps = v.parse().ok()?,
            ["50%", v] => load.p50_ms = latency_ms(v)?,
            ["99%", v] => load.p99_ms = latency_ms(v)?,
            [n, "requests", "in", ..] => load.requests = n.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => load.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                load.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    (load.rps > 0.0).then_some(load)
}

fn wrk(url: &str, connections: usize, secs: u64) -> Load {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk runs");
    let text = String::from_utf8_lossy(&out.stdout);
    parse(&text).unwrap_or_else(|| panic!("cannot read wrk's report:\n{text}"))
}

fn wait_listening(addr: &str) {
    for _ in 0..600 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr}");
}

pub fn hello_vs_wasmtime_serve(secs: u64) {
    println!("## A function vs `wasmtime serve` (hello, wrk -t2, {secs} s per run)\n");
    let ratios =
        against_wasmtime_serve(Path::new(flotilla_samples::HTTP_P2), &[16, 64], secs, false);
    for (c, rps, p99) in ratios {
        println!(
            "- {c} connections: requests/s ratio **{rps:.2}** (target ≥ 1.0{}), p99 ratio **{p99:.2}** (target ≤ 1.0{})",
            if rps >= 1.0 { ", met" } else { ", missed" },
            if p99 <= 1.0 { ", met" } else { ", missed" },
        );
    }
    println!();
}

/// The ~18 MB componentize-py hello (CPython inside, initialised at build
/// time): every request still gets a fresh instance on both sides.
pub fn python_vs_wasmtime_serve(secs: u64) {
    println!(
        "## A large interpreter component vs `wasmtime serve` (componentize-py hello, wrk -t2, {secs} s per run)\n"
    );
    let component = match flotilla_samples::python_hello() {
        Ok(p) => p,
        Err(e) => {
            println!("Not measured: the Python component cannot be built here: {e}\n");
            return;
        }
    };
    let mb = std::fs::metadata(&component).map_or(0.0, |m| m.len() as f64 / 1e6);
    println!("The component: {mb:.1} MB.\n");
    for reuse in [false, true] {
        println!(
            "{}\n",
            if reuse {
                "With `reuse_instances = true` (opt-in: an instance that answered takes the next request; `wasmtime serve` has no such mode, so its side is again a fresh instance per request):"
            } else {
                "A fresh instance per request on both sides (the default):"
            }
        );
        let ratios = against_wasmtime_serve(&component, &[16], secs, reuse);
        for (c, rps, p99) in ratios {
            println!(
                "- {c} connections: requests/s ratio **{rps:.2}** (target ≥ 10{}), p99 ratio **{p99:.2}**",
                if rps >= 10.0 { ", met" } else { ", missed" },
            );
        }
        println!();
    }
}

/// Serves `component` the way a function pod does and under `wasmtime
/// serve -Scli`, loads each with wrk at each of `connections` for `secs`
/// (after a 2 s warm-up of each; ours reusing instances when `reuse`),
/// prints the table and returns
/// `(connections, requests/s ratio, p99 ratio)`, ours over theirs.
fn against_wasmtime_serve(
    component: &Path,
    connections: &[usize],
    secs: u64,
    reuse: bool,
) -> Vec<(usize, f64, f64)> {
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("Not measured: `wrk` is not installed (scripts/setup installs it).\n");
        return Vec::new();
    }
    let Some(wasmtime) = crate::cli::which("wasmtime") else {
        println!(
            "Not measured: `wasmtime` (wasmtime-cli 48) is not on PATH; `cargo install wasmtime-cli --version 48.0.8 --locked` provides it.\n"
        );
        return Vec::new();
    };
    let dir = tempfile::tempdir().unwrap();

    // The agent's side: its engine (pooling allocator, 4 GiB slots, epoch
    // ticks) and the server a function pod runs, on a two-worker runtime
    // like the agent's workload runtime on this machine.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ours = "127.0.0.1:18401";
    let (listener, f) = rt.block_on(async {
        let runtime =
            Arc::new(WasmRuntime::new(WasmConfig::new(dir.path().join("cache"))).unwrap());
        let prepared = runtime.prepare(component, "").await.unwrap();
        let f = HttpFunction::new(
            runtime,
            prepared,
            "hello",
            Labels::new(),
            LogSink::new(LogPaths::new(dir.path(), "fn"), 1 << 20),
            Outgoing::default(),
            Limits {
                timeout: Duration::from_secs(30),
                max_concurrency: 4096,
                memory: None,
                reuse,
            },
        )
        .unwrap()
        // Counted like a pod's run: its figures cost what they cost there.
        .counting(Arc::new(flotilla_host::metrics::Usage::default()));
        let listener = tokio::net::TcpListener::bind(ours).await.unwrap();
        (listener, Arc::new(f))
    });
    let server = rt.spawn(serve(listener, f, std::future::pending()));

    // The reference: the same component under `wasmtime serve`.
    let theirs = "127.0.0.1:18402";
    let mut child = Command::new(&wasmtime)
        .args(["serve", "-Scli", "--addr", theirs])
        .arg(component)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(ours);
    wait_listening(theirs);

    println!("| connections | server | requests/s | p50 | p99 | requests | errors |");
    println!("|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for &connections in connections {
        // Warm both (compiled code paged in, connections and pools made).
        wrk(&format!("http://{ours}/"), connections, 2);
        wrk(&format!("http://{theirs}/"), connections, 2);
        let a = wrk(&format!("http://{ours}/"), connections, secs);
        let b = wrk(&format!("http://{theirs}/"), connections, secs);
        for (name, l) in [
            ("flotilla function server", &a),
            ("`wasmtime serve -Scli`", &b),
        ] {
            println!(
                "| {connections} | {name} | {:.0} | {:.2} ms | {:.2} ms | {} | {} |",
                l.rps, l.p50_ms, l.p99_ms, l.requests, l.errors
            );
        }
        ratios.push((connections, a.rps / b.rps, a.p99_ms / b.p99_ms));
    }
    println!();
    let _ = child.kill();
    let _ = child.wait();
    server.abort();
    drop(rt);
    ratios
}

/// One GET through the gateway on a connection of its own; the time to
/// the whole answer, and whether it was 200.
fn timed_get(addr: &str, path: &str) -> (Duration, bool) {
    use std::io::{Read, Write};
    let t = std::time::Instant::now();
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (t.elapsed(), false);
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: cold.example\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (t.elapsed(), false);
    }
    let mut got = Vec::new();
    let ok = s.read_to_end(&mut got).is_ok() && got.starts_with(b"HTTP/1.1 200");
    (t.elapsed(), ok)
}

/// Scale to zero on a real `flotilla up` (bridge pod network, the node's
/// gateway): the first request after the function went to zero, against
/// a request while it has an instance (same gateway, same path, a new
/// connection each), and what the node's process holds with no function,
/// with the function at zero and with one idle instance.
pub fn scale_from_zero(trials: usize, warm: usize) {
    println!("## Functions: the first request after scale to zero\n");
    let bridge_before = Path::new("/sys/class/net/flt0").exists();
    let dir = tempfile::tempdir().unwrap();
    let gateway = "127.0.0.1:18403";
    let (child, url, auth) = super::up_with(
        64,
        &dir.path().join("data"),
        "bridge",
        &["--gateway-addr", gateway, "--metrics-interval", "1s"],
    );
    let pid = child.id();
    let http = ureq::AgentBuilder::new().build();
    let module = super::upload(&http, &url, &auth, flotilla_samples::HTTP_P2);
    // The node settled without the function.
    std::thread::sleep(Duration::from_secs(3));
    let rss_none = super::rss_kib(pid);
    http.post(&format!("{url}/v1/apply"))
        .set("authorization", &auth)
        .send_json(serde_json::json!({"objects": [{"kind": "Function",
            "metadata": {"name": "cold", "namespace": "default"},
            "spec": {"module": module, "routes": [{"path": "/"}],
                "scale_to_zero_after": "1s", "timeout": "30s"}}]}))
        .unwrap();
    let function = |field: &str| -> u64 {
        let f: serde_json::Value =
            super::get_json(&http, &url, &auth, "/v1/functions/default/cold");
        f["status"][field].as_u64().unwrap_or(0)
    };
    let no_pods = || {
        let pods: Vec<serde_json::Value> = super::get_json(&http, &url, &auth, "/v1/pods");
        pods.is_empty()
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let end = std::time::Instant::now() + Duration::from_secs(300);
        while !f() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("the function to be ready", &|| function("ready") == 1);

    // The reference: requests while an instance runs (each one keeps it).
    let mut hot = Vec::with_capacity(warm);
    for _ in 0..warm {
        let (took, ok) = timed_get(gateway, "/warm");
        assert!(ok, "a request to the running function failed");
        hot.push(took);
    }
    let rss_one = super::rss_kib(pid);

    let mut cold = Vec::with_capacity(trials);
    for _ in 0..trials {
        wait("the function to go to zero", &|| {
            function("instances") == 0 && no_pods()
        });
        let (took, ok) = timed_get(gateway, "/cold");
        assert!(ok, "the first request after zero failed");
        cold.push(took);
    }
    wait("the function to go to zero", &|| {
        function("instances") == 0 && no_pods()
    });
    std::thread::sleep(Duration::from_secs(3));
    let rss_zero = super::rss_kib(pid);

    hot.sort();
    cold.sort();
    let median = |v: &[Duration]| v[v.len() / 2];
    println!("| request | samples | median | p99 | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| while an instance runs (reference) | {} | {} | {} | {} |",
        hot.len(),
        super::ms(median(&hot)),
        super::ms(super::pct(&hot, 0.99)),
        super::ms(*hot.last().unwrap())
    );
    println!(
        "| first after scale to zero | {} | {} | — | {} |",
        cold.len(),
        super::ms(median(&cold)),
        super::ms(*cold.last().unwrap())
    );
    println!();
    let m = median(&cold);
    println!(
        "- First request after zero: median **{}** (target ≤ 5 ms, {}), **{:.0}×** the median request to a running instance. The component and its compiled code are cached on the node; the time is the wake over the link, the controller's pass, placement, the pod's sandbox, the instance becoming ready and the table reaching the gateway.",
        super::ms(m),
        if m <= Duration::from_millis(5) {
            "met"
        } else {
            "missed"
        },
        m.as_secs_f64() / median(&hot).as_secs_f64()
    );
    println!(
        "- Resident memory of the `flotilla up` process (scheduler and agent): no function {} MiB; the function at zero {} MiB (**{:.2}×**); with one idle instance {} MiB (**{:.2}×**).",
        rss_none / 1024,
        rss_zero / 1024,
        rss_zero as f64 / rss_none as f64,
        rss_one / 1024,
        rss_one as f64 / rss_none as f64
    );
    println!();
    drop(child);
    if !bridge_before {
        let _ = Command::new("ip").args(["link", "del", "flt0"]).status();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "flotilla"])
            .status();
    }
}
