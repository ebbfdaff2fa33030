//! The node's service proxy: a userspace L4 balancer for every service in the
//! table the scheduler sends. Each service's virtual IP is an address of the
//! node bridge (so pods reach it through their gateway and the node owns
//! it); a listener per port accepts there — and on every address of the node
//! for ports with a `node_port` — and each connection (TCP) or client flow
//! (UDP) goes to the next ready endpoint in turn. Endpoints on other nodes
//! are reached through the pod network, i.e. the QUIC tunnel.
//!
//! The same table answers names (`NAME.NAMESPACE.svc`) through the DNS
//! responder and fills `NAME_SERVICE_HOST`/`_PORT` variables of new members.

use crate::net::netlink::{self, Netlink};
use crate::net::podnet::BRIDGE;
use flotilla_api::Protocol;
use flotilla_api::proto::ServiceView;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

/// How long a connection attempt to one endpoint may take before the next
/// endpoint is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes each direction of a proxied connection reads at once.
const COPY_BUFFER: usize = 64 * 1024;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65536;

/// What the proxy holds at most, so that no client (or spoofed sources)
/// can exhaust the agent's file descriptors or memory: each proxied TCP
/// connection costs two descriptors, each UDP flow one and a task.
#[derive(Clone, Copy, Debug)]
pub struct ProxyLimits {
    /// Open TCP connections through one listener (service port); more are
    /// closed as they are accepted.
    pub tcp_per_port: usize,
    /// Open TCP connections through the whole proxy.
    pub tcp_per_node: usize,
    /// A TCP connection with no byte in either direction for this long is
    /// closed (`None`: never).
    pub tcp_idle: Option<Duration>,
    /// UDP flows (client addresses) one listener tracks; a new one beyond
    /// it evicts the oldest.
    pub udp_flows_per_port: usize,
    /// UDP flows through the whole proxy.
    pub udp_flows_per_node: usize,
    /// A UDP flow with no reply for this long is forgotten.
    pub udp_idle: Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            tcp_per_port: 1024,
            tcp_per_node: 4096,
            tcp_idle: Some(Duration::from_secs(600)),
            udp_flows_per_port: 1024,
            udp_flows_per_node: 4096,
            udp_idle: Duration::from_secs(60),
        }
    }
}

impl ProxyLimits {
    /// No caps and no idle timeout: the proxy as it was before it had
    /// limits (the reference its benchmark compares against).
    pub fn unlimited() -> ProxyLimits {
        ProxyLimits {
            tcp_per_port: tokio::sync::Semaphore::MAX_PERMITS,
            tcp_per_node: tokio::sync::Semaphore::MAX_PERMITS,
            tcp_idle: None,
            udp_flows_per_port: usize::MAX,
            udp_flows_per_node: usize::MAX,
            udp_idle: Duration::from_secs(60),
        }
    }
}

/// What the proxy holds now and what it turned away (all listeners).
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub tcp_open: AtomicUsize,
    /// TCP connections closed on accept because a cap was reached.
    pub tcp_refused: AtomicUsize,
    /// TCP connections closed for idleness.
    pub tcp_idled: AtomicUsize,
    pub udp_flows: AtomicUsize,
    /// UDP flows evicted to make room for a new one.
    pub udp_evicted: AtomicUsize,
}

/// The node-wide limits and counters every listener shares.
struct Shared {
    limits: ProxyLimits,
    stats: Arc<ProxyStats>,
    tcp: Arc<tokio::sync::Semaphore>,
    /// Proxied TCP connections (and attempts) per endpoint address, so a
    /// pod going away can wait until none is left ([`Proxy::drained`]).
    to: Mutex<HashMap<std::net::IpAddr, Open>>,
    /// Signalled each time a connection to an endpoint ends.
    ended: tokio::sync::Notify,
}

impl Shared {
    fn new(limits: ProxyLimits) -> Shared {
        Shared {
            limits,
            stats: Arc::default(),
            tcp: Arc::new(tokio::sync::Semaphore::new(limits.tcp_per_node)),
            to: Mutex::default(),
            ended: tokio::sync::Notify::new(),
        }
    }

    fn open_to(&self, ip: std::net::IpAddr) -> usize {
        self.to
            .lock()
            .expect("poisoned")
            .get(&ip)
            .map_or(0, |o| o.conns.len())
    }
}

/// The proxied connections open to one endpoint.
struct Open {
    conns: HashMap<u64, Conn>,
    /// Signalled when the endpoint's pod is gone: they end at once.
    cut: Arc<tokio::sync::Notify>,
}

