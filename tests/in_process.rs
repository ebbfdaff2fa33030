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
    start_scheduler(SchedulerConfig {
        data_dir: dir.join("sched"),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        quic_addr: "127.0.0.1:0".parse().unwrap(),
        node_timeout: Duration::from_millis(800),
        heartbeat: Duration::from_millis(200),
        insecure_http: true,
        node_cert_ttl: Duration::from_secs(86_400),
        pod_cidr: Default::default(),
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
        ca_pem: s.ca_pem().into(),
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
        link: LinkConfig::default(),
        max_instances: 32,
        creds_dir: None,
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
        "spec": {"members": [{"name": "c", "wasm": flotilla_samples::COUNTER_P2, "env": {"INTERVAL_MS": "20"}}]}
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
    for _ in 0..100 {
        log = http(&s, "GET", url.clone(), None).await.1;
        if log.contains("count 2\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.agent.lock().unwrap().pod_count(), 0);
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
    // None of them registered a node, and the scheduler still serves a good agent.
    assert!(s.cluster.store.list("nodes/").is_empty());
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
