//! First start of a large component (an ~18 MB componentize-py program):
//! the agent's compile (its engine settings, cold cache, artifact written
//! to disk) against wasmtime compiling the same bytes with its default
//! settings, in the same process; plus the agent's engine with wasmtime's
//! default memory reservation, to show what that setting costs.

use flotilla_host::executor::wasm::runtime::{WasmConfig, WasmRuntime, engine_config};
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
        // The agent's settings with wasmtime's default memory reservation
        // and guard (so Cranelift can drop bounds checks).
        let mut c = engine_config(&cfg);
        c.memory_reservation(4 << 30).memory_guard_size(2 << 30);
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
        "| `Component::new`, agent's settings but 4 GiB reservation + 2 GiB guard | {} | {:.2} |",
        secs(r),
        r.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "\nSame process, same bytes; parallel compilation on both sides (2 cores). The agent reserves {} MiB per linear memory (pooling allocator slots) with a 64 KiB guard, so Cranelift must emit explicit bounds checks that a 4 GiB reservation lets it leave out; the third row isolates that setting.\n",
        WasmConfig::new(dir.path().into()).max_memory >> 20
    );
}
