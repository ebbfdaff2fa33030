//! The Flotilla host agent: runs the pods the scheduler assigns to its node.
//!
//! - [`link`]: the sans-IO protocol core for the scheduler link, and
//!   [`client`] which drives it over QUIC.
//! - [`agent`]: desired vs running pods; [`pod`]: one pod's members.
//! - [`wasm`]: the wasmtime executor; [`logs`]: member log files.

pub mod agent;
pub mod backoff;
pub mod client;
pub mod container;
/// The digest-addressed blob store (shared with the scheduler's).
pub use flotilla_api::content;
pub mod dns;
pub mod executor;
pub mod fetch;
pub mod image;
pub mod join;
pub mod link;
pub mod logs;
pub mod netlink;
pub mod node;
pub mod pod;
pub mod podnet;
pub mod proxy;
pub mod runc;
pub mod shim;
pub mod sim;
pub mod tunnel;
pub mod unpack;
pub mod wasm;
