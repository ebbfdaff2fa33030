//! Multi-host in one process: a scheduler and several agents that joined it
//! with tokens, over real QUIC with mutual TLS on loopback.

mod common;

use common::{wait_for, wait_for_up_to};

use flotilla_api::proto::{
    AgentMsg, FrameReader, NodeInfo, PROTOCOL_VERSION, SchedulerMsg, encode,
};
use flotilla_api::{Object, PodPhase, Role};
use flotilla_host::link::LinkConfig;
use flotilla_host::link::join::{Credentials, JoinError, JoinToken, join};
use flotilla_host::node::{AgentConfig, AgentHandle, start as start_agent};
use flotilla_scheduler::auth::{create_join_token, revoke_token};
use flotilla_scheduler::server::{Scheduler, SchedulerConfig, start as start_scheduler};
use std::path::Path;
use std::time::Duration;

async fn scheduler(dir: &Path, cert_ttl: Duration) -> Scheduler {
    start_scheduler(SchedulerConfig {
        advertise: None,
        data_dir: dir.join("sched"),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        quic_addr: "127.0.0.1:0".parse().unwrap(),
        node_timeout: Duration::from_millis(1000),
        heartbeat: Duration::from_millis(200),
        insecure_http: true,
        node_cert_ttl: cert_ttl,
        pod_cidr: Default::default(),
        blob_grace: flotilla_scheduler::server::DEFAULT_BLOB_GRACE,
        pull_through: false,
        node_ports: flotilla_api::net::DEFAULT_NODE_PORTS,
        registries: Default::default(),
        store: Default::default(),
    })
    .await
    .unwrap()
}

fn token(s: &Scheduler, ttl: Duration) -> JoinToken {
    token_for(s, ttl, None)
}

/// A join token admitting at most `uses` nodes (`None`: any number).
fn token_for(s: &Scheduler, ttl: Duration, uses: Option<u32>) -> JoinToken {
    let ca =
        flotilla_scheduler::pki::ClusterCa::load_or_create(&s.cluster.cfg.data_dir.join("pki"))
            .unwrap();
    let (t, _) = create_join_token(
        s.cluster.store.as_ref(),
        &ca.cert_sha256(),
        ttl,
        "test",
        uses,
    )
    .unwrap();
    JoinToken::parse(&t).unwrap()
}

trait QuicAddr {
    fn quic(&self) -> std::net::SocketAddr;
}

impl QuicAddr for Scheduler {
    fn quic(&self) -> std::net::SocketAddr {
        self.quic_addr
    }
}

impl QuicAddr for Down {
    fn quic(&self) -> std::net::SocketAddr {
        self.0
    }
}

async fn start(s: &impl QuicAddr, dir: &Path, name: &str, creds: &Credentials) -> AgentHandle {
    let pki = dir.join(name).join("pki");
    creds.save(&pki).unwrap();
    start_agent(AgentConfig {
        data_dir: dir.join(name),
        node_name: name.into(),
        labels: Default::default(),
        capacity: None,
        server: s.quic(),
        others: Vec::new(),
        ca_pem: creds.ca_pem.clone(),
        cert_pem: creds.cert_pem.clone(),
        key_pem: creds.key_pem.clone(),
        link: LinkConfig {
            heartbeat: Duration::from_millis(200),
            dead_after: Duration::from_secs(1),
            ..LinkConfig::default()
        },
        max_instances: 32,
        creds_dir: Some(pki),
        metrics: Default::default(),

        executors: Default::default(),
    })
    .await
    .unwrap()
}

async fn joined(s: &Scheduler, dir: &Path, name: &str) -> (AgentHandle, Credentials) {
    let creds = join(s.quic_addr, name, &token(s, Duration::from_secs(60)))
        .await
        .unwrap();
    (start(s, dir, name, &creds).await, creds)
}

fn node_ready(s: &Scheduler, name: &str) -> Option<(bool, u64)> {
    match s.cluster.store.get(&format!("nodes/{name}")).as_deref() {
        Some(Object::Node(n)) => Some((n.status.ready, n.status.epoch)),
        _ => None,
    }
}

