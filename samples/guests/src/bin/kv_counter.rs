//! A counter on `wasi:keyvalue`, configured through `wasi:config` and
//! logging through `wasi:logging` — the workload sample of the SDK.
//!
//! Every `interval_ms` (config, default 200) it adds `step` (config,
//! default 1; read again each time, so a ConfigMap change shows on the
//! next tick) to the key `count` of the bucket named by `bucket` (config,
//! default `counters`) and prints `count=N step=S`; with `payload_bytes`
//! set it also stores that many bytes under `payload/N` (to fill a bucket
//! to its quota). Errors are printed (`error: …`) and logged at error
//! level; the counter goes on.
//!
//! `kv_counter bench N` instead times N `set`s then N `get`s of distinct
//! 64-byte values in the bucket and prints each one's p50, p99 and total
//! in nanoseconds (`set_p50_ns=… get_total_ns=… ops=N`; the benchmark).

use flotilla_sdk::{config, kv, log};
use std::time::{Duration, Instant};

fn main() {
    let bucket_name = config::get("bucket").unwrap_or_else(|| "counters".into());
    let bucket = match kv::open(&bucket_name) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot open bucket {bucket_name}: {}", kv::describe(&e));
            std::process::exit(2);
        }
    };
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("bench") {
        let n: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1000);
        bench(&bucket, n);
        return;
    }
    log::info("counter", &format!("counting in bucket {bucket_name}"));
    loop {
        let step: u64 = config::get_or("step", 1);
        match kv::increment(&bucket, "count", step) {
            Ok(n) => {
                println!("count={n} step={step}");
                log::debug("counter", &format!("count={n}"));
                let payload: usize = config::get_or("payload_bytes", 0);
                if payload > 0
                    && let Err(e) = bucket.set(&format!("payload/{n}"), &vec![b'x'; payload])
                {
                    let e = kv::describe(&e);
                    println!("error: payload/{n}: {e}");
                    log::error("counter", &format!("payload/{n}: {e}"));
                }
            }
            Err(e) => {
                let e = kv::describe(&e);
                println!("error: {e}");
                log::error("counter", &e);
            }
        }
        std::thread::sleep(Duration::from_millis(config::get_or("interval_ms", 200)));
    }
}

fn bench(bucket: &kv::Bucket, n: usize) {
    let value = vec![b'v'; 64];
    let time = |op: &dyn Fn(usize)| {
        let mut each = Vec::with_capacity(n);
        let start = Instant::now();
        for i in 0..n {
            let t = Instant::now();
            op(i);
            each.push(t.elapsed().as_nanos());
        }
        let total = start.elapsed().as_nanos();
        each.sort_unstable();
        let at = |q: f64| each[((n as f64 * q) as usize).min(n - 1)];
        (at(0.5), at(0.99), total)
    };
    let (sp50, sp99, st) = time(&|i| bucket.set(&format!("bench/{i}"), &value).expect("set"));
    let (gp50, gp99, gt) = time(&|i| {
        assert!(bucket.get(&format!("bench/{i}")).expect("get").is_some());
    });
    println!(
        "set_p50_ns={sp50} set_p99_ns={sp99} set_total_ns={st} get_p50_ns={gp50} get_p99_ns={gp99} get_total_ns={gt} ops={n}"
    );
}
