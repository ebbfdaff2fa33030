//! The node's packet filter for pod networking, as an nftables table
//! (`inet flotilla`) the agent owns. Two guarantees (issue 14 item 9):
//!
//! - **Nothing routes into pods around the tunnel.** Forwarding is switched
//!   on only for the bridge and the tunnel device (per interface, not for
//!   the whole host), and the `forward` chain refuses packets bound for the
//!   bridge that come from anywhere else — for hosts whose owner turned
//!   forwarding on for their own reasons. With direct routes, packets from
//!   the cluster's pod addresses and from peer nodes' addresses are let in
//!   too (that mode trades the tunnel's authentication for speed).
//! - **Pods reach only the node services meant for them**: the DNS
//!   responder on the gateway, service virtual IPs on their ports, and node
//!   ports; replies to the node's own connections pass. Everything else
//!   from the bridge or the tunnel to a node address is refused.
//!
//! Refusals answer ICMP "administratively prohibited" (a quick, specific
//! "no route to host" for the sender, not a hang) and are counted in the
//! table's `forward_refused` and `input_refused` counters, which survive
//! reloads: a reload flushes and refills the chains and sets in one
//! transaction. [`Policy::script`] is pure and unit-tested; loading goes
//! through [`crate::net::sys::NetSys::load_firewall`].

use crate::net::podnet::BRIDGE;
use crate::net::tunnel::DEVICE as TUNNEL;
use flotilla_api::Protocol;
use flotilla_api::net::Cidr;
use flotilla_api::proto::ServiceView;
use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::Ipv4Addr;

/// The table's name (family `inet`).
pub const TABLE: &str = "flotilla";

/// What the filter lets through, besides replies and pod-to-pod traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// The bridge's address: the DNS responder listens there.
    pub gateway: Option<Ipv4Addr>,
    /// Service virtual IPs with their protocol and port.
    pub services: BTreeSet<(Ipv4Addr, Protocol, u16)>,
    /// Node ports (any node address).
    pub node_ports: BTreeSet<(Protocol, u16)>,
    /// With direct routes: the cluster's pod CIDR and the peers' node
    /// addresses, whose packets may come in on any interface.
    pub direct_from: Vec<Cidr>,
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

impl Policy {
    /// The service ports of a service table.
    pub fn set_services(&mut self, table: &[ServiceView]) {
        self.services.clear();
        self.node_ports.clear();
        for s in table {
            let Ok(vip) = s.cluster_ip.parse::<Ipv4Addr>() else {
                continue;
            };
            for p in &s.ports {
                self.services.insert((vip, p.protocol, p.port));
                if let Some(np) = p.node_port {
                    self.node_ports.insert((p.protocol, np));
                }
            }
        }
    }