/// One proxied connection, for saying which are still open.
struct Conn {
    since: std::time::Instant,
    /// The proxy's end, once connected.
    local: Option<SocketAddr>,
}

/// One connection (or attempt) to an endpoint, counted while it lives.
struct ToEndpoint {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
    id: u64,
    cut: Arc<tokio::sync::Notify>,
}

impl ToEndpoint {
    fn new(shared: &Arc<Shared>, ip: std::net::IpAddr) -> ToEndpoint {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        let mut to = shared.to.lock().expect("poisoned");
        let open = to.entry(ip).or_insert_with(|| Open {
            conns: HashMap::new(),
            cut: Arc::default(),
        });
        open.conns.insert(
            id,
            Conn {
                since: std::time::Instant::now(),
                local: None,
            },
        );
        let cut = open.cut.clone();
        drop(to);
        ToEndpoint {
            shared: shared.clone(),
            ip,
            id,
            cut,
        }
    }

    /// The attempt became a connection from `local`.
    fn connected(&self, local: Option<SocketAddr>) {
        if let Some(c) = self
            .shared
            .to
            .lock()
            .expect("poisoned")
            .get_mut(&self.ip)
            .and_then(|o| o.conns.get_mut(&self.id))
        {
            c.local = local;
        }
    }
}

impl Drop for ToEndpoint {
    fn drop(&mut self) {
        let mut to = self.shared.to.lock().expect("poisoned");
        if let Some(o) = to.get_mut(&self.ip) {
            o.conns.remove(&self.id);
            if o.conns.is_empty() {
                to.remove(&self.ip);
            }
        }
        drop(to);
        self.shared.ended.notify_waiters();
    }
}

/// Where one listener sends its traffic, shared with its accept loop.
#[derive(Default)]
struct Backends {
    targets: RwLock<Vec<SocketAddr>>,
    next: AtomicUsize,
}

impl Backends {
    /// The targets in the order to try them, starting with the next in turn.
    fn order(&self) -> Vec<SocketAddr> {
        let t = self.targets.read().expect("poisoned");
        if t.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % t.len();
        t[start..].iter().chain(&t[..start]).copied().collect()
    }

    /// Whether `target` is still one of the targets.
    fn has(&self, target: SocketAddr) -> bool {
        self.targets.read().expect("poisoned").contains(&target)
    }
}

struct Listener {
    backends: Arc<Backends>,
    task: tokio::task::AbortHandle,
}

type ListenKey = (SocketAddrV4, Protocol);

/// The proxy's state; changes come from [`Proxy::update`].
pub struct Proxy {
    enabled: bool,
    shared: Arc<Shared>,
    listeners: Mutex<HashMap<ListenKey, Listener>>,
    vips: Mutex<HashSet<Ipv4Addr>>,
    table: watch::Sender<Arc<Vec<ServiceView>>>,
    /// The DNS responder and the address it serves on.
    dns: Mutex<Option<(SocketAddr, tokio::task::AbortHandle)>>,
    /// Where the virtual IPs on the bridge are recorded, so a restarted
    /// agent removes those of services deleted while it was away.
    vips_file: Option<std::path::PathBuf>,
}

impl Proxy {
    /// `enabled`: the node has a bridge (pods have addresses); otherwise only
    /// the table is kept (for environment variables).
    /// `vips_file`: the record of virtual IPs on the bridge (kept across
    /// agent restarts).
    pub fn new(enabled: bool, vips_file: Option<std::path::PathBuf>) -> Proxy {
        Proxy::with_limits(enabled, vips_file, ProxyLimits::default())
    }

    /// [`Proxy::new`] with other limits.
    pub fn with_limits(
        enabled: bool,
        vips_file: Option<std::path::PathBuf>,
        limits: ProxyLimits,
    ) -> Proxy {
        // The previous run's addresses count as ours until the first table.
        let vips = vips_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default();
        Proxy {
            enabled,
            shared: Arc::new(Shared::new(limits)),
            vips_file,
            listeners: Mutex::new(HashMap::new()),
            vips: Mutex::new(vips),
            table: watch::Sender::new(Arc::new(Vec::new())),
            dns: Mutex::new(None),
        }
    }