fn pods(s: &Scheduler) -> Vec<flotilla_api::Pod> {
    s.cluster
        .store
        .list("pods/")
        .iter()
        .filter_map(|o| match &**o {
            Object::Pod(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn apply(s: &Scheduler, obj: serde_json::Value) {
    let obj: Object = serde_json::from_value(obj).unwrap();
    s.cluster
        .store
        .put(
            obj,
            flotilla_scheduler::store::Expect::Absent,
            flotilla_scheduler::store::WriteDurability::Sync,
        )
        .unwrap();
}

fn counter_pod(s: &Scheduler, name: &str, node: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Pod", "metadata": {"name": name, "namespace": "default"},
        "spec": {"node_selector": {"flotilla.dev/hostname": node},
                 "members": [{"name": "c", "module": common::uploaded(&s.cluster, flotilla_samples::COUNTER_P2), "env": {"INTERVAL_MS": "100"}}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_needs_a_valid_token_for_this_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let good = token(&s, Duration::from_secs(60));

    let forged = JoinToken {
        ca_sha256: good.ca_sha256.clone(),
        secret: format!("{}x", good.secret),
    };
    let e = join(s.quic_addr, "a", &forged).await.unwrap_err();
    assert!(
        matches!(&e, JoinError::Refused(r) if r.contains("unknown join token")),
        "{e}"
    );

    let expired = token(&s, Duration::ZERO);
    let e = join(s.quic_addr, "a", &expired).await.unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");

    let revoked = token(&s, Duration::from_secs(60));
    revoke_token(
        s.cluster.store.as_ref(),
        revoked.secret.split('.').next().unwrap(),
    )
    .unwrap();
    let e = join(s.quic_addr, "a", &revoked).await.unwrap_err();
    assert!(e.to_string().contains("revoked"), "{e}");

    // A token pinned to another cluster's CA: the agent refuses before sending anything.
    let other = JoinToken {
        ca_sha256: "ab".repeat(32),
        secret: good.secret.clone(),
    };
    let e = join(s.quic_addr, "a", &other).await.unwrap_err();
    assert!(matches!(e, JoinError::WrongCluster(_)), "{e}");

    let e = join(s.quic_addr, "Bad_Name", &good).await.unwrap_err();
    assert!(e.to_string().contains("node name"), "{e}");
    assert!(
        s.cluster.store.list("nodes/").is_empty(),
        "nothing registered"
    );

    // The good token admits the node, with a certificate bound to its name.
    let creds = join(s.quic_addr, "edge-1", &good).await.unwrap();
    let a = start(&s, dir.path(), "edge-1", &creds).await;
    wait_for("edge-1 ready", || {
        node_ready(&s, "edge-1") == Some((true, 1))
    })
    .await;
    a.shutdown().await;

    // The name is that machine's: another one with the same (still valid)
    // token cannot take it over while edge-1 is away.
    let e = join(s.quic_addr, "edge-1", &good).await.unwrap_err();
    assert!(
        matches!(&e, JoinError::Refused(r) if r.contains("node edge-1 is already registered")),
        "{e}"
    );
    // An admin deletes the node: its certificate admits it no more…
    s.cluster.store.delete("nodes/edge-1", None).unwrap();
    let (ep, _c, r) = raw(
        &s,
        common::quic_client(&creds.ca_pem, Some((&creds.cert_pem, &creds.key_pem))),
        &[hello("edge-1")],
    )
    .await;
    match r {
        Ok(SchedulerMsg::Refused { reason }) => {
            assert!(reason.contains("node edge-1 is not registered"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    ep.close(0u32.into(), b"");
    // …and a machine may join under the name again.
    join(s.quic_addr, "edge-1", &good).await.unwrap();

    // A token for one node admits one; the next is refused and registers
    // nothing.
    let once = token_for(&s, Duration::from_secs(60), Some(1));
    join(s.quic_addr, "edge-2", &once).await.unwrap();
    let e = join(s.quic_addr, "edge-3", &once).await.unwrap_err();
    assert!(
        matches!(&e, JoinError::Refused(r) if r.contains("is used up")),
        "{e}"
    );
    assert!(s.cluster.store.get("nodes/edge-3").is_none());
    s.shutdown().await;
}

/// A QUIC connection to the scheduler's agent port with `cfg`.
async fn connect_raw(
    s: &Scheduler,
    cfg: quinn::ClientConfig,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let conn = ep
        .connect(s.quic_addr, "flotilla-scheduler")
        .unwrap()
        .await
        .unwrap();
    (ep, conn)
}

/// Opens a raw session, sends `msgs`, returns the first reply.
async fn raw(
    s: &Scheduler,
    cfg: quinn::ClientConfig,
    msgs: &[AgentMsg],
) -> (
    quinn::Endpoint,
    quinn::Connection,
    Result<SchedulerMsg, String>,
) {
    let (ep, conn) = connect_raw(s, cfg).await;
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    for m in msgs {
        tx.write_all(&encode(m)).await.unwrap();
    }
    let mut reader = FrameReader::new(rx);
    let r = tokio::time::timeout(Duration::from_secs(5), reader.next::<SchedulerMsg>())
        .await
        .map_err(|_| "timeout".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    (ep, conn, r)
}

fn hello(name: &str) -> AgentMsg {
    AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        node: NodeInfo {
            name: name.into(),
            labels: Default::default(),
            allocatable: flotilla_api::Capacity {
                cpu: 1000,
                memory: 1 << 30,
                ..Default::default()
            },
            arch: "x86_64".into(),
            version: "test".into(),
            runtimes: vec!["wasm".into()],
            pod_network: String::new(),
            gateway_tls: false,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_labels_are_set_by_the_scheduler_and_refused_from_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let (a, creds) = joined(&s, dir.path(), "node-a").await;
    wait_for("node-a ready", || {
        node_ready(&s, "node-a").is_some_and(|r| r.0)
    })
    .await;
    let key = flotilla_api::object::key(flotilla_api::Kind::Node, "", "node-a");
    let Some(Object::Node(n)) = s.cluster.store.get(&key).as_deref().cloned() else {
        panic!("node-a is not stored");
    };
    assert_eq!(n.metadata.labels["flotilla.dev/hostname"], "node-a");
    assert_eq!(
        n.metadata.labels["flotilla.dev/arch"],
        std::env::consts::ARCH
    );
    // node-a's own certificate, claiming to be another host by label.
    let AgentMsg::Hello { version, mut node } = hello("node-a") else {
        unreachable!()
    };
    node.labels
        .insert("flotilla.dev/hostname".into(), "node-b".into());
    let (ep, _c, r) = raw(
        &s,
        common::quic_client(&creds.ca_pem, Some((&creds.cert_pem, &creds.key_pem))),
        &[AgentMsg::Hello { version, node }],
    )
    .await;
    match r {
        Ok(SchedulerMsg::Refused { reason }) => assert!(
            reason.contains("label flotilla.dev/hostname is reserved"),
            "{reason}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    ep.close(0u32.into(), b"");
    a.shutdown().await;
}

/// A 20-byte IPv4 header (UDP, no options) and `payload`.
fn ipv4(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_drops_packets_whose_source_is_not_the_senders_block() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    // Two nodes on raw links: registered, each given its block.
    let mut links = Vec::new();
    for name in ["node-a", "node-b"] {
        let creds = join(s.quic_addr, name, &token(&s, Duration::from_secs(60)))
            .await
            .unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(common::quic_client(
            &creds.ca_pem,
            Some((&creds.cert_pem, &creds.key_pem)),
        ));
        let conn = ep
            .connect(s.quic_addr, "flotilla-scheduler")
            .unwrap()
            .await
            .unwrap();
        // The control stream stays open for the test (its end ends the session).
        let (mut tx, rx) = conn.open_bi().await.unwrap();
        tx.write_all(&encode(&hello(name))).await.unwrap();
        let mut reader = FrameReader::new(rx);
        let r = reader.next::<SchedulerMsg>().await;
        let Ok(SchedulerMsg::Welcome { pod_cidr, .. }) = r else {
            panic!("{name} not welcomed: {r:?}");
        };
        let block: flotilla_api::net::Cidr = pod_cidr.parse().unwrap();
        links.push((ep, conn, block, tx, reader));
    }
    let (a, b) = (&links[0], &links[1]);
    let at = |block: flotilla_api::net::Cidr, n: u32| {
        std::net::Ipv4Addr::from(u32::from(block.base) + n)
    };
    let to_b = at(b.2, 10);
    // From node-a: B's own pod address as source, and an address outside
    // every block; then a packet from one of A's pods.
    a.1.send_datagram(ipv4(at(b.2, 5), to_b, b"spoofed-b").into())
        .unwrap();
    a.1.send_datagram(ipv4("192.0.2.7".parse().unwrap(), to_b, b"spoofed-x").into())
        .unwrap();
    let legit = ipv4(at(a.2, 5), to_b, b"legit");
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            a.1.send_datagram(legit.clone().into()).unwrap();
            if let Ok(Ok(d)) =
                tokio::time::timeout(Duration::from_millis(200), b.1.read_datagram()).await
            {
                break d;
            }
        }
    })
    .await
    .expect("the legitimate packet was never relayed");
    assert_eq!(&got[..], &legit[..], "node-b got a spoofed packet first");
    assert_eq!(
        s.cluster
            .spoofed_datagrams
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    for (ep, ..) in &links {
        ep.close(0u32.into(), b"");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_not_yet_known_cannot_send_a_large_frame() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let ca = s.cluster.ca.as_ref().unwrap().cert_pem().to_string();
    let (ep, conn) = connect_raw(&s, common::quic_client(&ca, None)).await;
    let (mut tx, _rx) = conn.open_bi().await.unwrap();
    // A well-formed header announcing a 1 MiB first frame, and some of it.
    let mut frame = encode(&hello("node-x"));
    let len = 1u32 << 20;
    frame.truncate(7);
    frame[3..7].copy_from_slice(&len.to_be_bytes());
    frame.extend(std::iter::repeat_n(b' ', 64 << 10));
    let _ = tx.write_all(&frame).await;
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the scheduler kept the connection");
    assert!(
        reason.to_string().contains("exceeds the 65536-byte limit"),
        "{reason}"
    );
    ep.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_see_and_change_only_their_own_node() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let (a, creds_a) = joined(&s, dir.path(), "node-a").await;
    let (b, _) = joined(&s, dir.path(), "node-b").await;
    wait_for("both ready", || {
        node_ready(&s, "node-a").is_some_and(|r| r.0)
            && node_ready(&s, "node-b").is_some_and(|r| r.0)
    })
    .await;
    apply(&s, counter_pod(&s, "on-a", "node-a"));
    // B's pod runs another module, which A has no business fetching.
    let b_module = common::uploaded(&s.cluster, flotilla_samples::COUNTER_P1);
    apply(
        &s,
        serde_json::json!({"kind": "Pod", "metadata": {"name": "on-b", "namespace": "default"},
            "spec": {"node_selector": {"flotilla.dev/hostname": "node-b"},
                     "members": [{"name": "c", "module": b_module, "env": {"INTERVAL_MS": "100"}}]}}),
    );
    wait_for("both running", || {
        pods(&s).iter().all(|p| p.status.phase == PodPhase::Running) && pods(&s).len() == 2
    })
    .await;
    assert_eq!(a.agent.lock().unwrap().pod_count(), 1);
    assert_eq!(b.agent.lock().unwrap().pod_count(), 1);
    // Each agent fetched its own pod's module over its link, and only that.
    let cached = |node: &str| -> Vec<String> {
        let d = dir.path().join(node).join("modules/sha256");
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let a_digest =
        flotilla_api::manifest::digest_of(&std::fs::read(flotilla_samples::COUNTER_P2).unwrap());
    assert_eq!(cached("node-a"), std::slice::from_ref(&a_digest));
    assert_eq!(
        cached("node-b"),
        [b_module["digest"].as_str().unwrap().to_string()]
    );

    // Node A's certificate cannot speak for node B.
    let (ep, _c, r) = raw(
        &s,
        common::quic_client(&creds_a.ca_pem, Some((&creds_a.cert_pem, &creds_a.key_pem))),
        &[hello("node-b")],
    )
    .await;
    match r {
        Ok(SchedulerMsg::Refused { reason }) => {
            assert!(reason.contains("belongs to node node-a"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    ep.close(0u32.into(), b"");
    // No certificate: only joining is possible.
    let (ep, _c, r) = raw(
        &s,
        common::quic_client(&creds_a.ca_pem, None),
        &[hello("node-a")],
    )
    .await;
    assert!(
        matches!(r, Ok(SchedulerMsg::Refused { reason }) if reason.contains("no client certificate"))
    );
    ep.close(0u32.into(), b"");

    // As node A, a Sync carries only A's pods, and a status report about B's
    // pod is ignored.
    let b_pod = pods(&s)
        .into_iter()
        .find(|p| p.metadata.name == "on-b")
        .unwrap();
    let forged = AgentMsg::Report {
        uid: b_pod.metadata.uid.clone(),
        report: flotilla_api::AgentReport {
            phase: PodPhase::Failed,
            reason: "Forged".into(),
            ..Default::default()
        },
    };
    let (ep, conn) = connect_raw(
        &s,
        common::quic_client(&creds_a.ca_pem, Some((&creds_a.cert_pem, &creds_a.key_pem))),
    )
    .await;
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    tx.write_all(&encode(&hello("node-a"))).await.unwrap();
    let mut reader = FrameReader::new(rx);
    assert!(matches!(
        reader.next::<SchedulerMsg>().await.unwrap(),
        SchedulerMsg::Welcome { .. }
    ));
    match reader.next::<SchedulerMsg>().await.unwrap() {
        SchedulerMsg::Sync { pods, .. } => {
            let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["on-a"]);
        }
        other => panic!("expected Sync, got {other:?}"),
    }
    tx.write_all(&encode(&forged)).await.unwrap();
    // As node A, B's module is refused; A's own is served, whole.
    let fetch = |digest: String| {
        let conn = conn.clone();
        async move {
            let (mut t, mut r) = conn.open_bi().await.unwrap();
            t.write_all(&encode(&flotilla_api::proto::BlobRequest { digest }))
                .await
                .unwrap();
            let _ = t.finish();
            r.read_to_end(64 << 20).await.unwrap()
        }
    };
    let refused = fetch(b_module["digest"].as_str().unwrap().to_string()).await;
    assert_eq!(refused[0], flotilla_api::proto::BLOB_REFUSED);
    let why = String::from_utf8_lossy(&refused[1..]).to_string();
    assert!(
        why.contains("belongs to no pod bound to node node-a"),
        "{why}"
    );
    let served = fetch(a_digest.clone()).await;
    assert_eq!(served[0], flotilla_api::proto::BLOB_FOUND);
    let body = &served[9..];
    assert_eq!(
        u64::from_be_bytes(served[1..9].try_into().unwrap()),
        body.len() as u64
    );
    assert_eq!(flotilla_api::manifest::digest_of(body), a_digest);
    // Then a report about A's own pod: reports of one session are applied
    // in order, so once this one shows, the forged one was handled.
    let on_a = pods(&s)
        .into_iter()
        .find(|p| p.metadata.name == "on-a")
        .unwrap();
    // Watched from here, so that a later report of the real agent cannot
    // hide the marker from the check.
    let from = s.cluster.store.revision();
    let mut mine = flotilla_api::AgentReport::of(&on_a.status);
    mine.message = "marker after the forged report".into();
    tx.write_all(&encode(&AgentMsg::Report {
        uid: on_a.metadata.uid.clone(),
        report: mine,
    }))
    .await
    .unwrap();
    wait_for("A's own report applied", || {
        let (seen, _) = s.cluster.store.watch_from(from).unwrap();
        seen.iter().any(|e| {
            matches!(&*e.object, Object::Pod(p)
                if p.metadata.name == "on-a" && p.status.message == "marker after the forged report")
        })
    })
    .await;
    let now = pods(&s)
        .into_iter()
        .find(|p| p.metadata.name == "on-b")
        .unwrap();
    assert_eq!(now.status.phase, PodPhase::Running);
    assert_ne!(now.status.reason, "Forged");
    ep.close(0u32.into(), b"");
    a.shutdown().await;
    b.shutdown().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_nodes_are_replaced_and_fenced_when_they_return() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let mut agents = Vec::new();
    let mut creds = Vec::new();
    for n in ["n1", "n2", "n3"] {
        let (a, c) = joined(&s, dir.path(), n).await;
        agents.push(a);
        creds.push(c);
    }
    wait_for("3 ready", || {
        ["n1", "n2", "n3"]
            .iter()
            .all(|n| node_ready(&s, n).is_some_and(|r| r.0))
    })
    .await;
    apply(
        &s,
        serde_json::json!({"kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": 3, "template": {"labels": {"app": "web"}, "spec": {"members": [{"name": "c", "module": common::uploaded(&s.cluster, flotilla_samples::COUNTER_P2)}]}}}}),
    );
    apply(&s, counter_pod(&s, "solo", "n1"));
    let running = |s: &Scheduler| {
        pods(s)
            .into_iter()
            .filter(|p| p.status.phase == PodPhase::Running)
            .collect::<Vec<_>>()
    };
    wait_for("4 running", || running(&s).len() == 4).await;
    let on_n1: Vec<String> = pods(&s)
        .iter()
        .filter(|p| p.status.node.as_deref() == Some("n1"))
        .map(|p| p.metadata.name.clone())
        .collect();
    assert!(on_n1.contains(&"solo".to_string()));

    // n1 goes away.
    let n1 = agents.remove(0);
    n1.shutdown().await;
    wait_for("n1 NotReady", || node_ready(&s, "n1").is_some_and(|r| !r.0)).await;
    wait_for("replacements running elsewhere", || {
        let r = running(&s);
        r.iter()
            .filter(|p| p.metadata.name.starts_with("web-"))
            .count()
            == 3
            && r.iter().all(|p| p.status.node.as_deref() != Some("n1"))
    })
    .await;
    let solo = pods(&s)
        .into_iter()
        .find(|p| p.metadata.name == "solo")
        .unwrap();
    assert_eq!(
        solo.status.phase,
        PodPhase::Lost,
        "bare pods are marked lost, not re-run"
    );
    assert_eq!(solo.status.node.as_deref(), Some("n1"));

    // n1 returns (same certificate): new epoch, and it is given nothing to run.
    let back = start(&s, dir.path(), "n1", &creds[0]).await;
    wait_for("n1 back", || node_ready(&s, "n1") == Some((true, 2))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        back.agent.lock().unwrap().pod_count(),
        0,
        "fenced pods are not re-sent"
    );
    let web = running(&s)
        .into_iter()
        .filter(|p| p.metadata.name.starts_with("web-"))
        .count();
    assert_eq!(web, 3, "exactly N replicas");
    back.shutdown().await;
    for a in agents {
        a.shutdown().await;
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_restarting_pods() {
    let dir = tempfile::tempdir().unwrap();
    // Three-second certificates: the agent renews when one second is left.
    let s = scheduler(dir.path(), Duration::from_secs(3)).await;
    let (a, creds) = joined(&s, dir.path(), "edge").await;
    apply(&s, counter_pod(&s, "busy", "edge"));
    // The node reconnects with a new certificate every two seconds or so
    // meanwhile (a busy machine may need several for the first start).
    wait_for_up_to(Duration::from_secs(30), "busy running", || {
        pods(&s)
            .first()
            .is_some_and(|p| p.status.phase == PodPhase::Running)
    })
    .await;
    let uid = pods(&s)[0].metadata.uid.clone();
    let cert_path = dir.path().join("edge/pki/node.pem");
    wait_for("a renewed certificate", || {
        std::fs::read_to_string(&cert_path).unwrap() != creds.cert_pem
    })
    .await;
    let renewed = std::fs::read_to_string(&cert_path).unwrap();
    // Well past the first certificate's expiry, the node is still Ready on a
    // newer one, and the pod never restarted.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(node_ready(&s, "edge").is_some_and(|r| r.0));
    assert_ne!(std::fs::read_to_string(&cert_path).unwrap(), creds.cert_pem);
    let p = &pods(&s)[0];
    assert_eq!(p.metadata.uid, uid);
    assert_eq!(p.status.phase, PodPhase::Running);
    assert_eq!(p.status.restarts(), 0);
    assert!(!renewed.is_empty());
    a.shutdown().await;
    s.shutdown().await;
}

#[test]
fn join_tokens_cannot_call_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let store = flotilla_scheduler::store::RedbStore::open(&dir.path().join("s.redb")).unwrap();
    let (t, _) =
        create_join_token(&store, &"ab".repeat(32), Duration::from_secs(60), "t", None).unwrap();
    let JoinToken { secret, .. } = JoinToken::parse(&t).unwrap();
    let (id, sec) = secret.split_once('.').unwrap();
    let api_form = format!("flt_{id}_{sec}");
    let e = flotilla_scheduler::auth::check_token(&store, &api_form).unwrap_err();
    assert!(format!("{e:?}").contains("join token"), "{e:?}");
    let _ = Role::Join;
}

async fn scheduler_at(dir: &Path, quic: std::net::SocketAddr) -> Scheduler {
    start_scheduler(SchedulerConfig {
        advertise: None,
        data_dir: dir.join("sched"),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        quic_addr: quic,
        node_timeout: Duration::from_millis(1000),
        heartbeat: Duration::from_millis(200),
        insecure_http: true,
        node_cert_ttl: Duration::from_secs(3600),
        pod_cidr: Default::default(),
        blob_grace: flotilla_scheduler::server::DEFAULT_BLOB_GRACE,
        pull_through: false,
        node_ports: flotilla_api::net::DEFAULT_NODE_PORTS,
        registries: Default::default(),
        store: Default::default(),
    })
    .await
    .unwrap()
}

fn agent_pods(a: &AgentHandle) -> Vec<flotilla_api::PodStatus> {
    a.agent
        .lock()
        .unwrap()
        .statuses()
        .into_iter()
        .map(|(_, s)| s)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_nodes_keep_running_without_the_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let quic = s.quic_addr;
    let (a, creds) = joined(&s, dir.path(), "edge").await;
    apply(&s, counter_pod(&s, "steady", "edge"));
    apply(
        &s,
        serde_json::json!({"kind": "Pod", "metadata": {"name": "flaky", "namespace": "default"},
        "spec": {"members": [{"name": "c", "module": common::uploaded(&s.cluster, flotilla_samples::CRASHER_P1), "restart": "OnFailure", "env": {"DELAY_MS": "100"}}]}}),
    );
    wait_for("both running", || {
        pods(&s).len() == 2 && pods(&s).iter().all(|p| p.status.phase == PodPhase::Running)
    })
    .await;
    let steady_uid = pods(&s)
        .into_iter()
        .find(|p| p.metadata.name == "steady")
        .unwrap()
        .metadata
        .uid;

    // The scheduler goes away: pods keep running, restart policies keep working, logs keep growing.
    s.shutdown().await;
    let log = dir.path().join("edge/logs").join(&steady_uid).join("c.log");
    let before = std::fs::metadata(&log).unwrap().len();
    let restarts = |a: &AgentHandle| agent_pods(a).iter().map(|p| p.restarts()).sum::<u32>();
    let r0 = restarts(&a);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        std::fs::metadata(&log).unwrap().len() > before,
        "logs keep being written"
    );
    assert!(restarts(&a) > r0, "restart policies keep working");

    // A simulated reboot with no scheduler reachable: the agent stops, its
    // workloads die, and it starts again from its local state.
    a.shutdown().await;
    let a = start(&s_dummy(quic), dir.path(), "edge", &creds).await;
    wait_for("pods restored offline", || {
        let st = agent_pods(&a);
        st.len() == 2 && st.iter().all(|p| p.phase == PodPhase::Running)
    })
    .await;
    let started: Vec<u64> = agent_pods(&a).iter().map(|p| p.started_ms).collect();

    // The scheduler returns: the agent resyncs without restarting healthy pods.
    let s = scheduler_at(dir.path(), quic).await;
    wait_for("edge ready again", || {
        node_ready(&s, "edge").is_some_and(|r| r.0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let steady = pods(&s)
        .into_iter()
        .find(|p| p.metadata.name == "steady")
        .unwrap();
    assert_eq!(steady.metadata.uid, steady_uid);
    assert_eq!(steady.status.phase, PodPhase::Running);
    assert_eq!(
        steady.status.restarts(),
        0,
        "the healthy pod was not restarted"
    );
    assert_eq!(a.agent.lock().unwrap().pod_count(), 2);
    let after: Vec<u64> = agent_pods(&a).iter().map(|p| p.started_ms).collect();
    assert_eq!(started, after);
    a.shutdown().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_using_secrets_and_configs_restart_offline() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let quic = s.quic_addr;
    let (a, creds) = joined(&s, dir.path(), "edge").await;
    let (other, _) = joined(&s, dir.path(), "other").await;
    apply(
        &s,
        serde_json::json!({"kind": "Secret", "metadata": {"name": "db", "namespace": "default"},
            "data": {"v": "s3cret-offline"}}),
    );
    apply(
        &s,
        serde_json::json!({"kind": "ConfigMap", "metadata": {"name": "app", "namespace": "default"},
            "data": {"mode": "edge"}}),
    );
    let args: Vec<&str> = "cat /creds/v ; cat /cfg/mode ; env ; watch /cfg/mode never"
        .split(' ')
        .collect();
    apply(
        &s,
        serde_json::json!({"kind": "Pod", "metadata": {"name": "user", "namespace": "default"},
            "spec": {
                "node_selector": {"flotilla.dev/hostname": "edge"},
                "volumes": [{"name": "creds", "secret": {"name": "db"}}, {"name": "cfg", "config": {"name": "app"}}],
                "members": [{"name": "files", "module": common::uploaded(&s.cluster, flotilla_samples::FILES_P1),
                    "args": args, "restart": "Never",
                    "env": {"TOKEN": {"secret": "db", "key": "v"}},
                    "mounts": [{"volume": "creds", "path": "/creds"}, {"volume": "cfg", "path": "/cfg"}]}]}}),
    );
    wait_for("the pod running", || {
        pods(&s).iter().any(|p| p.status.phase == PodPhase::Running)
    })
    .await;
    let uid = pods(&s)[0].metadata.uid.clone();
    let log = dir.path().join("edge/logs").join(&uid).join("files.log");
    let want = [
        "cat /creds/v: s3cret-offline",
        "cat /cfg/mode: edge",
        "TOKEN=s3cret-offline",
    ];
    let printed_all = |log: &Path| {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        want.iter().all(|w| text.contains(w))
    };
    wait_for("the member printed its inputs", || printed_all(&log)).await;
    // Only the node running a pod that uses them holds them.
    let held = |a: &AgentHandle| a.agent.lock().unwrap().env().inputs.keys();
    assert_eq!(
        held(&a),
        vec![
            "configmaps/default/app".to_string(),
            "secrets/default/db".to_string()
        ]
    );
    assert!(held(&other).is_empty(), "{:?}", held(&other));
    assert!(!dir.path().join("other/inputs.sealed").exists());
    other.shutdown().await;

    // A reboot with no scheduler reachable: the pod comes back with its
    // secret and config, from the node's sealed copy.
    s.shutdown().await;
    a.shutdown().await;
    std::fs::remove_file(&log).unwrap();
    let a = start(&s_dummy(quic), dir.path(), "edge", &creds).await;
    wait_for("the pod restored offline printed its inputs again", || {
        printed_all(&log)
    })
    .await;
    // Nothing the agent keeps holds the value plain (its member's own log
    // aside, which printed it on purpose).
    let mut stack = vec![dir.path().join("edge")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                if !p.ends_with("logs") {
                    stack.push(p);
                }
            } else if let Ok(bytes) = std::fs::read(&p) {
                let on_tmpfs = p.starts_with(dir.path().join("edge/volumes"));
                assert!(
                    on_tmpfs || !bytes.windows(14).any(|w| w == b"s3cret-offline"),
                    "secret value in {}",
                    p.display()
                );
            }
        }
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_volumes_bind_at_first_use_and_their_pods_follow() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let (a, _) = joined(&s, dir.path(), "vol-a").await;
    let (b, _) = joined(&s, dir.path(), "vol-b").await;
    apply(
        &s,
        serde_json::json!({"kind": "Volume", "metadata": {"name": "data", "namespace": "default"},
            "spec": {"capacity": "10Mi"}}),
    );
    let module = common::uploaded(&s.cluster, flotilla_samples::FILES_P1);
    let pod = |name: &str, cmds: &str| {
        let args: Vec<&str> = cmds.split(' ').collect();
        serde_json::json!({"kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "volumes": [{"name": "data", "persistent": {"name": "data"}}],
                "members": [{"name": "files", "module": module.clone(), "args": args, "restart": "Never",
                    "mounts": [{"volume": "data", "path": "/data"}]}]}})
    };
    let pod_of = |s: &Scheduler, name: &str| pods(s).into_iter().find(|p| p.metadata.name == name);
    let bound = |s: &Scheduler| match s.cluster.store.get("volumes/default/data").as_deref() {
        Some(Object::Volume(v)) => v.status.node.clone(),
        _ => None,
    };
    apply(&s, pod("writer", "write /data/note kept-across-pods"));
    wait_for("writer done and the volume bound", || {
        pod_of(&s, "writer").is_some_and(|p| p.status.phase == PodPhase::Succeeded)
            && bound(&s).is_some()
    })
    .await;
    let node = bound(&s).unwrap();
    assert_eq!(
        pod_of(&s, "writer").unwrap().status.node.as_deref(),
        Some(node.as_str())
    );
    let file = dir.path().join(&node).join("persistent/default/data/note");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept-across-pods");
    // The pod is gone; the data stays, and the next pod using it goes to
    // the same node and reads it.
    s.cluster.store.delete("pods/default/writer", None).unwrap();
    for i in 0..3 {
        apply(&s, pod(&format!("reader-{i}"), "cat /data/note"));
    }
    wait_for("readers done", || {
        (0..3).all(|i| {
            pod_of(&s, &format!("reader-{i}"))
                .is_some_and(|p| p.status.phase == PodPhase::Succeeded)
        })
    })
    .await;
    for i in 0..3 {
        let p = pod_of(&s, &format!("reader-{i}")).unwrap();
        assert_eq!(
            p.status.node.as_deref(),
            Some(node.as_str()),
            "reader-{i} followed the volume"
        );
        let log = dir
            .path()
            .join(&node)
            .join("logs")
            .join(&p.metadata.uid)
            .join("files.log");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("cat /data/note: kept-across-pods"), "{text}");
    }
    assert!(file.exists());
    // Its node goes down: the data stays on its disk (for when it is back),
    // and a new pod using the volume waits, saying why.
    let (down, up) = if node == "vol-a" { (a, b) } else { (b, a) };
    down.shutdown().await;
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "kept-across-pods",
        "an agent stopping its pods leaves persistent data"
    );
    wait_for("the volume's node not ready", || {
        node_ready(&s, &node).is_some_and(|r| !r.0)
    })
    .await;
    apply(&s, pod("late", "cat /data/note"));
    let want = format!("volume \"data\" is on node {node}, which is not ready");
    wait_for("the pending reason names the volume's node", || {
        pod_of(&s, "late")
            .is_some_and(|p| p.status.phase == PodPhase::Pending && p.status.message == want)
    })
    .await;
    up.shutdown().await;
    s.shutdown().await;
}

/// Stands in for a scheduler that is down: only its address is used.
struct Down(std::net::SocketAddr);

fn s_dummy(addr: std::net::SocketAddr) -> Down {
    Down(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_wrongly_marked_not_ready_recovers_while_heard_from() {
    // Regression: a controller pass racing a re-registration could leave a
    // connected, heartbeating node NotReady for good.
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let (a, _) = joined(&s, dir.path(), "edge").await;
    wait_for("ready", || node_ready(&s, "edge").is_some_and(|r| r.0)).await;
    let Some(obj) = s.cluster.store.get("nodes/edge") else {
        panic!()
    };
    let Object::Node(n) = &*obj else { panic!() };
    let mut stale = n.clone();
    stale.status.ready = false;
    s.cluster
        .store
        .put(
            Object::Node(stale),
            flotilla_scheduler::store::Expect::Version(n.metadata.resource_version),
            flotilla_scheduler::store::WriteDurability::Sync,
        )
        .unwrap();
    wait_for("ready again", || {
        node_ready(&s, "edge").is_some_and(|r| r.0)
    })
    .await;
    a.shutdown().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agents_join_take_pods_and_go_not_ready_when_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let mut joined_counts = Vec::new();
    let fleet = flotilla_host::sim::start(
        flotilla_host::sim::SimConfig {
            server: s.quic_addr,
            token: token(&s, Duration::from_secs(60)),
            count: 40,
            prefix: "sim".into(),
            capacity: flotilla_api::Capacity {
                cpu: 1000,
                memory: 1 << 30,
                ..Default::default()
            },
            labels: [("zone".to_string(), "z1".to_string())].into(),
            link: LinkConfig {
                heartbeat: Duration::from_millis(200),
                dead_after: Duration::from_secs(1),
                ..LinkConfig::default()
            },
            join_parallelism: 8,
        },
        |n| joined_counts.push(n),
    )
    .await
    .unwrap();
    assert_eq!(joined_counts, (1..=40).collect::<Vec<_>>());
    assert_eq!(fleet.join_times.len(), 40);
    let names: Vec<String> = (0..40)
        .map(|i| flotilla_host::sim::node_name("sim", i))
        .collect();
    wait_for("40 simulated nodes Ready", || {
        names.iter().all(|n| node_ready(&s, n).is_some_and(|r| r.0))
    })
    .await;
    // Each node is registered with what the fleet offered, labels included.
    match s.cluster.store.get("nodes/sim-00007").as_deref() {
        Some(Object::Node(n)) => {
            assert_eq!(n.status.allocatable.cpu, 1000);
            assert_eq!(
                n.metadata.labels.get("zone").map(String::as_str),
                Some("z1")
            );
            assert_eq!(
                n.metadata
                    .labels
                    .get("flotilla.dev/hostname")
                    .map(String::as_str),
                Some("sim-00007")
            );
        }
        other => panic!("no node sim-00007: {other:?}"),
    }
    // 120 replicas of 300m fit only three to a node: placement must use all 40.
    apply(
        &s,
        serde_json::json!({"kind": "Deployment", "metadata": {"name": "wide", "namespace": "default"},
        "spec": {"replicas": 120, "template": {"labels": {"app": "wide"}, "spec": {"members": [
            {"name": "c", "module": common::uploaded(&s.cluster, flotilla_samples::COUNTER_P2), "resources": {"cpu": 300}}]}}}}),
    );
    wait_for("120 simulated pods Running", || {
        pods(&s)
            .iter()
            .filter(|p| p.status.phase == PodPhase::Running)
            .count()
            == 120
    })
    .await;
    let mut per_node: std::collections::HashMap<String, usize> = Default::default();
    for p in pods(&s) {
        *per_node.entry(p.status.node.clone().unwrap()).or_default() += 1;
    }
    assert_eq!(per_node.len(), 40);
    assert!(per_node.values().all(|&n| n == 3), "{per_node:?}");
    assert_eq!(fleet.pod_count(), 120);
    // Simulated pods have no logs, and say so.
    let log = flotilla_scheduler::agents::open_log(
        &s.cluster,
        "sim-00003",
        &flotilla_api::proto::LogRequest {
            pod_uid: pods(&s)
                .iter()
                .find(|p| p.status.node.as_deref() == Some("sim-00003"))
                .unwrap()
                .metadata
                .uid
                .clone(),
            member: "c".into(),
            follow: false,
            previous: false,
            tail_lines: None,
        },
    )
    .await;
    assert!(
        log.err().is_some_and(|e| e.contains("simulated")),
        "a simulated node's log stream must refuse"
    );
    fleet.shutdown().await;
    wait_for("simulated nodes NotReady after their links close", || {
        names
            .iter()
            .all(|n| node_ready(&s, n).is_some_and(|r| !r.0))
    })
    .await;
}

/// Issue 14 item 1: cluster-wide tables larger than a frame reach agents in
/// parts (10,000 services of 16 ports each encode to well over the 4 MiB
/// frame cap), new pods still start, and a node whose link keeps dropping
/// is shown as flapping with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_services_sync_and_a_flapping_link_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let (a, _) = joined(&s, dir.path(), "node-a").await;
    wait_for("node-a ready", || {
        node_ready(&s, "node-a").is_some_and(|r| r.0)
    })
    .await;
    const N: usize = 10_000;
    let services: Vec<(Object, flotilla_scheduler::store::Expect)> = (0..N)
        .map(|i| {
            let ports: Vec<serde_json::Value> = (0..16)
                .map(|p| serde_json::json!({"port": 1000 + p, "target_port": 8000 + p, "name": format!("port-{p}")}))
                .collect();
            let svc = serde_json::json!({"kind": "Service",
                "metadata": {"name": format!("svc-{i}"), "namespace": "many"},
                "spec": {"selector": {"app": format!("app-{i}")}, "ports": ports}});
            (
                serde_json::from_value(svc).unwrap(),
                flotilla_scheduler::store::Expect::Absent,
            )
        })
        .collect();
    let written = s
        .cluster
        .store
        .put_many(services, flotilla_scheduler::store::WriteDurability::Sync);
    assert!(written.iter().all(|r| r.is_ok()));
    let table = |a: &AgentHandle| a.agent.lock().unwrap().env().proxy.table();
    wait_for_up_to(Duration::from_secs(60), "10,000 services at node-a", || {
        table(&a).len() == N
    })
    .await;
    // The table really is larger than one frame may be.
    let whole = flotilla_api::proto::encoded_len(&SchedulerMsg::Services {
        services: table(&a).to_vec(),
        more: false,
    });
    assert!(whole > flotilla_api::proto::MAX_FRAME_LEN, "{whole} bytes");
    let got = table(&a);
    let last = got
        .iter()
        .find(|v| v.name == format!("svc-{}", N - 1))
        .unwrap();
    assert_eq!(last.ports.len(), 16);
    assert!(!last.cluster_ip.is_empty());
    // The link stayed up throughout and new work still arrives.
    apply(&s, counter_pod(&s, "after", "node-a"));
    wait_for_up_to(Duration::from_secs(30), "the new pod running", || {
        pods(&s)
            .iter()
            .any(|p| p.metadata.name == "after" && p.status.phase == PodPhase::Running)
    })
    .await;
    let node = |name: &str| match s.cluster.store.get(&format!("nodes/{name}")).as_deref() {
        Some(Object::Node(n)) => n.clone(),
        _ => panic!("no node {name}"),
    };
    assert_eq!(node("node-a").status.link, "", "node-a's link is stable");

    // node-f's sessions keep ending: after three it is shown as flapping,
    // with the reason its agent gave.
    let creds = join(s.quic_addr, "node-f", &token(&s, Duration::from_secs(60)))
        .await
        .unwrap();
    for _ in 0..3 {
        let (ep, conn, r) = raw(
            &s,
            common::quic_client(&creds.ca_pem, Some((&creds.cert_pem, &creds.key_pem))),
            &[hello("node-f")],
        )
        .await;
        assert!(matches!(r, Ok(SchedulerMsg::Welcome { .. })), "{r:?}");
        conn.close(7u32.into(), b"frame of 5000000 bytes exceeds the limit");
        ep.wait_idle().await;
    }
    wait_for_up_to(Duration::from_secs(15), "node-f shown flapping", || {
        !node("node-f").status.link.is_empty()
    })
    .await;
    let link = node("node-f").status.link;
    assert!(
        link.starts_with("flapping: the link dropped 3 times in the last 60 s; last: ")
            && link.contains("frame of 5000000 bytes exceeds the limit"),
        "{link}"
    );
    let events = s
        .cluster
        .events
        .list(None, Some(flotilla_api::Kind::Node), Some("node-f"));
    assert!(
        events
            .iter()
            .any(|e| e.reason == "LinkFlapping" && e.message == link),
        "{events:?}"
    );
    a.shutdown().await;
    s.shutdown().await;
}

/// Issue 14 item 3: a deleted pod's address is not handed to the next pod
/// on its node until the node confirms the old one gone (`Released`): a
/// container that ignores SIGTERM for its grace period never shares its
/// address. Here the node is a raw session speaking the protocol, so the
/// test decides when (and whether) it confirms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pods_address_is_held_until_its_node_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(dir.path(), Duration::from_secs(3600)).await;
    let creds = join(s.quic_addr, "net-1", &token(&s, Duration::from_secs(60)))
        .await
        .unwrap();
    let (ep, conn) = connect_raw(
        &s,
        common::quic_client(&creds.ca_pem, Some((&creds.cert_pem, &creds.key_pem))),
    )
    .await;
    let (tx, rx) = conn.open_bi().await.unwrap();
    let tx = std::sync::Arc::new(tokio::sync::Mutex::new(tx));
    let AgentMsg::Hello { version, mut node } = hello("net-1") else {
        unreachable!()
    };
    node.pod_network = "bridge".into();
    tx.lock()
        .await
        .write_all(&encode(&AgentMsg::Hello { version, node }))
        .await
        .unwrap();
    // Heartbeats keep the node Ready; assignments are collected.
    let beat = {
        let tx = tx.clone();
        tokio::spawn(async move {
            for seq in 1.. {
                let frame = encode(&AgentMsg::Heartbeat { seq });
                if tx.lock().await.write_all(&frame).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let assigned = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let read = {
        let assigned = assigned.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(rx);
            while let Ok(m) = reader.next::<SchedulerMsg>().await {
                if let SchedulerMsg::Assign(a) = m {
                    assigned.lock().unwrap().push(a.name);
                }
            }
        })
    };
    wait_for("net-1 ready", || {
        node_ready(&s, "net-1").is_some_and(|r| r.0)
    })
    .await;
    let module = common::uploaded(&s.cluster, flotilla_samples::COUNTER_P2);
    let networked = |name: &str| {
        serde_json::json!({"kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"node_selector": {"flotilla.dev/hostname": "net-1"},
                     "members": [{"name": "c", "module": module.clone(), "ports": [{"port": 8080}]}]}})
    };
    let pod = |name: &str| pods(&s).into_iter().find(|p| p.metadata.name == name);
    let ip_of = |name: &str| pod(name).map(|p| p.status.pod_ip).unwrap_or_default();
    apply(&s, networked("old"));
    wait_for("old bound with an address", || !ip_of("old").is_empty()).await;
    let old_ip = ip_of("old");
    let old_uid = pod("old").unwrap().metadata.uid;
    wait_for("old sent to the node", || {
        assigned.lock().unwrap().iter().any(|n| n == "old")
    })
    .await;
    // Deleted while its node (say, a container ignoring SIGTERM) still
    // holds it: the next pod gets another address.
    s.cluster.store.delete("pods/default/old", None).unwrap();
    let releasing = || match s.cluster.store.get("nodes/net-1").as_deref() {
        Some(Object::Node(n)) => n.status.releasing.clone(),
        _ => panic!("no node net-1"),
    };
    wait_for("old's address recorded as releasing", || {
        releasing().iter().any(|r| r.uid == old_uid)
    })
    .await;
    let r = releasing();
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].ip.as_str(), r[0].pod.as_str()),
        (old_ip.as_str(), "default/old")
    );
    apply(&s, networked("new"));
    wait_for("new bound with an address", || !ip_of("new").is_empty()).await;
    assert_ne!(
        ip_of("new"),
        old_ip,
        "the new pod got the old one's address"
    );
    // The node lets go of it: the address is free again, and the next pod
    // (the lowest free address first) gets it.
    tx.lock()
        .await
        .write_all(&encode(&AgentMsg::Released {
            uid: old_uid.clone(),
        }))
        .await
        .unwrap();
    wait_for("the address released", || releasing().is_empty()).await;
    apply(&s, networked("third"));
    wait_for("third bound with an address", || !ip_of("third").is_empty()).await;
    assert_eq!(ip_of("third"), old_ip);
    beat.abort();
    read.abort();
    ep.close(0u32.into(), b"");
    s.shutdown().await;
}