    /// The nft script that makes the table say this policy: declares what
    /// is missing (keeping counters), then empties and refills the chains
    /// and sets. Loaded with `nft -f`, it applies atomically.
    pub fn script(&self) -> String {
        let mut s = String::new();
        let t = format!("inet {TABLE}");
        let _ = writeln!(
            s,
            "table {t} {{\n\
             \tcounter forward_refused {{ }}\n\
             \tcounter input_refused {{ }}\n\
             \tset services {{ type ipv4_addr . inet_proto . inet_service; }}\n\
             \tset node_ports {{ type inet_proto . inet_service; }}\n\
             \tchain forward {{ type filter hook forward priority filter; policy accept; }}\n\
             \tchain input {{ type filter hook input priority filter; policy accept; }}\n\
             }}"
        );
        let _ = writeln!(s, "flush chain {t} forward");
        let _ = writeln!(s, "flush chain {t} input");
        let _ = writeln!(s, "flush set {t} services");
        let _ = writeln!(s, "flush set {t} node_ports");
        if !self.services.is_empty() {
            let items: Vec<String> = self
                .services
                .iter()
                .map(|(ip, p, port)| format!("{ip} . {} . {port}", proto(*p)))
                .collect();
            let _ = writeln!(s, "add element {t} services {{ {} }}", items.join(", "));
        }
        if !self.node_ports.is_empty() {
            let items: Vec<String> = self
                .node_ports
                .iter()
                .map(|(p, port)| format!("{} . {port}", proto(*p)))
                .collect();
            let _ = writeln!(s, "add element {t} node_ports {{ {} }}", items.join(", "));
        }
        let reject = "reject with icmpx type admin-prohibited";
        // Into the bridge: from pods and the tunnel, replies, direct peers.
        let fwd = format!("add rule {t} forward oifname \"{BRIDGE}\"");
        let _ = writeln!(s, "{fwd} iifname {{ \"{BRIDGE}\", \"{TUNNEL}\" }} accept");
        let _ = writeln!(s, "{fwd} ct state established,related accept");
        if !self.direct_from.is_empty() {
            let from: Vec<String> = self.direct_from.iter().map(|c| c.to_string()).collect();
            let _ = writeln!(s, "{fwd} ip saddr {{ {} }} accept", from.join(", "));
        }
        let _ = writeln!(s, "{fwd} counter name \"forward_refused\" {reject}");
        // To the node itself from pods (bridge) and other nodes' pods
        // (tunnel).
        let inp = format!("add rule {t} input");
        let _ = writeln!(
            s,
            "{inp} iifname != {{ \"{BRIDGE}\", \"{TUNNEL}\" }} accept"
        );
        let _ = writeln!(s, "{inp} ct state established,related accept");
        let from_pods = format!("{inp} iifname \"{BRIDGE}\"");
        if let Some(gw) = self.gateway {
            let _ = writeln!(s, "{from_pods} ip daddr {gw} udp dport 53 accept");
        }
        let _ = writeln!(
            s,
            "{from_pods} ip daddr . meta l4proto . th dport @services accept"
        );
        let _ = writeln!(s, "{from_pods} meta l4proto . th dport @node_ports accept");
        let _ = writeln!(s, "{inp} counter name \"input_refused\" {reject}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::ServicePort;

    fn table() -> Vec<ServiceView> {
        vec![ServiceView {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: "10.96.0.7".into(),
            ports: vec![
                ServicePort {
                    name: String::new(),
                    port: 80,
                    target_port: Some(8080),
                    protocol: Protocol::Tcp,
                    node_port: Some(30080),
                },
                ServicePort {
                    name: String::new(),
                    port: 53,
                    target_port: Some(5353),
                    protocol: Protocol::Udp,
                    node_port: None,
                },
            ],
            endpoints: vec!["10.88.1.5".into()],
            routes: Vec::new(),
        }]
    }

    #[test]
    fn pods_are_let_through_to_dns_services_and_node_ports_only() {
        let mut p = Policy {
            gateway: Some("10.88.1.1".parse().unwrap()),
            ..Policy::default()
        };
        p.set_services(&table());
        let s = p.script();
        assert!(
            s.contains(
                "add element inet flotilla services { 10.96.0.7 . tcp . 80, 10.96.0.7 . udp . 53 }"
            ),
            "{s}"
        );
        assert!(
            s.contains("add element inet flotilla node_ports { tcp . 30080 }"),
            "{s}"
        );
        assert!(
            s.contains("input iifname \"flt0\" ip daddr 10.88.1.1 udp dport 53 accept"),
            "{s}"
        );
        // The refusal is the input chain's last rule, after every accept.
        let input: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("add rule inet flotilla input"))
            .collect();
        assert!(
            input.last().unwrap().ends_with(
                "counter name \"input_refused\" reject with icmpx type admin-prohibited"
            )
        );
        assert!(input[0].contains("iifname != { \"flt0\", \"flttun\" } accept"));
        // Without direct routes nothing but pods, the tunnel and replies
        // enters the bridge.
        let forward: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("add rule inet flotilla forward"))
            .collect();
        assert_eq!(forward.len(), 3, "{forward:?}");
        assert!(forward[2].contains("forward_refused"));
    }

    #[test]
    fn a_reload_keeps_counters_and_replaces_the_rest_in_one_script() {
        let mut p = Policy::default();
        let empty = p.script();
        // Declarations never delete: counters survive.
        assert!(!empty.contains("delete"), "{empty}");
        assert!(empty.contains("flush chain inet flotilla forward"));
        assert!(empty.contains("flush set inet flotilla services"));
        // An empty set gets no `add element` (nft refuses an empty list).
        assert!(!empty.contains("add element"), "{empty}");
        // No gateway known: no DNS rule.
        assert!(!empty.contains("dport 53"), "{empty}");
        p.set_services(&table());
        p.set_services(&[]);
        assert_eq!(p, Policy::default());
    }

    #[test]
    fn direct_routes_admit_the_cluster_and_peer_addresses() {
        let p = Policy {
            direct_from: vec![
                "10.88.0.0/16".parse().unwrap(),
                "192.168.5.2/32".parse().unwrap(),
            ],
            ..Policy::default()
        };
        let s = p.script();
        assert!(
            s.contains("forward oifname \"flt0\" ip saddr { 10.88.0.0/16, 192.168.5.2/32 } accept"),
            "{s}"
        );
        let at = |needle: &str| s.find(needle).unwrap();
        assert!(at("ip saddr {") < at("forward_refused\" reject"));
    }
}
