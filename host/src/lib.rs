//! The Flotilla host agent: runs the pods the scheduler assigns to its node.
//!
//! - [`link`]: the scheduler link — the sans-IO protocol core, [`link::client`]
//!   which drives it over QUIC, [`link::join`], and [`link::fetch`] (modules
//!   fetched over the link).
//! - [`agent`]: desired vs running pods; [`pod`]: one pod's members and
//!   their supervisor.
//! - [`executor`]: the member contract and its wasm and container
//!   implementations (wasmtime runtime; runc, its spec and the shim).
//! - [`image`]: registry client, image store, layer unpacking.
//! - [`net`]: pod sandboxes, service proxy, DNS, tunnel.
//! - [`metrics`]: what running members use (CPU, memory), for the scheduler
//!   and the node's Prometheus port.
//! - [`logs`]: member log files; [`node`]: assembly; [`sim`]: simulated agents.

pub mod agent;
pub mod backoff;
/// The digest-addressed blob store (shared with the scheduler's).
pub use flotilla_api::content;
pub mod executor;
pub mod image;
pub mod inputs;
pub mod link;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod node;
pub mod pod;
pub mod probe;
pub mod sim;
pub mod volume;
