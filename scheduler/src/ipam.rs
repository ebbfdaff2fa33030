//! Address management for pod networking: the cluster's pod CIDR is split
//! into one block per node, handed out at a node's first registration and
//! kept for as long as its Node object exists. Pure functions, like
//! placement.

pub use flotilla_api::net::Cidr;
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// The default cluster pod CIDR.
pub const DEFAULT_POD_CIDR: Cidr = Cidr {
    base: Ipv4Addr::new(10, 88, 0, 0),
    prefix: 16,
};

/// Size of each node's block: a /24, 253 pod addresses (`.1` is the node's
/// bridge).
pub const NODE_PREFIX: u8 = 24;

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

/// The lowest address of a node's block that no pod holds (`used`: the
/// addresses of every pod bound to the node, whatever its phase, so an
/// address is never handed out twice while its pod exists).
pub fn next_pod_ip(block: Cidr, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    block.pod_addresses().find(|ip| !used.contains(ip))
}

/// How many more pods with an address fit in the block.
pub fn free_pod_ips(block: Cidr, used: &HashSet<Ipv4Addr>) -> usize {
    block
        .pod_addresses()
        .filter(|ip| !used.contains(ip))
        .count()
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

    #[test]
    fn pod_addresses_skip_network_gateway_and_broadcast_and_are_never_reused_while_held() {
        let block = c("10.88.3.0/24");
        assert_eq!(block.gateway().to_string(), "10.88.3.1");
        assert_eq!(block.broadcast().to_string(), "10.88.3.255");
        let mut used = HashSet::new();
        assert_eq!(free_pod_ips(block, &used), 253);
        let first = next_pod_ip(block, &used).unwrap();
        assert_eq!(first.to_string(), "10.88.3.2");
        used.insert(first);
        assert_eq!(next_pod_ip(block, &used).unwrap().to_string(), "10.88.3.3");
        // Fill the block: the last address is .254 and then there is none.
        let mut last = first;
        while let Some(ip) = next_pod_ip(block, &used) {
            assert!(used.insert(ip), "{ip} handed out twice");
            last = ip;
        }
        assert_eq!(last.to_string(), "10.88.3.254");
        assert_eq!(used.len(), 253);
        assert_eq!(free_pod_ips(block, &used), 0);
        // A released address is the next one given.
        used.remove(&"10.88.3.77".parse().unwrap());
        assert_eq!(next_pod_ip(block, &used).unwrap().to_string(), "10.88.3.77");
    }
}
