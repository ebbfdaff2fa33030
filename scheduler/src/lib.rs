//! The Flotilla scheduler: object store, placement, controllers, the HTTP API
//! and the QUIC endpoint agents connect to.

pub mod agents;
pub mod api;
pub mod audit;
pub mod auth;
pub mod blobs;
pub mod cluster;
pub mod controllers;
pub mod events;
pub mod guard;
pub mod http;
pub mod invoke;
pub mod ipam;
pub mod kinds;
pub mod kv;
pub mod leader;
pub mod mirror;
pub mod outbox;
pub mod pki;
pub mod placement;
pub mod plugins;
pub mod replicate;
pub mod resolve;
pub mod server;
pub mod store;
pub mod tls;
pub mod usage;