    /// Serves service names on `ip`:53 (the node bridge's address); a new
    /// address replaces the old responder. Needs a tokio runtime.
    pub fn serve_dns(&self, ip: Ipv4Addr) {
        if !self.enabled {
            return;
        }
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, 53));
        let mut dns = self.dns.lock().expect("poisoned");
        if dns.as_ref().is_some_and(|(a, _)| *a == addr) {
            return;
        }
        if let Some((_, old)) = dns.take() {
            old.abort();
        }
        let table = self.table.subscribe();
        let task = tokio::spawn(async move {
            if let Err(e) = crate::net::dns::serve(addr, table).await {
                tracing::warn!("DNS responder on {addr}: {e}");
            }
        });
        *dns = Some((addr, task.abort_handle()));
    }

    /// Counters of what the proxy holds and turned away.
    pub fn stats(&self) -> &Arc<ProxyStats> {
        &self.shared.stats
    }

    /// The current service table.
    pub fn table(&self) -> Arc<Vec<ServiceView>> {
        self.table.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<ServiceView>>> {
        self.table.subscribe()
    }

    /// Waits until no proxied TCP connection to `ip` is open (or being
    /// opened), at most `limit`; whether none is. A pod that has left the
    /// endpoints waits here so the requests it already took finish.
    pub async fn drained(&self, ip: std::net::IpAddr, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ended = self.shared.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.shared.open_to(ip) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return false;
            }
        }
    }

    /// Ends every proxied connection to `ip` at once: its pod is gone (its
    /// members stopped, its network about to go), so nothing will answer
    /// or close them, and a client would otherwise wait until it gives up.
    /// Returns how many there were.
    pub fn cut(&self, ip: std::net::IpAddr) -> usize {
        let to = self.shared.to.lock().expect("poisoned");
        let Some(o) = to.get(&ip) else {
            return 0;
        };
        o.cut.notify_waiters();
        o.conns.len()
    }

    /// The proxied connections open to `ip` now, each as "from ADDR, open
    /// for N s" (or "connecting for N s"), for a pod that waited in vain.
    pub fn open_conns(&self, ip: std::net::IpAddr) -> Vec<String> {
        let to = self.shared.to.lock().expect("poisoned");
        let Some(o) = to.get(&ip) else {
            return Vec::new();
        };
        o.conns
            .values()
            .map(|c| {
                let age = c.since.elapsed().as_secs_f64();
                match c.local {
                    Some(l) => format!("from {l}, open for {age:.1} s"),
                    None => format!("connecting for {age:.1} s"),
                }
            })
            .collect()
    }

    /// Listeners now open (address, protocol), for tests and diagnostics.
    pub fn listening(&self) -> Vec<(SocketAddrV4, Protocol)> {
        let mut v: Vec<_> = self
            .listeners
            .lock()
            .expect("poisoned")
            .keys()
            .copied()
            .collect();
        v.sort();
        v
    }

    /// Applies a new table: addresses, listeners and targets follow it.
    /// Needs a tokio runtime; quick (a few netlink requests and binds).
    pub fn update(&self, services: Vec<ServiceView>) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            for s in &services {
                tracing::debug!(service = %s.name, endpoints = ?s.endpoints, "service table");
            }
        }
        if self.enabled {
            let wanted = wanted(&services);
            self.sync_vips(&services);
            self.sync_listeners(wanted);
        }
        self.table.send_replace(Arc::new(services));
    }

    fn sync_vips(&self, services: &[ServiceView]) {
        let want: HashSet<Ipv4Addr> = services
            .iter()
            .filter_map(|s| s.cluster_ip.parse().ok())
            .collect();
        let mut have = self.vips.lock().expect("poisoned");
        if want == *have {
            return;
        }
        let res = (|| -> std::io::Result<()> {
            let mut nl = Netlink::open()?;
            let bridge = match netlink::index_of(BRIDGE) {
                Ok(i) => i,
                // No bridge, no addresses on it (e.g. after a reboot).
                Err(_) if want.is_empty() => return Ok(()),
                Err(e) => return Err(e),
            };
            for ip in want.difference(&have) {
                nl.add_addr(bridge, *ip, 32)?;
            }
            for ip in have.difference(&want) {
                nl.del_addr(bridge, *ip, 32)?;
            }
            Ok(())
        })();
        match res {
            Ok(()) => {
                if let Some(f) = &self.vips_file {
                    let text: String = want.iter().map(|ip| format!("{ip}\n")).collect();
                    if let Err(e) = std::fs::write(f, text) {
                        tracing::warn!("recording service addresses in {}: {e}", f.display());
                    }
                }
                *have = want;
            }
            Err(e) => tracing::warn!("service addresses on {BRIDGE}: {e}"),
        }
    }

    fn sync_listeners(&self, wanted: HashMap<ListenKey, Vec<SocketAddr>>) {
        let mut listeners = self.listeners.lock().expect("poisoned");
        listeners.retain(|key, l| {
            let keep = wanted.contains_key(key);
            if !keep {
                l.task.abort();
            }
            keep
        });
        for (key, targets) in wanted {
            if let Some(l) = listeners.get(&key) {
                *l.backends.targets.write().expect("poisoned") = targets;
                continue;
            }
            let backends = Arc::new(Backends {
                targets: RwLock::new(targets),
                next: AtomicUsize::new(0),
            });
            let task = match key.1 {
                Protocol::Tcp => std::net::TcpListener::bind(key.0)
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        TcpListener::from_std(l)
                    })
                    .map(|l| tokio::spawn(serve_tcp(l, backends.clone(), self.shared.clone()))),
                Protocol::Udp => std::net::UdpSocket::bind(key.0)
                    .and_then(|s| {
                        s.set_nonblocking(true)?;
                        UdpSocket::from_std(s)
                    })
                    .map(|s| {
                        tokio::spawn(serve_udp(
                            Arc::new(s),
                            backends.clone(),
                            self.shared.clone(),
                        ))
                    }),
            };
            match task {
                Ok(task) => {
                    listeners.insert(
                        key,
                        Listener {
                            backends,
                            task: task.abort_handle(),
                        },
                    );
                }
                Err(e) => tracing::warn!("service listener {}/{}: {e}", key.0, key.1),
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for l in self.listeners.lock().expect("poisoned").values() {
            l.task.abort();
        }
        if let Some((_, dns)) = self.dns.lock().expect("poisoned").take() {
            dns.abort();
        }
    }
}

