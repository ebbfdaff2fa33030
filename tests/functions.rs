//! Issue 17: Functions on a real all-in-one cluster with the bridge pod
//! network — a `wasi:http` component deployed with one manifest, answered
//! one fresh instance per request behind its Service; a trap, a memory
//! blow-up and a timeout fail only their own request; over its
//! concurrency it answers 503 with `Retry-After`; a new revision takes over;
//! deleting it removes its Deployment, Service and pods. An idle function
//! goes to zero instances and the gateway brings it back for the next
//! request; a new revision under steady traffic fails no request.

mod common;

use common::{HostNetwork, Up, wait_until};
use std::io::{Read, Write};
use std::time::Duration;

const HTTP: &str = flotilla_samples::HTTP_P2;
const LONG: Duration = Duration::from_secs(90);
const GATEWAY: &str = "127.0.0.1:18088";
const METRICS: &str = "127.0.0.1:18089";
const GATEWAY_TLS: &str = "127.0.0.1:18443";

fn function(greeting: &str) -> String {
    format!(
        r#"kind = "Function"
name = "hello"
wasm = "{HTTP}"
routes = [{{ host = "hello.example", path = "/api" }}]
env = {{ GREETING = "{greeting}" }}
memory = "16Mi"
timeout = "120s"
max_concurrency = 2
min_instances = 1
"#
    )
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// One HTTP/1.1 request to `addr` with `Host: host`, read to the end.
fn call(addr: &str, path: &str, host: &str) -> Result<Answer, String> {
    let s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    exchange(s, path, host)
}

/// The same over TLS, naming `host` (SNI) and trusting only `ca_der`.
fn call_tls(addr: &str, path: &str, host: &str, ca_der: &[u8]) -> Result<Answer, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| e.to_string())?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    exchange(rustls::StreamOwned::new(conn, s), path, host)
}

/// Sends a GET on `s` and reads the answer to the end.
fn exchange(mut s: impl Read + Write, path: &str, host: &str) -> Result<Answer, String> {
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(|e| e.to_string())?;
    let got = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = got
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("bad answer: {got:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head:?}"))?;
    // Bodies of unknown length come chunked: keep only the data.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Answer {
        status,
        head: head.to_string(),
        body,
    })
}

/// Starts a `POST /echo` that promises one body byte and sends none, and
/// returns once the answer's head has come back: the function instance is
/// then running and holds one of the function's slots until [`release`].
fn hold(addr: &str) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        assert!(n == 1, "the connection closed before the answer's head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Sends the byte a [`hold`] promised and returns the echoed body.
fn release(mut s: std::net::TcpStream) -> String {
    s.write_all(b"x").unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    dechunk(&String::from_utf8_lossy(&rest))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// POSTs `len` bytes (a repeating pattern, written as it goes) to `/echo`
/// through `addr` and checks the echo as it arrives; returns how many
/// bytes came back and whether every one matched.
fn echo(addr: &str, path: &str, host: &str, len: usize) -> (usize, bool) {
    let pattern = |i: usize| (i % 251) as u8;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut reader = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < len {
            let n = (len - sent).min(1 << 16);
            let part: Vec<u8> = (sent..sent + n).map(pattern).collect();
            s.write_all(&part).unwrap();
            sent += n;
        }
    });
    // The head, then a chunked body: decode while checking.
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 1 << 16];
    let head_end = loop {
        let n = reader.read(&mut tmp).unwrap();
        assert!(n > 0, "the connection closed before the answer's head");
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut rest = buf[head_end..].to_vec();
    let (mut got, mut same) = (0usize, true);
    loop {
        // Read a chunk size line.
        let line_end = loop {
            if let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let n = reader.read(&mut tmp).unwrap();
            assert!(n > 0, "cut after {got} bytes");
            rest.extend_from_slice(&tmp[..n]);
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&rest[..line_end]).trim(), 16).unwrap();
        rest.drain(..line_end + 2);
        if size == 0 {
            break;
        }
        while rest.len() < size + 2 {
            let n = reader.read(&mut tmp).unwrap();
            assert!(n > 0, "cut after {got} bytes");
            rest.extend_from_slice(&tmp[..n]);
        }
        for (k, b) in rest[..size].iter().enumerate() {
            same &= *b == pattern(got + k);
        }
        got += size;
        rest.drain(..size + 2);
    }
    writer.join().unwrap();
    (got, same)
}

