//! Cross-node pod traffic over the agent's QUIC link: a TUN device takes
//! every packet for another node's pods (a route for the cluster pod CIDR
//! points at it), and each packet travels as one QUIC datagram to the
//! scheduler, which relays it to the node owning the destination address.
//! Packets arriving from the link are written back to the device and the
//! kernel forwards them to the local pod over the bridge.
//!
//! Both agents dial out, so this works between nodes behind NAT; the link's
//! mutual TLS covers the traffic.

use crate::net::netlink::{self, Netlink};
use flotilla_api::net::Cidr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// The tunnel device's name.
pub const DEVICE: &str = "flttun";

/// Packets larger than this are refused by the device (its MTU): a QUIC
/// datagram carries one packet, and the link's initial path MTU (1200
/// bytes of UDP payload) minus QUIC's overhead leaves about this much.
pub const MTU: u32 = 1100;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Counters, for tests and `describe`.
#[derive(Debug, Default)]
pub struct TunnelStats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub dropped: AtomicU64,
}

fn open_device(name: &str) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // struct ifreq: 16 bytes of name, then the flags (a union of 24 bytes).
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    req[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is
    // large enough to hold, on a descriptor we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on our own descriptor.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Lets packets from other nodes' pods, which come in on the tunnel
/// device, be forwarded to the bridge (this interface only).
fn enable_forwarding() -> io::Result<()> {
    crate::net::sys::forward_on(DEVICE)
}

/// The node's tunnel: the device (once the node has a bridge) and the
/// current link.
pub struct Tunnel {
    dev: std::sync::OnceLock<Arc<AsyncFd<File>>>,
    link: watch::Sender<Option<quinn::Connection>>,
    pub stats: Arc<TunnelStats>,
}

impl Default for Tunnel {
    fn default() -> Self {
        Tunnel {
            dev: std::sync::OnceLock::new(),
            link: watch::Sender::new(None),
            stats: Arc::default(),
        }
    }
}

impl Tunnel {
    /// Creates the device in the calling thread's namespace, routes the
    /// cluster's pod CIDR into it and starts moving packets (once; later
    /// calls do nothing). `local`: this node's block; its gateway address
    /// is the source of the node's own packets to other nodes' pods, so
    /// replies come back through the tunnel too. Needs a tokio runtime.
    pub fn open(&self, cluster: Cidr, local: Cidr) -> io::Result<()> {
        if self.dev.get().is_some() {
            return Ok(());
        }
        let dev = open_device(DEVICE)?;
        let mut nl = Netlink::open()?;
        let index = netlink::index_of(DEVICE)?;
        nl.set_mtu(index, MTU)?;
        nl.set_up(index, None)?;
        nl.replace_route_from(
            cluster.base,
            cluster.prefix,
            None,
            Some(index),
            Some(local.gateway()),
        )?;
        enable_forwarding()?;
        // SAFETY: the AsyncFd owns the File, which keeps the descriptor
        // open and unchanged until the AsyncFd is dropped.
        let dev = unsafe { AsyncFd::register_with_interest(dev, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let dev = Arc::new(dev);
        if self.dev.set(dev.clone()).is_ok() {
            tokio::spawn(pump_out(dev, self.link.subscribe(), self.stats.clone()));
        }
        Ok(())
    }

    /// A new link to the scheduler: packets go out on it, and those it
    /// brings are written to the device (dropped while there is none) until
    /// it closes.
    pub fn attach(self: &Arc<Self>, conn: quinn::Connection) {
        self.link.send_replace(Some(conn.clone()));
        tokio::spawn(pump_in(conn, self.clone()));
    }
}

/// Device → link.
async fn pump_out(
    dev: Arc<AsyncFd<File>>,
    link: watch::Receiver<Option<quinn::Connection>>,
    stats: Arc<TunnelStats>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok(mut guard) = dev.readable().await else {
            return;
        };
        match guard.try_io(|d| d.get_ref().read(&mut buf)) {
            Ok(Ok(n)) if n >= 20 => {
                let conn = link.borrow().clone();
                let sent = conn.is_some_and(|c| {
                    c.send_datagram(bytes::Bytes::copy_from_slice(&buf[..n]))
                        .is_ok()
                });
                let counter = if sent { &stats.sent } else { &stats.dropped };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!("tunnel device read: {e}");
                return;
            }
            Err(_would_block) => {}
        }
    }
}

/// Link → device, until the connection ends.
async fn pump_in(conn: quinn::Connection, tunnel: Arc<Tunnel>) {
    let stats = &tunnel.stats;
    while let Ok(packet) = conn.read_datagram().await {
        // No device (no local pods) or a full device queue: the packet is
        // dropped, as a router would.
        let written = tunnel
            .dev
            .get()
            .is_some_and(|dev| matches!(dev.get_ref().write(&packet), Ok(n) if n == packet.len()));
        let counter = if written {
            &stats.received
        } else {
            &stats.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