/// Listeners the table asks for, with their targets: each service port on
/// the virtual IP, and on every node address for a node port.
fn wanted(services: &[ServiceView]) -> HashMap<ListenKey, Vec<SocketAddr>> {
    let mut out = HashMap::new();
    for s in services {
        let Ok(vip) = s.cluster_ip.parse::<Ipv4Addr>() else {
            continue;
        };
        for p in &s.ports {
            let targets: Vec<SocketAddr> = s
                .endpoints
                .iter()
                .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
                .map(|ip| SocketAddr::V4(SocketAddrV4::new(ip, p.target())))
                .collect();
            out.insert(
                (SocketAddrV4::new(vip, p.port), p.protocol),
                targets.clone(),
            );
            if let Some(np) = p.node_port {
                out.insert(
                    (SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, np), p.protocol),
                    targets,
                );
            }
        }
    }
    out
}

async fn connect_any(backends: &Backends, shared: &Arc<Shared>) -> Option<(TcpStream, ToEndpoint)> {
    for target in backends.order() {
        let counted = ToEndpoint::new(shared, target.ip());
        // Counted first, then checked against the targets now: a pod that
        // left the endpoints since `order` was taken either finds this
        // attempt counted when it waits to be drained, or is not tried.
        if !backends.has(target) {
            continue;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(s)) => {
                counted.connected(s.local_addr().ok());
                return Some((s, counted));
            }
            Ok(Err(e)) => tracing::debug!(%target, "service endpoint refused: {e}"),
            Err(_) => tracing::debug!(%target, "service endpoint timed out"),
        }
    }
    None
}

async fn serve_tcp(listener: TcpListener, backends: Arc<Backends>, shared: Arc<Shared>) {
    let port = Arc::new(tokio::sync::Semaphore::new(shared.limits.tcp_per_port));
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Over a cap: closed at once (the client sees a reset or EOF).
        let (Ok(p), Ok(n)) = (
            port.clone().try_acquire_owned(),
            shared.tcp.clone().try_acquire_owned(),
        ) else {
            shared.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let backends = backends.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permits = (p, n);
            // No endpoint: the client sees the connection close.
            let Some((outbound, counted)) = connect_any(&backends, &shared).await else {
                return;
            };
            let cut = counted.cut.clone();
            let cut = cut.notified();
            tokio::pin!(cut);
            cut.as_mut().enable();
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            shared.stats.tcp_open.fetch_add(1, Ordering::Relaxed);
            let Some(idle_after) = shared.limits.tcp_idle else {
                let (mut a, mut b) = (inbound, outbound);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut a,
                        &mut b,
                        COPY_BUFFER,
                        COPY_BUFFER,
                    ) => {}
                    () = cut => tracing::debug!(to = %counted.ip, "cut: the endpoint's pod is gone"),
                }
                shared.stats.tcp_open.fetch_sub(1, Ordering::Relaxed);
                return;
            };
            let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut a = Counted {
                inner: inbound,
                moved: moved.clone(),
            };
            let mut b = Counted {
                inner: outbound,
                moved: moved.clone(),
            };
            // Large buffers: a bulk transfer moves in few syscalls.
            let copy =
                tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER, COPY_BUFFER);
            tokio::select! {
                _ = copy => {}
                () = idle(&moved, idle_after) => {
                    shared.stats.tcp_idled.fetch_add(1, Ordering::Relaxed);
                }
                () = cut => tracing::debug!(to = %counted.ip, "cut: the endpoint's pod is gone"),
            }
            shared.stats.tcp_open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Returns once `moved` has not changed for `limit` (checked every quarter
/// of it, so an idle connection ends between 1 and 1.25 times the limit).
async fn idle(moved: &std::sync::atomic::AtomicU64, limit: Duration) {
    let step = limit / 4;
    let mut last = moved.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = moved.load(Ordering::Relaxed);
        if now == last {
            quiet += step;
            if quiet >= limit {
                return;
            }
        } else {
            last = now;
            quiet = Duration::ZERO;
        }
    }
}

