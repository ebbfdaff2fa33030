//! The Flotilla scheduler: object store, placement, controllers, the HTTP API
//! and the QUIC endpoint agents connect to.

pub mod placement;
pub mod store;
