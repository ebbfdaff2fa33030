//! Drives [`LinkCore`] over a real QUIC connection with mutual TLS, hands
//! assignments to the [`Agent`], and serves the streams the scheduler opens:
//! log reads and `flotilla invoke` requests for the node's gateway.

use crate::agent::{Agent, initial_log};
use crate::link::{Action, LinkConfig, LinkCore, SCHEDULER_NAME};
use crate::logs::LogPaths;
use crate::pod::PodNews;
use flotilla_api::PodStatus;
use flotilla_api::proto::{
    ALPN, AgentMsg, FrameReader, InvokeReply, InvokeRequest, LogReply, LogRequest, NodeInfo,
    SchedulerMsg, StreamOpen, encode,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad PEM in {what}: {why}")]
    Pem { what: &'static str, why: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC setup: {0}")]
    Quic(String),
    #[error("cannot bind a UDP socket: {0}")]
    Bind(std::io::Error),
}

/// Everything the agent needs to reach its scheduler.
pub struct ClientConfig {
    pub server: SocketAddr,
    /// Other schedulers of the same cluster, tried in turn after `server`
    /// when a connection fails or ends (several share one etcd store; a
    /// follower sends the agent to the leader).
    pub others: Vec<SocketAddr>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub node: NodeInfo,
    pub link: LinkConfig,
    /// Where renewed credentials are saved; `None`: never renew (certificates
    /// issued in-process, as by `flotilla up`, do not expire soon).
    pub creds_dir: Option<std::path::PathBuf>,
    /// Carries other nodes' pod traffic over the link (bridge networking).
    pub tunnel: Option<Arc<crate::net::tunnel::Tunnel>>,
    /// Fetches uploaded modules over the link (none: simulated agents).
    pub modules: Option<Arc<crate::link::fetch::ModuleFetcher>>,
    /// The node's function gateway, for `flotilla invoke` (none: the node
    /// runs none).
    pub gateway: Option<Arc<crate::net::gateway::Gateway>>,
}

fn quic_client(cfg: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
    let pem = |what: &'static str| {
        move |e: rustls::pki_types::pem::Error| ClientError::Pem {
            what,
            why: e.to_string(),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cfg.ca_pem.as_bytes()) {
        roots.add(c.map_err(pem("CA certificate"))?)?;
    }
    let chain = CertificateDer::pem_slice_iter(cfg.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("client certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(cfg.key_pem.as_bytes()).map_err(pem("client key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Quic(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    // Heartbeats keep the connection alive (see the scheduler's transport).
    t.keep_alive_interval(None);
    t.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .expect("valid idle timeout"),
    ));
    cc.transport_config(Arc::new(t));
    Ok(cc)
}

/// The link's endpoint: quinn's receive buffer sized for Ethernet-sized
/// datagrams (1472 bytes; path MTU discovery stops at 1452), not 64 KiB ones,
/// which made it 3 MiB once traffic had touched it.
fn endpoint(bind: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let mut cfg = quinn::EndpointConfig::default();
    cfg.max_udp_payload_size(1472)
        .expect("1472 is a valid payload size");
    quinn::Endpoint::new(cfg, None, socket, Arc::new(quinn::TokioRuntime))
}

/// Which scheduler the next connection goes to: the one the last
/// connection reached while that works, the leader a follower named, else
/// the next of the list in turn.
struct Target {
    list: Vec<SocketAddr>,
    at: usize,
    current: SocketAddr,
    /// Where a follower said the leader is.
    redirected: Option<SocketAddr>,
    /// The last connection failed or ended: move on.
    moving: bool,
}

impl Target {
    fn new(first: SocketAddr, others: &[SocketAddr]) -> Target {
        let mut list = vec![first];
        list.extend(others.iter().filter(|a| **a != first));
        Target {
            list,
            at: 0,
            current: first,
            redirected: None,
            moving: false,
        }
    }

    fn next(&mut self) -> SocketAddr {
        if let Some(a) = self.redirected.take() {
            self.current = a;
        } else if std::mem::take(&mut self.moving) {
            self.at = (self.at + 1) % self.list.len();
            self.current = self.list[self.at];
        }
        self.current
    }

    fn failed(&mut self) {
        self.moving = self.list.len() > 1;
    }

    fn redirect(&mut self, to: &str) {
        match to.parse() {
            Ok(a) => self.redirected = Some(a),
            Err(_) => self.failed(),
        }
    }

    fn registered(&mut self) {
        self.moving = false;
    }
}

enum Woke {
    Timer,
    Frame(Result<SchedulerMsg, flotilla_api::proto::ReadError>),
    Stream(Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>),
    News(PodNews),
}

struct Conn {
    connection: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader<quinn::RecvStream>,
}

/// Connects, giving up after 5 s or when the lease runs out, whichever is
/// first (the lease must be acted on even while a connection attempt hangs).
async fn connect(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    lease_until: Option<Instant>,
) -> Result<Conn, String> {
    let connecting = endpoint
        .connect(server, SCHEDULER_NAME)
        .map_err(|e| e.to_string())?;
    let mut limit = Duration::from_secs(5);
    if let Some(u) = lease_until {
        limit = limit.min(u.saturating_duration_since(Instant::now()));
    }
    let connection = tokio::time::timeout(limit, connecting)
        .await
        .map_err(|_| "timed out connecting".to_string())?
        .map_err(|e| e.to_string())?;
    let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    Ok(Conn {
        connection,
        send,
        reader: FrameReader::new(recv),
    })
}

/// What the link drives: the pods of a node. [`Agent`] runs them for real;
/// the simulated agents of [`crate::sim`] only pretend to.
pub trait Workloads: Send + 'static {
    /// Applies one message from the scheduler.
    fn handle(&mut self, msg: SchedulerMsg);
    /// Current status of every pod, for a resync after reconnecting.
    fn statuses(&self) -> Vec<(String, PodStatus)>;
    /// Resolves a log request to files, or says why it cannot.
    fn log_paths(&self, req: &LogRequest) -> Result<LogPaths, String>;
    /// The node's lease ran out: stop the pods that must not outlive it.
    fn lease_expired(&mut self);
    /// The scheduler accepted the node and gave it this block of pod
    /// addresses, in the cluster's pod CIDR (empty: none).
    fn registered(&mut self, pod_cidr: &str, cluster_cidr: &str) {
        let _ = (pod_cidr, cluster_cidr);
    }
}

impl Workloads for Agent {
    fn handle(&mut self, msg: SchedulerMsg) {
        Agent::handle(self, msg)
    }
    fn statuses(&self) -> Vec<(String, PodStatus)> {
        Agent::statuses(self)
    }
    fn log_paths(&self, req: &LogRequest) -> Result<LogPaths, String> {
        Agent::log_paths(self, req)
    }
    fn lease_expired(&mut self) {
        Agent::lease_expired(self)
    }
    fn registered(&mut self, pod_cidr: &str, cluster_cidr: &str) {
        // Remembered only (the bridge comes with the first pod or service
        // that needs it), unless an earlier run left the bridge: then a few
        // quick netlink requests.
        if let Ok(block) = pod_cidr.parse::<flotilla_api::net::Cidr>()
            && let Err(e) = self
                .env()
                .network
                .set_cidr(block, cluster_cidr.parse().ok())
        {
            tracing::error!("pod network: {e}");
        }
    }
}

/// Runs the link until `shutdown` turns true.
pub async fn run<W: Workloads>(
    cfg: ClientConfig,
    agent: Arc<Mutex<W>>,
    mut status_rx: mpsc::UnboundedReceiver<PodNews>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let bind: SocketAddr = if cfg.server.is_ipv6() {
        "[::]:0".parse().expect("valid")
    } else {
        "0.0.0.0:0".parse().expect("valid")
    };
    let mut cfg = cfg;
    let mut endpoint = endpoint(bind).map_err(ClientError::Bind)?;
    endpoint.set_default_client_config(quic_client(&cfg)?);
    // Renewal: the key of a requested certificate, while the request is out.
    let mut renewing: Option<String> = None;
    let mut core = LinkCore::new(cfg.link.clone(), cfg.node.clone(), Instant::now());
    let mut conn: Option<Conn> = None;
    let mut pending: HashMap<String, PodStatus> = HashMap::new();
    // Pods stopped with their network, to tell the scheduler (kept until
    // a link takes them).
    let mut released: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut last_connect_error: Option<String> = None;
    let mut target = Target::new(cfg.server, &cfg.others);
    loop {
        while let Some(action) = core.poll_action() {
            match action {
                Action::Connect => {
                    match connect(&endpoint, target.next(), core.lease_until()).await {
                        Ok(c) => {
                            last_connect_error = None;
                            conn = Some(c);
                            core.connected(Instant::now());
                        }
                        Err(why) => {
                            // Each new reason is a warning (a certificate the
                            // scheduler refuses says so here); repeats are debug.
                            if last_connect_error.as_deref() != Some(why.as_str()) {
                                tracing::warn!(
                                    "cannot connect to the scheduler at {}: {why}",
                                    target.current
                                );
                                last_connect_error = Some(why.clone());
                            } else {
                                tracing::debug!("connect to {} failed: {why}", target.current);
                            }
                            target.failed();
                            core.connect_failed(Instant::now(), why);
                        }
                    }
                }
                Action::Send(msg) => {
                    if let Some(c) = conn.as_mut()
                        && let Err(e) = c.send.write_all(&encode(&msg)).await
                    {
                        target.failed();
                        core.closed(Instant::now(), format!("send failed: {e}"));
                        conn = None;
                    }
                }
                Action::Redirect(to) => target.redirect(&to),
                Action::Close(why) => {
                    target.failed();
                    tracing::warn!("scheduler link down: {why}");
                    if let Some(c) = conn.take() {
                        c.connection.close(1u32.into(), why.as_bytes());
                    }
                }
                Action::Registered {
                    epoch,
                    pod_cidr,
                    cluster_cidr,
                } => {
                    target.registered();
                    tracing::info!(epoch, %pod_cidr, "registered with scheduler at {}", target.current);
                    agent
                        .lock()
                        .expect("poisoned")
                        .registered(&pod_cidr, &cluster_cidr);
                    if let (Some(t), Some(c)) = (&cfg.tunnel, &conn) {
                        t.attach(c.connection.clone());
                    }
                    if let (Some(m), Some(c)) = (&cfg.modules, &conn) {
                        m.attach(c.connection.clone());
                    }
                    pending.clear();
                    renewing = None;
                    let statuses = agent.lock().expect("poisoned").statuses();
                    for (uid, status) in statuses {
                        core.send(AgentMsg::Report {
                            uid,
                            report: flotilla_api::AgentReport::of(&status),
                        });
                    }
                }
                Action::Deliver(SchedulerMsg::Renewed { cert_pem, .. }) => {
                    let Some(key_pem) = renewing.take() else {
                        continue;
                    };
                    let creds = crate::link::join::Credentials {
                        ca_pem: cfg.ca_pem.clone(),
                        cert_pem,
                        key_pem,
                    };
                    if let Some(dir) = &cfg.creds_dir
                        && let Err(e) = creds.save(dir)
                    {
                        tracing::error!("cannot save renewed certificate: {e}");
                        continue;
                    }
                    cfg.cert_pem = creds.cert_pem;
                    cfg.key_pem = creds.key_pem;
                    match quic_client(&cfg) {
                        Ok(cc) => {
                            endpoint.set_default_client_config(cc);
                            tracing::info!(
                                "node certificate renewed; reconnecting with it (pods keep running)"
                            );
                            // The next connection presents the new certificate.
                            if let Some(c) = conn.take() {
                                c.connection.close(0u32.into(), b"certificate renewed");
                            }
                            core.closed(Instant::now(), "certificate renewed".into());
                        }
                        Err(e) => tracing::error!("renewed certificate unusable: {e}"),
                    }
                }
                Action::Deliver(msg) => agent.lock().expect("poisoned").handle(msg),
                Action::LeaseExpired => {
                    tracing::warn!(
                        "no word from the scheduler within the node's lease: stopping pods with on_disconnect = Stop"
                    );
                    agent.lock().expect("poisoned").lease_expired();
                }
            }
        }
        if core.is_ready()
            && renewing.is_none()
            && cfg.creds_dir.is_some()
            && due_for_renewal(&cfg.cert_pem)
        {
            match crate::link::join::key_and_csr(&cfg.node.name) {
                Ok((key_pem, csr_pem)) => {
                    renewing = Some(key_pem);
                    core.send(AgentMsg::Renew { csr_pem });
                    continue;
                }
                Err(e) => tracing::error!("cannot make a renewal request: {e}"),
            }
        }
        if core.is_ready() && !released.is_empty() {
            for uid in released.drain() {
                core.send(AgentMsg::Released { uid });
            }
            continue;
        }
        if core.is_ready() && !pending.is_empty() {
            for (uid, status) in pending.drain() {
                core.send(AgentMsg::Report {
                    uid,
                    report: flotilla_api::AgentReport::of(&status),
                });
            }
            continue;
        }
        let deadline = core
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let (reader, connection) = match conn.as_mut() {
            Some(c) => (Some(&mut c.reader), Some(c.connection.clone())),
            None => (None, None),
        };
        let woke = tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => Woke::Timer,
            msg = async { reader.expect("guarded").next::<SchedulerMsg>().await }, if connection.is_some() => Woke::Frame(msg),
            stream = async { connection.as_ref().expect("guarded").accept_bi().await }, if connection.is_some() => Woke::Stream(stream),
            Some(news) = status_rx.recv() => Woke::News(news),
            _ = shutdown.wait_for(|s| *s) => break,
        };
        match woke {
            Woke::Timer => core.handle_timeout(Instant::now()),
            Woke::Frame(Ok(m)) => core.received(m, Instant::now()),
            Woke::Frame(Err(e)) => {
                target.failed();
                core.closed(Instant::now(), format!("control stream: {e}"));
                if let Some(c) = conn.take() {
                    c.connection.close(2u32.into(), b"bad frame");
                }
            }
            Woke::Stream(Ok((send, recv))) => {
                tokio::spawn(serve_stream(agent.clone(), cfg.gateway.clone(), send, recv));
            }
            Woke::Stream(Err(_)) => {}
            Woke::News(news) => {
                let mut news = Some(news);
                while let Some(n) = news.take().or_else(|| status_rx.try_recv().ok()) {
                    match n {
                        PodNews::Status(uid, status) => {
                            pending.insert(uid, status);
                        }
                        PodNews::Released(uid) => {
                            released.insert(uid);
                        }
                        // Figures are not kept for later: the next sample
                        // says it all again.
                        PodNews::Usage(report) => {
                            if core.is_ready() {
                                core.send(AgentMsg::Usage(report));
                            }
                        }
                        PodNews::Wake(namespace, service) => {
                            if core.is_ready() {
                                core.send(AgentMsg::Wake { namespace, service });
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(c) = conn {
        c.connection.close(0u32.into(), b"agent shutting down");
    }
    endpoint.wait_idle().await;
    Ok(())
}

/// Whether a third or less of the certificate's lifetime is left.
fn due_for_renewal(cert_pem: &str) -> bool {
    let creds = crate::link::join::Credentials {
        ca_pem: String::new(),
        cert_pem: cert_pem.to_string(),
        key_pem: String::new(),
    };
    creds
        .remaining()
        .is_some_and(|(left, total)| left * 3 <= total)
}

/// Serves one log stream: request frame in, reply frame and log bytes out.
/// Reads what a stream the scheduler opened is for and serves it.
async fn serve_stream<W: Workloads>(
    agent: Arc<Mutex<W>>,
    gateway: Option<Arc<crate::net::gateway::Gateway>>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::new(recv);
    match reader.next::<StreamOpen>().await {
        Ok(StreamOpen::Log(req)) => serve_log(agent, req, send).await,
        Ok(StreamOpen::Invoke(req)) => serve_invoke(gateway, req, reader, send).await,
        Err(_) => {}
    }
}

/// Serves one `flotilla invoke` request through the node's gateway: the
/// request body is the rest of the stream, the answer's head goes back as
/// an [`InvokeReply`] frame and its body streams after it.
async fn serve_invoke(
    gateway: Option<Arc<crate::net::gateway::Gateway>>,
    req: InvokeRequest,
    reader: FrameReader<quinn::RecvStream>,
    mut send: quinn::SendStream,
) {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let refuse = |message: String| encode(&InvokeReply::Err { message });
    let Some(gateway) = gateway else {
        let _ = send
            .write_all(&refuse(
                "this node runs no function gateway (its agent has no --gateway-addr)".into(),
            ))
            .await;
        let _ = send.finish();
        return;
    };
    let (recv, rest) = reader.into_parts();
    let first = futures_util::stream::iter(
        (!rest.is_empty()).then(|| Ok(hyper::body::Frame::data(bytes::Bytes::from(rest)))),
    );
    let tail = futures_util::stream::unfold(recv, |mut recv| async move {
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => Some((Ok(hyper::body::Frame::data(chunk.bytes)), recv)),
            Ok(None) => None,
            Err(e) => Some((Err(Box::new(e) as BoxError), recv)),
        }
    });
    let body = http_body_util::StreamBody::new(first.chain(tail)).boxed_unsync();
    let mut request = http::Request::builder()
        .method(req.method.as_str())
        .uri(req.path.as_str());
    for (k, v) in &req.headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let request = match request.body(body) {
        Ok(r) => r,
        Err(e) => {
            let _ = send
                .write_all(&refuse(format!("not a valid HTTP request: {e}")))
                .await;
            let _ = send.finish();
            return;
        }
    };
    if send
        .write_all(&encode(&InvokeReply::Accepted))
        .await
        .is_err()
    {
        return;
    }
    let resp = gateway.invoke(&req.namespace, &req.function, request).await;
    let head = InvokeReply::Head {
        status: resp.status().as_u16(),
        headers: resp
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
    };
    if send.write_all(&encode(&head)).await.is_err() {
        return;
    }
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The function's body broke off: the caller must not take
            // what came as all of it.
            let _ = send.reset(1u32.into());
            return;
        };
        if let Ok(data) = frame.into_data()
            && send.write_all(&data).await.is_err()
        {
            return;
        }
    }
    let _ = send.finish();
}

async fn serve_log<W: Workloads>(
    agent: Arc<Mutex<W>>,
    req: LogRequest,
    mut send: quinn::SendStream,
) {
    let paths = agent.lock().expect("poisoned").log_paths(&req);
    let (paths, initial) = match paths.and_then(|p| initial_log(&p, &req).map(|b| (p, b))) {
        Ok(x) => x,
        Err(message) => {
            let _ = send.write_all(&encode(&LogReply::Err { message })).await;
            let _ = send.finish();
            return;
        }
    };
    if send.write_all(&encode(&LogReply::Ok)).await.is_err()
        || send.write_all(&initial).await.is_err()
    {
        return;
    }
    if req.follow && !req.previous {
        let mut offset = std::fs::metadata(&paths.current).map_or(0, |m| m.len());
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if agent.lock().expect("poisoned").log_paths(&req).is_err() {
                break;
            }
            let len = std::fs::metadata(&paths.current).map_or(0, |m| m.len());
            if len < offset {
                offset = 0; // rotated or a new run began
            }
            if len > offset {
                let chunk = match read_range(&paths.current, offset, len) {
                    Ok(c) => c,
                    Err(_) => continue,
                };
                offset += chunk.len() as u64;
                if send.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = send.finish();
}

fn read_range(path: &std::path::Path, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity((to - from) as usize);
    f.take(to - from).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod target_tests {
    use super::Target;
    use std::net::SocketAddr;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn stays_while_it_works_moves_on_failure_and_follows_a_redirect() {
        let mut t = Target::new(
            a("10.0.0.1:7371"),
            &[a("10.0.0.2:7371"), a("10.0.0.1:7371")],
        );
        // The first address once, even if listed again.
        assert_eq!(t.list.len(), 2);
        assert_eq!(t.next(), a("10.0.0.1:7371"));
        t.registered();
        assert_eq!(t.next(), a("10.0.0.1:7371"), "stays while the link works");
        t.failed();
        assert_eq!(t.next(), a("10.0.0.2:7371"));
        t.failed();
        assert_eq!(t.next(), a("10.0.0.1:7371"), "round the list");
        // A follower names the leader: that is next, whatever failed.
        t.failed();
        t.redirect("10.0.0.9:7371");
        assert_eq!(t.next(), a("10.0.0.9:7371"));
        // No leader known yet: the next of the list.
        t.redirect("");
        assert_eq!(t.next(), a("10.0.0.2:7371"));
        // One scheduler only: always that one.
        let mut one = Target::new(a("10.0.0.1:7371"), &[]);
        one.failed();
        assert_eq!(one.next(), a("10.0.0.1:7371"));
    }
}