/// A stream that counts the bytes read through it (both directions of a
/// proxied connection share one counter: any traffic is activity).
struct Counted<S> {
    inner: S,
    moved: Arc<std::sync::atomic::AtomicU64>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.moved.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One UDP client's flow: its upstream socket and the task relaying replies.
struct Flow {
    upstream: Arc<UdpSocket>,
    replies: tokio::task::AbortHandle,
    /// Tells this flow from a later one of the same client.
    seq: u64,
}

/// A listener's flows, oldest first for eviction.
#[derive(Default)]
struct Flows {
    by_client: HashMap<SocketAddr, Flow>,
    order: std::collections::VecDeque<(SocketAddr, u64)>,
    next_seq: u64,
}

impl Flows {
    /// Removes the oldest live flow; whether there was one.
    fn evict_oldest(&mut self, stats: &ProxyStats) -> bool {
        while let Some((client, seq)) = self.order.pop_front() {
            if self.by_client.get(&client).is_some_and(|f| f.seq == seq) {
                self.remove(&client, seq, stats);
                stats.udp_evicted.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    fn remove(&mut self, client: &SocketAddr, seq: u64, stats: &ProxyStats) {
        if self.by_client.get(client).is_some_and(|f| f.seq == seq)
            && let Some(f) = self.by_client.remove(client)
        {
            f.replies.abort();
            stats.udp_flows.fetch_sub(1, Ordering::Relaxed);
        }
        // Flows that ended on their own leave their place in `order`:
        // dropped once they are most of it (amortized, so the list stays
        // within twice the live flows).
        if self.order.len() > 2 * self.by_client.len() + 64 {
            let live = &self.by_client;
            self.order
                .retain(|(c, s)| live.get(c).is_some_and(|f| f.seq == *s));
        }
    }
}

/// UDP: each client address is a flow with its own upstream socket
/// connected to one endpoint; replies go back from the service address.
/// Flows are bounded per listener and per node: a new one beyond a bound
/// evicts the listener's oldest, so spoofed sources cost a bounded number
/// of sockets and tasks, never more.
async fn serve_udp(socket: Arc<UdpSocket>, backends: Arc<Backends>, shared: Arc<Shared>) {
    let flows: Arc<Mutex<Flows>> = Arc::default();
    let stats = shared.stats.clone();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let existing = flows
            .lock()
            .expect("poisoned")
            .by_client
            .get(&client)
            .map(|f| f.upstream.clone());
        let upstream = match existing {
            Some(u) => u,
            None => {
                let Some(target) = backends.order().into_iter().next() else {
                    continue;
                };
                {
                    let mut f = flows.lock().expect("poisoned");
                    let limits = &shared.limits;
                    while f.by_client.len() >= limits.udp_flows_per_port
                        || stats.udp_flows.load(Ordering::Relaxed) >= limits.udp_flows_per_node
                    {
                        if !f.evict_oldest(&stats) {
                            break;
                        }
                    }
                    if stats.udp_flows.load(Ordering::Relaxed) >= limits.udp_flows_per_node {
                        // Other listeners hold the node's flows.
                        continue;
                    }
                }
                let Ok(u) = UdpSocket::bind("0.0.0.0:0").await else {
                    continue;
                };
                if u.connect(target).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                let mut f = flows.lock().expect("poisoned");
                let seq = f.next_seq;
                f.next_seq += 1;
                let replies = tokio::spawn(udp_replies(
                    u.clone(),
                    socket.clone(),
                    (client, seq),
                    flows.clone(),
                    shared.clone(),
                ));
                f.by_client.insert(
                    client,
                    Flow {
                        upstream: u.clone(),
                        replies: replies.abort_handle(),
                        seq,
                    },
                );
                f.order.push_back((client, seq));
                stats.udp_flows.fetch_add(1, Ordering::Relaxed);
                u
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

/// Relays an upstream's replies to its client until the flow is idle; no
/// buffer is held while waiting.
async fn udp_replies(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    (client, seq): (SocketAddr, u64),
    flows: Arc<Mutex<Flows>>,
    shared: Arc<Shared>,
) {
    while let Ok(Ok(())) = tokio::time::timeout(shared.limits.udp_idle, upstream.readable()).await {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match upstream.try_recv(&mut buf) {
            Ok(n) => {
                let _ = socket.send_to(&buf[..n], client).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // An endpoint gone (ICMP unreachable) ends the flow.
            Err(_) => break,
        }
    }
    flows
        .lock()
        .expect("poisoned")
        .remove(&client, seq, &shared.stats);
}

/// `NAME_SERVICE_HOST` and `NAME_SERVICE_PORT` (the first port) of every
/// service in `namespace`, as Kubernetes names them.
pub fn service_env(services: &[ServiceView], namespace: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in services.iter().filter(|s| s.namespace == namespace) {
        let Some(first) = s.ports.first() else {
            continue;
        };
        let prefix = s.name.to_ascii_uppercase().replace('-', "_");
        out.push((format!("{prefix}_SERVICE_HOST"), s.cluster_ip.clone()));
        out.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::ServicePort;

    fn view(
        name: &str,
        ns: &str,
        vip: &str,
        ports: &[(u16, u16, Option<u16>)],
        eps: &[&str],
    ) -> ServiceView {
        ServiceView {
            namespace: ns.into(),
            name: name.into(),
            cluster_ip: vip.into(),
            ports: ports
                .iter()
                .map(|&(port, target, node_port)| ServicePort {
                    port,
                    target_port: Some(target),
                    protocol: Protocol::Tcp,
                    node_port,
                    name: String::new(),
                })
                .collect(),
            endpoints: eps.iter().map(|s| s.to_string()).collect(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn listeners_per_service_port_and_node_port_with_target_ports() {
        let w = wanted(&[view(
            "web",
            "default",
            "10.96.0.2",
            &[(80, 8080, Some(30080))],
            &["10.88.0.2", "10.88.1.2"],
        )]);
        assert_eq!(w.len(), 2);
        let vip = &w[&("10.96.0.2:80".parse().unwrap(), Protocol::Tcp)];
        assert_eq!(
            vip,
            &vec![
                "10.88.0.2:8080".parse::<SocketAddr>().unwrap(),
                "10.88.1.2:8080".parse().unwrap()
            ]
        );
        assert_eq!(&w[&("0.0.0.0:30080".parse().unwrap(), Protocol::Tcp)], vip);
    }

    #[test]
    fn endpoints_take_turns() {
        let b = Backends::default();
        *b.targets.write().unwrap() = vec![
            "10.88.0.2:80".parse().unwrap(),
            "10.88.1.2:80".parse().unwrap(),
            "10.88.1.3:80".parse().unwrap(),
        ];
        let firsts: Vec<SocketAddr> = (0..6).map(|_| b.order()[0]).collect();
        assert_eq!(firsts[0..3], firsts[3..6]);
        let distinct: HashSet<_> = firsts.iter().collect();
        assert_eq!(distinct.len(), 3);
        // Every order holds every endpoint (the rest are fallbacks).
        assert_eq!(b.order().len(), 3);
        assert!(Backends::default().order().is_empty());
    }

    fn shared(limits: ProxyLimits) -> Arc<Shared> {
        Arc::new(Shared::new(limits))
    }

    fn backends(targets: Vec<SocketAddr>) -> Arc<Backends> {
        Arc::new(Backends {
            targets: RwLock::new(targets),
            next: AtomicUsize::new(0),
        })
    }

    #[tokio::test]
    async fn tcp_connections_take_turns_and_skip_dead_endpoints() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Two loopback "pods" answering with their name, and one that is gone.
        let mut targets = Vec::new();
        for name in ["one", "two"] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            targets.push(l.local_addr().unwrap());
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let _ = s.write_all(name.as_bytes()).await;
                }
            });
        }
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        targets.insert(1, dead.local_addr().unwrap());
        drop(dead);
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let task = tokio::spawn(serve_tcp(
            front,
            backends(targets),
            shared(ProxyLimits::default()),
        ));
        let mut got = Vec::new();
        for _ in 0..4 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).await.unwrap();
            got.push(s);
        }
        task.abort();
        got.sort();
        assert_eq!(got, ["one", "one", "two", "two"], "the dead one is skipped");
    }

    /// A node proxy whose one listener sends to `target`: the proxy, the
    /// listener's address and its accept loop.
    async fn proxy_to(target: SocketAddr) -> (Arc<Proxy>, SocketAddr, tokio::task::JoinHandle<()>) {
        let proxy = Arc::new(Proxy::new(false, None));
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let task = tokio::spawn(serve_tcp(
            front,
            backends(vec![target]),
            proxy.shared.clone(),
        ));
        (proxy, addr, task)
    }

    #[tokio::test]
    async fn a_pod_leaving_waits_for_the_connections_it_has_to_end() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A "pod" that answers only when told to.
        let pod = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = pod.local_addr().unwrap();
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = pod.accept().await.unwrap();
            let _ = answered.await;
            let _ = s.write_all(b"done").await;
        });
        let (proxy, addr, task) = proxy_to(target).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET").await.unwrap();
        // The connection is through: not drained, for as long as it lasts.
        let ip = target.ip();
        while proxy.shared.open_to(ip) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!proxy.drained(ip, Duration::from_millis(50)).await);
        let waiting = tokio::spawn({
            let proxy = proxy.clone();
            async move { proxy.drained(ip, Duration::from_secs(60)).await }
        });
        answer.send(()).unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "done");
        assert!(waiting.await.unwrap(), "drained once the answer went out");
        assert_eq!(proxy.shared.open_to(ip), 0);
        // Another address was never busy.
        assert!(
            proxy
                .drained("10.0.0.9".parse().unwrap(), Duration::ZERO)
                .await
        );
        task.abort();
    }

