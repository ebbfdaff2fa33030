use super::*;
use crate::executor::wasm::runtime::WasmConfig;
use crate::logs::{LogPaths, read_log};
use flotilla_samples as samples;
use std::net::SocketAddr;
use std::path::Path;

/// The `http` sample served on a loopback port with `limits`.
async fn serving(dir: &Path, limits: Limits) -> (SocketAddr, Arc<HttpFunction>) {
    let mut cfg = WasmConfig::new(dir.join("cache"));
    cfg.max_instances = 32;
    let rt = Arc::new(WasmRuntime::new(cfg).unwrap());
    let prepared = rt.prepare(Path::new(samples::HTTP_P2), "").await.unwrap();
    let env: Labels = [("GREETING".to_string(), "tests".to_string())].into();
    let log = LogSink::new(LogPaths::new(dir, "fn"), 1 << 20);
    let f = Arc::new(
        HttpFunction::new(rt, prepared, "hello", env, log, Outgoing::default(), limits)
            .unwrap()
            .counting(Arc::new(crate::metrics::Usage::default())),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, f.clone(), std::future::pending()));
    (addr, f)
}

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(60),
        max_concurrency: 8,
        memory: Some(32 << 20),
        reuse: false,
    }
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

/// One request on a connection of its own.
async fn call(addr: SocketAddr, method: &str, path: &str, body: Bytes) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "fn.example")
        .body(Full::new(body))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    call(addr, "GET", path, Bytes::new()).await
}

fn body(a: &Answer) -> String {
    String::from_utf8_lossy(&a.body).into_owned()
}

#[tokio::test]
async fn every_request_gets_a_fresh_instance_with_the_functions_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, f) = serving(dir.path(), limits()).await;
    let a = get(addr, "/api/hello?x=1").await;
    assert_eq!(a.status, 200, "{}", body(&a));
    assert_eq!(
        body(&a),
        "hello from tests: GET fn.example /api/hello?x=1\n"
    );
    assert!(a.headers.contains_key(REQUEST_ID_HEADER));
    // A counter in the guest's memory: each request sees it at 1.
    for _ in 0..3 {
        assert_eq!(body(&get(addr, "/count").await), "1\n");
    }
    assert_eq!(body(&get(addr, "/env?name=GREETING").await), "tests\n");
    assert_eq!(get(addr, "/env?name=HOME").await.status, 404);
    assert_eq!(f.counts.requests.load(Ordering::Relaxed), 6);
    assert_eq!(f.in_flight(), 0);
}

#[tokio::test]
async fn a_trap_a_memory_blowup_and_a_timeout_fail_only_their_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = limits();
    l.memory = Some(16 << 20);
    let (addr, f) = serving(dir.path(), l).await;
    // A second function with a short timeout, for the spinning request.
    let short = tempfile::tempdir().unwrap();
    let mut l = limits();
    l.timeout = Duration::from_secs(2);
    let (short_addr, short_f) = serving(short.path(), l).await;

    let trap = get(addr, "/trap").await;
    assert_eq!(trap.status, 500);
    assert!(
        body(&trap).contains("function hello trapped"),
        "{}",
        body(&trap)
    );
    assert_eq!(get(addr, "/hello").await.status, 200);

    let hog = get(addr, "/hog").await;
    assert_eq!(hog.status, 500);
    assert!(body(&hog).contains("ran out of memory"), "{}", body(&hog));
    assert_eq!(get(addr, "/hello").await.status, 200);

    let spin = get(short_addr, "/spin").await;
    assert_eq!(spin.status, 504, "{}", body(&spin));
    assert!(
        body(&spin).contains("timeout of 2000 ms"),
        "{}",
        body(&spin)
    );
    assert_eq!(body(&get(short_addr, "/count").await), "1\n");

    assert_eq!(f.counts.errors.load(Ordering::Relaxed), 2);
    assert_eq!(short_f.counts.timeouts.load(Ordering::Relaxed), 1);
    // What the node reports: every request with its latency, the 5xx ones
    // as errors; the timed-out one took its 2 s.
    let u = f.usage.as_ref().unwrap();
    assert_eq!(u.requests.load(Ordering::Relaxed), 4);
    assert_eq!(u.errors.load(Ordering::Relaxed), 2);
    assert_eq!(u.latency.counts().iter().sum::<u64>(), 4);
    let u = short_f.usage.as_ref().unwrap();
    assert_eq!(u.errors.load(Ordering::Relaxed), 1);
    let at_least_2s = flotilla_api::latency::BOUNDS_US.partition_point(|&b| b < 2_000_000);
    assert_eq!(u.latency.counts()[at_least_2s..].iter().sum::<u64>(), 1);
    assert!(u.latency.sum_us() >= 2_000_000);
    assert_eq!(f.in_flight(), 0);
    // The function's log names each failed request by its id.
    let log_of = |d: &Path| {
        String::from_utf8(read_log(&LogPaths::new(d, "fn"), false, None).unwrap()).unwrap()
    };
    let (log, short_log) = (log_of(dir.path()), log_of(short.path()));
    for id in [&trap, &hog].map(|a| a.headers[REQUEST_ID_HEADER].to_str().unwrap()) {
        assert!(
            log.contains(&format!("request {id}: ")),
            "{id} not in {log}"
        );
    }
    let id = spin.headers[REQUEST_ID_HEADER].to_str().unwrap();
    assert!(
        short_log.contains(&format!("request {id}: timed out")),
        "{id} not in {short_log}"
    );
}

