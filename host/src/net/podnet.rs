//! Pod sandboxes: a network namespace per pod that needs one, with loopback
//! and (in bridge mode) a veth into the node bridge and the pod's address;
//! and the per-pod thread that runs the pod's wasm members inside it, so
//! their WASI sockets live in the pod's namespace next to its containers.
//!
//! Namespaces are files: a thread `unshare`s a new network namespace and
//! bind-mounts it at `<data>/netns/<pod uid>`; the mount keeps it alive
//! across agent restarts, containers join it by path, and removing the pod
//! unmounts it. No global `ip netns` names are used.

use crate::net::netlink::{self, Netlink};
use flotilla_api::net::Cidr;
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How the agent gives pods a network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetMode {
    /// A namespace per pod, a veth into the node bridge, the pod's address.
    #[default]
    Bridge,
    /// A namespace per pod with loopback only: members reach each other on
    /// localhost and nothing else (no address, no routes).
    Loopback,
    /// Pods share the node's network (agents that cannot make namespaces).
    Host,
}

impl std::str::FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<NetMode, String> {
        match s {
            "bridge" => Ok(NetMode::Bridge),
            "loopback" => Ok(NetMode::Loopback),
            "host" => Ok(NetMode::Host),
            _ => Err(format!(
                "unknown pod network '{s}' (bridge, loopback or host)"
            )),
        }
    }
}

impl std::fmt::Display for NetMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetMode::Bridge => "bridge",
            NetMode::Loopback => "loopback",
            NetMode::Host => "host",
        })
    }
}

/// The node bridge's name.
pub const BRIDGE: &str = "flt0";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn ctx(what: &'static str) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Io { what, source }
}

/// The node's side of pod networking: the namespace directory, the bridge
/// and its address block.
pub struct PodNetwork {
    mode: NetMode,
    dir: PathBuf,
    /// The agent's own namespace (veth host ends are moved there).
    root_ns: Option<File>,
    /// A netlink socket in the agent's namespace.
    root: Mutex<Option<Netlink>>,
    state: Mutex<State>,
    /// Set once the bridge is up: (node block, cluster pod CIDR). The DNS
    /// responder and the tunnel start then, not before.
    ready: tokio::sync::watch::Sender<Option<Bridge>>,
    /// Route straight to other nodes' blocks where their address is on a
    /// directly connected network (faster; plain, not through the tunnel).
    direct_routes: bool,
    /// Spare namespaces (loopback up), made after a pod's sandbox for the
    /// next ones; none until the first networked pod.
    pool: Mutex<Vec<PathBuf>>,
    spares: std::sync::atomic::AtomicU64,
    refilling: std::sync::atomic::AtomicBool,
}

/// The node's bridge, once it is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bridge {
    /// The node's block; the bridge has its gateway address.
    pub block: Cidr,
    /// Every node's pods (routed into the tunnel), when the scheduler said.
    pub cluster: Option<Cidr>,
}

#[derive(Default)]
struct State {
    cidr: Option<Cidr>,
    cluster: Option<Cidr>,
    bridge_index: Option<i32>,
    /// Other nodes' blocks and addresses (from the scheduler).
    peers: Vec<(Cidr, Ipv4Addr)>,
    /// Blocks with a direct route installed.
    routed: std::collections::HashSet<Cidr>,
}

/// A pod's network: its namespace file (none on the host network) and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub netns: Option<PathBuf>,
    pub ip: Option<Ipv4Addr>,
}

/// The host end of a pod's veth pair, named after the pod (15 bytes at most).
pub fn host_veth(uid: &str) -> String {
    let h = uid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("vf{:012x}", h & 0xffff_ffff_ffff)
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Whether `path` is a bind-mounted namespace (a live sandbox).
fn is_ns_mount(path: &Path) -> bool {
    // `f_type`'s width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == NSFS_MAGIC)
}

/// Namespaces kept ready ahead of pods that need one.
const POOL: usize = 2;
/// File names of spare namespaces in the namespace directory.
const POOL_PREFIX: &str = ".spare-";

/// A new network namespace with loopback up, bind-mounted at `path`, made by
/// a thread of its own (which ends right after).
fn new_namespace(path: &Path) -> Result<(), NetError> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(), NetError> {
            // SAFETY: unshare(2) on this thread only; it ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(ctx("creating a network namespace")(
                    io::Error::last_os_error(),
                ));
            }
            File::create(path).map_err(ctx("creating the namespace file"))?;
            rustix::mount::mount_bind("/proc/thread-self/ns/net", path)
                .map_err(|e| ctx("bind-mounting the namespace")(e.into()))?;
            let mut nl = Netlink::open().map_err(ctx("opening netlink in the pod"))?;
            nl.set_up(netlink::index_of("lo").map_err(ctx("finding lo"))?, None)
                .map_err(ctx("setting lo up"))
        })
        .join()
        .unwrap_or_else(|_| Err(ctx("namespace thread")(io::Error::other("panicked"))))
    })
}

