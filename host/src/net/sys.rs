//! What pod networking asks of the kernel, as one small trait: pinned
//! network namespaces, the bridge, a pod's veth wiring, routes. [`Kernel`]
//! does it with rtnetlink, `unshare`/`setns` and bind mounts (root only);
//! [`fake::FakeNet`] records it, so the sandbox logic in
//! [`crate::net::podnet`] is unit-tested without root.

use crate::net::netlink::{self, Netlink};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Names what failed.
pub fn ctx(what: &'static str) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Io { what, source }
}

/// The kernel operations pod sandboxes are made of. Blocking.
pub trait NetSys: Send + Sync {
    /// A new network namespace with loopback up, pinned (bind-mounted) on a
    /// new file at `path`.
    fn new_namespace(&self, path: &Path) -> Result<(), NetError>;
    /// Pins the namespace pinned at `from` on a new file at `to` as well.
    fn pin(&self, from: &Path, to: &Path) -> Result<(), NetError>;
    /// Whether a namespace is pinned at `path`.
    fn is_pinned(&self, path: &Path) -> bool;
    /// Unpins `path` (lazily); the file stays.
    fn unpin(&self, path: &Path) -> io::Result<()>;
    /// Whether the agent's namespace has a link named `name`.
    fn link_exists(&self, name: &str) -> bool;
    /// The bridge `name` (made if missing) with `gateway/prefix`, up; its
    /// link index.
    fn bridge(&self, name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<i32, NetError>;
    /// Wires the namespace pinned at `ns` to the bridge: a veth pair whose
    /// host end `host_end` is attached to `bridge` and up, and whose pod end
    /// `eth0` has `ip/prefix`, is up, and carries the default route via
    /// `gateway`.
    fn wire(&self, ns: &Path, host_end: &str, bridge: i32, pod: PodAddr) -> Result<(), NetError>;
    /// Removes a link of the agent's namespace.
    fn del_link(&self, name: &str) -> io::Result<()>;
    /// Routes `dst/prefix` via `via` (replacing any route to it).
    fn replace_route(&self, dst: Ipv4Addr, prefix: u8, via: Ipv4Addr) -> io::Result<()>;
    fn del_route(&self, dst: Ipv4Addr, prefix: u8) -> io::Result<()>;
    /// Lets packets that come in on link `dev` be forwarded (IPv4, this
    /// interface only).
    fn forward_on(&self, dev: &str) -> io::Result<()>;
    /// Turns IPv4 forwarding on for every interface (direct routes only).
    fn forward_all(&self) -> io::Result<()>;
    /// Loads an nft script ([`crate::net::firewall::Policy::script`]) in the
    /// agent's namespace, in one transaction.
    fn load_firewall(&self, script: &str) -> io::Result<()>;
}

/// A pod's address on the bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodAddr {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// The real kernel, from the agent's own network namespace.
pub struct Kernel {
    /// The agent's namespace (veth host ends are moved there).
    root_ns: File,
    /// A netlink socket in the agent's namespace.
    root: Mutex<Netlink>,
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

impl Kernel {
    /// Called on a thread in the agent's own namespace.
    pub fn open() -> Result<Kernel, NetError> {
        let root_ns = File::open("/proc/thread-self/ns/net")
            .map_err(ctx("opening the agent's network namespace"))?;
        let root = Netlink::open().map_err(ctx("opening netlink"))?;
        Ok(Kernel {
            root_ns,
            root: Mutex::new(root),
        })
    }
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

/// Moves the calling thread into the network namespace `ns`.
pub fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: setns(2) with a namespace fd we own, affecting this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pod's hardware address, from its IPv4 address: `0a:58` (locally
/// administered, unicast) and the address's four octets — the scheme the
/// CNI bridge plugin used.
pub fn pod_mac(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x0a, 0x58, a, b, c, d]
}

/// The node bridge's hardware address: fixed, locally administered
/// (`02:66:6c` — "fl"), then the gateway's last three octets, so it never
/// changes while pods come and go, nor across agent restarts.
pub fn bridge_mac(gateway: Ipv4Addr) -> [u8; 6] {
    let [_, b, c, d] = gateway.octets();
    [0x02, 0x66, 0x6c, b, c, d]
}

impl NetSys for Kernel {
    fn new_namespace(&self, path: &Path) -> Result<(), NetError> {
        // A thread of its own unshares (and ends right after).
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

    fn pin(&self, from: &Path, to: &Path) -> Result<(), NetError> {
        File::create(to).map_err(ctx("creating the namespace file"))?;
        rustix::mount::mount_bind(from, to)
            .map_err(|e| ctx("bind-mounting the namespace")(e.into()))
    }

    fn is_pinned(&self, path: &Path) -> bool {
        // `f_type`'s width differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == NSFS_MAGIC)
    }

    fn unpin(&self, path: &Path) -> io::Result<()> {
        rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(io::Error::from)
    }

    fn link_exists(&self, name: &str) -> bool {
        netlink::index_of(name).is_ok()
    }

    fn bridge(&self, name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<i32, NetError> {
        let mut nl = self.root.lock().expect("poisoned");
        nl.add_bridge(name)
            .map_err(ctx("creating the node bridge"))?;
        let index = netlink::index_of(name).map_err(ctx("finding the node bridge"))?;
        // Pods keep the gateway's hardware address in their neighbour
        // tables for tens of seconds; one that changed under them (a
        // bridge follows its lowest port's unless set) would leave their
        // traffic to the node addressed to a port that is gone.
        nl.set_hw_address(index, bridge_mac(gateway))
            .map_err(ctx("setting the node bridge's hardware address"))?;
        nl.add_addr(index, gateway, prefix)
            .map_err(ctx("addressing the node bridge"))?;
        nl.set_up(index, None)
            .map_err(ctx("setting the node bridge up"))?;
        Ok(index)
    }

    fn wire(&self, ns: &Path, host_end: &str, bridge: i32, pod: PodAddr) -> Result<(), NetError> {
        in_namespace(ns, || {
            let mut nl = Netlink::open().map_err(ctx("opening netlink in the pod"))?;
            nl.add_veth("eth0", host_end, self.root_ns.as_fd().as_raw_fd())
                .map_err(ctx("creating the veth pair"))?;
            self.root
                .lock()
                .expect("poisoned")
                .set_up_named(host_end, Some(bridge))
                .map_err(ctx("attaching the veth to the bridge"))?;
            let eth0 = netlink::index_of("eth0").map_err(ctx("finding eth0"))?;
            // An address handed to a new pod keeps its hardware address, so
            // the node's neighbour entry for it (kept tens of seconds) stays
            // right when a pod's address is reused.
            nl.set_hw_address(eth0, pod_mac(pod.ip))
                .map_err(ctx("setting the pod's hardware address"))?;
            nl.add_addr(eth0, pod.ip, pod.prefix)
                .map_err(ctx("addressing the pod"))?;
            nl.set_up(eth0, None).map_err(ctx("setting eth0 up"))?;
            nl.replace_route(Ipv4Addr::UNSPECIFIED, 0, Some(pod.gateway), Some(eth0))
                .map_err(ctx("adding the pod's default route"))
        })
    }

    fn del_link(&self, name: &str) -> io::Result<()> {
        self.root.lock().expect("poisoned").del_link(name)
    }

    fn replace_route(&self, dst: Ipv4Addr, prefix: u8, via: Ipv4Addr) -> io::Result<()> {
        self.root
            .lock()
            .expect("poisoned")
            .replace_route(dst, prefix, Some(via), None)
    }

    fn del_route(&self, dst: Ipv4Addr, prefix: u8) -> io::Result<()> {
        self.root.lock().expect("poisoned").del_route(dst, prefix)
    }

    fn forward_on(&self, dev: &str) -> io::Result<()> {
        forward_on(dev)
    }

    fn forward_all(&self) -> io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
    }

    fn load_firewall(&self, script: &str) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let ns = self.root_ns.as_raw_fd();
        let mut cmd = Command::new("nft");
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setns(2) is async-signal-safe and touches only the child,
        // which enters the agent's namespace whatever thread spawned it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "running nft: {e} (install nftables, or start the agent with \
                     --no-firewall to leave pods unfiltered)"
                ),
            )
        })?;
        let written = child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes());
        let out = child.wait_with_output()?;
        written?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "nft refused the pod network filter: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// Sets `net.ipv4.conf.<dev>.forwarding` (the calling thread's namespace).