    #[tokio::test]
    async fn connections_to_a_pod_that_is_gone_are_cut_not_left_hanging() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A "pod" that accepts, answers part of a reply, and then neither
        // answers nor closes (as one whose network was taken away).
        let pod = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = pod.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (mut s, _) = pod.accept().await.unwrap();
            s.write_all(b"HTTP/1.1 ").await.unwrap();
            std::future::pending::<()>().await;
            drop(s);
        });
        let (proxy, addr, task) = proxy_to(target).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut first = [0u8; 9];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 ");
        assert_eq!(proxy.cut("10.0.0.9".parse().unwrap()), 0, "not ours");
        assert_eq!(proxy.cut(target.ip()), 1);
        // The client sees the end instead of waiting for ever.
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
        assert!(proxy.drained(target.ip(), Duration::from_secs(60)).await);
        held.abort();
        task.abort();
    }

    #[tokio::test]
    async fn udp_flows_reach_an_endpoint_and_replies_come_back() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = echo.send_to(&reply, from).await;
            }
        });
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let task = tokio::spawn(serve_udp(
            front,
            backends(vec![target]),
            shared(ProxyLimits::default()),
        ));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for msg in ["a", "b"] {
            client.send_to(msg.as_bytes(), addr).await.unwrap();
            let mut buf = [0u8; 64];
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
            assert_eq!(from, addr, "replies come from the service address");
            assert_eq!(&buf[..n], format!("echo:{msg}").as_bytes());
        }
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_after_its_limit_without_traffic() {
        let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let m = moved.clone();
        // Traffic every second for ten seconds, then none.
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                m.fetch_add(1, Ordering::Relaxed);
            }
        });
        let t0 = tokio::time::Instant::now();
        idle(&moved, Duration::from_secs(4)).await;
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(14) && took <= Duration::from_secs(15),
            "{took:?}"
        );
    }

    /// A backend that accepts and says nothing, holding its sockets open.
    async fn silent_backend() -> SocketAddr {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = target.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = target.accept().await {
                held.push(s);
            }
        });
        addr
    }

    /// The tests counting this process's descriptors run one at a time.
    static FD_COUNTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// Raises this process's descriptor limit to the hard limit; returns it.
    fn raise_fd_limit() -> u64 {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit write and read the struct we own.
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        r.rlim_cur
    }

    async fn wait(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Issue 14 item 7: 10,000 idle TCP connections through one service
    /// port hold at most its cap of proxied connections (two descriptors
    /// each); the rest are closed on accept; the idle ones end after the
    /// idle limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_idle_tcp_connections_are_capped_and_time_out() {
        let _one_at_a_time = FD_COUNTING.lock().await;
        // The clients' own sockets live in this process too.
        let n = (raise_fd_limit().saturating_sub(2_000) as usize).min(10_000);
        assert!(n >= 1_000, "descriptor limit too low for this test");
        let target_addr = silent_backend().await;
        // Idle connections end only after the caps were counted (an idle
        // limit shorter than the time to open 10,000 would free permits
        // mid-way); the idle limit has a test of its own below.
        let limits = ProxyLimits {
            tcp_per_port: 100,
            tcp_idle: Some(Duration::from_secs(3600)),
            ..ProxyLimits::default()
        };
        let shared = shared(limits);
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let before = open_fds();
        let task = tokio::spawn(serve_tcp(
            front,
            backends(vec![target_addr]),
            shared.clone(),
        ));
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let stats = shared.stats.clone();
        wait("every connection accepted or refused", || {
            stats.tcp_refused.load(Ordering::Relaxed) + stats.tcp_open.load(Ordering::Relaxed) == n
        })
        .await;
        assert_eq!(stats.tcp_open.load(Ordering::Relaxed), 100);
        assert_eq!(stats.tcp_refused.load(Ordering::Relaxed), n - 100);
        // Descriptors beyond the clients' own: the proxied connections'
        // (two each, the backend holds one more each) and little else.
        let proxy_fds = open_fds().saturating_sub(before + n);
        assert!(proxy_fds <= 3 * 100 + 200, "{proxy_fds} descriptors");
        drop(clients);
        task.abort();
    }

    /// Proxied connections with no traffic end after the idle limit; the
    /// clients see them closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_tcp_connections_end_after_the_idle_limit() {
        use tokio::io::AsyncReadExt;
        let target_addr = silent_backend().await;
        let shared = shared(ProxyLimits {
            tcp_idle: Some(Duration::from_millis(400)),
            ..ProxyLimits::default()
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let task = tokio::spawn(serve_tcp(
            front,
            backends(vec![target_addr]),
            shared.clone(),
        ));
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let stats = shared.stats.clone();
        wait("idle connections closed", || {
            stats.tcp_idled.load(Ordering::Relaxed) == 5
        })
        .await;
        assert_eq!(stats.tcp_open.load(Ordering::Relaxed), 0);
        for mut c in clients {
            let mut b = [0u8; 1];
            assert_eq!(c.read(&mut b).await.unwrap_or(0), 0, "still open");
        }
        task.abort();
    }

    /// Issue 14 item 7: 100,000 UDP sources (distinct loopback addresses)
    /// keep the flow table at its cap, evicting the oldest, and the
    /// service still answers afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hundred_thousand_udp_sources_keep_the_flow_table_bounded() {
        let _one_at_a_time = FD_COUNTING.lock().await;
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let limits = ProxyLimits {
            udp_flows_per_port: 256,
            ..ProxyLimits::default()
        };
        let shared = shared(limits);
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let before = open_fds();
        let task = tokio::spawn(serve_udp(front, backends(vec![target]), shared.clone()));
        let stats = shared.stats.clone();
        let mut most = 0;
        for i in 0..100_000u32 {
            // 127.1.0.0 and up: one datagram from each address.
            let src = Ipv4Addr::from(0x7f01_0000 + i);
            let s = std::net::UdpSocket::bind((src, 0)).unwrap();
            let _ = s.send_to(b"x", addr);
            if i % 1000 == 999 {
                most = most.max(stats.udp_flows.load(Ordering::Relaxed));
                // Let the proxy keep up (loopback drops what overflows).
                tokio::task::yield_now().await;
            }
        }
        most = most.max(stats.udp_flows.load(Ordering::Relaxed));
        assert!(most <= 256, "{most} flows held");
        let proxy_fds = open_fds().saturating_sub(before);
        assert!(proxy_fds <= 256 + 200, "{proxy_fds} descriptors");
        assert!(
            stats.udp_evicted.load(Ordering::Relaxed) > 0,
            "no flow was evicted"
        );
        // A client after the flood still gets its answer.
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        let mut answered = false;
        for _ in 0..60 {
            client.send_to(b"after", addr).await.unwrap();
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_secs(1), client.recv_from(&mut buf)).await
            {
                assert_eq!(&buf[..n], b"after");
                answered = true;
                break;
            }
        }
        assert!(answered, "the service no longer answers");
        assert!(stats.udp_flows.load(Ordering::Relaxed) <= 256);
        task.abort();
    }

    #[test]
    fn env_vars_name_services_of_the_namespace() {
        let env = service_env(
            &[
                view(
                    "web-api",
                    "default",
                    "10.96.0.2",
                    &[(80, 80, None), (443, 443, None)],
                    &[],
                ),
                view("db", "prod", "10.96.0.3", &[(5432, 5432, None)], &[]),
            ],
            "default",
        );
        assert_eq!(
            env,
            [
                ("WEB_API_SERVICE_HOST".to_string(), "10.96.0.2".to_string()),
                ("WEB_API_SERVICE_PORT".to_string(), "80".to_string())
            ]
        );
    }
}
