//! The services controller: gives each Service a virtual IP from the
//! service CIDR, keeps its endpoints (the ready pods its selector picks, with
//! addresses) in its status, and publishes the table every agent's proxy and
//! DNS responder serve.

use crate::cluster::Cluster;
use crate::ipam::Cidr;
use crate::store::{Expect, WriteDurability};
use flotilla_api::proto::{Peer, ServiceView};
use flotilla_api::{Endpoint, Object, Pod, Service};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// Virtual IPs of services (kept apart from the pod CIDR).
pub const SERVICE_CIDR: Cidr = Cidr {
    base: Ipv4Addr::new(10, 96, 0, 0),
    prefix: 16,
};

/// The ready pods behind a service, sorted. An endpoint is only ever an
/// address in the cluster's pod CIDR (the scheduler hands those out; no
/// status can point a service at the node, loopback or anything else).
pub fn endpoints<'a>(
    svc: &Service,
    pod_cidr: Cidr,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = pods
        .into_iter()
        .filter(|p| {
            p.metadata.namespace == svc.metadata.namespace
                && !svc.spec.selector.is_empty()
                && svc
                    .spec
                    .selector
                    .iter()
                    .all(|(k, v)| p.metadata.labels.get(k) == Some(v))
                && p.is_ready()
                && p.status
                    .pod_ip
                    .parse::<Ipv4Addr>()
                    .is_ok_and(|ip| pod_cidr.pod_addresses_contain(ip))
        })
        .map(|p| Endpoint {
            ip: p.status.pod_ip.clone(),
            pod: p.metadata.name.clone(),
            node: p.status.node.clone().unwrap_or_default(),
        })
        .collect();
    out.sort();
    out
}

/// Replaces a published table when it changed (watchers wake only then).
fn publish<T: PartialEq>(tx: &tokio::sync::watch::Sender<Arc<Vec<T>>>, table: Vec<T>) {
    tx.send_if_modified(|cur| {
        let changed = **cur != table;
        if changed {
            *cur = Arc::new(table);
        }
        changed
    });
}

/// The peer table: every bridged node with a block, at the IP its link
/// comes from. Published only when it changes.
pub fn publish_peers(cluster: &Cluster) {
    let mut peers: Vec<Peer> = cluster
        .store
        .list("nodes/")
        .iter()
        .filter_map(|o| match &**o {
            Object::Node(n)
                if n.status.pod_network == "bridge" && !n.status.pod_cidr.is_empty() =>
            {
                let ip = n.status.address.parse::<std::net::SocketAddr>().ok()?.ip();
                Some(Peer {
                    node: n.metadata.name.clone(),
                    pod_cidr: n.status.pod_cidr.clone(),
                    address: ip.to_string(),
                })
            }
            _ => None,
        })
        .collect();
    peers.sort_by(|a, b| a.node.cmp(&b.node));
    publish(&cluster.peers, peers);
}

