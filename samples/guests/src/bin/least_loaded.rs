//! A scheduler plugin built with flotilla-sdk that only scores: nodes with
//! a larger share of their memory and cpu still free score higher (0–100).
//! The placement benchmark's plugin; with `$FLAT` set it gives every node
//! 50 without looking (what a call costs when the plugin does nothing).

use flotilla_sdk::{Node, Pod, Scheduler};

struct LeastLoaded;

/// Percent of `allocatable` not requested. In f64: wasm32 has no 64×64-bit
/// multiply-high, so an overflow-checked u64 multiplication compiles to a
/// call of `__multi3`, which cost this plugin a third of its time per node.
fn free_share(allocatable: u64, requested: u64) -> u64 {
    let free = allocatable.saturating_sub(requested) as f64;
    (free * 100.0 / allocatable.max(1) as f64) as u64
}

/// `$FLAT`, read once.
fn flat() -> bool {
    static FLAT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAT.get_or_init(|| std::env::var_os("FLAT").is_some())
}

#[flotilla_sdk::scheduler]
impl Scheduler for LeastLoaded {
    fn score(_pod: &Pod, node: &Node) -> u32 {
        if flat() {
            return 50;
        }
        let memory = free_share(node.allocatable_memory, node.requested_memory);
        let cpu = free_share(node.allocatable_cpu, node.requested_cpu);
        ((memory + cpu) / 2) as u32
    }
}

/// Built as a binary with the other samples; the scheduler calls the
/// exports, never `main`.
fn main() {}