pub fn forward_on(dev: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/forwarding"), b"1")
}

/// A recording stand-in for the kernel: namespaces are plain files it
/// remembers as pinned, links and routes are sets, and every call is logged
/// in order. Failures can be injected per operation.
#[cfg(test)]
mod tests {
    #[test]
    fn the_bridge_address_is_fixed_local_and_per_block() {
        let mac = super::bridge_mac("10.88.3.1".parse().unwrap());
        assert_eq!(mac, [0x02, 0x66, 0x6c, 88, 3, 1]);
        // Locally administered, unicast.
        assert_eq!(mac[0] & 0b11, 0b10);
        assert_ne!(mac, super::bridge_mac("10.88.4.1".parse().unwrap()));
        // A pod's follows its address and never equals a bridge's.
        let pod = super::pod_mac("10.88.3.1".parse().unwrap());
        assert_eq!(pod, [0x0a, 0x58, 10, 88, 3, 1]);
        assert_eq!(pod[0] & 0b11, 0b10);
        assert_ne!(pod, mac);
    }
}

#[cfg(test)]
pub mod fake {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet, HashSet};
    use std::path::PathBuf;

    #[derive(Default)]
    pub struct World {
        pub calls: Vec<String>,
        pub pinned: HashSet<PathBuf>,
        pub links: BTreeSet<String>,
        pub routes: BTreeMap<(Ipv4Addr, u8), Ipv4Addr>,
        /// Operations (by name) that fail from now on.
        pub failing: HashSet<&'static str>,
        /// Addresses wired into namespaces, by namespace file.
        pub wired: BTreeMap<PathBuf, PodAddr>,
        /// Routes the kernel refuses (gateway not on a connected network).
        pub unreachable: HashSet<Ipv4Addr>,
        /// The last firewall script loaded.
        pub firewall: Option<String>,
    }

    #[derive(Default)]
    pub struct FakeNet(pub Mutex<World>);

    impl FakeNet {
        pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
            self.0.lock().unwrap()
        }

        /// The calls so far, cleared.
        pub fn take_calls(&self) -> Vec<String> {
            std::mem::take(&mut self.world().calls)
        }

        fn call(&self, op: &'static str, detail: String) -> io::Result<()> {
            let mut w = self.world();
            w.calls.push(format!("{op} {detail}"));
            if w.failing.contains(op) {
                return Err(io::Error::other(format!("{op} failed (injected)")));
            }
            Ok(())
        }
    }

    fn name(p: &Path) -> String {
        p.file_name().unwrap().to_string_lossy().into_owned()
    }

    impl NetSys for FakeNet {
        fn new_namespace(&self, path: &Path) -> Result<(), NetError> {
            self.call("new_namespace", name(path))
                .map_err(ctx("creating a network namespace"))?;
            File::create(path).map_err(ctx("creating the namespace file"))?;
            self.world().pinned.insert(path.to_path_buf());
            Ok(())
        }

        fn pin(&self, from: &Path, to: &Path) -> Result<(), NetError> {
            self.call("pin", format!("{} {}", name(from), name(to)))
                .map_err(ctx("bind-mounting the namespace"))?;
            File::create(to).map_err(ctx("creating the namespace file"))?;
            let mut w = self.world();
            assert!(w.pinned.contains(from), "pinning an unpinned namespace");
            w.pinned.insert(to.to_path_buf());
            Ok(())
        }

        fn is_pinned(&self, path: &Path) -> bool {
            self.world().pinned.contains(path)
        }

        fn unpin(&self, path: &Path) -> io::Result<()> {
            self.call("unpin", name(path))?;
            self.world().pinned.remove(path);
            Ok(())
        }

        fn link_exists(&self, name: &str) -> bool {
            self.world().links.contains(name)
        }

        fn bridge(&self, name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<i32, NetError> {
            self.call("bridge", format!("{name} {gateway}/{prefix}"))
                .map_err(ctx("creating the node bridge"))?;
            self.world().links.insert(name.to_string());
            Ok(7)
        }

        fn wire(
            &self,
            ns: &Path,
            host_end: &str,
            bridge: i32,
            pod: PodAddr,
        ) -> Result<(), NetError> {
            self.call(
                "wire",
                format!(
                    "{} {host_end} bridge {bridge} {}/{} via {}",
                    name(ns),
                    pod.ip,
                    pod.prefix,
                    pod.gateway
                ),
            )
            .map_err(ctx("creating the veth pair"))?;
            let mut w = self.world();
            assert!(w.pinned.contains(ns), "wiring an unpinned namespace");
            // The kernel makes the pair before the later steps can fail;
            // the host end exists from here.
            w.links.insert(host_end.to_string());
            w.wired.insert(ns.to_path_buf(), pod);
            Ok(())
        }

        fn del_link(&self, name: &str) -> io::Result<()> {
            self.call("del_link", name.to_string())?;
            if self.world().links.remove(name) {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::ENODEV))
            }
        }

        fn replace_route(&self, dst: Ipv4Addr, prefix: u8, via: Ipv4Addr) -> io::Result<()> {
            self.call("replace_route", format!("{dst}/{prefix} via {via}"))?;
            let mut w = self.world();
            if w.unreachable.contains(&via) {
                return Err(io::Error::from_raw_os_error(libc::ENETUNREACH));
            }
            w.routes.insert((dst, prefix), via);
            Ok(())
        }

        fn del_route(&self, dst: Ipv4Addr, prefix: u8) -> io::Result<()> {
            self.call("del_route", format!("{dst}/{prefix}"))?;
            self.world().routes.remove(&(dst, prefix));
            Ok(())
        }

        fn forward_on(&self, dev: &str) -> io::Result<()> {
            self.call("forward_on", dev.to_string())
        }

        fn forward_all(&self) -> io::Result<()> {
            self.call("forward_all", String::new())
        }

        fn load_firewall(&self, script: &str) -> io::Result<()> {
            self.call("load_firewall", String::new())?;
            self.world().firewall = Some(script.to_string());
            Ok(())
        }
    }
}
