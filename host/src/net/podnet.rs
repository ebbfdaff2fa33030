//! Pod sandboxes: a network namespace per pod that needs one, with loopback
//! and (in bridge mode) a veth into the node bridge and the pod's address;
//! and the per-pod thread that runs the pod's wasm members inside it, so
//! their WASI sockets live in the pod's namespace next to its containers.
//!
//! Namespaces are files: a thread `unshare`s a new network namespace and
//! bind-mounts it at `<data>/netns/<pod uid>`; the mount keeps it alive
//! across agent restarts, containers join it by path, and removing the pod
//! unmounts it. No global `ip netns` names are used.

use crate::net::firewall::Policy;
pub use crate::net::sys::NetError;
use crate::net::sys::{Kernel, NetSys, PodAddr, ctx, enter};
use flotilla_api::net::Cidr;
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
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

/// How a bridged pod network behaves beyond its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// Route straight to other nodes' blocks where their address is on a
    /// directly connected network (see [`PodNetwork::set_peers`]).
    pub direct_routes: bool,
    /// Filter what reaches pods and what pods reach on the node
    /// ([`crate::net::firewall`]). On unless an admin turns it off.
    pub firewall: bool,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            direct_routes: false,
            firewall: true,
        }
    }
}

/// The node bridge's name.
pub const BRIDGE: &str = "flt0";

/// The node's side of pod networking: the namespace directory, the bridge
/// and its address block.
pub struct PodNetwork {
    mode: NetMode,
    dir: PathBuf,
    /// The kernel (`None` on the host network: nothing to make).
    sys: Option<Arc<dyn NetSys>>,
    state: Mutex<State>,
    /// Set once the bridge is up: (node block, cluster pod CIDR). The DNS
    /// responder and the tunnel start then, not before.
    ready: tokio::sync::watch::Sender<Option<Bridge>>,
    /// Route straight to other nodes' blocks where their address is on a
    /// directly connected network (faster; plain, not through the tunnel).
    direct_routes: bool,
    firewall: bool,
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
    /// What the node's filter lets through (its gateway is set once the
    /// bridge is up, and the filter is loaded from then on).
    firewall: Policy,
    /// The script last loaded, so unchanged tables load nothing.
    loaded: Option<String>,
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

/// Namespaces kept ready ahead of pods that need one.
const POOL: usize = 2;
/// File names of spare namespaces in the namespace directory.
const POOL_PREFIX: &str = ".spare-";

/// Drops a spare namespace's mount and file (failures ignored).
fn discard(sys: &dyn NetSys, path: &Path) {
    let _ = sys.unpin(path);
    let _ = std::fs::remove_file(path);
}

impl PodNetwork {
    /// Called on a thread in the agent's own namespace.
    pub fn new(mode: NetMode, dir: PathBuf, opts: NetOptions) -> Result<PodNetwork, NetError> {
        let sys: Option<Arc<dyn NetSys>> = match mode {
            NetMode::Host => None,
            _ => Some(Arc::new(Kernel::open()?)),
        };
        PodNetwork::with_sys(mode, dir, opts, sys)
    }