/// Drops a namespace mount and its file (a spare's; failures ignored).
fn discard(path: &Path) {
    let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
    let _ = std::fs::remove_file(path);
}

/// Runs `f` on a thread of its own inside the namespace at `path`.
fn in_namespace<T: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    let ns = File::open(path).map_err(ctx("opening the pod's namespace"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&ns).map_err(ctx("entering the pod's namespace"))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(ctx("namespace thread")(io::Error::other("panicked"))))
    })
}

impl PodNetwork {
    /// Called on a thread in the agent's own namespace.
    /// `direct_routes`: see [`PodNetwork::set_peers`].
    pub fn new(mode: NetMode, dir: PathBuf, direct_routes: bool) -> Result<PodNetwork, NetError> {
        let (root_ns, root) = match mode {
            NetMode::Host => (None, None),
            _ => {
                std::fs::create_dir_all(&dir).map_err(ctx("creating the namespace directory"))?;
                let ns = File::open("/proc/thread-self/ns/net")
                    .map_err(ctx("opening the agent's network namespace"))?;
                let nl = match mode {
                    NetMode::Bridge => Some(Netlink::open().map_err(ctx("opening netlink"))?),
                    _ => None,
                };
                (Some(ns), nl)
            }
        };
        let net = PodNetwork {
            mode,
            dir,
            root_ns,
            root: Mutex::new(root),
            state: Mutex::new(State::default()),
            ready: tokio::sync::watch::Sender::new(None),
            direct_routes,
            pool: Mutex::new(Vec::new()),
            spares: std::sync::atomic::AtomicU64::new(0),
            refilling: std::sync::atomic::AtomicBool::new(false),
        };
        // Direct routes an earlier run installed count as ours, so those of
        // nodes gone meanwhile are removed with the first peer table.
        if let Ok(text) = std::fs::read_to_string(net.routes_file()) {
            net.state.lock().expect("poisoned").routed =
                text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        }
        // The blocks of an earlier run, so saved pods get their network back
        // before the scheduler is reached.
        if mode == NetMode::Bridge
            && let Ok(s) = std::fs::read_to_string(net.cidr_file())
        {
            let mut lines = s.lines().map(|l| l.trim().parse::<Cidr>().ok());
            if let Some(Some(block)) = lines.next()
                && let Err(e) = net.set_cidr(block, lines.next().flatten())
            {
                tracing::warn!("pod network bridge: {e}");
            }
        }
        Ok(net)
    }

    /// Changes to the bridge (none until a pod or a service needs it).
    pub fn bridge_ready(&self) -> tokio::sync::watch::Receiver<Option<Bridge>> {
        self.ready.subscribe()
    }

    pub fn mode(&self) -> NetMode {
        self.mode
    }

    fn cidr_file(&self) -> PathBuf {
        self.dir.join("node-cidr")
    }

    fn routes_file(&self) -> PathBuf {
        self.dir.join("direct-routes")
    }

    pub fn cidr(&self) -> Option<Cidr> {
        self.state.lock().expect("poisoned").cidr
    }

    /// The node's address block and the cluster's pod CIDR (from the
    /// scheduler), remembered for later runs. The bridge is made only when
    /// a pod or a service needs it ([`PodNetwork::ensure_bridge`]) — a node
    /// running socket-free wasm pods changes nothing in the host's network —
    /// or right away if an earlier run left it.
    pub fn set_cidr(&self, block: Cidr, cluster: Option<Cidr>) -> Result<(), NetError> {
        if self.mode != NetMode::Bridge {
            return Ok(());
        }
        let known = {
            let mut st = self.state.lock().expect("poisoned");
            let known = (st.cidr, st.cluster) == (Some(block), cluster);
            if !known {
                let text = match cluster {
                    Some(c) => format!("{block}\n{c}\n"),
                    None => format!("{block}\n"),
                };
                let _ = std::fs::write(self.cidr_file(), text);
                st.cidr = Some(block);
                st.cluster = cluster;
                st.bridge_index = None;
            }
            known
        };
        if !known && netlink::index_of(BRIDGE).is_ok() {
            self.ensure_bridge()?;
        }
        Ok(())
    }

