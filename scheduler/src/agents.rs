//! The scheduler's end of the agent link: accepts QUIC connections (mutual
//! TLS), registers nodes, streams assignments and takes status reports.

use crate::auth::{Identity, check_join_token, identity_from_cert};
use crate::cluster::{Cluster, Feed, Session, StatusReport};
use crate::outbox::Outbox;
use crate::store::{Expect, StoreError, WriteDurability};
use flotilla_api::proto::{
    AgentMsg, Assignment, FrameReader, LogReply, LogRequest, NodeInfo, PROTOCOL_VERSION,
    SchedulerMsg, Table, encode,
};
use flotilla_api::time::now_ms;
use flotilla_api::{EventType, Node, NodeStatus, Object, ObjectMeta, Pod, PodStatus};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// Routes store changes of pods to the session of the node each pod is
/// bound to. One watcher for all sessions: with every session watching the
/// whole store, each write woke every session (a thousand nodes and ten
/// thousand pods made tens of millions of wake-ups and starved heartbeats).
pub async fn dispatch(cluster: Arc<Cluster>) {
    let Ok((_, mut changes)) = cluster.store.watch_from(cluster.store.revision()) else {
        tracing::error!("cannot watch the store; agents get no assignments");
        return;
    };
    loop {
        match changes.recv().await {
            Ok(ev) => {
                // ConfigMaps and Secrets go to every session; each forwards
                // them only if a pod it sent refers to them.
                if matches!(
                    &*ev.object,
                    Object::ConfigMap(_) | Object::Secret(_) | Object::Volume(_)
                ) {
                    for s in cluster.sessions.lock().expect("poisoned").values() {
                        let _ = s.feed.send(Feed::Change(ev.clone()));
                    }
                    continue;
                }
                let Object::Pod(p) = &*ev.object else {
                    continue;
                };
                let Some(node) = &p.status.node else { continue };
                if let Some(s) = cluster.sessions.lock().expect("poisoned").get(node) {
                    let _ = s.feed.send(Feed::Change(ev));
                }
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "agent dispatcher fell behind the store; resyncing every agent"
                );
                for s in cluster.sessions.lock().expect("poisoned").values() {
                    let _ = s.feed.send(Feed::Resync);
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Accepts agent connections until the endpoint closes.
/// Connections not yet past their first frame (unauthenticated, or not
/// yet shown to be): beyond this many, new ones are refused at once.
pub const MAX_UNIDENTIFIED: usize = 256;

pub async fn serve(endpoint: quinn::Endpoint, cluster: Arc<Cluster>) {
    let unidentified = Arc::new(tokio::sync::Semaphore::new(MAX_UNIDENTIFIED));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = unidentified.clone().try_acquire_owned() else {
            tracing::warn!(
                remote = %incoming.remote_address(),
                "refused a connection: {MAX_UNIDENTIFIED} connections are still to identify themselves"
            );
            incoming.refuse();
            continue;
        };
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    if let Err(why) = session(conn.clone(), cluster, permit).await {
                        match conn.close_reason() {
                            Some(quinn::ConnectionError::ApplicationClosed(c))
                                if c.error_code == 0u32.into() =>
                            {
                                tracing::info!(%remote, "agent disconnected: {}", String::from_utf8_lossy(&c.reason));
                            }
                            _ => {
                                tracing::warn!(%remote, "agent session ended: {why}");
                                conn.close(1u32.into(), why.as_bytes());
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(%remote, "agent connection refused: {e}"),
            }
        });
    }
}

/// Ends every agent session (this scheduler stopped leading: the agents
/// go to the new leader).
pub fn close_sessions(cluster: &Cluster, why: &str) {
    let conns: Vec<quinn::Connection> = cluster
        .sessions
        .lock()
        .expect("poisoned")
        .values()
        .map(|s| s.conn.clone())
        .collect();
    for c in conns {
        c.close(0u32.into(), why.as_bytes());
    }
}

/// Tells the agent why it cannot join and gives it a moment to read that
/// before the connection is closed.
async fn refuse(conn: &quinn::Connection, tx: &mut quinn::SendStream, reason: String) -> String {
    if send(
        tx,
        &SchedulerMsg::Refused {
            reason: reason.clone(),
        },
    )
    .await
    .is_ok()
    {
        let _ = tx.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    }
    reason
}

async fn send(s: &mut quinn::SendStream, msg: &SchedulerMsg) -> Result<(), String> {
    s.write_all(&encode(msg))
        .await
        .map_err(|e| format!("send: {e}"))
}

fn assignment(p: &Pod) -> Assignment {
    Assignment {
        uid: p.metadata.uid.clone(),
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone(),
        spec: p.spec.clone(),
        epoch: p.status.node_epoch,
        pod_ip: p.status.pod_ip.clone(),
    }
}

/// The pod, if the node should be running it: bound there and not Lost.
fn assigned_to(obj: &Object, node: &str) -> Option<Pod> {
    match obj {
        Object::Pod(p)
            if p.status.node.as_deref() == Some(node)
                && p.status.phase != flotilla_api::PodPhase::Lost =>
        {
            Some(p.clone())
        }
        _ => None,
    }
}

/// The identity in the peer's client certificate (verified against the CA by TLS).
fn peer_identity(conn: &quinn::Connection) -> Option<Result<Identity, String>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    let first = certs.first()?;
    Some(identity_from_cert(first).map_err(|f| format!("{f:?}")))
}

/// Admits a new node: checks its join token and signs its key.
async fn join(
    cluster: &Cluster,
    conn: &quinn::Connection,
    tx: &mut quinn::SendStream,
    name: &str,
    token: &str,
    csr_pem: &str,
) -> Result<(), String> {
    if let Err(why) = flotilla_api::meta::check_dns_label(name) {
        return Err(refuse(conn, tx, format!("node name '{name}' {why}")).await);
    }
    if let Err(why) = check_join_token(cluster.store.as_ref(), token) {
        return Err(refuse(conn, tx, format!("join refused: {why}")).await);
    }
    let Some(ca) = &cluster.ca else {
        return Err(refuse(conn, tx, "this scheduler cannot issue certificates".into()).await);
    };
    // A name is one machine's: a token cannot take over a registered node
    // (even one that is disconnected right now).
    let admitted = {
        let (store, n) = (cluster.store.clone(), name.to_string());
        tokio::task::spawn_blocking(move || crate::cluster::admit_node(store.as_ref(), &n))
            .await
            .map_err(|e| e.to_string())?
    };
    match admitted {
        Ok(true) => {
            // A token limited in uses spends one now; none left: the name
            // goes again.
            let (store, t) = (cluster.store.clone(), token.to_string());
            let used = tokio::task::spawn_blocking(move || {
                crate::auth::use_join_token(store.as_ref(), &t)
            })
            .await
            .map_err(|e| e.to_string())?;
            if let Err(why) = used {
                let key = flotilla_api::object::key(flotilla_api::Kind::Node, "", name);
                let _ = cluster.store.delete(&key, None);
                return Err(refuse(conn, tx, format!("join refused: {why}")).await);
            }
        }
        Ok(false) => {
            let why = format!(
                "node {name} is already registered; if that machine is gone for good, an admin deletes the node first (flotilla delete node {name})"
            );
            return Err(refuse(conn, tx, why).await);
        }
        Err(e) => return Err(refuse(conn, tx, format!("cannot register node {name}: {e}")).await),
    }
    let ttl = cluster.cfg.node_cert_ttl;
    let cert_pem = match ca.issue_node_from_csr(name, csr_pem, ttl) {
        Ok(c) => c,
        Err(e) => return Err(refuse(conn, tx, format!("bad certificate request: {e}")).await),
    };
    tracing::info!(node = %name, remote = %conn.remote_address(), "node joined");
    let expires_ms = flotilla_api::time::now_ms() + ttl.as_millis() as u64;
    send(
        tx,
        &SchedulerMsg::Joined {
            cert_pem,
            expires_ms,
        },
    )
    .await?;
    let _ = tx.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    Ok(())
}

async fn session(
    conn: quinn::Connection,
    cluster: Arc<Cluster>,
    unidentified: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), String> {
    let (mut tx, rx) = tokio::time::timeout(Duration::from_secs(5), conn.accept_bi())
        .await
        .map_err(|_| "no control stream within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    // The first frame is small (Hello or Join) and comes soon.
    let mut reader = FrameReader::with_max(rx, flotilla_api::proto::FIRST_FRAME_LEN);
    let first = tokio::time::timeout(Duration::from_secs(5), reader.next::<AgentMsg>())
        .await
        .map_err(|_| "no Hello within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    drop(unidentified);
    let version = match &first {
        AgentMsg::Hello { version, .. } | AgentMsg::Join { version, .. } => *version,
        other => return Err(format!("expected Hello or Join, got {other:?}")),
    };
    if version != PROTOCOL_VERSION {
        let reason = format!(
            "agent speaks protocol version {version}, this scheduler speaks {PROTOCOL_VERSION}; upgrade the older side"
        );
        return Err(refuse(&conn, &mut tx, reason).await);
    }
    // Only the leader keeps links with agents and admits nodes (a
    // follower writes nothing of its own); a follower points at it.
    if !cluster.leadership.is_leader() {
        let to = cluster
            .leadership
            .leader()
            .map(|l| l.quic)
            .unwrap_or_default();
        if send(&mut tx, &SchedulerMsg::Redirect { to: to.clone() })
            .await
            .is_ok()
        {
            let _ = tx.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        }
        tracing::debug!(leader = %to, "sent an agent to the leader");
        return Ok(());
    }
    let node = match (peer_identity(&conn), first) {
        (
            None,
            AgentMsg::Join {
                node_name,
                token,
                csr_pem,
                ..
            },
        ) => {
            return join(&cluster, &conn, &mut tx, &node_name, &token, &csr_pem).await;
        }
        (None, _) => {
            let reason = "this connection presented no client certificate; a new node joins with `flotilla host --join ADDR --token FLT1…`".to_string();
            return Err(refuse(&conn, &mut tx, reason).await);
        }
        (Some(Err(why)), _) => return Err(refuse(&conn, &mut tx, why).await),
        (Some(Ok(Identity::User { name, .. })), _) => {
            let reason = format!("user {name}'s certificate cannot register a node");
            return Err(refuse(&conn, &mut tx, reason).await);
        }
        (Some(Ok(Identity::Node { .. })), AgentMsg::Join { .. }) => {
            let reason = "this node already has a certificate; connect with it".to_string();
            return Err(refuse(&conn, &mut tx, reason).await);
        }
        (Some(Ok(Identity::Node { name })), AgentMsg::Hello { node, .. }) => {
            if node.name != name {
                let reason = format!(
                    "this certificate belongs to node {name}, but Hello names node {}",
                    node.name
                );
                return Err(refuse(&conn, &mut tx, reason).await);
            }
            let key = flotilla_api::object::key(flotilla_api::Kind::Node, "", &name);
            if cluster.store.get(&key).is_none() {
                let reason = format!(
                    "node {name} is not registered (an admin deleted it); its certificate no longer admits it: join again with a token"
                );
                return Err(refuse(&conn, &mut tx, reason).await);
            }
            node
        }
        (Some(Ok(Identity::Node { .. })), other) => {
            return Err(format!("expected Hello, got {other:?}"));
        }
    };
    if let Err(why) = flotilla_api::meta::check_dns_label(&node.name) {
        let reason = format!("node name '{}' {why}", node.name);
        return Err(refuse(&conn, &mut tx, reason).await);
    }
    if let Err(why) = flotilla_api::meta::check_node_labels(&node.labels) {
        return Err(refuse(&conn, &mut tx, why).await);
    }
    let name = node.name.clone();
    // The feed is in place before the first snapshot, so no change slips
    // between them; changes the snapshot already holds are skipped by revision.
    let (feed, mut changes) = tokio::sync::mpsc::unbounded_channel();
    // Heard from now: touched before registering so that no controller pass
    // sees a Ready node with a stale last-seen time.
    cluster.touch(&name);
    // The registration is fsynced: off the async workers.
    let (epoch, pod_cidr) = {
        let (c, info, address) = (cluster.clone(), node.clone(), conn.remote_address());
        tokio::task::spawn_blocking(move || register(&c, &info, address))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
    cluster.sessions.lock().expect("poisoned").insert(
        name.clone(),
        Session {
            id,
            conn: conn.clone(),
            epoch,
            feed,
        },
    );
    cluster.touch(&name);
    tracing::info!(node = %name, epoch, remote = %conn.remote_address(), "agent registered");
    // Pod packets between nodes ride the links as datagrams.
    let own_block = pod_cidr.parse::<crate::ipam::Cidr>().ok();
    let relay = tokio::spawn(relay_datagrams(
        cluster.clone(),
        conn.clone(),
        name.clone(),
        own_block,
    ));
    // Module fetches come on streams of their own.
    let blobs = tokio::spawn(crate::blobs::serve_node(
        cluster.clone(),
        conn.clone(),
        name.clone(),
    ));
    // Known now: frames as large as the protocol allows.
    reader.set_max(flotilla_api::proto::MAX_FRAME_LEN);
    let result = run_session(
        &cluster,
        &name,
        node.gateway_tls,
        (epoch, pod_cidr),
        tx,
        &mut reader,
        &mut changes,
    )
    .await;
    relay.abort();
    blobs.abort();
    let why = match (conn.close_reason(), &result) {
        (Some(reason), _) => reason.to_string(),
        (None, Err(e)) => e.clone(),
        (None, Ok(())) => "the session ended".to_string(),
    };
    cluster.link_dropped(&name, why);
    let mut sessions = cluster.sessions.lock().expect("poisoned");
    if sessions.get(&name).is_some_and(|s| s.id == id) {
        sessions.remove(&name);
    }
    drop(sessions);
    cluster.kick.notify_one();
    result
}

/// Relays a node's tunnelled pod packets: each datagram is one IPv4 packet,
/// sent on to the node whose address block holds its destination. Packets
/// for unknown or disconnected nodes are dropped, as a router would; so are
/// packets whose source is not in the sending node's own block (a node
/// speaks only for its own pods), counted in `Cluster::spoofed_datagrams`.
async fn relay_datagrams(
    cluster: Arc<Cluster>,
    conn: quinn::Connection,
    node: String,
    own: Option<crate::ipam::Cidr>,
) {
    let block_mask = u32::MAX << (32 - u32::from(crate::ipam::NODE_PREFIX));
    // The last destination block's connection, to spare the locks per packet.
    let mut last: Option<(u32, quinn::Connection)> = None;
    let mut dropped = 0u64;
    while let Ok(packet) = conn.read_datagram().await {
        let (Some(src), Some(dst)) = (
            flotilla_api::net::ipv4_source(&packet),
            flotilla_api::net::ipv4_destination(&packet),
        ) else {
            continue;
        };
        if !own.is_some_and(|b| b.contains(src))
            && cluster.tunnel_source_check.load(Ordering::Relaxed)
        {
            cluster.spoofed_datagrams.fetch_add(1, Ordering::Relaxed);
            if dropped.is_multiple_of(10_000) {
                tracing::warn!(
                    %node, %src, %dst, dropped = dropped + 1,
                    "dropped tunnelled packets whose source is not the node's own block"
                );
            }
            dropped += 1;
            continue;
        }
        let block = u32::from(dst) & block_mask;
        let target = match &last {
            Some((b, c)) if *b == block && c.close_reason().is_none() => c.clone(),
            _ => {
                let node = cluster
                    .blocks
                    .lock()
                    .expect("poisoned")
                    .get(&block)
                    .cloned();
                let Some(c) = node.and_then(|n| {
                    cluster
                        .sessions
                        .lock()
                        .expect("poisoned")
                        .get(&n)
                        .map(|s| s.conn.clone())
                }) else {
                    continue;
                };
                last = Some((block, c.clone()));
                c
            }
        };
        let _ = target.send_datagram(packet);
    }
}

async fn run_session(
    cluster: &Cluster,
    name: &str,
    gateway_tls: bool,
    (epoch, pod_cidr): (u64, String),
    tx: quinn::SendStream,
    reader: &mut FrameReader<quinn::RecvStream>,
    changes: &mut tokio::sync::mpsc::UnboundedReceiver<Feed>,
) -> Result<(), String> {
    let mut out = Outbox::new();
    out.send(&SchedulerMsg::Welcome {
        epoch,
        heartbeat_ms: cluster.cfg.heartbeat.as_millis() as u64,
        lease_ms: cluster.cfg.node_timeout.as_millis() as u64,
        pod_cidr,
        cluster_cidr: cluster.cfg.pod_cidr.to_string(),
    })?;
    // uid → store key of every pod sent to this agent.
    let mut sent: HashMap<String, String> = HashMap::new();
    let mut inputs = Inputs {
        gateway_tls,
        ..Default::default()
    };
    let mut synced = sync(cluster, name, &out, &mut sent, &mut inputs)?;
    // The service and peer tables follow the first Sync, then every change.
    let writer = out.start(
        tx,
        cluster.services.subscribe(),
        cluster.peers.subscribe(),
        cluster.table_frames.clone(),
    );
    let _writer = AbortOnDrop(writer);
    loop {
        tokio::select! {
            msg = reader.next::<AgentMsg>() => match msg.map_err(|e| e.to_string())? {
                AgentMsg::Heartbeat { seq } => {
                    cluster.touch(name);
                    out.urgent(&SchedulerMsg::HeartbeatAck { seq })?;
                }
                AgentMsg::Report { uid, report } => {
                    if let Some(key) = sent.get(&uid) {
                        cluster.reports.lock().expect("poisoned").push(StatusReport {
                            node: name.to_string(),
                            key: key.clone(),
                            uid,
                            report,
                        });
                        cluster.reported.notify_one();
                    }
                }
                AgentMsg::Usage(report) => cluster.usage.record(name, report),
                AgentMsg::Wake { namespace, service } => {
                    crate::controllers::functions::wake(cluster, &namespace, &service);
                }
                AgentMsg::Released { uid } => {
                    cluster.addresses.lock().expect("poisoned").confirm(name, &uid);
                    cluster.kick.notify_one();
                }
                AgentMsg::Renew { csr_pem } => {
                    let ttl = cluster.cfg.node_cert_ttl;
                    let issued = cluster.ca.as_ref().map(|ca| ca.issue_node_from_csr(name, &csr_pem, ttl));
                    match issued {
                        Some(Ok(cert_pem)) => {
                            let expires_ms = now_ms() + ttl.as_millis() as u64;
                            out.send(&SchedulerMsg::Renewed { cert_pem, expires_ms })?;
                        }
                        Some(Err(e)) => return Err(format!("bad renewal request: {e}")),
                        None => return Err("this scheduler cannot issue certificates".into()),
                    }
                }
                AgentMsg::Hello { .. } | AgentMsg::Join { .. } => return Err("protocol error: second Hello".into()),
            },
            feed = changes.recv() => match feed {
                Some(Feed::Change(ev)) if ev.revision <= synced => {}
                Some(Feed::Change(ev)) if matches!(&*ev.object, Object::ConfigMap(_) | Object::Secret(_) | Object::Volume(_)) => {
                    let key = ev.object.key();
                    // A certificate's Secret, or one that was and has lost its label.
                    let certificate = inputs.gateway_tls
                        && (flotilla_api::function::is_gateway_tls(&ev.object) || inputs.sent.contains_key(&key));
                    if !ev.deleted && (inputs.used(&key) || certificate) {
                        inputs.send(cluster, &out, [key])?;
                    }
                }
                Some(Feed::Change(ev)) => {
                    let uid = &ev.object.meta().uid;
                    let fenced = matches!(&*ev.object, Object::Pod(p) if p.status.phase == flotilla_api::PodPhase::Lost);
                    if ev.deleted || fenced {
                        if sent.remove(uid).is_some() {
                            inputs.forget_pod(uid);
                            out.send(&SchedulerMsg::Unassign { uid: uid.clone() })?;
                        }
                    } else if let Some(p) = assigned_to(&ev.object, name)
                        && !sent.contains_key(uid)
                    {
                        sent.insert(uid.clone(), ev.object.key());
                        let keys = inputs.pod(&p);
                        inputs.send(cluster, &out, keys)?;
                        out.send(&SchedulerMsg::Assign(assignment(&p)))?;
                    }
                }
                Some(Feed::Resync) => synced = sync(cluster, name, &out, &mut sent, &mut inputs)?,
                None => return Ok(()),
            },
        }
    }
}

/// Ends a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The ConfigMaps and Secrets a session's pods refer to, and the version
/// of each it sent. A node receives one only while a pod sent to it refers
/// to it, always before that pod.
#[derive(Default)]
struct Inputs {
    /// Pod uid → store keys of what it refers to.
    by_pod: HashMap<String, std::collections::BTreeSet<String>>,
    /// Store key → resource version sent.
    sent: HashMap<String, u64>,
    /// The node's gateway serves HTTPS: it gets every Secret labelled
    /// `flotilla.dev/gateway-tls`.
    gateway_tls: bool,
}

impl Inputs {
    /// Records what `p` refers to; returns those keys.
    fn pod(&mut self, p: &Pod) -> Vec<String> {
        let keys = flotilla_api::config::input_keys(&p.spec, &p.metadata.namespace);
        let out = keys.iter().cloned().collect();
        if !keys.is_empty() {
            self.by_pod.insert(p.metadata.uid.clone(), keys);
        }
        out
    }

    /// The pod left the node; so do (on the agent too) the objects no
    /// other pod there uses, which are sent again if a pod needs them.
    fn forget_pod(&mut self, uid: &str) {
        if self.by_pod.remove(uid).is_some() {
            let by_pod = &self.by_pod;
            self.sent
                .retain(|key, _| by_pod.values().any(|k| k.contains(key)));
        }
    }

    fn used(&self, key: &str) -> bool {
        self.by_pod.values().any(|k| k.contains(key))
    }

    /// Sends each of `keys` that exists and was not sent at its version.
    fn send(
        &mut self,
        cluster: &Cluster,
        out: &Outbox,
        keys: impl IntoIterator<Item = String>,
    ) -> Result<(), String> {
        for key in keys {
            let Some(obj) = cluster.store.get(&key) else {
                continue;
            };
            let version = obj.meta().resource_version;
            if self.sent.get(&key) == Some(&version) {
                continue;
            }
            out.send(&SchedulerMsg::Input(Box::new((*obj).clone())))?;
            self.sent.insert(key, version);
        }
        Ok(())
    }
}

/// Sends the full set of pods bound to the node (after what they refer to).
fn sync(
    cluster: &Cluster,
    name: &str,
    out: &Outbox,
    sent: &mut HashMap<String, String>,
    inputs: &mut Inputs,
) -> Result<u64, String> {
    sent.clear();
    *inputs = Inputs {
        gateway_tls: inputs.gateway_tls,
        ..Default::default()
    };
    let mut pods = Vec::new();
    let mut keys = std::collections::BTreeSet::new();
    if inputs.gateway_tls {
        keys.extend(
            cluster
                .store
                .list("secrets/")
                .iter()
                .filter(|o| flotilla_api::function::is_gateway_tls(o))
                .map(|o| o.key()),
        );
    }
    let (revision, all) = cluster.store.snapshot("pods/");
    for obj in all {
        if let Some(p) = assigned_to(&obj, name) {
            sent.insert(p.metadata.uid.clone(), obj.key());
            keys.extend(inputs.pod(&p));
            pods.push(assignment(&p));
        }
    }
    inputs.send(cluster, out, keys)?;
    out.table(Table::Pods(pods))?;
    Ok(revision)
}

/// Creates or refreshes the Node object; returns the new epoch.
fn register(
    cluster: &Cluster,
    info: &NodeInfo,
    remote: std::net::SocketAddr,
) -> Result<(u64, String), StoreError> {
    let key = flotilla_api::object::key(flotilla_api::Kind::Node, "", &info.name);
    // One registration at a time picks a free address block.
    let _ipam = cluster.ipam.lock().expect("poisoned");
    for _ in 0..5 {
        let current = cluster.store.get(&key);
        let (mut node, expect) = match current.as_deref() {
            Some(Object::Node(n)) => (n.clone(), Expect::Version(n.metadata.resource_version)),
            _ => (
                Node {
                    metadata: ObjectMeta {
                        name: info.name.clone(),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                Expect::Absent,
            ),
        };
        let epoch = node.status.epoch + 1;
        let pod_cidr = match node.status.pod_cidr.parse::<crate::ipam::Cidr>() {
            Ok(kept) => Some(kept),
            Err(_) => {
                let taken: std::collections::HashSet<crate::ipam::Cidr> = cluster
                    .store
                    .list("nodes/")
                    .iter()
                    .filter_map(|o| match &**o {
                        Object::Node(n) => n.status.pod_cidr.parse().ok(),
                        _ => None,
                    })
                    .collect();
                let next = crate::ipam::next_node_cidr(cluster.cfg.pod_cidr, &taken);
                if next.is_none() {
                    tracing::warn!(
                        node = %info.name,
                        "no free /{} left in the pod CIDR {}: the node gets no pod addresses",
                        crate::ipam::NODE_PREFIX,
                        cluster.cfg.pod_cidr
                    );
                }
                next
            }
        };
        node.metadata.labels = info.labels.clone();
        // Reserved labels come from what the scheduler knows (the name is
        // the certificate's), never from the node's report.
        node.metadata.labels.insert(
            flotilla_api::meta::HOSTNAME_LABEL.to_string(),
            info.name.clone(),
        );
        node.metadata.labels.insert(
            flotilla_api::meta::ARCH_LABEL.to_string(),
            info.arch.clone(),
        );
        node.status = NodeStatus {
            ready: true,
            allocatable: info.allocatable,
            arch: info.arch.clone(),
            version: info.version.clone(),
            runtimes: info.runtimes.clone(),
            last_heartbeat_ms: now_ms(),
            epoch,
            address: remote.to_string(),
            pod_cidr: pod_cidr.map(|c| c.to_string()).unwrap_or_default(),
            pod_network: info.pod_network.clone(),
            // The nodes controller judges the link from its drops.
            link: std::mem::take(&mut node.status.link),
            // Addresses the node has not let go of stay held across its
            // reconnects.
            releasing: std::mem::take(&mut node.status.releasing),
        };
        let pod_cidr = node.status.pod_cidr.clone();
        if let Ok(block) = pod_cidr.parse::<crate::ipam::Cidr>() {
            cluster
                .blocks
                .lock()
                .expect("poisoned")
                .insert(u32::from(block.base), info.name.clone());
        }
        let obj = Object::Node(node);
        match cluster
            .store
            .put(obj.clone(), expect, WriteDurability::Sync)
        {
            Ok(_) => {
                cluster.event(
                    &obj,
                    EventType::Normal,
                    "NodeReady",
                    format!("agent connected from {remote}"),
                );
                return Ok((epoch, pod_cidr));
            }
            Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Backend(
        "node registration kept conflicting".into(),
    ))
}

/// Writes an agent's report into the pod's status, if the pod is still its own.
/// Writes agents' status reports: everything reported since the last batch
/// in one store transaction (a report per write made the store the
/// bottleneck of placing thousands of pods).
pub async fn write_statuses(cluster: Arc<Cluster>) {
    loop {
        cluster.reported.notified().await;
        let batch = std::mem::take(&mut *cluster.reports.lock().expect("poisoned"));
        if batch.is_empty() {
            continue;
        }
        // Off the async workers, always: the write waits for the store's
        // writer lock, which a controller's burst of fsynced writes (10,000
        // pods deleted) may hold for seconds, and a worker blocked there
        // is one that cannot acknowledge heartbeats.
        let c = cluster.clone();
        let _ = tokio::task::spawn_blocking(move || write_batch(&c, batch)).await;
    }
}

fn write_batch(cluster: &Cluster, batch: Vec<StatusReport>) {
    // The latest report per pod wins.
    let mut latest: HashMap<String, StatusReport> = HashMap::new();
    for r in batch {
        latest.insert(r.key.clone(), r);
    }
    let mut writes = Vec::new();
    let mut meta = Vec::new();
    for r in latest.into_values() {
        let Some((obj, was)) = status_update(cluster, &r) else {
            continue;
        };
        let version = was.1;
        writes.push((obj, Expect::Version(version)));
        meta.push((r, was.0));
    }
    let results = cluster.store.put_many(writes, WriteDurability::Lazy);
    for (res, (r, was)) in results.into_iter().zip(meta) {
        match res {
            Ok(obj) => {
                let Object::Pod(p) = &*obj else { continue };
                note_transitions(cluster, &obj, &was, &p.status)
            }
            // Changed meanwhile (a label change or a controller's mark, say):
            // apply it alone, on the newer object.
            Err(StoreError::Conflict { .. }) => update_status(cluster, &r),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => tracing::warn!("pod status {}: {e}", r.key),
        }
    }
}

/// The pod object with the reported status, and its status and version
/// before; `None` when the report is not to be written.
fn status_update(cluster: &Cluster, r: &StatusReport) -> Option<(Object, (PodStatus, u64))> {
    let obj = cluster.store.get(&r.key)?;
    let Object::Pod(p) = &*obj else { return None };
    // Only the pod's own node reports on it, and never once it is Lost.
    if p.metadata.uid != r.uid
        || p.status.node.as_deref() != Some(r.node.as_str())
        || p.status.phase == flotilla_api::PodPhase::Lost
    {
        return None;
    }
    let status = p.status.with_report(&r.report);
    if status == p.status {
        return None;
    }
    let mut np = p.clone();
    np.status = status;
    Some((
        Object::Pod(np),
        (p.status.clone(), p.metadata.resource_version),
    ))
}

fn update_status(cluster: &Cluster, r: &StatusReport) {
    for _ in 0..5 {
        let Some((obj, (was, version))) = status_update(cluster, r) else {
            return;
        };
        match cluster
            .store
            .put(obj.clone(), Expect::Version(version), WriteDurability::Lazy)
        {
            Ok(_) => {
                let Object::Pod(p) = &obj else { return };
                note_transitions(cluster, &obj, &was, &p.status);
                return;
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => {
                tracing::warn!("pod status {}: {e}", r.key);
                return;
            }
        }
    }
}

/// Events for restarts and phase changes people care about.
fn note_transitions(cluster: &Cluster, obj: &Object, was: &PodStatus, now: &PodStatus) {
    use flotilla_api::MemberState;
    if was.phase != now.phase {
        let type_ = if now.phase == flotilla_api::PodPhase::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        };
        cluster.event(
            obj,
            type_,
            &now.phase.to_string(),
            format!(
                "pod is {}{}",
                now.phase,
                if now.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {} {}", now.reason, now.message)
                }
            ),
        );
    }
    for m in &now.members {
        let before = was.members.iter().find(|b| b.name == m.name);
        // A member kept waiting for something it misses (a ConfigMap, a
        // Secret, a key): said once per new reason.
        if let MemberState::Waiting { reason } = &m.state
            && !matches!(
                reason.as_str(),
                "Preparing" | "FetchingModule" | "PullingImage" | "CrashLoopBackOff"
            )
            && !before.is_some_and(
                |b| matches!(&b.state, MemberState::Waiting { reason: r } if r == reason),
            )
        {
            cluster.event(
                obj,
                EventType::Warning,
                "Waiting",
                format!("member {} cannot start: {reason}", m.name),
            );
        }
        if before.is_some_and(|b| b.restarts < m.restarts)
            && let Some(t) = &m.last_termination
        {
            let unhealthy = t.reason == flotilla_api::TerminationReason::Unhealthy;
            cluster.event(
                obj,
                EventType::Warning,
                if unhealthy { "Unhealthy" } else { "BackOff" },
                format!(
                    "member {} {} ({}, code {}){}; restart {}",
                    m.name,
                    if unhealthy { "was stopped" } else { "exited" },
                    t.reason,
                    t.exit_code,
                    if t.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", t.message)
                    },
                    m.restarts
                ),
            );
        }
        // Readiness verdicts of a running member's probe.
        if matches!(m.state, MemberState::Running { .. })
            && let (Some(now_ready), Some(was)) = (m.ready, before.and_then(|b| b.ready))
            && now_ready != was
        {
            if now_ready {
                cluster.event(
                    obj,
                    EventType::Normal,
                    "Ready",
                    format!("member {} passes its readiness probe", m.name),
                );
            } else {
                cluster.event(
                    obj,
                    EventType::Warning,
                    "NotReady",
                    format!(
                        "member {} fails its readiness probe: out of service endpoints",
                        m.name
                    ),
                );
            }
        }
        if let MemberState::Terminated(t) = &m.state
            && !before.is_some_and(|b| matches!(b.state, MemberState::Terminated(_)))
            && t.reason != flotilla_api::TerminationReason::Completed
        {
            cluster.event(
                obj,
                EventType::Warning,
                &t.reason.to_string(),
                format!(
                    "member {} terminated with code {}{}",
                    m.name,
                    t.exit_code,
                    if t.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", t.message)
                    }
                ),
            );
        }
    }
}

/// Opens a log stream to the agent running the pod.
pub async fn open_log(
    cluster: &Cluster,
    node: &str,
    req: &LogRequest,
) -> Result<(quinn::RecvStream, Vec<u8>), String> {
    let conn = cluster
        .connection(node)
        .ok_or_else(|| format!("node {node} is not connected; its logs cannot be read now"))?;
    let (mut tx, rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
    tx.write_all(&encode(req))
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(rx);
    match reader.next::<LogReply>().await.map_err(|e| e.to_string())? {
        LogReply::Ok => {
            // The agent reads nothing more; finishing our side is harmless.
            drop(tx);
            let (rx, rest) = reader.into_parts();
            Ok((rx, rest))
        }
        LogReply::Err { message } => Err(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{Racing, Write};
    use crate::store::{RedbStore, Store};
    use flotilla_api::{AgentReport, PodPhase};

    /// Another writer changes the pod's labels just before each batched
    /// status write commits, as an API `apply` racing an agent's report
    /// would.
    fn relabel(inner: &RedbStore, key: &str) {
        let obj = inner.get(key).unwrap();
        let mut o = (*obj).clone();
        o.meta_mut()
            .labels
            .insert("tier".into(), format!("v{}", obj.meta().resource_version));
        let v = obj.meta().resource_version;
        inner
            .put(o, Expect::Version(v), WriteDurability::Lazy)
            .unwrap();
    }

    fn cluster_with_bound_pod(dir: &std::path::Path) -> (Arc<Cluster>, String, String) {
        let inner = RedbStore::open(&dir.join("store.redb")).unwrap();
        let mut pod = Pod::default();
        pod.metadata.name = "web".into();
        pod.metadata.namespace = "default".into();
        pod.status.phase = PodPhase::Scheduled;
        pod.status.node = Some("n1".into());
        pod.status.node_epoch = 7;
        pod.status.pod_ip = "10.88.0.2".into();
        let stored = inner
            .put(Object::Pod(pod), Expect::Absent, WriteDurability::Sync)
            .unwrap();
        let key = stored.key();
        let uid = stored.meta().uid.clone();
        let racing_key = key.clone();
        let store = Racing {
            inner,
            before: move |inner: &RedbStore, w: Write<'_>| {
                if matches!(w, Write::Many) {
                    relabel(inner, &racing_key);
                }
            },
        };
        let cluster = crate::cluster::for_tests(Arc::new(store), dir);
        (cluster, key, uid)
    }

    fn pod_of(cluster: &Cluster, key: &str) -> Pod {
        match &*cluster.store.get(key).unwrap() {
            Object::Pod(p) => p.clone(),
            o => panic!("not a pod: {o:?}"),
        }
    }

    #[test]
    fn a_report_racing_a_label_change_keeps_the_scheduler_owned_fields() {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, key, uid) = cluster_with_bound_pod(dir.path());
        let report = |phase| StatusReport {
            node: "n1".into(),
            key: key.clone(),
            uid: uid.clone(),
            report: AgentReport {
                phase,
                reason: "Started".into(),
                started_ms: 42,
                ..Default::default()
            },
        };
        // The batch write conflicts with the relabel, so the report is
        // applied again alone, on the relabelled object.
        write_batch(&cluster, vec![report(PodPhase::Running)]);
        let p = pod_of(&cluster, &key);
        assert_eq!(p.status.phase, PodPhase::Running, "the report was written");
        assert_eq!(p.status.reason, "Started");
        assert_eq!(p.status.started_ms, 42);
        assert_eq!(
            p.status.pod_ip, "10.88.0.2",
            "the address survives the race"
        );
        assert_eq!(p.status.node.as_deref(), Some("n1"));
        assert_eq!(p.status.node_epoch, 7);
        assert!(
            p.metadata.labels.contains_key("tier"),
            "the label change kept"
        );

        // A report from another node changes nothing.
        let mut stray = report(PodPhase::Failed);
        stray.node = "n2".into();
        write_batch(&cluster, vec![stray]);
        assert_eq!(pod_of(&cluster, &key).status.phase, PodPhase::Running);
    }

    #[test]
    fn with_report_takes_only_agent_owned_fields() {
        let stored = PodStatus {
            phase: PodPhase::Running,
            node: Some("n1".into()),
            node_epoch: 3,
            pod_ip: "10.88.1.9".into(),
            ..Default::default()
        };
        let r = AgentReport {
            phase: PodPhase::Failed,
            reason: "Error".into(),
            message: "exit 3".into(),
            members: vec![],
            started_ms: 9,
        };
        let now = stored.with_report(&r);
        assert_eq!(
            (
                now.phase,
                now.reason.as_str(),
                now.message.as_str(),
                now.started_ms
            ),
            (PodPhase::Failed, "Error", "exit 3", 9)
        );
        assert_eq!(
            (now.node.as_deref(), now.node_epoch, now.pod_ip.as_str()),
            (Some("n1"), 3, "10.88.1.9")
        );
        assert_eq!(AgentReport::of(&now), r);
    }
}
