//! First start of a large component (an ~18 MB componentize-py program):
//! the agent's compile (its engine settings, cold cache, artifact written
//! to disk) against wasmtime compiling the same bytes with its default
//! settings, in the same process; plus the agent's engine with wasmtime's
//! default memory reservation, to show what that setting costs.

use flotilla_host::executor::wasm::runtime::{WasmConfig, WasmRuntime, compact_engine_config};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

pub fn large(rt: &tokio::runtime::Runtime, trials: usize) {
    println!("## First start of a large component ({trials} compiles each)\n");
    let Some(path) = std::env::var_os("BENCH_LARGE_COMPONENT") else {
        println!(
            "Not measured: set BENCH_LARGE_COMPONENT to a large component (scripts/bench builds one with componentize-py).\n"
        );
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let mb = bytes.len() as f64 / 1e6;
    let dir = tempfile::tempdir().unwrap();
    let mut ours = Vec::new();
    let mut bare = Vec::new();
    let mut roomy = Vec::new();
    for t in 0..trials {
        // The agent: a fresh cache each time (a first start on the node).
        let mut cfg = WasmConfig::new(dir.path().join(format!("cache{t}")));
        cfg.max_instances = 64;
        let runtime = Arc::new(WasmRuntime::new(cfg.clone()).unwrap());
        let t0 = Instant::now();
        rt.block_on(runtime.prepare(Path::new(&path), "")).unwrap();
        ours.push(t0.elapsed());
        drop(runtime);
        // wasmtime with its defaults.
        let engine = wasmtime::Engine::default();
        let t0 = Instant::now();
        wasmtime::component::Component::new(&engine, &bytes).unwrap();
        bare.push(t0.elapsed());
        // The agent's settings with slots only as large as its memory limit
        // (what it falls back to where 4 GiB slots cannot be reserved):
        // Cranelift must emit bounds checks.
        let c = compact_engine_config(&cfg);
        let engine = wasmtime::Engine::new(&c).unwrap();
        let t0 = Instant::now();
        wasmtime::component::Component::new(&engine, &bytes).unwrap();
        roomy.push(t0.elapsed());
    }
    for v in [&mut ours, &mut bare, &mut roomy] {
        v.sort();
    }
    let (o, b, r) = (ours[trials / 2], bare[trials / 2], roomy[trials / 2]);
    println!("| compile of the {mb:.1} MB component | median | ratio to wasmtime defaults |");
    println!("|---|---|---|");
    println!(
        "| agent's first start (its engine, cold cache, artifact written to disk) | {} | {:.2} (target ≤ 1.2) |",
        secs(o),
        o.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "| `Component::new`, wasmtime 48 default settings (reference) | {} | 1.00 |",
        secs(b)
    );
    println!(
        "| `Component::new`, agent's fallback settings ({} MiB slots, bounds checks) | {} | {:.2} |",
        WasmConfig::new(dir.path().into()).max_memory >> 20,
        secs(r),
        r.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "\nSame process, same bytes; parallel compilation on both sides (2 cores). The agent reserves 4 GiB of address space per linear memory slot (pooling allocator; reserved, not committed) with a 32 MiB guard, so Cranelift leaves out bounds checks as with wasmtime's defaults; the third row is its fallback where that much address space cannot be reserved, which needs explicit bounds checks.\n"
    );
}
