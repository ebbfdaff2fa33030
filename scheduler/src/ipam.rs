//! Address management for pod networking: the cluster's pod CIDR is split
//! into one block per node, handed out at a node's first registration and
//! kept for as long as its Node object exists. Pure functions, like
//! placement.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network, `10.88.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

/// The default cluster pod CIDR.
pub const DEFAULT_POD_CIDR: Cidr = Cidr {
    base: Ipv4Addr::new(10, 88, 0, 0),
    prefix: 16,
};

/// Size of each node's block: a /24, 253 pod addresses (`.1` is the node's
/// bridge).
pub const NODE_PREFIX: u8 = 24;

impl Default for Cidr {
    fn default() -> Self {
        DEFAULT_POD_CIDR
    }
}

impl Cidr {
    fn mask(prefix: u8) -> u32 {
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

/// The first `/NODE_PREFIX` block of `cluster` that no node holds (blocks
/// outside the cluster CIDR, e.g. from an older setting, are ignored), or
/// `None` when all are taken.
pub fn next_node_cidr(cluster: Cidr, taken: &HashSet<Cidr>) -> Option<Cidr> {
    if cluster.prefix > NODE_PREFIX {
        return None;
    }
    let blocks = 1u64 << (NODE_PREFIX - cluster.prefix);
    let step = 1u64 << (32 - NODE_PREFIX);
    (0..blocks)
        .map(|i| Cidr {
            base: Ipv4Addr::from((u64::from(u32::from(cluster.base)) + i * step) as u32),
            prefix: NODE_PREFIX,
        })
        .find(|c| !taken.iter().any(|t| t.overlaps(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_print_and_refuse_nonsense() {
        assert_eq!(c("10.88.0.0/16").to_string(), "10.88.0.0/16");
        assert_eq!(Cidr::default(), c("10.88.0.0/16"));
        assert!("10.88.0.0".parse::<Cidr>().is_err());
        assert!("10.88.0.0/33".parse::<Cidr>().is_err());
        assert!("10.888.0.0/16".parse::<Cidr>().is_err());
        let e = "10.88.1.0/16".parse::<Cidr>().unwrap_err();
        assert!(e.contains("host bits") && e.contains("10.88.0.0/16"), "{e}");
        assert!(c("10.88.0.0/16").contains("10.88.200.7".parse().unwrap()));
        assert!(!c("10.88.0.0/16").contains("10.89.0.1".parse().unwrap()));
        assert!(c("10.88.0.0/16").overlaps(&c("10.88.3.0/24")));
        assert!(!c("10.88.2.0/24").overlaps(&c("10.88.3.0/24")));
    }

    #[test]
    fn node_blocks_are_handed_out_in_order_and_never_twice() {
        let cluster = c("10.88.0.0/22");
        let mut taken = HashSet::new();
        let mut got = Vec::new();
        while let Some(b) = next_node_cidr(cluster, &taken) {
            taken.insert(b);
            got.push(b.to_string());
        }
        assert_eq!(
            got,
            [
                "10.88.0.0/24",
                "10.88.1.0/24",
                "10.88.2.0/24",
                "10.88.3.0/24"
            ]
        );
        // A freed block is reused; an overlapping foreign block is skipped.
        taken.remove(&c("10.88.1.0/24"));
        assert_eq!(next_node_cidr(cluster, &taken), Some(c("10.88.1.0/24")));
        let taken = HashSet::from([c("10.88.0.0/23")]);
        assert_eq!(next_node_cidr(cluster, &taken), Some(c("10.88.2.0/24")));
        // A cluster CIDR smaller than one block has none to give.
        assert_eq!(next_node_cidr(c("10.88.0.0/25"), &HashSet::new()), None);
    }
}