    /// Like [`PodNetwork::new`], on the given kernel (a fake in tests).
    pub fn with_sys(
        mode: NetMode,
        dir: PathBuf,
        opts: NetOptions,
        sys: Option<Arc<dyn NetSys>>,
    ) -> Result<PodNetwork, NetError> {
        if mode != NetMode::Host {
            std::fs::create_dir_all(&dir).map_err(ctx("creating the namespace directory"))?;
        }
        let net = PodNetwork {
            mode,
            dir,
            sys,
            state: Mutex::new(State::default()),
            ready: tokio::sync::watch::Sender::new(None),
            direct_routes: opts.direct_routes,
            firewall: opts.firewall,
            pool: Mutex::new(Vec::new()),
            spares: std::sync::atomic::AtomicU64::new(0),
            refilling: std::sync::atomic::AtomicBool::new(false),
        };
        // Spare namespaces of an earlier run go now, before this run makes
        // spares of its own under the same names.
        if let (Some(sys), Ok(entries)) = (&net.sys, std::fs::read_dir(&net.dir)) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(POOL_PREFIX) {
                    discard(&**sys, &e.path());
                }
            }
        }
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
        if !known && self.sys().link_exists(BRIDGE) {
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
        let index = self.sys().bridge(BRIDGE, block.gateway(), block.prefix)?;
        // The filter before forwarding, so no packet is forwarded unfiltered;
        // a node that cannot filter gives pods no network (the admin may
        // turn the filter off).
        self.state.lock().expect("poisoned").firewall.gateway = Some(block.gateway());
        if let Err(e) = self.sync_firewall() {
            self.state.lock().expect("poisoned").firewall.gateway = None;
            return Err(ctx("loading the pod network filter")(e));
        }
        // Packets coming in on the bridge (and the tunnel, which turns its
        // own on) may be forwarded; other interfaces are left as they are,
        // except with direct routes, where peers' packets come in on them.
        let forwarding = if self.direct_routes {
            self.sys().forward_all()
        } else {
            self.sys().forward_on(BRIDGE)
        };
        if let Err(e) = forwarding {
            tracing::warn!("cannot turn on IPv4 forwarding: {e}");
        }
        self.state.lock().expect("poisoned").bridge_index = Some(index);
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
        let parsed: Vec<(Cidr, Ipv4Addr)> = peers
            .iter()
            .filter_map(|p| Some((p.pod_cidr.parse().ok()?, p.address.parse().ok()?)))
            .collect();
        {
            let mut st = self.state.lock().expect("poisoned");
            if self.direct_routes && self.mode == NetMode::Bridge {
                st.firewall.direct_from = st
                    .cluster
                    .into_iter()
                    .chain(parsed.iter().map(|(_, addr)| Cidr {
                        base: *addr,
                        prefix: 32,
                    }))
                    .collect();
            }
            st.peers = parsed;
        }
        if let Err(e) = self.sync_firewall() {
            tracing::error!("pod network filter: {e}");
        }
        self.sync_routes();
    }

    /// The service table: its virtual IPs' ports and node ports are what
    /// pods may reach on the node besides DNS.
    pub fn set_services(&self, table: &[flotilla_api::proto::ServiceView]) {
        if self.mode != NetMode::Bridge {
            return;
        }
        self.state
            .lock()
            .expect("poisoned")
            .firewall
            .set_services(table);
        if let Err(e) = self.sync_firewall() {
            tracing::error!("pod network filter: {e}");
        }
    }

