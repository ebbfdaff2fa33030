//! The sample counter (`kv_counter`: wasi:config, wasi:keyvalue,
//! wasi:logging) run against a bucket map in memory.

use super::*;
use crate::executor::wasm::runtime::{RunSpec, WasmConfig, WasmRuntime};
use crate::logs::{LogPaths, read_log};
use flotilla_api::TerminationReason;
use flotilla_api::interfaces::KvPair;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// Buckets in memory, with the scheduler's semantics for what the sample
/// uses; records which pods asked.
#[derive(Default)]
struct MemoryKv {
    data: Mutex<HashMap<(String, String), Vec<u8>>>,
    callers: Mutex<Vec<String>>,
}

impl KvClient for MemoryKv {
    fn call(&self, req: KvRequest) -> crate::executor::BoxFuture<'static, KvReply> {
        self.callers
            .lock()
            .unwrap()
            .push(format!("{}/{}", req.namespace, req.pod));
        let mut d = self.data.lock().unwrap();
        let b = req.bucket.clone();
        let reply = match req.op {
            KvOp::Get { key } => Ok(KvAnswer::Value(d.get(&(b, key)).cloned())),
            KvOp::Set { key, value } => {
                d.insert((b, key), value);
                Ok(KvAnswer::Done)
            }
            KvOp::Increment { key, delta } => {
                let cur: u64 = d
                    .get(&(b.clone(), key.clone()))
                    .map(|v| String::from_utf8_lossy(v).parse().unwrap())
                    .unwrap_or(0);
                d.insert((b, key), (cur + delta).to_string().into_bytes());
                Ok(KvAnswer::Count(cur + delta))
            }
            KvOp::GetMany { keys } => Ok(KvAnswer::Values(
                keys.into_iter()
                    .map(|k| {
                        d.get(&(b.clone(), k.clone())).map(|v| KvPair {
                            key: k,
                            value: v.clone(),
                        })
                    })
                    .collect(),
            )),
            other => Err(KvError::Refused(format!("{other:?} is not faked"))),
        };
        Box::pin(async move { reply })
    }
}

fn runtime(dir: &Path) -> Arc<WasmRuntime> {
    let mut cfg = WasmConfig::new(dir.join("cache"));
    cfg.max_instances = 8;
    Arc::new(WasmRuntime::new(cfg).unwrap())
}

fn workload(asked: HostInterfaces, kv: &Arc<MemoryKv>, config: &ConfigCell) -> Workload {
    Workload {
        member: "counter".into(),
        kv: (!asked.keyvalue.is_empty()).then(|| KvAccess {
            client: kv.clone(),
            namespace: "shop".into(),
            pod: "tally".into(),
        }),
        asked,
        config: config.clone(),
    }
}

/// A runtime under `dir` and the `kv_counter` sample prepared on it.
async fn counter(
    dir: &Path,
) -> (
    Arc<WasmRuntime>,
    Arc<crate::executor::wasm::runtime::Prepared>,
) {
    let rt = runtime(dir);
    let p = rt
        .prepare(Path::new(flotilla_samples::KV_COUNTER_P2), "")
        .await
        .unwrap();
    (rt, p)
}

fn all_three(bucket: &str) -> HostInterfaces {
    HostInterfaces {
        config: vec!["counter-config".into()],
        keyvalue: vec![bucket.into()],
        logging: true,
    }
}

fn spec<'a>(log: &LogSink, env: &'a flotilla_api::Labels, w: &'a Workload) -> RunSpec<'a> {
    RunSpec {
        argv0: "counter",
        args: &[],
        env,
        preopens: &[],
        blocking_io: false,
        memory_limit: None,
        cpu_time: None,
        cpu_millis: 0,
        log: log.clone(),
        network: false,
        usage: None,
        outgoing: Default::default(),
        workload: w,
    }
}