fn json(up: &Up, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&up.ok(&a)).unwrap()
}

#[test]
fn a_function_is_served_per_request_behind_its_service_and_isolates_failures() {
    let _network = HostNetwork::taken();
    let up = Up::start_with(&[
        "--pod-network",
        "bridge",
        "--gateway-addr",
        GATEWAY,
        "--gateway-tls-addr",
        GATEWAY_TLS,
    ]);
    let f = up.manifest("fn.toml", &function("v1"));
    let out = up.ok(&["apply", "-f", &f]);
    assert!(out.contains("function/hello created"), "{out}");

    wait_until(LONG, "the function to be ready", || {
        json(&up, &["get", "function", "hello"])["status"]["ready"] == 1
    });
    let svc = json(&up, &["get", "svc", "hello"]);
    assert_eq!(svc["metadata"]["owner"]["kind"], "Function", "{svc}");
    let vip = svc["status"]["cluster_ip"].as_str().unwrap().to_string();
    let addr = format!("{vip}:80");
    wait_until(LONG, "the service to answer", || {
        call(&addr, "/api/hi", "hello.example").is_ok_and(|a| a.status == 200)
    });

    let a = call(&addr, "/api/hi?x=1", "hello.example").unwrap();
    assert_eq!(a.body, "hello from v1: GET hello.example /api/hi?x=1\n");
    assert!(
        a.head
            .to_ascii_lowercase()
            .contains("x-flotilla-request-id"),
        "{}",
        a.head
    );
    // A fresh instance per request: the guest's counter is always 1.
    for _ in 0..3 {
        assert_eq!(call(&addr, "/count", "h").unwrap().body, "1\n");
    }

    // A second function with a short timeout, reached through the node's
    // gateway: it takes `/other` on any host; `hello` only
    // `hello.example/api`.
    let other = up.manifest(
        "other.toml",
        &format!(
            "kind = \"Function\"\nname = \"other\"\nwasm = \"{HTTP}\"\nroutes = [{{ path = \"/other\" }}]\nenv = {{ GREETING = \"other\" }}\ntimeout = \"2s\"\nmin_instances = 1\n"
        ),
    );
    up.ok(&["apply", "-f", &other]);
    wait_until(
        LONG,
        "the second function to answer through the gateway",
        || call(GATEWAY, "/other/x", "any.example").is_ok_and(|a| a.status == 200),
    );

    // Failures stay with their request.
    let trap = call(&addr, "/trap", "h").unwrap();
    assert_eq!(trap.status, 500, "{}", trap.body);
    assert!(trap.body.contains("trapped"), "{}", trap.body);
    let hog = call(&addr, "/hog", "h").unwrap();
    assert_eq!(hog.status, 500, "{}", hog.body);
    assert!(hog.body.contains("ran out of memory"), "{}", hog.body);
    let spin = call(GATEWAY, "/other/spin", "h").unwrap();
    assert_eq!(spin.status, 504, "{}", spin.body);
    assert!(spin.body.contains("timeout of 2000 ms"), "{}", spin.body);
    assert_eq!(call(GATEWAY, "/other/count", "h").unwrap().body, "1\n");
    assert_eq!(call(&addr, "/count", "h").unwrap().body, "1\n");

    // HTTPS: a certificate Secret for hello.example, labelled for the
    // gateways; a client naming that host (SNI) gets the function over TLS
    // with that certificate.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["hello.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let crt = up.manifest("tls.crt", &cert.pem());
    let k = up.manifest("tls.key", &key.serialize_pem());
    up.ok(&[
        "create",
        "secret",
        "hello-tls",
        "--from-file",
        &format!("tls.crt={crt}"),
        "--from-file",
        &format!("tls.key={k}"),
        "--label",
        "flotilla.dev/gateway-tls=true",
    ]);
    wait_until(LONG, "the gateway to answer over HTTPS", || {
        call_tls(GATEWAY_TLS, "/api/tls", "hello.example", cert.der()).is_ok()
    });
    let a = call_tls(GATEWAY_TLS, "/api/tls", "hello.example", cert.der()).unwrap();
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "hello from v1: GET hello.example /api/tls\n")
    );
    // A host no Function routes has no certificate: no handshake.
    assert!(call_tls(GATEWAY_TLS, "/api/tls", "nobody.example", cert.der()).is_err());

    // `flotilla invoke` reaches a function through the API and the node's
    // link, with no route and no node address: the path, headers and a
    // streamed body are the function's, its answer comes back as it is.
    let a = up.ok(&[
        "invoke",
        "hello",
        "--path",
        "/api/x?y=2",
        "-H",
        "Host: hello.example",
    ]);
    assert_eq!(a, "hello from v1: GET hello.example /api/x?y=2\n");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let file = up.manifest("data.bin", "");
    std::fs::write(&file, &data).unwrap();
    let out = up.cli(&[
        "invoke",
        "hello",
        "--path",
        "/echo",
        "-d",
        &format!("@{file}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == data, "the echo of 3 MB differs");
    let mut piped = up
        .command()
        .args(["invoke", "hello", "--path", "/echo", "-d", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    piped
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    let out = piped.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from stdin");
    let head = up.ok(&["invoke", "hello", "-i", "--path", "/count"]);
    assert!(head.starts_with("HTTP/1.1 200 OK\n"), "{head}");
    assert!(head.contains("x-flotilla-request-id: "), "{head}");
    assert!(head.contains("x-flotilla-node: "), "{head}");
    assert!(head.ends_with("\n\n1\n"), "{head}");
    // What a request's instance writes is in the function's log, each
    // line tagged with the request's id; --request picks one request.
    let head = up.ok(&["invoke", "hello", "-i", "--path", "/log"]);
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-flotilla-request-id: "))
        .unwrap()
        .to_string();
    up.ok(&["invoke", "hello", "--path", "/log"]);
    let logs = up.ok(&["logs", "function/hello", "--request", &id]);
    assert_eq!(
        logs,
        format!(
            "[req {id}] first line for /log\n[req {id}] second line, written in two parts\n[req {id}] and one on stderr\n"
        )
    );
    // A failed request: the function's answer, and exit code 1.
    let trap = up.cli(&["invoke", "hello", "--path", "/trap"]);
    assert_eq!(trap.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&trap.stdout).contains("trapped"),
        "{trap:?}"
    );
    assert!(
        String::from_utf8_lossy(&trap.stderr).contains("function hello answered 500"),
        "{trap:?}"
    );
    let root = up.ok(&["invoke", "hello", "--path", "/?q=1"]);
    assert_eq!(root, "hello from v1: GET hello.example /?q=1\n");
    let nope = up.cli(&["invoke", "nope"]);
    assert!(!nope.status.success());
    assert!(
        String::from_utf8_lossy(&nope.stderr)
            .contains("function nope not found in namespace default"),
        "{nope:?}"
    );

    // Two requests hold both slots: each is inside the function (its
    // answer's head has come back) and waits for the one body byte it was
    // promised. A third is turned away at once; no timing involved.
    let held: Vec<_> = (0..2).map(|_| hold(&addr)).collect();
    let a = call(&addr, "/count", "h").unwrap();
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body.contains("max_concurrency"), "{}", a.body);
    assert!(
        a.head.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        a.head
    );
    for h in held {
        assert_eq!(release(h), "x");
    }
    // With the slots given back, the next request is served.
    assert_eq!(call(&addr, "/count", "h").unwrap().body, "1\n");

    // The gateway routes by host and path.
    for (host, path, want) in [
        (
            "hello.example",
            "/api/x?q=1",
            "hello from v1: GET hello.example /api/x?q=1\n",
        ),
        (
            "hello.example:18088",
            "/api",
            "hello from v1: GET hello.example:18088 /api\n",
        ),
        (
            "hello.example",
            "/other/y",
            "hello from other: GET hello.example /other/y\n",
        ),
        (
            "elsewhere.example",
            "/other",
            "hello from other: GET elsewhere.example /other\n",
        ),
    ] {
        let a = call(GATEWAY, path, host).unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, want), "{host}{path}");
    }
    for (host, path) in [("elsewhere.example", "/api/x"), ("hello.example", "/apis")] {
        let a = call(GATEWAY, path, host).unwrap();
        assert_eq!(a.status, 404, "{host}{path}: {}", a.body);
        assert!(a.body.contains("no function route"), "{}", a.body);
    }
    // HTTP/2 (prior knowledge) through the gateway; `--resolve` maps the
    // name to loopback without a lookup.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "--resolve",
            "hello.example:18088:127.0.0.1",
            "-w",
            "|%{http_version}",
            "http://hello.example:18088/api/h2",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from v1: GET hello.example:18088 /api/h2\n|2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 100 MB streamed through the gateway and back: the node does not
    // hold the body (its resident memory grows far less than that).
    let pid = up.child.as_ref().unwrap().id();
    let before = rss_kib(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let (got, same) = echo(GATEWAY, "/api/echo", "hello.example", 100 << 20);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(got, 100 << 20);
    assert!(same, "the echo differs from what was sent");
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    assert!(
        grew < 48 << 10,
        "the node grew by {grew} KiB while streaming 100 MiB"
    );

    // A failure behind the gateway is still the function's answer.
    assert_eq!(call(GATEWAY, "/other/trap", "h").unwrap().status, 500);
    up.ok(&["delete", "function", "other"]);

    // The table people read.
    let table = up.ok(&["get", "functions"]);
    assert!(
        table.contains("hello") && table.contains("hello.example/api"),
        "{table}"
    );

    // A new revision takes over.
    let f = up.manifest("fn.toml", &function("v2"));
    let out = up.ok(&["apply", "-f", &f]);
    assert!(out.contains("function/hello configured"), "{out}");
    wait_until(LONG, "v2 to answer", || {
        call(&addr, "/", "h").is_ok_and(|a| a.body.starts_with("hello from v2"))
    });
    wait_until(LONG, "revision 2 to be the only one", || {
        let f = json(&up, &["get", "function", "hello"]);
        f["status"]["revision"] == 2 && up.pods().len() == 1
    });

    // A canary takes its weight of the route's requests through the gateway.
    let canary = format!(
        "{}canary = {{ wasm = \"{HTTP}\", weight = 20, env = {{ GREETING = \"canary\" }} }}\n",
        function("v2")
    );
    up.ok(&["apply", "-f", &up.manifest("fn.toml", &canary)]);
    wait_until(LONG, "the canary to be ready", || {
        json(&up, &["get", "function", "hello"])["status"]["ready"] == 2
            && call(GATEWAY, "/api/who", "hello.example")
                .is_ok_and(|a| a.body.starts_with("hello from canary"))
    });
    let mut to_canary = 0;
    for _ in 0..1000 {
        let a = call(GATEWAY, "/api/who", "hello.example").unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        if a.body.starts_with("hello from canary") {
            to_canary += 1;
        } else {
            assert!(a.body.starts_with("hello from v2"), "{}", a.body);
        }
    }
    assert!(
        (100..=300).contains(&to_canary),
        "{to_canary} of 1000 requests went to the canary (weight 20)"
    );
    // Dropping the canary from the spec removes its objects.
    up.ok(&["apply", "-f", &up.manifest("fn.toml", &function("v2"))]);
    wait_until(LONG, "the canary's objects to go", || {
        !up.cli(&["get", "deploy", "hello-canary"]).status.success()
            && !up.cli(&["get", "svc", "hello-canary"]).status.success()
    });

    // Deleting the function removes what it owned.
    up.ok(&["delete", "function", "hello"]);
    wait_until(LONG, "the function's objects to go", || {
        up.pods().is_empty()
            && !up.cli(&["get", "deploy", "hello"]).status.success()
            && !up.cli(&["get", "svc", "hello"]).status.success()
    });
}

/// The pods hosting function `name`.
fn pods_of(up: &Up, name: &str) -> usize {
    up.pods()
        .iter()
        .filter(|p| p["metadata"]["labels"]["flotilla.dev/function"] == name)
        .count()
}

#[test]
fn an_idle_function_goes_to_zero_and_a_new_revision_fails_no_request() {
    let _network = HostNetwork::taken();
    let up = Up::start_with(&[
        "--pod-network",
        "bridge",
        "--gateway-addr",
        GATEWAY,
        "--metrics-interval",
        "1s",
        "--metrics-addr",
        METRICS,
    ]);
    let lazy = format!(
        "kind = \"Function\"\nname = \"lazy\"\nwasm = \"{HTTP}\"\nroutes = [{{ path = \"/lazy\" }}]\nenv = {{ GREETING = \"lazy\" }}\ntimeout = \"120s\"\nscale_to_zero_after = \"2s\"\n"
    );
    up.ok(&["apply", "-f", &up.manifest("lazy.toml", &lazy)]);
    wait_until(LONG, "the function to be ready", || {
        json(&up, &["get", "function", "lazy"])["status"]["ready"] == 1
    });
    let a = call(GATEWAY, "/lazy/a", "h").unwrap();
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "hello from lazy: GET h /lazy/a\n")
    );

    // Two seconds without a request: no instance, no pod.
    wait_until(LONG, "the idle function to have no instance", || {
        let f = json(&up, &["get", "function", "lazy"]);
        f["status"]["instances"] == 0 && pods_of(&up, "lazy") == 0
    });
    let f = json(&up, &["get", "function", "lazy"]);
    assert!(
        f["status"]["last_request_ms"].as_u64().unwrap_or(0) > 0,
        "{f}"
    );
    let described = up.ok(&["describe", "function", "lazy"]);
    assert!(described.contains("Scale to 0:   after 2s"), "{described}");

    // The next request waits at the gateway while an instance comes up,
    // and is answered by it.
    let a = call(GATEWAY, "/lazy/back", "h").unwrap();
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "hello from lazy: GET h /lazy/back\n"),
        "{}",
        a.head
    );
    // At zero again, `flotilla invoke` wakes it the same way.
    wait_until(LONG, "the function to go to zero again", || {
        json(&up, &["get", "function", "lazy"])["status"]["instances"] == 0
            && pods_of(&up, "lazy") == 0
    });
    let a = up.ok(&["invoke", "lazy", "--path", "/lazy/invoked"]);
    assert_eq!(a, "hello from lazy: GET localhost /lazy/invoked\n");
    up.ok(&["delete", "function", "lazy"]);

    // Autoscaling on concurrency: four clients keep four slow requests in
    // flight on a function whose instances take two each; it grows to its
    // max_instances of 3 (4 / (2 × 70%) rounds up to 3), and back to its
    // one once the clients stop and the scale-down window has passed.
    let busy = format!(
        "kind = \"Function\"\nname = \"busy\"\nwasm = \"{HTTP}\"\nroutes = [{{ path = \"/busy\" }}]\ntimeout = \"120s\"\nmax_concurrency = 2\nmin_instances = 1\nmax_instances = 3\n"
    );
    up.ok(&["apply", "-f", &up.manifest("busy.toml", &busy)]);
    wait_until(LONG, "the busy function to answer", || {
        call(GATEWAY, "/busy/x", "h").is_ok_and(|a| a.status == 200)
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for _ in 0..100_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    // 503s (all slots of the instances there are busy)
                    // are part of the load.
                    let _ = call(GATEWAY, "/busy/sleep?ms=300", "h");
                }
            })
        })
        .collect();
    wait_until(
        Duration::from_secs(180),
        "the function to scale up to 3",
        || json(&up, &["get", "function", "busy"])["status"]["ready"] == 3,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    wait_until(
        Duration::from_secs(180),
        "the function to scale back down to 1",
        || pods_of(&up, "busy") == 1,
    );
    up.ok(&["delete", "function", "busy"]);

    // A new revision under steady traffic: every request answered 200,
    // first by v1, then by v2.
    let roll = |greeting: &str| {
        format!(
            "kind = \"Function\"\nname = \"roll\"\nwasm = \"{HTTP}\"\nroutes = [{{ path = \"/roll\" }}]\nenv = {{ GREETING = \"{greeting}\" }}\ntimeout = \"120s\"\nmin_instances = 1\n"
        )
    };
    up.ok(&["apply", "-f", &up.manifest("roll.toml", &roll("v1"))]);
    wait_until(LONG, "v1 to answer", || {
        call(GATEWAY, "/roll/x", "h").is_ok_and(|a| a.status == 200)
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let traffic = {
        let (stop, served) = (stop.clone(), served.clone());
        std::thread::spawn(move || {
            let (mut failed, mut seen) = (Vec::new(), std::collections::BTreeSet::new());
            for _ in 0..200_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match call(GATEWAY, "/roll/x", "h") {
                    Ok(a) if a.status == 200 => {
                        seen.insert(a.body.split(':').next().unwrap_or("").to_string());
                    }
                    Ok(a) => failed.push(format!("{}: {}", a.status, a.body)),
                    Err(e) => failed.push(e),
                }
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (failed, seen)
        })
    };
    wait_until(LONG, "traffic to flow", || {
        served.load(std::sync::atomic::Ordering::Relaxed) >= 20
    });
    up.ok(&["apply", "-f", &up.manifest("roll.toml", &roll("v2"))]);
    wait_until(LONG, "revision 2 to be the only one", || {
        let f = json(&up, &["get", "function", "roll"]);
        f["status"]["revision"] == 2 && f["status"]["ready"] == 1 && pods_of(&up, "roll") == 1
    });
    // Some more requests after the old pod is gone.
    let after = served.load(std::sync::atomic::Ordering::Relaxed);
    wait_until(LONG, "traffic after the rollout", || {
        served.load(std::sync::atomic::Ordering::Relaxed) >= after + 20
    });
    // The traffic shows: in the Function's status (from what the node
    // reports each second), in `get functions`, and per route on the
    // node's /metrics.
    wait_until(LONG, "the function's traffic figures", || {
        let t = &json(&up, &["get", "function", "roll"])["status"]["traffic"];
        t["requests"].as_u64().unwrap_or(0) > 0 && t["p99_us"].as_u64().unwrap_or(0) > 0
    });
    let table = up.ok(&["get", "functions"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("REQ/S") && header.contains("P99") && header.contains("ERRORS"),
        "{table}"
    );
    let metrics = call(METRICS, "/metrics", "h").unwrap().body;
    let route = r#"flotilla_gateway_requests_total{namespace="default",service="roll",host="",path="/roll",node="#;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(route) && l.contains(r#"code="2xx"} "#) && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE flotilla_function_request_duration_seconds histogram"),
        "{metrics}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (failed, seen) = traffic.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["hello from v1".to_string(), "hello from v2".to_string()]
    );
}
