//! The node's network: pod sandboxes (network namespaces on the node
//! bridge) and the small rtnetlink client they are made with, the service
//! proxy and DNS responder, and the cross-node tunnel.

pub mod dns;
pub mod netlink;
pub mod podnet;
pub mod proxy;
pub mod sys;
pub mod tunnel;
