//! Scheduler and agent in one process, joined over real QUIC with mutual TLS.

mod common;

use common::wait_for;

use flotilla_api::proto::{AgentMsg, FrameReader, PROTOCOL_VERSION, SchedulerMsg, encode};
use flotilla_api::{Object, PodPhase};
use flotilla_host::link::LinkConfig;
use flotilla_host::node::{AgentConfig, AgentHandle, start as start_agent};
use flotilla_scheduler::pki::{CertPair, ClusterCa};
use flotilla_scheduler::server::{Scheduler, SchedulerConfig, start as start_scheduler};
use std::time::Duration;

async fn scheduler(dir: &std::path::Path) -> Scheduler {
    scheduler_with_grace(dir, flotilla_scheduler::server::DEFAULT_BLOB_GRACE).await
}

async fn scheduler_with_grace(dir: &std::path::Path, blob_grace: Duration) -> Scheduler {
    start_scheduler(SchedulerConfig {
        advertise: None,
        data_dir: dir.join("sched"),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        quic_addr: "127.0.0.1:0".parse().unwrap(),
        node_timeout: Duration::from_millis(800),
        heartbeat: Duration::from_millis(200),
        insecure_http: true,
        node_cert_ttl: Duration::from_secs(86_400),
        pod_cidr: Default::default(),
        blob_grace,
        pull_through: false,
        node_ports: flotilla_api::net::DEFAULT_NODE_PORTS,
        registries: Default::default(),
        store: Default::default(),
    })
    .await
    .unwrap()
}

async fn agent(s: &Scheduler, dir: &std::path::Path, name: &str) -> AgentHandle {
    let cert = s.issue_agent_cert(name).unwrap();
    start_agent(AgentConfig {
        data_dir: dir.join(name),
        node_name: name.into(),
        labels: Default::default(),
        capacity: None,
        server: s.quic_addr,
        others: Vec::new(),
        ca_pem: s.ca_pem().into(),
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
        link: LinkConfig::default(),
        max_instances: 32,
        creds_dir: None,
        metrics: Default::default(),

        executors: Default::default(),
    })
    .await
    .unwrap()
}

fn node(s: &Scheduler, name: &str) -> Option<flotilla_api::Node> {
    match s.cluster.store.get(&format!("nodes/{name}")).as_deref() {
        Some(Object::Node(n)) => Some(n.clone()),
        _ => None,
    }
}

fn pod_phase(s: &Scheduler, name: &str) -> Option<PodPhase> {
    match s
        .cluster
        .store
        .get(&format!("pods/default/{name}"))
        .as_deref()
    {
        Some(Object::Pod(p)) => Some(p.status.phase),
        _ => None,
    }
}

async fn http(
    s: &Scheduler,
    method: &'static str,
    url: String,
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let (token, _) = flotilla_scheduler::auth::create_token(
        s.cluster.store.as_ref(),
        flotilla_api::Role::Admin,
        vec![],
        Duration::from_secs(60),
        "test",
    )
    .unwrap();
    tokio::task::spawn_blocking(move || {
        let req = ureq::request(method, &url).set("authorization", &format!("Bearer {token}"));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_and_nodes_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path()).await;
    let a = agent(&s, dir.path(), "edge-1").await;
    wait_for("node ready", || {
        node(&s, "edge-1").is_some_and(|n| n.status.ready)
    })
    .await;
    assert_eq!(node(&s, "edge-1").unwrap().status.epoch, 1);

    let pod = serde_json::json!({"objects": [{
        "kind": "Pod",
        "metadata": {"name": "c", "namespace": "default"},
        "spec": {"members": [{"name": "c", "module": common::uploaded(&s.cluster, flotilla_samples::COUNTER_P2), "env": {"INTERVAL_MS": "20"}}]}
    }]});
    let (code, body) = http(
        &s,
        "POST",
        format!("http://{}/v1/apply", s.api_addr),
        Some(pod),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"created\""), "{body}");
    wait_for("pod running", || {
        pod_phase(&s, "c") == Some(PodPhase::Running)
    })
    .await;
    let url = format!("http://{}/v1/pods/default/c/logs", s.api_addr);
    let mut log = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30) * common::slack();
    while !log.contains("count 2\n") {
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        log = http(&s, "GET", url.clone(), None).await.1;
    }
    assert!(log.starts_with("count 0\ncount 1\ncount 2\n"), "{log}");

    // The agent goes away: the node turns NotReady after the timeout.
    a.shutdown().await;
    wait_for("node not ready", || {
        node(&s, "edge-1").is_some_and(|n| !n.status.ready)
    })
    .await;
    let events = s
        .cluster
        .events
        .list(None, Some(flotilla_api::Kind::Node), Some("edge-1"));
    assert!(
        events.iter().any(|e| e.reason == "NodeNotReady"),
        "{events:?}"
    );

    // Its bare pod was marked Lost, not re-run; the node comes back under a
    // new epoch and is not given the Lost pod again.
    wait_for("pod lost", || pod_phase(&s, "c") == Some(PodPhase::Lost)).await;
    let a = agent(&s, dir.path(), "edge-1").await;
    wait_for("node ready again", || {
        node(&s, "edge-1").is_some_and(|n| n.status.ready && n.status.epoch == 2)
    })
    .await;
    // A new pod sent to it after the Sync: once the agent runs it, it has
    // applied that Sync too (one ordered stream), so the Lost pod would be
    // there by now if it had been sent.
    let later = serde_json::json!({"objects": [{
        "kind": "Pod",
        "metadata": {"name": "later", "namespace": "default"},
        "spec": {"members": [{"name": "c", "module": common::uploaded(&s.cluster, flotilla_samples::COUNTER_P2)}]}
    }]});
    let (code, body) = http(
        &s,
        "POST",
        format!("http://{}/v1/apply", s.api_addr),
        Some(later),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    wait_for("the later pod running", || {
        pod_phase(&s, "later") == Some(PodPhase::Running)
    })
    .await;
    assert_eq!(a.agent.lock().unwrap().pod_count(), 1, "only the later pod");
    assert_eq!(pod_phase(&s, "c"), Some(PodPhase::Lost));
    a.shutdown().await;
    s.shutdown().await;
}

