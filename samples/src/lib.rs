//! Sample guest programs, compiled by this crate's build script, and the paths
//! to their `.wasm` files for tests and benchmarks.
//!
//! `*_P1` constants are WASI preview 1 core modules (wasm32-wasip1); `*_P2`
//! constants are components that export `wasi:cli/run` (wasm32-wasip2).
//!
//! ```
//! assert!(std::path::Path::new(flotilla_samples::HELLO_P2).exists());
//! ```

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// Directory holding the sample manifests.
pub const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests");