#[tokio::test]
async fn each_line_a_request_writes_is_tagged_with_its_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _f) = serving(dir.path(), limits()).await;
    let (a, b) = tokio::join!(get(addr, "/a/log"), get(addr, "/b/log"));
    assert_eq!((a.status, b.status), (200, 200));
    let log = String::from_utf8(read_log(&LogPaths::new(dir.path(), "fn"), false, None).unwrap())
        .unwrap();
    for (ans, path) in [(&a, "/a/log"), (&b, "/b/log")] {
        let id = ans.headers[REQUEST_ID_HEADER].to_str().unwrap();
        let mine: Vec<&str> = log
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("[req {id}] ")))
            .collect();
        assert_eq!(
            mine,
            vec![
                format!("first line for {path}").as_str(),
                "second line, written in two parts",
                "and one on stderr",
            ],
            "{log}"
        );
    }
    assert_eq!(log.lines().count(), 6, "{log}");
}

#[tokio::test]
async fn an_opted_in_function_reuses_its_instance_until_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = limits();
    l.reuse = true;
    let (addr, _f) = serving(dir.path(), l).await;
    // One request at a time: the same instance, counting on.
    for n in 1..=3 {
        assert_eq!(body(&get(addr, "/count").await), format!("{n}\n"));
    }
    // Its output is still tagged per request.
    let a = get(addr, "/log").await;
    let b = get(addr, "/log").await;
    let log = String::from_utf8(read_log(&LogPaths::new(dir.path(), "fn"), false, None).unwrap())
        .unwrap();
    for ans in [&a, &b] {
        let id = ans.headers[REQUEST_ID_HEADER].to_str().unwrap();
        let tagged = log
            .lines()
            .filter(|l| l.starts_with(&format!("[req {id}] ")))
            .count();
        assert_eq!(tagged, 3, "{log}");
    }
    // A trap ends that instance: the next request gets a new one.
    assert_eq!(get(addr, "/trap").await.status, 500);
    assert_eq!(body(&get(addr, "/count").await), "1\n");
    assert_eq!(body(&get(addr, "/count").await), "2\n");
}

#[tokio::test]
async fn over_max_concurrency_answers_503_with_retry_after_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = limits();
    l.max_concurrency = 2;
    let (addr, f) = serving(dir.path(), l).await;
    // Two requests that hold their instance until the test ends.
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(get(addr, "/sleep?ms=600000")))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while f.in_flight() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the two never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let third = get(addr, "/hello").await;
    assert_eq!(third.status, 503, "{}", body(&third));
    assert_eq!(third.headers["retry-after"], "1");
    assert_eq!(f.counts.rejected.load(Ordering::Relaxed), 1);
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _f) = serving(dir.path(), limits()).await;
    let sent: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
    let a = call(addr, "POST", "/echo", Bytes::from(sent.clone())).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), sent.len());
    assert!(a.body == sent, "the echo differs");
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_too() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _f) = serving(dir.path(), limits()).await;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // Several requests at once on the one connection, each its own instance.
    let mut answers = Vec::new();
    for i in 0..4 {
        let req = hyper::Request::builder()
            .uri(format!("http://fn.example/h2/{i}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        answers.push(send.send_request(req));
    }
    for (i, a) in futures_util::future::join_all(answers)
        .await
        .into_iter()
        .enumerate()
    {
        let resp = a.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!("hello from tests: GET fn.example /h2/{i}\n")
        );
    }
}