    /// Loads the filter if the bridge is up and the policy changed since
    /// the last load.
    fn sync_firewall(&self) -> io::Result<()> {
        if !self.firewall || self.mode != NetMode::Bridge {
            return Ok(());
        }
        let mut st = self.state.lock().expect("poisoned");
        if st.firewall.gateway.is_none() {
            return Ok(());
        }
        let script = st.firewall.script();
        if st.loaded.as_deref() == Some(script.as_str()) {
            return Ok(());
        }
        self.sys().load_firewall(&script)?;
        st.loaded = Some(script);
        Ok(())
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
        let sys = self.sys();
        let own = st.cidr;
        let mut routed = std::collections::HashSet::new();
        for (block, via) in st.peers.clone() {
            if Some(block) == own {
                continue;
            }
            match sys.replace_route(block.base, block.prefix, via) {
                Ok(()) => {
                    routed.insert(block);
                }
                Err(e) => {
                    tracing::debug!(%block, %via, "no direct route ({e}): through the tunnel")
                }
            }
        }
        for gone in st.routed.difference(&routed) {
            if let Err(e) = sys.del_route(gone.base, gone.prefix) {
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

    /// The kernel; only called outside host mode.
    fn sys(&self) -> &dyn NetSys {
        &**self.sys.as_ref().expect("pod namespaces need the kernel")
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
        if self.sys().is_pinned(&path) {
            return Ok(Sandbox {
                netns: Some(path),
                ip: wired.map(|w| w.0),
            });
        }
        let made = self.take_namespace(&path).and_then(|()| {
            let Some((ip, cidr, bridge)) = wired else {
                return Ok(());
            };
            let pod = PodAddr {
                ip,
                prefix: cidr.prefix,
                gateway: cidr.gateway(),
            };
            self.sys().wire(&path, &host_veth(uid), bridge, pod)
        });
        if let Err(e) = made {
            let _ = self.release(uid);
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
        let sys = self.sys();
        let spare = self.pool.lock().expect("poisoned").pop();
        if let Some(spare) = spare {
            let moved = sys.pin(&spare, path);
            discard(sys, &spare);
            if moved.is_ok() {
                return Ok(());
            }
            let _ = std::fs::remove_file(path);
        }
        sys.new_namespace(path)
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
            match self.sys().new_namespace(&path) {
                Ok(()) => self.pool.lock().expect("poisoned").push(path),
                Err(e) => {
                    tracing::warn!("making a spare pod namespace: {e}");
                    discard(self.sys(), &path);
                    return;
                }
            }
        }
    }

    /// Removes the spare namespaces (the agent is stopping). Blocking.
    pub fn drain_pool(&self) {
        let spares = std::mem::take(&mut *self.pool.lock().expect("poisoned"));
        for p in spares {
            discard(self.sys(), &p);
        }
    }

    /// Tears a pod's sandbox down: its veth, its namespace mount and file.
    /// Missing pieces are fine. Blocking.
    /// Whether all of it is gone (a failure is logged; the pod's address
    /// is then not reported free).
    pub fn release(&self, uid: &str) -> bool {
        if self.mode == NetMode::Host {
            return true;
        }
        let sys = self.sys();
        let mut clean = true;
        if self.mode == NetMode::Bridge
            && let Err(e) = sys.del_link(&host_veth(uid))
            && e.raw_os_error() != Some(libc::ENODEV)
        {
            tracing::warn!(pod = uid, "removing the pod's veth: {e}");
            clean = false;
        }
        let path = self.ns_path(uid);
        if sys.is_pinned(&path)
            && let Err(e) = sys.unpin(&path)
        {
            tracing::warn!(pod = uid, "unmounting the pod's namespace: {e}");
            clean = false;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(pod = uid, "removing the pod's namespace file: {e}");
                clean = false;
            }
        }
        clean
    }

    /// The sandboxes there are now of pods not in `keep`: what an agent
    /// starting up may have to remove (see [`PodNetwork::release_stale`]).
    pub fn stale(&self, keep: &HashSet<String>) -> Vec<String> {
        self.sandboxes()
            .into_iter()
            .filter(|uid| !keep.contains(uid))
            .collect()
    }

    /// Releases those of `stale` whose pods are still not wanted (`keep`,
    /// read now): sandboxes made since `stale` was listed are never among
    /// them, however long the agent took to get here. Blocking.
    pub fn release_stale(&self, stale: &[String], keep: &HashSet<String>) {
        for uid in stale.iter().filter(|u| !keep.contains(*u)) {
            tracing::info!(pod = %uid, "removing the network of a pod this node no longer runs");
            let _ = self.release(uid);
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

impl<T> Abortable<T> {
    /// Aborts the task and waits (at most `limit`) until its future is
    /// dropped — what it held (a guest's sockets) is closed by then.
    pub async fn cancel(mut self, limit: std::time::Duration) {
        self.0.abort();
        let _ = tokio::time::timeout(limit, &mut self.0).await;
    }
}

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

    use crate::net::sys::fake::FakeNet;

    fn network(mode: NetMode, direct: bool) -> (tempfile::TempDir, Arc<FakeNet>, PodNetwork) {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeNet::default());
        let net = PodNetwork::with_sys(
            mode,
            dir.path().join("netns"),
            NetOptions {
                direct_routes: direct,
                ..NetOptions::default()
            },
            Some(fake.clone() as Arc<dyn NetSys>),
        )
        .unwrap();
        (dir, fake, net)
    }

    fn block() -> Cidr {
        "10.88.3.0/24".parse().unwrap()
    }

    const POD: &str = "6f1d2a9e-0000-4000-8000-000000000001";

    #[test]
    fn a_bridged_sandbox_is_a_pinned_namespace_wired_to_the_bridge_with_the_pod_address() {
        let (_d, fake, net) = network(NetMode::Bridge, false);
        let ip: Ipv4Addr = "10.88.3.7".parse().unwrap();
        // No block from the scheduler yet: nothing to wire to, and the
        // bridge is not made before a pod needs it.
        net.set_cidr(block(), Some("10.88.0.0/16".parse().unwrap()))
            .unwrap();
        assert!(
            fake.take_calls().is_empty(),
            "no bridge before a pod needs it"
        );
        let mut ready = net.bridge_ready();
        let sb = net.sandbox(POD, Some(ip)).unwrap();
        assert_eq!(sb.ip, Some(ip));
        assert_eq!(sb.netns.as_deref(), Some(net.ns_path(POD).as_path()));
        let veth = host_veth(POD);
        assert_eq!(
            fake.take_calls(),
            vec![
                "bridge flt0 10.88.3.1/24".to_string(),
                "load_firewall ".into(),
                "forward_on flt0".into(),
                format!("new_namespace {POD}"),
                format!("wire {POD} {veth} bridge 7 10.88.3.7/24 via 10.88.3.1"),
            ]
        );
        assert_eq!(
            *ready.borrow_and_update(),
            Some(Bridge {
                block: block(),
                cluster: Some("10.88.0.0/16".parse().unwrap())
            })
        );
        // An agent restart finds it pinned: reused as it is, nothing made.
        let again = net.sandbox(POD, Some(ip)).unwrap();
        assert_eq!(again, sb);
        assert!(fake.take_calls().is_empty());
        assert_eq!(net.sandboxes(), vec![POD.to_string()]);

        // Removal: veth, namespace mount, file.
        net.release(POD);
        assert_eq!(
            fake.take_calls(),
            vec![format!("del_link {veth}"), format!("unpin {POD}")]
        );
        assert!(!net.ns_path(POD).exists());
        assert!(fake.world().pinned.is_empty());
        assert_eq!(
            *fake.world().links.iter().collect::<Vec<_>>(),
            [&"flt0".to_string()]
        );
    }

    #[test]
    fn an_address_outside_the_block_gets_loopback_only_and_loopback_mode_never_wires() {
        let (_d, fake, net) = network(NetMode::Bridge, false);
        net.set_cidr(block(), None).unwrap();
        let sb = net
            .sandbox(POD, Some("10.99.0.5".parse().unwrap()))
            .unwrap();
        assert_eq!(sb.ip, None);
        let calls = fake.take_calls();
        assert!(calls.contains(&format!("new_namespace {POD}")), "{calls:?}");
        assert!(!calls.iter().any(|c| c.starts_with("wire")), "{calls:?}");

        let (_d, fake, net) = network(NetMode::Loopback, false);
        let sb = net
            .sandbox(POD, Some("10.88.3.9".parse().unwrap()))
            .unwrap();
        assert_eq!((sb.ip, sb.netns.is_some()), (None, true));
        assert_eq!(fake.take_calls(), vec![format!("new_namespace {POD}")]);
        net.release(POD);
        assert_eq!(fake.take_calls(), vec![format!("unpin {POD}")]);
    }

    #[test]
    fn a_sandbox_that_fails_half_way_is_taken_down_again() {
        let (_d, fake, net) = network(NetMode::Bridge, false);
        net.set_cidr(block(), None).unwrap();
        fake.world().failing.insert("wire");
        let err = net
            .sandbox(POD, Some("10.88.3.7".parse().unwrap()))
            .unwrap_err();
        assert!(err.to_string().contains("veth"), "{err}");
        assert!(!net.ns_path(POD).exists(), "no namespace file left");
        assert!(fake.world().pinned.is_empty(), "no namespace left pinned");
        assert!(net.sandboxes().is_empty());
    }

    #[test]
    fn spare_namespaces_are_made_ahead_and_moved_into_the_next_sandbox() {
        let (_d, fake, net) = network(NetMode::Loopback, false);
        net.refill();
        assert_eq!(
            fake.take_calls(),
            vec!["new_namespace .spare-0", "new_namespace .spare-1"]
        );
        assert!(net.sandboxes().is_empty(), "spares are not sandboxes");
        net.sandbox(POD, None).unwrap();
        assert_eq!(
            fake.take_calls(),
            vec![format!("pin .spare-1 {POD}"), "unpin .spare-1".into()]
        );
        assert!(fake.is_pinned(&net.ns_path(POD)));
        // A spare that cannot be moved is dropped and a namespace made.
        fake.world().failing.insert("pin");
        net.sandbox("other", None).unwrap();
        assert_eq!(
            fake.take_calls(),
            vec![
                "pin .spare-0 other".to_string(),
                "unpin .spare-0".into(),
                "new_namespace other".into()
            ]
        );
        net.drain_pool();
        assert_eq!(
            fake.world().pinned.len(),
            2,
            "only the two sandboxes stay pinned"
        );
    }

    #[test]
    fn a_restart_drops_old_spares_and_reaps_only_what_was_stale_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeNet::default());
        let start = || {
            PodNetwork::with_sys(
                NetMode::Loopback,
                dir.path().join("netns"),
                NetOptions::default(),
                Some(fake.clone() as Arc<dyn NetSys>),
            )
            .unwrap()
        };
        let net = start();
        net.refill();
        net.sandbox("old", None).unwrap();
        net.sandbox("kept", None).unwrap();
        net.refill();
        fake.take_calls();
        // The agent restarts: the earlier run's spares go at once.
        let net = start();
        let mut calls = fake.take_calls();
        calls.sort();
        assert_eq!(calls, vec!["unpin .spare-2", "unpin .spare-3"]);
        let keep: HashSet<String> = ["kept".to_string()].into();
        let stale = net.stale(&keep);
        assert_eq!(stale, vec!["old".to_string()]);
        // Meanwhile the scheduler sends a pod; its sandbox is made.
        net.sandbox("new", None).unwrap();
        fake.take_calls();
        // The reap, later, removes what was stale and nothing made since.
        net.release_stale(&stale, &keep);
        assert_eq!(fake.take_calls(), vec!["unpin old"]);
        let mut left = net.sandboxes();
        left.sort();
        assert_eq!(left, vec!["kept".to_string(), "new".to_string()]);
    }

    #[test]
    fn reaping_keeps_the_pods_still_here_and_the_node_files() {
        let (_d, fake, net) = network(NetMode::Loopback, false);
        for uid in ["keep", "gone-1", "gone-2"] {
            net.sandbox(uid, None).unwrap();
        }
        std::fs::write(net.cidr_file(), "10.88.3.0/24\n").unwrap();
        fake.take_calls();
        net.reap(&["keep".to_string()].into());
        let mut calls = fake.take_calls();
        calls.sort();
        assert_eq!(calls, vec!["unpin gone-1", "unpin gone-2"]);
        assert_eq!(net.sandboxes(), vec!["keep".to_string()]);
        assert!(net.cidr_file().exists());
    }

    #[test]
    fn direct_routes_follow_the_peer_table_and_unreachable_peers_stay_on_the_tunnel() {
        let (_d, fake, net) = network(NetMode::Bridge, true);
        net.set_cidr(block(), None).unwrap();
        net.ensure_bridge().unwrap();
        let peer = |node: &str, cidr: &str, addr: &str| flotilla_api::proto::Peer {
            node: node.into(),
            pod_cidr: cidr.into(),
            address: addr.into(),
        };
        fake.world()
            .unreachable
            .insert("192.0.2.9".parse().unwrap());
        net.set_peers(&[
            peer("self", "10.88.3.0/24", "10.0.0.3"),
            peer("b", "10.88.4.0/24", "10.0.0.4"),
            peer("far", "10.88.5.0/24", "192.0.2.9"),
        ]);
        assert_eq!(net.direct_routes(), vec!["10.88.4.0/24".parse().unwrap()]);
        assert!(
            fake.world()
                .routes
                .contains_key(&("10.88.4.0".parse().unwrap(), 24))
        );
        // Remembered for the next run.
        assert_eq!(
            std::fs::read_to_string(net.routes_file()).unwrap(),
            "10.88.4.0/24\n"
        );
        // Peers' packets come in on the node's own links: the filter lets
        // their node addresses into the bridge.
        let script = fake.world().firewall.clone().unwrap();
        assert!(
            script.contains("ip saddr { 10.0.0.3/32, 10.0.0.4/32, 192.0.2.9/32 } accept"),
            "{script}"
        );
        // b leaves: its route goes, and its address from the filter.
        fake.take_calls();
        net.set_peers(&[peer("self", "10.88.3.0/24", "10.0.0.3")]);
        assert!(net.direct_routes().is_empty());
        assert_eq!(
            fake.take_calls(),
            vec!["load_firewall ", "del_route 10.88.4.0/24"]
        );
        assert!(fake.world().routes.is_empty());
        assert!(
            fake.world()
                .firewall
                .as_deref()
                .unwrap()
                .contains("ip saddr { 10.0.0.3/32 } accept")
        );
    }

    #[test]
    fn no_filter_no_forwarding_and_the_filter_follows_the_service_table() {
        let (_d, fake, net) = network(NetMode::Bridge, false);
        net.set_cidr(block(), None).unwrap();
        // Services before the bridge: remembered, nothing loaded yet.
        let svc = flotilla_api::proto::ServiceView {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: "10.96.0.9".into(),
            ports: vec![flotilla_api::ServicePort {
                name: String::new(),
                port: 80,
                target_port: None,
                protocol: flotilla_api::Protocol::Tcp,
                node_port: Some(30001),
            }],
            endpoints: vec![],
            routes: Vec::new(),
        };
        net.set_services(std::slice::from_ref(&svc));
        assert!(fake.take_calls().is_empty());
        // nft missing or refusing: no bridge marked up, no forwarding.
        fake.world().failing.insert("load_firewall");
        let e = net.ensure_bridge().unwrap_err().to_string();
        assert!(e.contains("loading the pod network filter"), "{e}");
        let calls = fake.take_calls();
        assert!(!calls.iter().any(|c| c.starts_with("forward")), "{calls:?}");
        assert!(net.bridge_ready().borrow().is_none());
        // Once it loads, the bridge comes up with the services let in.
        fake.world().failing.clear();
        net.ensure_bridge().unwrap();
        assert_eq!(
            fake.take_calls(),
            vec![
                "bridge flt0 10.88.3.1/24",
                "load_firewall ",
                "forward_on flt0"
            ]
        );
        let script = fake.world().firewall.clone().unwrap();
        assert!(
            script.contains("services { 10.96.0.9 . tcp . 80 }"),
            "{script}"
        );
        assert!(script.contains("node_ports { tcp . 30001 }"), "{script}");
        assert!(
            script.contains("ip daddr 10.88.3.1 udp dport 53 accept"),
            "{script}"
        );
        // The same table again loads nothing; a changed one reloads.
        net.set_services(std::slice::from_ref(&svc));
        assert!(fake.take_calls().is_empty());
        net.set_services(&[]);
        assert_eq!(fake.take_calls(), vec!["load_firewall "]);
        assert!(
            !fake
                .world()
                .firewall
                .as_deref()
                .unwrap()
                .contains("add element")
        );
    }

    #[test]
    fn an_admin_may_run_pods_unfiltered() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeNet::default());
        let net = PodNetwork::with_sys(
            NetMode::Bridge,
            dir.path().join("netns"),
            NetOptions {
                direct_routes: false,
                firewall: false,
            },
            Some(fake.clone() as Arc<dyn NetSys>),
        )
        .unwrap();
        net.set_cidr(block(), None).unwrap();
        net.ensure_bridge().unwrap();
        assert_eq!(
            fake.take_calls(),
            vec!["bridge flt0 10.88.3.1/24", "forward_on flt0"]
        );
    }
}
