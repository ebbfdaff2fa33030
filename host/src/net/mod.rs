//! The node's network: pod sandboxes (network namespaces on the node
//! bridge) and the small rtnetlink client they are made with, the service
//! proxy and DNS responder, the cross-node tunnel, and the packet filter
//! that keeps pods and the node's neighbours to what is meant for them;
//! and the function gateway, which routes HTTP requests to functions.

pub mod dns;
pub mod firewall;
pub mod gateway;
pub mod gateway_tls;
pub mod netlink;
pub mod podnet;
pub mod proxy;
pub mod sys;
pub mod tunnel;