#[tokio::test]
async fn a_command_is_not_a_function() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(WasmRuntime::new(WasmConfig::new(dir.path().join("c"))).unwrap());
    let prepared = rt.prepare(Path::new(samples::HELLO_P2), "").await.unwrap();
    let log = LogSink::new(LogPaths::new(dir.path(), "fn"), 1 << 20);
    let err = HttpFunction::new(
        rt,
        prepared,
        "x",
        Labels::new(),
        log,
        Outgoing::default(),
        limits(),
    )
    .err()
    .unwrap();
    assert!(err.contains("wasi:http/incoming-handler"), "{err}");
}

#[test]
fn outgoing_requests_go_only_to_listed_hosts() {
    let none = Outgoing::default();
    let uri: http::Uri = "http://127.0.0.1:9/x".parse().unwrap();
    assert!(!none.allows(&uri));
    let some = Outgoing {
        allow: vec!["127.0.0.1:9".to_string(), "api.internal".to_string()].into(),
    };
    assert!(some.allows(&uri));
    assert!(some.allows(&"https://api.internal/v1".parse().unwrap()));
    assert!(!some.allows(&"http://127.0.0.1:10/".parse().unwrap()));
    assert!(!some.allows(&"http://other/".parse().unwrap()));
}

/// Starts a `POST /echo` promising one body byte and returns once the
/// answer's head is back: its instance is running until the byte comes.
async fn hold(addr: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    s
}

#[tokio::test]
async fn draining_refuses_new_connections_and_answers_what_it_has() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WasmConfig::new(dir.path().join("cache"));
    cfg.max_instances = 8;
    let rt = Arc::new(WasmRuntime::new(cfg).unwrap());
    let prepared = rt.prepare(Path::new(samples::HTTP_P2), "").await.unwrap();
    let log = LogSink::new(LogPaths::new(dir.path(), "fn"), 1 << 20);
    let usage = Arc::new(crate::metrics::Usage::default());
    let f = Arc::new(
        HttpFunction::new(
            rt,
            prepared,
            "hello",
            Labels::new(),
            log,
            Outgoing::default(),
            limits(),
        )
        .unwrap()
        .counting(usage.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (drain, drained) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, f, async {
        let _ = drained.await;
    }));

    let mut held = hold(addr).await;
    assert_eq!(usage.requests.load(Ordering::Relaxed), 1);
    assert_eq!(usage.in_flight.load(Ordering::Relaxed), 1);
    drain.send(()).unwrap();
    // The listener closes: new connections are refused (what lets a
    // gateway pass over this instance), while the held request goes on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!server.is_finished(), "it waits for the request it has");
    held.write_all(b"x").await.unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).await.unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("\r\nx\r\n"), "the echo: {rest:?}");
    // Its connection was told to close after the answer, and the server
    // is done once it has.
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the server ends after its last request")
        .unwrap();
    assert_eq!(usage.in_flight.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_python_component_built_by_componentize_py_is_served_unmodified() {
    // Built from samples/python/hello by componentize-py from PyPI: its
    // own bindings, CPython inside, wasi:cli imports beside wasi:http.
    let wasm = tokio::task::spawn_blocking(samples::python_hello)
        .await
        .unwrap()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WasmConfig::new(dir.path().join("cache"));
    cfg.max_instances = 8;
    let rt = Arc::new(WasmRuntime::new(cfg).unwrap());
    let prepared = rt.prepare(&wasm, "").await.unwrap();
    let env: Labels = [("GREETING".to_string(), "hi".to_string())].into();
    let log = LogSink::new(LogPaths::new(dir.path(), "fn"), 1 << 20);
    let f = Arc::new(
        HttpFunction::new(rt, prepared, "py", env, log, Outgoing::default(), limits()).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, f, std::future::pending()));

    let a = get(addr, "/py/x?y=1").await;
    assert_eq!(
        (a.status, body(&a).as_str()),
        (200, "hello from python (hi): GET /py/x?y=1\n")
    );
    let a = call(
        addr,
        "POST",
        "/echo",
        Bytes::from_static(b"from the client"),
    )
    .await;
    assert_eq!(
        (a.status, body(&a).as_str()),
        (200, "hello from python (hi): POST /echo\nfrom the client")
    );
}