fn client_config(ca_pem: &str, cert: Option<&CertPair>) -> quinn::ClientConfig {
    common::quic_client(
        ca_pem,
        cert.map(|c| (c.cert_pem.as_str(), c.key_pem.as_str())),
    )
}

/// Connects and tries to register; returns what happened.
async fn try_register(
    s: &Scheduler,
    cfg: quinn::ClientConfig,
    first_bytes: Vec<u8>,
) -> Result<SchedulerMsg, String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let conn = ep
        .connect(s.quic_addr, "flotilla-scheduler")
        .unwrap()
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut tx, rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
    tx.write_all(&first_bytes)
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(rx);
    let r = tokio::time::timeout(Duration::from_secs(5), reader.next::<SchedulerMsg>())
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string());
    ep.close(0u32.into(), b"");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_and_hostile_peers_are_refused() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path()).await;
    let hello = |name: &str| {
        encode(&AgentMsg::Hello {
            version: flotilla_api::proto::PROTOCOL_VERSION,
            node: flotilla_api::proto::NodeInfo {
                name: name.into(),
                labels: Default::default(),
                allocatable: Default::default(),
                arch: "x".into(),
                version: "t".into(),
                runtimes: vec![],
                pod_network: String::new(),
                gateway_tls: false,
            },
        })
    };
    // No client certificate: only joining with a token is possible, and the agent is told so.
    let r = try_register(&s, client_config(s.ca_pem(), None), hello("anon")).await;
    assert!(
        matches!(&r, Ok(SchedulerMsg::Refused { reason }) if reason.contains("no client certificate")),
        "{r:?}"
    );
    // A certificate from another cluster's CA.
    let foreign = ClusterCa::load_or_create(&dir.path().join("foreign")).unwrap();
    let cert = foreign.issue_agent("evil").unwrap();
    let r = try_register(&s, client_config(s.ca_pem(), Some(&cert)), hello("evil")).await;
    assert!(r.is_err(), "{r:?}");
    // A valid peer sending garbage is disconnected.
    let good = s.issue_agent_cert("ok").unwrap();
    let r = try_register(
        &s,
        client_config(s.ca_pem(), Some(&good)),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    )
    .await;
    assert!(r.is_err(), "{r:?}");
    // A peer speaking another protocol version is told why.
    let mut v9 = hello("ok");
    v9[2] = 9;
    let r = try_register(&s, client_config(s.ca_pem(), Some(&good)), v9).await;
    assert!(r.is_err(), "{r:?}");
    let mut newer = serde_json::to_value(AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        node: flotilla_api::proto::NodeInfo {
            name: "ok".into(),
            labels: Default::default(),
            allocatable: Default::default(),
            arch: "x".into(),
            version: "t".into(),
            runtimes: vec![],
            pod_network: String::new(),
            gateway_tls: false,
        },
    })
    .unwrap();
    newer["Hello"]["version"] = (PROTOCOL_VERSION + 1).into();
    let framed = {
        let body = serde_json::to_vec(&newer).unwrap();
        let mut f = vec![b'F', b'L', PROTOCOL_VERSION];
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(&body);
        f
    };
    match try_register(&s, client_config(s.ca_pem(), Some(&good)), framed).await {
        Ok(SchedulerMsg::Refused { reason }) => {
            let v = format!("protocol version {}", PROTOCOL_VERSION + 1);
            assert!(reason.contains(&v), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // None of them registered a session (the one node is the name the
    // scheduler admitted when it issued `ok`'s certificate, never
    // connected), and the scheduler still serves a good agent.
    let nodes = s.cluster.store.list("nodes/");
    let epochs: Vec<(String, u64)> = nodes
        .iter()
        .filter_map(|o| match &**o {
            flotilla_api::Object::Node(n) => Some((n.metadata.name.clone(), n.status.epoch)),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, [("ok".to_string(), 0)]);
    match try_register(&s, client_config(s.ca_pem(), Some(&good)), hello("ok")).await {
        Ok(SchedulerMsg::Welcome { epoch: 1, .. }) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_gets_its_own_pod_cidr_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path()).await;
    let a = agent(&s, dir.path(), "a").await;
    let b = agent(&s, dir.path(), "b").await;
    let cidr = |name: &str| {
        node(&s, name)
            .map(|n| n.status.pod_cidr)
            .unwrap_or_default()
    };
    wait_for("both nodes registered", || {
        !cidr("a").is_empty() && !cidr("b").is_empty()
    })
    .await;
    let (ca, cb) = (cidr("a"), cidr("b"));
    assert_ne!(ca, cb);
    let cluster = flotilla_scheduler::ipam::Cidr::default();
    for c in [&ca, &cb] {
        let c: flotilla_scheduler::ipam::Cidr = c.parse().unwrap();
        assert_eq!(c.prefix, 24);
        assert!(cluster.contains(c.base), "{c} inside {cluster}");
    }
    // Reconnecting (a new epoch) keeps the block.
    let epoch = node(&s, "a").unwrap().status.epoch;
    a.shutdown().await;
    let a = agent(&s, dir.path(), "a").await;
    wait_for("a re-registered", || {
        node(&s, "a").is_some_and(|n| n.status.epoch > epoch)
    })
    .await;
    assert_eq!(cidr("a"), ca);
    a.shutdown().await;
    b.shutdown().await;
    s.shutdown().await;
}

fn token(s: &Scheduler, role: flotilla_api::Role) -> String {
    flotilla_scheduler::auth::create_token(
        s.cluster.store.as_ref(),
        role,
        vec![],
        Duration::from_secs(60),
        "test",
    )
    .unwrap()
    .0
}

/// One raw HTTP/1.1 request (so a test can lie about the body's length or
/// cut it short); the status code and body of the answer.
fn raw_request(
    s: &Scheduler,
    token: &str,
    method: &str,
    path: &str,
    content_length: Option<u64>,
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.api_addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\nconnection: close\r\n",
        s.api_addr
    );
    if let Some(n) = content_length {
        head.push_str(&format!("content-length: {n}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).unwrap();
    let _ = c.write_all(body);
    // A body shorter than promised: the client goes away (hyper then ends
    // the connection, answered or not). Otherwise the write side stays
    // open until the answer is read.
    if content_length.is_some_and(|n| n > body.len() as u64) && !body.is_empty() {
        let _ = c.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (code, body)
}

fn stored_blobs(s: &Scheduler) -> Vec<String> {
    let mut v: Vec<String> = s
        .cluster
        .blobs
        .list()
        .unwrap()
        .into_iter()
        .map(|b| b.digest)
        .collect();
    v.sort();
    v
}

fn leftovers(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("sched/blobs/tmp"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_verified_while_streaming_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path()).await;
    let admin = token(&s, flotilla_api::Role::Admin);
    let module = std::fs::read(flotilla_samples::HELLO_P1).unwrap();
    let digest = flotilla_api::manifest::digest_of(&module);
    let put = |d: &str, len: Option<u64>, body: &[u8]| {
        raw_request(&s, &admin, "PUT", &format!("/v1/blobs/{d}"), len, body)
    };
    let (h, _) = raw_request(
        &s,
        &admin,
        "HEAD",
        &format!("/v1/blobs/{digest}"),
        None,
        b"",
    );
    assert_eq!(h, 404);

    // Corrupt: the bytes do not hash to the digest named.
    let mut corrupt = module.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    let (code, body) = put(&digest, Some(corrupt.len() as u64), &corrupt);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("hashes to"), "{body}");
    // Truncated: half of what content-length promised, then the client is gone.
    let (code, body) = put(&digest, Some(module.len() as u64), &module[..mid]);
    assert!(code == 400 || code == 0, "{code} {body}");
    // Not wasm at all.
    let text = b"#!/bin/sh\necho this is not wasm\n";
    let text_digest = flotilla_api::manifest::digest_of(text);
    let (code, body) = put(&text_digest, Some(text.len() as u64), text);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("not a wasm module or component"), "{body}");
    // Over the cap: refused from the declared length, before any byte.
    let (code, body) = put(
        &digest,
        Some(flotilla_api::manifest::MAX_MODULE_BYTES + 1),
        b"",
    );
    assert_eq!(code, 413, "{body}");
    // A malformed digest.
    let (code, _) = put("sha256:xyz", Some(module.len() as u64), &module);
    assert_eq!(code, 400);
    // None of that left anything, stored or half-written.
    assert!(stored_blobs(&s).is_empty());
    wait_for("no temporary files", || leftovers(dir.path()) == 0).await;

    // A viewer may ask but not upload.
    let viewer = token(&s, flotilla_api::Role::View);
    let (code, body) = raw_request(
        &s,
        &viewer,
        "PUT",
        &format!("/v1/blobs/{digest}"),
        Some(module.len() as u64),
        b"",
    );
    assert_eq!(code, 403, "{body}");

    // The real thing: stored once; a second upload and a HEAD see it.
    assert_eq!(put(&digest, Some(module.len() as u64), &module).0, 201);
    assert_eq!(put(&digest, Some(module.len() as u64), &module).0, 200);
    assert_eq!(stored_blobs(&s), std::slice::from_ref(&digest));
    let (code, _) = raw_request(
        &s,
        &viewer,
        "HEAD",
        &format!("/v1/blobs/{digest}"),
        None,
        b"",
    );
    assert_eq!(code, 200);

    // Applying a module nobody uploaded, or one with the wrong size, is
    // refused and names the digest; a path is not a source at all.
    let pod = |name: &str, member: serde_json::Value| {
        serde_json::json!({"objects": [{"kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"members": [member]}}]})
    };
    let url = format!("http://{}/v1/apply", s.api_addr);
    let missing = "sha256:".to_string() + &"ab".repeat(32);
    let (code, body) = http(
        &s,
        "POST",
        url.clone(),
        Some(pod(
            "p1",
            serde_json::json!({"name": "c", "module": {"digest": missing, "size": 100}}),
        )),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("was not uploaded") && body.contains(&missing),
        "{body}"
    );
    let (_, body) = http(
        &s,
        "POST",
        url.clone(),
        Some(pod(
            "p2",
            serde_json::json!({"name": "c", "module": {"digest": digest, "size": 9}}),
        )),
    )
    .await;
    assert!(body.contains("not the 9 the spec declares"), "{body}");
    let (code, body) = http(
        &s,
        "POST",
        url.clone(),
        Some(pod(
            "p3",
            serde_json::json!({"name": "c", "wasm": "/etc/passwd"}),
        )),
    )
    .await;
    assert!((400..500).contains(&code), "{code} {body}");
    assert!(!body.contains("root:"), "{body}");
    assert!(s.cluster.store.list("pods/").is_empty());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreferenced_modules_are_collected_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler_with_grace(dir.path(), Duration::ZERO).await;
    let used = common::uploaded(&s.cluster, flotilla_samples::COUNTER_P2);
    let unused = common::uploaded(&s.cluster, flotilla_samples::HELLO_P1);
    let (code, body) = http(
        &s,
        "POST",
        format!("http://{}/v1/apply", s.api_addr),
        Some(serde_json::json!({"objects": [{"kind": "Deployment", "metadata": {"name": "d", "namespace": "default"},
            "spec": {"replicas": 0, "template": {"spec": {"members": [{"name": "c", "module": used}]}}}}]})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // The scheduler's own collector (every second with no grace) may have
    // taken the unused module already; either way this pass removes
    // nothing else, and only the referenced module is left.
    let removed = flotilla_scheduler::blobs::collect_once(&s.cluster);
    assert!(
        removed.is_empty() || removed == [unused["digest"].as_str().unwrap()],
        "{removed:?}"
    );
    assert_eq!(stored_blobs(&s), [used["digest"].as_str().unwrap()]);
    s.shutdown().await;
}
