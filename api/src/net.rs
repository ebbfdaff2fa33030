//! IPv4 networks as pod networking uses them: the cluster and node pod
//! CIDRs, pod addresses and a node's bridge (gateway) address.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network, `10.88.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Default for Cidr {
    /// The default cluster pod CIDR, 10.88.0.0/16.
    fn default() -> Self {
        Cidr {
            base: Ipv4Addr::new(10, 88, 0, 0),
            prefix: 16,
        }
    }
}

impl Cidr {
    pub fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.base)
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let p = self.prefix.min(other.prefix);
        u32::from(self.base) & Self::mask(p) == u32::from(other.base) & Self::mask(p)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("'{s}' is not an IPv4 CIDR (e.g. 10.88.0.0/16)");
        let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        if u32::from(ip) & !Self::mask(prefix) != 0 {
            return Err(format!(
                "'{s}' has host bits set; the network is {}/{prefix}",
                Ipv4Addr::from(u32::from(ip) & Self::mask(prefix))
            ));
        }
        Ok(Cidr { base: ip, prefix })
    }
}

impl Cidr {
    /// The first usable address: the node bridge's (gateway) address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// The broadcast address (the last of the network).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) | !Self::mask(self.prefix))
    }

    /// Whether `ip` is an address a pod may get in some node block (a /24)
    /// of this cluster CIDR: inside it, and not a block's network, gateway
    /// or broadcast address.
    pub fn pod_addresses_contain(&self, ip: Ipv4Addr) -> bool {
        let host = u32::from(ip) & 0xff;
        self.contains(ip) && host > 1 && host < 255
    }

    /// Addresses a pod may get: all but the network, gateway and broadcast ones.
    pub fn pod_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let first = u32::from(self.base) + 2;
        let last = u32::from(self.broadcast());
        (first..last).map(Ipv4Addr::from)
    }
}

/// An inclusive range of ports (`30000-32767`), e.g. the node ports
/// services may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// The node ports services may use unless the admin says otherwise
/// (Kubernetes' range).
pub const DEFAULT_NODE_PORTS: PortRange = PortRange {
    first: 30000,
    last: 32767,
};

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<PortRange, String> {
        let bad = || format!("'{s}' is not a port range; write FIRST-LAST, e.g. 30000-32767");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last) = (
            a.trim().parse::<u16>().map_err(|_| bad())?,
            b.trim().parse::<u16>().map_err(|_| bad())?,
        );
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The source address of an IPv4 packet (`None`: not IPv4, or cut short).
pub fn ipv4_source(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[12], packet[13], packet[14], packet[15],
    ))
}

/// The destination of an IPv4 packet (`None`: not IPv4, or cut short).
pub fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_of_ipv4_packets_only() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 88, 3, 7]);
        assert_eq!(ipv4_destination(&p), Some(Ipv4Addr::new(10, 88, 3, 7)));
        p[0] = 0x60;
        assert_eq!(ipv4_destination(&p), None, "IPv6 is not tunnelled");
        assert_eq!(ipv4_destination(&p[..10]), None);
    }

    #[test]
    fn gateway_broadcast_and_pod_addresses() {
        let c: Cidr = "10.88.3.0/24".parse().unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 88, 3, 1));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 88, 3, 255));
        let all: Vec<Ipv4Addr> = c.pod_addresses().collect();
        assert_eq!(all.len(), 253);
        assert_eq!(all[0], Ipv4Addr::new(10, 88, 3, 2));
        assert_eq!(all[252], Ipv4Addr::new(10, 88, 3, 254));
    }
}