/// One pass: addresses, endpoints, the published table.
pub fn reconcile(cluster: &Cluster) {
    let store = &cluster.store;
    let services = store.list("services/");
    if services.is_empty() && cluster.services.borrow().is_empty() {
        return;
    }
    let all_pods = store.list("pods/");
    let pods: Vec<&Pod> = all_pods
        .iter()
        .filter_map(|o| match &**o {
            Object::Pod(p) => Some(p),
            _ => None,
        })
        .collect();
    let mut taken: HashSet<Ipv4Addr> = services
        .iter()
        .filter_map(|o| match &**o {
            Object::Service(s) => s.status.cluster_ip.parse().ok(),
            _ => None,
        })
        .collect();
    // Addresses skipped once are taken for the rest of the pass.
    let mut free = SERVICE_CIDR.pod_addresses();
    let mut table = Vec::new();
    // Status changes go in one transaction (10,000 new services are one
    // write, not 10,000).
    let mut writes = Vec::new();
    for obj in &services {
        let Object::Service(svc) = &**obj else {
            continue;
        };
        let mut status = svc.status.clone();
        if status.cluster_ip.is_empty() {
            match free.find(|ip| !taken.contains(ip)) {
                Some(ip) => {
                    taken.insert(ip);
                    status.cluster_ip = ip.to_string();
                }
                None => {
                    tracing::warn!(service = %svc.metadata.name, "no virtual IP left in {SERVICE_CIDR}");
                    continue;
                }
            }
        }
        status.endpoints = endpoints(svc, cluster.cfg.pod_cidr, pods.iter().copied());
        if status != svc.status {
            let mut ns = svc.clone();
            ns.status = status.clone();
            writes.push((
                Object::Service(ns),
                Expect::Version(svc.metadata.resource_version),
            ));
        }
        table.push(ServiceView {
            namespace: svc.metadata.namespace.clone(),
            name: svc.metadata.name.clone(),
            cluster_ip: status.cluster_ip,
            ports: svc.spec.ports.clone(),
            endpoints: status.endpoints.into_iter().map(|e| e.ip).collect(),
            routes: svc.spec.routes.clone(),
        });
    }
    if !writes.is_empty() {
        for r in store.put_many(writes, WriteDurability::Lazy) {
            if let Err(e) = r {
                tracing::debug!("service status: {e}");
            }
        }
    }
    publish(&cluster.services, table);
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::{MemberState, MemberStatus, PodPhase};

    fn pod(name: &str, ns: &str, app: &str, ip: &str, running: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = name.into();
        p.metadata.namespace = ns.into();
        p.metadata.labels.insert("app".into(), app.into());
        p.status.pod_ip = ip.into();
        p.status.node = Some("n1".into());
        p.status.phase = if running {
            PodPhase::Running
        } else {
            PodPhase::Scheduled
        };
        p.status.members = vec![MemberStatus {
            name: "m".into(),
            state: if running {
                MemberState::Running { since_ms: 1 }
            } else {
                MemberState::Waiting {
                    reason: "Preparing".into(),
                }
            },
            restarts: 0,
            last_termination: None,
            ready: None,
        }];
        p
    }

    #[test]
    fn endpoints_are_the_ready_matching_pods_of_the_namespace_with_addresses() {
        let mut svc = Service::default();
        svc.metadata.namespace = "default".into();
        svc.spec.selector.insert("app".into(), "web".into());
        let pods = [
            pod("web-2", "default", "web", "10.88.0.3", true),
            pod("web-1", "default", "web", "10.88.1.2", true),
            pod("starting", "default", "web", "10.88.0.4", false),
            pod("db", "default", "db", "10.88.0.5", true),
            pod("other-ns", "prod", "web", "10.88.0.6", true),
            pod("no-ip", "default", "web", "", true),
            // Addresses no scheduler hands out: never endpoints.
            pod("loopback", "default", "web", "127.0.0.1", true),
            pod("outside", "default", "web", "192.168.1.10", true),
            pod("gateway", "default", "web", "10.88.0.1", true),
            pod("garbage", "default", "web", "ten.eighty-eight", true),
        ];
        let cidr = crate::ipam::DEFAULT_POD_CIDR;
        let e = endpoints(&svc, cidr, pods.iter());
        let ips: Vec<&str> = e.iter().map(|e| e.ip.as_str()).collect();
        assert_eq!(ips, ["10.88.0.3", "10.88.1.2"]);
        assert_eq!(e[0].pod, "web-2");
        // A failed member makes the pod unready.
        let mut sick = pod("web-3", "default", "web", "10.88.0.7", true);
        sick.status.members.push(MemberStatus {
            name: "n".into(),
            state: MemberState::Waiting {
                reason: "CrashLoopBackOff".into(),
            },
            restarts: 1,
            last_termination: None,
            ready: None,
        });
        assert!(endpoints(&svc, cidr, [&sick]).is_empty());
        // An empty selector picks nothing (not everything).
        svc.spec.selector.clear();
        assert!(endpoints(&svc, cidr, pods.iter()).is_empty());
    }
}
