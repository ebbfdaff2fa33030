//! A minimal, synchronous rtnetlink client: just the link, address and route
//! requests pod networking needs (bridge, veth pair, addresses, routes).
//! One request per call, each acknowledged by the kernel; no `ip` execs, so
//! setting up a pod's network costs syscalls, not process spawns.
//!
//! A netlink socket talks to the network namespace of the thread that created
//! it, so a [`Netlink`] made on a thread inside a pod's namespace configures
//! that namespace.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 1;
const AF_INET: u8 = libc::AF_INET as u8;

/// A netlink route socket bound to the namespace it was created in.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// Builds one request: header, fixed part, attributes (nested ones by
/// offset, closed with [`Msg::end_nest`]).
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.extend_from_slice(fixed);
        Msg { buf }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        self.pad();
        self.buf
            .extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self
    }

    fn attr_str(&mut self, kind: u16, s: &str) -> &mut Msg {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    fn nest(&mut self, kind: u16) -> usize {
        self.pad();
        let at = self.buf.len();
        self.attr(kind, &[]);
        at
    }

    /// Appends raw bytes (a nested header such as the veth peer's ifinfomsg).
    fn raw(&mut self, data: &[u8]) -> &mut Msg {
        self.pad();
        self.buf.extend_from_slice(data);
        self
    }

    fn end_nest(&mut self, at: usize) {
        self.pad();
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.pad();
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `r`, with the error `errno` counted as success (already there, already
/// gone).
fn except(r: io::Result<()>, errno: i32) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(errno) => Ok(()),
        r => r,
    }
}

/// The fixed part of an address request.
fn ifaddr(index: i32, prefix: u8) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = AF_INET;
    b[1] = prefix;
    b[3] = RT_SCOPE_UNIVERSE;
    b[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    b
}

fn ifinfo(index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = 0; // AF_UNSPEC
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// The index of the interface named `name` in the calling thread's
/// namespace.
pub fn index_of(name: &str) -> io::Result<i32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i as i32)
    }
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink { fd, seq: 0 })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, kind: u16, flags: u16, build: impl FnOnce(&mut Msg)) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = Msg::new(kind, flags, seq, &[]);
        build(&mut msg);
        let bytes = msg.finish();
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: the buffer and address are valid for the call's duration.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is writable for its whole length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut at = 0usize;
            let n = n as usize;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                let rseq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap());
                if len < 16 || at + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink reply",
                    ));
                }
                if ty == NLMSG_ERROR && rseq == seq && len >= 20 {
                    let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap());
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                at += len.next_multiple_of(4);
            }
        }
    }

    /// Creates a bridge (an existing one is fine).
    pub fn add_bridge(&mut self, name: &str) -> io::Result<()> {
        let r = self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, |m| {
            m.raw(&ifinfo(0, 0, 0)).attr_str(IFLA_IFNAME, name);
            let info = m.nest(IFLA_LINKINFO);
            m.attr_str(IFLA_INFO_KIND, "bridge");
            m.end_nest(info);
        });
        except(r, libc::EEXIST)
    }

    /// Creates a veth pair: `name` here, `peer` in the namespace `peer_ns`
    /// (a namespace file descriptor).
    pub fn add_veth(&mut self, name: &str, peer: &str, peer_ns: RawFd) -> io::Result<()> {
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, |m| {
            m.raw(&ifinfo(0, 0, 0)).attr_str(IFLA_IFNAME, name);
            let info = m.nest(IFLA_LINKINFO);
            m.attr_str(IFLA_INFO_KIND, "veth");
            let data = m.nest(IFLA_INFO_DATA);
            let p = m.nest(VETH_INFO_PEER);
            m.raw(&ifinfo(0, 0, 0))
                .attr_str(IFLA_IFNAME, peer)
                .attr(IFLA_NET_NS_FD, &(peer_ns as u32).to_ne_bytes());
            m.end_nest(p);
            m.end_nest(data);
            m.end_nest(info);
        })
    }

    /// Sets a link up, optionally enslaving it to `master` (an index).
    pub fn set_up(&mut self, index: i32, master: Option<i32>) -> io::Result<()> {
        self.request(RTM_NEWLINK, 0, |m| {
            m.raw(&ifinfo(index, IFF_UP, IFF_UP));
            if let Some(master) = master {
                m.attr(IFLA_MASTER, &(master as u32).to_ne_bytes());
            }
        })
    }

    /// Sets the link named `name` up, optionally enslaving it to `master`.
    pub fn set_up_named(&mut self, name: &str, master: Option<i32>) -> io::Result<()> {
        self.request(RTM_NEWLINK, 0, |m| {
            m.raw(&ifinfo(0, IFF_UP, IFF_UP))
                .attr_str(IFLA_IFNAME, name);
            if let Some(master) = master {
                m.attr(IFLA_MASTER, &(master as u32).to_ne_bytes());
            }
        })
    }

    /// Sets a link's hardware address. On a bridge this also pins it: a
    /// bridge whose address was never set takes the lowest of its ports'
    /// and changes as ports come and go.
    pub fn set_hw_address(&mut self, index: i32, mac: [u8; 6]) -> io::Result<()> {
        self.request(RTM_NEWLINK, 0, |m| {
            m.raw(&ifinfo(index, 0, 0)).attr(IFLA_ADDRESS, &mac);
        })
    }

    /// Sets a link's MTU.
    pub fn set_mtu(&mut self, index: i32, mtu: u32) -> io::Result<()> {
        self.request(RTM_NEWLINK, 0, |m| {
            m.raw(&ifinfo(index, 0, 0))
                .attr(IFLA_MTU, &mtu.to_ne_bytes());
        })
    }

    /// Deletes a link by name (a veth takes its peer with it). Missing is fine.
    pub fn del_link(&mut self, name: &str) -> io::Result<()> {
        let r = self.request(RTM_DELLINK, 0, |m| {
            m.raw(&ifinfo(0, 0, 0)).attr_str(IFLA_IFNAME, name);
        });
        except(r, libc::ENODEV)
    }

    /// Adds `ip/prefix` to a link (already there is fine).
    pub fn add_addr(&mut self, index: i32, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let r = self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, |m| {
            m.raw(&ifaddr(index, prefix))
                .attr(IFA_LOCAL, &ip.octets())
                .attr(IFA_ADDRESS, &ip.octets());
        });
        except(r, libc::EEXIST)
    }

    /// Removes `ip/prefix` from a link (missing is fine).
    pub fn del_addr(&mut self, index: i32, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let r = self.request(RTM_DELADDR, 0, |m| {
            m.raw(&ifaddr(index, prefix)).attr(IFA_LOCAL, &ip.octets());
        });
        except(r, libc::EADDRNOTAVAIL)
    }

    fn route_msg(prefix: u8, scope: u8) -> [u8; 12] {
        let mut fixed = [0u8; 12];
        fixed[0] = AF_INET;
        fixed[1] = prefix;
        fixed[4] = RT_TABLE_MAIN;
        fixed[5] = RTPROT_BOOT;
        fixed[6] = scope;
        fixed[7] = RTN_UNICAST;
        fixed
    }

    /// Adds or replaces the route to `dst/prefix` via `gateway` (or straight
    /// out of `oif` when there is no gateway).
    pub fn replace_route(
        &mut self,
        dst: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        oif: Option<i32>,
    ) -> io::Result<()> {
        self.replace_route_from(dst, prefix, gateway, oif, None)
    }

    /// Like [`Netlink::replace_route`], with the source address the node
    /// uses on the route.
    pub fn replace_route_from(
        &mut self,
        dst: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        oif: Option<i32>,
        src: Option<Ipv4Addr>,
    ) -> io::Result<()> {
        let scope = if gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        };
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, |m| {
            m.raw(&Self::route_msg(prefix, scope));
            if prefix > 0 {
                m.attr(RTA_DST, &dst.octets());
            }
            if let Some(gw) = gateway {
                m.attr(RTA_GATEWAY, &gw.octets());
            }
            if let Some(oif) = oif {
                m.attr(RTA_OIF, &(oif as u32).to_ne_bytes());
            }
            if let Some(src) = src {
                m.attr(RTA_PREFSRC, &src.octets());
            }
        })
    }

    /// Deletes the route to `dst/prefix` (missing is fine).
    pub fn del_route(&mut self, dst: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let r = self.request(RTM_DELROUTE, 0, |m| {
            m.raw(&Self::route_msg(prefix, RT_SCOPE_UNIVERSE));
            if prefix > 0 {
                m.attr(RTA_DST, &dst.octets());
            }
        });
        except(r, libc::ESRCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_padded_and_nests_carry_their_length() {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE, 7, &ifinfo(0, 0, 0));
        m.attr_str(IFLA_IFNAME, "ab");
        let info = m.nest(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        m.end_nest(info);
        let b = m.finish();
        assert_eq!(b.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        let flags = u16::from_ne_bytes(b[6..8].try_into().unwrap());
        assert_eq!(flags, NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        // ifname attribute: 4 + "ab\0" = 7, padded to 8.
        assert_eq!(u16::from_ne_bytes(b[32..34].try_into().unwrap()), 7);
        assert_eq!(&b[36..39], b"ab\0");
        // linkinfo nest: header 4 + kind attr (4 + "veth\0" = 9, padded 12) = 16.
        assert_eq!(u16::from_ne_bytes(b[40..42].try_into().unwrap()), 16);
        assert_eq!(
            u16::from_ne_bytes(b[42..44].try_into().unwrap()),
            IFLA_LINKINFO
        );
        assert_eq!(&b[48..53], b"veth\0");
    }
}
