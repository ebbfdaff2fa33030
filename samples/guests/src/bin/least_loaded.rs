//! A scheduler plugin built with flotilla-sdk that only scores: nodes with
//! a larger share of their memory and cpu still free score higher (0–100).
//! The placement benchmark's plugin; with `$FLAT` set it gives every node
//! 50 without looking (what a call costs when the plugin does nothing).

use flotilla_sdk::{Node, Pod, Scheduler};

struct LeastLoaded;

fn free_share(allocatable: u64, requested: u64) -> u64 {
    allocatable.saturating_sub(requested).saturating_mul(100) / allocatable.max(1)
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