    /// Makes sure the bridge exists, up, with the block's gateway address;
    /// the first time, tells [`PodNetwork::bridge_ready`] watchers. `None`:
    /// no bridge (another mode, or no block from the scheduler yet).
    pub fn ensure_bridge(&self) -> Result<Option<i32>, NetError> {
        let (block, cluster) = {
            let st = self.state.lock().expect("poisoned");
            if st.bridge_index.is_some() || self.mode != NetMode::Bridge {
                return Ok(st.bridge_index);
            }
            match st.cidr {
                Some(b) => (b, st.cluster),
                None => return Ok(None),
            }
        };
        let index = {
            let mut root = self.root.lock().expect("poisoned");
            let nl = root.as_mut().expect("bridge mode has a root socket");
            nl.add_bridge(BRIDGE)
                .map_err(ctx("creating the node bridge"))?;
            let index = netlink::index_of(BRIDGE).map_err(ctx("finding the node bridge"))?;
            nl.add_addr(index, block.gateway(), block.prefix)
                .map_err(ctx("addressing the node bridge"))?;
            nl.set_up(index, None)
                .map_err(ctx("setting the node bridge up"))?;
            index
        };
        self.state.lock().expect("poisoned").bridge_index = Some(index);
        // Pods' packets pass between the bridge and the node's other links.
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1") {
            tracing::warn!("cannot turn on IPv4 forwarding: {e}");
        }
        self.ready.send_replace(Some(Bridge { block, cluster }));
        self.sync_routes();
        Ok(Some(index))
    }

    /// Other nodes' blocks and addresses. With direct routes on, each block
    /// whose node address is on a directly connected network gets a route
    /// via that address (the kernel refuses the others, which stay with the
    /// tunnel's route for the whole cluster CIDR); routes of nodes gone are
    /// removed.
    pub fn set_peers(&self, peers: &[flotilla_api::proto::Peer]) {
        let parsed = peers
            .iter()
            .filter_map(|p| Some((p.pod_cidr.parse().ok()?, p.address.parse().ok()?)))
            .collect();
        self.state.lock().expect("poisoned").peers = parsed;
        self.sync_routes();
    }

    /// Blocks of other nodes routed directly (not through the tunnel).
    pub fn direct_routes(&self) -> Vec<Cidr> {
        let mut v: Vec<Cidr> = self
            .state
            .lock()
            .expect("poisoned")
            .routed
            .iter()
            .copied()
            .collect();
        v.sort_by_key(|c| u32::from(c.base));
        v
    }

    fn sync_routes(&self) {
        if !self.direct_routes || self.mode != NetMode::Bridge {
            return;
        }
        let mut st = self.state.lock().expect("poisoned");
        if st.bridge_index.is_none() {
            return;
        }
        let mut root = self.root.lock().expect("poisoned");
        let nl = root.as_mut().expect("bridge mode has a root socket");
        let own = st.cidr;
        let mut routed = std::collections::HashSet::new();
        for (block, via) in st.peers.clone() {
            if Some(block) == own {
                continue;
            }
            match nl.replace_route(block.base, block.prefix, Some(via), None) {
                Ok(()) => {
                    routed.insert(block);
                }
                Err(e) => {
                    tracing::debug!(%block, %via, "no direct route ({e}): through the tunnel")
                }
            }
        }
        for gone in st.routed.difference(&routed) {
            if let Err(e) = nl.del_route(gone.base, gone.prefix) {
                tracing::warn!(block = %gone, "removing a direct route: {e}");
            }
        }
        if routed != st.routed {
            let text: String = routed.iter().map(|c| format!("{c}\n")).collect();
            if let Err(e) = std::fs::write(self.routes_file(), text) {
                tracing::warn!("recording direct routes: {e}");
            }
        }
        st.routed = routed;
    }

    fn ns_path(&self, uid: &str) -> PathBuf {
        self.dir.join(uid)
    }

    /// The pod's sandbox: reused when it exists (an agent restart keeps
    /// running pods' networking), made otherwise. Blocking.
    pub fn sandbox(&self, uid: &str, ip: Option<Ipv4Addr>) -> Result<Sandbox, NetError> {
        if self.mode == NetMode::Host {
            return Ok(Sandbox {
                netns: None,
                ip: None,
            });
        }
        let path = self.ns_path(uid);
        let bridge = match (self.mode, ip) {
            (NetMode::Bridge, Some(_)) => self.ensure_bridge()?,
            _ => None,
        };
        let cidr = self.cidr();
        let wired = match (self.mode, ip, cidr, bridge) {
            (NetMode::Bridge, Some(ip), Some(cidr), Some(bridge)) if cidr.contains(ip) => {
                Some((ip, cidr, bridge))
            }
            (NetMode::Bridge, Some(ip), _, _) => {
                tracing::warn!(pod = uid, %ip, "the pod's address is not in this node's block: loopback only");
                None
            }
            _ => None,
        };
        if is_ns_mount(&path) {
            return Ok(Sandbox {
                netns: Some(path),
                ip: wired.map(|w| w.0),
            });
        }
        let root_ns = self
            .root_ns
            .as_ref()
            .expect("namespaces need the root namespace");
        let veth = host_veth(uid);
        let root = &self.root;
        let made = self.take_namespace(&path).and_then(|()| {
            let Some((ip, cidr, bridge)) = wired else {
                return Ok(());
            };
            in_namespace(&path, || {
                let mut nl = Netlink::open().map_err(ctx("opening netlink in the pod"))?;
                nl.add_veth("eth0", &veth, root_ns.as_fd().as_raw_fd())
                    .map_err(ctx("creating the veth pair"))?;
                root.lock()
                    .expect("poisoned")
                    .as_mut()
                    .expect("bridge mode has a root socket")
                    .set_up_named(&veth, Some(bridge))
                    .map_err(ctx("attaching the veth to the bridge"))?;
                let eth0 = netlink::index_of("eth0").map_err(ctx("finding eth0"))?;
                nl.add_addr(eth0, ip, cidr.prefix)
                    .map_err(ctx("addressing the pod"))?;
                nl.set_up(eth0, None).map_err(ctx("setting eth0 up"))?;
                nl.replace_route(Ipv4Addr::UNSPECIFIED, 0, Some(cidr.gateway()), Some(eth0))
                    .map_err(ctx("adding the pod's default route"))
            })
        });
        if let Err(e) = made {
            self.release(uid);
            return Err(e);
        }
        Ok(Sandbox {
            netns: Some(path),
            ip: wired.map(|w| w.0),
        })
    }

    /// A namespace with loopback up, mounted at `path`: one made ahead of
    /// time if the pool has one (bind-mounted here, its pool mount
    /// dropped), else a new one. Blocking.
    fn take_namespace(&self, path: &Path) -> Result<(), NetError> {
        let spare = self.pool.lock().expect("poisoned").pop();
        if let Some(spare) = spare {
            let moved = File::create(path)
                .map_err(ctx("creating the namespace file"))
                .and_then(|_| {
                    rustix::mount::mount_bind(&spare, path)
                        .map_err(|e| ctx("bind-mounting the namespace")(e.into()))
                });
            discard(&spare);
            if moved.is_ok() {
                return Ok(());
            }
        }
        new_namespace(path)
    }

    /// Fills the pool of namespaces made ahead of time (the slow part of a
    /// sandbox: about two thirds of it), so the next pods skip that. Called
    /// after a sandbox is made, off the pod's start path. Blocking.
    pub fn refill(&self) {
        use std::sync::atomic::Ordering;
        if self.mode == NetMode::Host || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        self.fill_pool();
        self.refilling.store(false, Ordering::Release);
    }

    fn fill_pool(&self) {
        while self.pool.lock().expect("poisoned").len() < POOL {
            let n = self
                .spares
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = self.dir.join(format!("{POOL_PREFIX}{n}"));
            match new_namespace(&path) {
                Ok(()) => self.pool.lock().expect("poisoned").push(path),
                Err(e) => {
                    tracing::warn!("making a spare pod namespace: {e}");
                    discard(&path);
                    return;
                }
            }
        }
    }

    /// Removes the spare namespaces (the agent is stopping). Blocking.
    pub fn drain_pool(&self) {
        let spares = std::mem::take(&mut *self.pool.lock().expect("poisoned"));
        for p in spares {
            discard(&p);
        }
    }

    /// Tears a pod's sandbox down: its veth, its namespace mount and file.
    /// Missing pieces are fine. Blocking.
    pub fn release(&self, uid: &str) {
        if self.mode == NetMode::Host {
            return;
        }
        if let Some(nl) = self.root.lock().expect("poisoned").as_mut()
            && let Err(e) = nl.del_link(&host_veth(uid))
        {
            tracing::warn!(pod = uid, "removing the pod's veth: {e}");
        }
        let path = self.ns_path(uid);
        if is_ns_mount(&path)
            && let Err(e) = rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH)
        {
            tracing::warn!(pod = uid, "unmounting the pod's namespace: {e}");
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(pod = uid, "removing the pod's namespace file: {e}"),
        }
    }

    /// Releases the sandboxes of pods not in `keep` (left by pods that are
    /// gone). Blocking.
    pub fn reap(&self, keep: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "node-cidr" || name == "direct-routes" || keep.contains(&name) {
                continue;
            }
            tracing::info!(pod = %name, "removing the network of a pod this node no longer runs");
            self.release(&name);
        }
    }

    /// Pod uids with a sandbox on this node.
    pub fn sandboxes(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "node-cidr" && n != "direct-routes" && !n.starts_with(POOL_PREFIX))
            .collect()
    }
}

