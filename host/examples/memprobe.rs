use flotilla_api::Labels;
use flotilla_host::executor::wasm::runtime::{RunSpec, WasmConfig, WasmRuntime};
use flotilla_host::logs::{LogPaths, LogSink};
use std::path::Path;
use std::sync::Arc;

fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

#[tokio::main]
async fn main() {
    let path = std::env::args().nth(1).unwrap();
    let n: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WasmConfig::new(dir.path().join("cache"));
    cfg.max_instances = n as u32 + 10;
    let rt = Arc::new(WasmRuntime::new(cfg).unwrap());
    let prepared = rt.prepare(Path::new(&path), "").await.unwrap();
    let before = rss();
    let mut env = Labels::new();
    env.insert("INTERVAL_MS".into(), "600000".into());
    let mut tasks = Vec::new();
    for i in 0..n {
        let log = LogSink::new(LogPaths::new(dir.path(), &format!("m{i}")), 1 << 20);
        let s = rt
            .start(
                &prepared,
                RunSpec {
                    preopens: &[],
                    blocking_io: false,
                    argv0: "m",
                    args: &[],
                    env: &env,
                    memory_limit: None,
                    cpu_time: None,
                    cpu_millis: 0,
                    log,
                    network: false,
                    usage: None,
                    outgoing: Default::default(),
                    workload: &Default::default(),
                },
            )
            .await
            .ok()
            .unwrap();
        tasks.push(tokio::spawn(s.run()));
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after = rss();
    println!(
        "{n} instances: {} KiB per instance",
        (after - before) / n as u64
    );
}
