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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

/// How long a connection attempt to one endpoint may take before the next
/// endpoint is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes each direction of a proxied connection reads at once.
const COPY_BUFFER: usize = 64 * 1024;
/// A UDP flow with no traffic for this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(60);

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
}

struct Listener {
    backends: Arc<Backends>,
    task: tokio::task::AbortHandle,
}

type ListenKey = (SocketAddrV4, Protocol);

/// The proxy's state; changes come from [`Proxy::update`].
pub struct Proxy {
    enabled: bool,
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
        // The previous run's addresses count as ours until the first table.
        let vips = vips_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default();
        Proxy {
            enabled,
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

    /// The current service table.
    pub fn table(&self) -> Arc<Vec<ServiceView>> {
        self.table.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<ServiceView>>> {
        self.table.subscribe()
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
                    .map(|l| tokio::spawn(serve_tcp(l, backends.clone()))),
                Protocol::Udp => std::net::UdpSocket::bind(key.0)
                    .and_then(|s| {
                        s.set_nonblocking(true)?;
                        UdpSocket::from_std(s)
                    })
                    .map(|s| tokio::spawn(serve_udp(Arc::new(s), backends.clone()))),
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

async fn connect_any(backends: &Backends) -> Option<TcpStream> {
    for target in backends.order() {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(s)) => return Some(s),
            Ok(Err(e)) => tracing::debug!(%target, "service endpoint refused: {e}"),
            Err(_) => tracing::debug!(%target, "service endpoint timed out"),
        }
    }
    None
}

async fn serve_tcp(listener: TcpListener, backends: Arc<Backends>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let backends = backends.clone();
        tokio::spawn(async move {
            // No endpoint: the client sees the connection close.
            let Some(mut outbound) = connect_any(&backends).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            // Large buffers: a bulk transfer moves in few syscalls.
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut inbound,
                &mut outbound,
                COPY_BUFFER,
                COPY_BUFFER,
            )
            .await;
        });
    }
}

/// UDP: each client address is a flow with its own upstream socket
/// connected to one endpoint; replies go back from the service address.
async fn serve_udp(socket: Arc<UdpSocket>, backends: Arc<Backends>) {
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let existing = flows.lock().expect("poisoned").get(&client).cloned();
        let upstream = match existing {
            Some(u) => u,
            None => {
                let Some(target) = backends.order().into_iter().next() else {
                    continue;
                };
                let Ok(u) = UdpSocket::bind("0.0.0.0:0").await else {
                    continue;
                };
                if u.connect(target).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                flows.lock().expect("poisoned").insert(client, u.clone());
                tokio::spawn(udp_replies(
                    u.clone(),
                    socket.clone(),
                    client,
                    flows.clone(),
                ));
                u
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

async fn udp_replies(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
) {
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, upstream.recv(&mut buf)).await {
        let _ = socket.send_to(&buf[..n], client).await;
    }
    flows.lock().expect("poisoned").remove(&client);
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
        let task = tokio::spawn(serve_tcp(front, backends(targets)));
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
        let task = tokio::spawn(serve_udp(front, backends(vec![target])));
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