/// A thread inside a pod's network namespace running a single-threaded tokio
/// runtime: every socket the pod's wasm members open is made there. Dropping
/// it ends the thread and whatever still runs on it.
pub struct PodThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: setns(2) with a namespace fd we own, affecting this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl PodThread {
    /// Starts the thread in the namespace at `netns` (`None`: the agent's).
    pub fn start(name: &str, netns: Option<&Path>) -> Result<PodThread, NetError> {
        let ns = match netns {
            Some(p) => Some(Arc::new(
                File::open(p).map_err(ctx("opening the pod's namespace"))?,
            )),
            None => None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("pod-{}", name.chars().take(10).collect::<String>()))
            .spawn(move || {
                if let Some(ns) = &ns
                    && let Err(e) = enter(ns)
                {
                    let _ = tx.send(Err(e));
                    return;
                }
                // Blocking-pool threads (name lookups, file I/O) enter too.
                let on_start = ns.clone();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_start(move || {
                        if let Some(ns) = &on_start
                            && let Err(e) = enter(ns)
                        {
                            tracing::error!(
                                "pod runtime thread cannot enter the pod namespace: {e}"
                            );
                        }
                    })
                    .build();
                match rt {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        let _ = rt.block_on(stopped);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(ctx("starting the pod thread"))?;
        let handle = rx
            .recv()
            .map_err(|_| ctx("starting the pod thread")(io::Error::other("thread ended")))?
            .map_err(ctx("entering the pod's namespace"))?;
        Ok(PodThread {
            handle,
            stop: Some(stop),
        })
    }

    /// Runs `fut` on the pod thread; the returned guard aborts it when dropped.
    pub fn spawn<F>(&self, fut: F) -> Abortable<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        Abortable(self.handle.spawn(fut))
    }
}

impl Drop for PodThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A task on a pod thread, aborted when dropped (a stopped member must not
/// keep running there).
pub struct Abortable<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Abortable<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for Abortable<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_fit_the_kernel_limit_and_differ_per_pod() {
        let a = host_veth("8c0a3f0e-2a47-4c1b-9d0b-3f1f8f7a6c11");
        let b = host_veth("8c0a3f0e-2a47-4c1b-9d0b-3f1f8f7a6c12");
        assert!(a.len() <= 15 && a.starts_with("vf"), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, host_veth("8c0a3f0e-2a47-4c1b-9d0b-3f1f8f7a6c11"));
    }

    #[test]
    fn modes_parse_and_print() {
        for m in ["bridge", "loopback", "host"] {
            assert_eq!(m.parse::<NetMode>().unwrap().to_string(), m);
        }
        assert!("cni".parse::<NetMode>().unwrap_err().contains("bridge"));
    }
}