/// Polls the member's log until `pred` holds (generous deadline).
async fn log_until(paths: &LogPaths, pred: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text =
            String::from_utf8_lossy(&read_log(paths, false, None).unwrap_or_default()).into_owned();
        if pred(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log never got there:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_counter_counts_in_its_bucket_sees_config_changes_and_logs_levelled_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, p) = counter(dir.path()).await;
    let kv = Arc::new(MemoryKv::default());
    let config = ConfigCell::new(
        [("interval_ms".to_string(), "10".to_string())]
            .into_iter()
            .collect(),
    );
    let w = workload(all_three("counters"), &kv, &config);
    let paths = LogPaths::new(dir.path(), "counter");
    let log = LogSink::new(paths.clone(), 1 << 20);
    let env = flotilla_api::Labels::new();
    let started = rt.start(&p, spec(&log, &env, &w)).await.unwrap();
    let running = tokio::spawn(started.run());
    log_until(&paths, |t| t.contains("count=3 step=1")).await;
    // A new value reaches the running member on its next read.
    assert!(
        config.set(
            [
                ("interval_ms".to_string(), "10".to_string()),
                ("step".to_string(), "5".to_string())
            ]
            .into_iter()
            .collect()
        )
    );
    let text = log_until(&paths, |t| t.contains(" step=5\n")).await;
    running.abort();
    assert!(
        text.contains("[INFO] counter: counting in bucket counters\n"),
        "{text}"
    );
    assert!(text.contains("[DEBUG] counter: count=1\n"), "{text}");
    // The count is the bucket's: what the last line says is stored.
    let stored = kv.data.lock().unwrap()[&("counters".to_string(), "count".to_string())].clone();
    let n: u64 = String::from_utf8(stored).unwrap().parse().unwrap();
    assert!(n >= 8, "three steps of 1 and one of 5 at least: {n}");
    assert!(kv.callers.lock().unwrap().iter().all(|c| c == "shop/tally"));
}

#[tokio::test]
async fn a_component_importing_interfaces_its_member_did_not_ask_for_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, p) = counter(dir.path()).await;
    let kv = Arc::new(MemoryKv::default());
    let log = LogSink::new(LogPaths::new(dir.path(), "counter"), 1 << 20);
    let env = flotilla_api::Labels::new();
    for (asked, missing) in [
        (HostInterfaces::default(), "wasi:"),
        (
            HostInterfaces {
                keyvalue: vec!["counters".into()],
                logging: true,
                ..Default::default()
            },
            "wasi:config/store",
        ),
        (
            HostInterfaces {
                keyvalue: vec!["counters".into()],
                config: vec!["c".into()],
                ..Default::default()
            },
            "wasi:logging/logging",
        ),
    ] {
        let w = workload(asked, &kv, &ConfigCell::default());
        let Err(exit) = rt.start(&p, spec(&log, &env, &w)).await else {
            panic!("started without the interfaces it imports");
        };
        assert_eq!(exit.reason, TerminationReason::StartError);
        assert!(
            exit.message.contains(missing)
                && exit.message.contains("member \"counter\" does not ask for"),
            "{}",
            exit.message
        );
    }
    assert!(kv.callers.lock().unwrap().is_empty(), "nothing ran");
    // A module without those imports runs whatever is asked.
    let hello = rt
        .prepare(Path::new(flotilla_samples::HELLO_P2), "")
        .await
        .unwrap();
    let w = workload(HostInterfaces::default(), &kv, &ConfigCell::default());
    assert!(rt.start(&hello, spec(&log, &env, &w)).await.is_ok());
}

#[tokio::test]
async fn a_bucket_the_member_did_not_name_cannot_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, p) = counter(dir.path()).await;
    let kv = Arc::new(MemoryKv::default());
    // It opens "counters" (its default); the member named another bucket.
    let w = workload(all_three("other"), &kv, &ConfigCell::default());
    let paths = LogPaths::new(dir.path(), "counter");
    let log = LogSink::new(paths.clone(), 1 << 20);
    let env = flotilla_api::Labels::new();
    let exit = rt
        .start(&p, spec(&log, &env, &w))
        .await
        .unwrap()
        .run()
        .await;
    // WASI 0.2's exit carries only success or failure.
    assert_eq!(exit.code, 1, "{exit:?}");
    let text = String::from_utf8(read_log(&paths, false, None).unwrap()).unwrap();
    assert!(
        text.contains("cannot open bucket counters: no such bucket"),
        "{text}"
    );
    assert!(kv.callers.lock().unwrap().is_empty());
}
