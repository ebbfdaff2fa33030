//! `wasi:keyvalue` from a wasm member against the same operations on the
//! store underneath called natively (issue 18): the `kv_counter` sample's
//! `bench N` mode, running as a pod member of an all-in-one cluster, times
//! N sets then N gets of 64-byte values (each through the member's host
//! call, the node's QUIC link, the scheduler's authorization and a synced
//! redb transaction); the reference is `flotilla_scheduler::kv::KvStore`
//! doing the same N sets and gets in this process on the same filesystem,
//! with the same durability (each set synced).

use super::{InProcess, pct};
use flotilla_api::interfaces::{BucketLimits, KvOp};
use flotilla_api::{Object, PodPhase};
use std::time::{Duration, Instant};

struct Figures {
    set_p50: Duration,
    set_p99: Duration,
    set_total: Duration,
    get_p50: Duration,
    get_p99: Duration,
    get_total: Duration,
}

fn parse(line: &str) -> Figures {
    let field = |k: &str| -> Duration {
        let v = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"));
        Duration::from_nanos(v.parse().unwrap())
    };
    Figures {
        set_p50: field("set_p50_ns"),
        set_p99: field("set_p99_ns"),
        set_total: field("set_total_ns"),
        get_p50: field("get_p50_ns"),
        get_p99: field("get_p99_ns"),
        get_total: field("get_total_ns"),
    }
}

/// The same operations on a `KvStore` of its own, called natively.
fn native(dir: &std::path::Path, n: usize) -> Figures {
    let store = flotilla_scheduler::kv::KvStore::open(&dir.join("native-kv.redb")).unwrap();
    let value = vec![b'v'; 64];
    let time = |op: &dyn Fn(usize)| {
        let mut each = Vec::with_capacity(n);
        let start = Instant::now();
        for i in 0..n {
            let t = Instant::now();
            op(i);
            each.push(t.elapsed());
        }
        let total = start.elapsed();
        each.sort();
        (pct(&each, 0.5), pct(&each, 0.99), total)
    };
    let l = BucketLimits::default();
    let (set_p50, set_p99, set_total) = time(&|i| {
        store
            .run(
                "default",
                "counters",
                KvOp::Set {
                    key: format!("bench/{i}"),
                    value: value.clone(),
                },
                l,
            )
            .unwrap();
    });
    let (get_p50, get_p99, get_total) = time(&|i| {
        store
            .run(
                "default",
                "counters",
                KvOp::Get {
                    key: format!("bench/{i}"),
                },
                l,
            )
            .unwrap();
    });
    Figures {
        set_p50,
        set_p99,
        set_total,
        get_p50,
        get_p99,
        get_total,
    }
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub async fn keyvalue(n: usize) {
    println!(
        "## wasi:keyvalue from a wasm member vs the store called natively ({n} sets then {n} gets of 64-byte values)\n"
    );
    let bed = InProcess::start(4).await;
    let store = bed.sched.cluster.store.clone();
    let logs = bed.dir.path().join("agent").join("logs");
    let mut https = tokio::task::block_in_place(|| bed.https());
    let member = tokio::task::block_in_place(move || {
        let bytes = std::fs::read(flotilla_samples::KV_COUNTER_P2).unwrap();
        let digest = flotilla_api::manifest::digest_of(&bytes);
        let module = serde_json::json!({"digest": digest, "size": bytes.len()});
        assert!(https.send("PUT", &format!("/v1/blobs/{digest}"), bytes) < 300);
        let objects = serde_json::json!({"objects": [
            {"kind": "ConfigMap", "metadata": {"name": "kvbench", "namespace": "default"}, "data": {}},
            {"kind": "Pod", "metadata": {"name": "kvbench", "namespace": "default"},
             "spec": {"members": [{"name": "kv", "module": module, "args": ["bench", n.to_string()],
                "restart": "Never",
                "wasi": {"config": ["kvbench"], "keyvalue": ["counters"], "logging": true}}]}}]});
        assert_eq!(
            https.send("POST", "/v1/apply", serde_json::to_vec(&objects).unwrap()),
            200
        );
        let deadline = Instant::now() + Duration::from_secs(600);
        let uid = loop {
            if let Some(Object::Pod(p)) = store.get("pods/default/kvbench").as_deref() {
                match p.status.phase {
                    PodPhase::Succeeded => break p.metadata.uid.clone(),
                    PodPhase::Failed => panic!("the benchmark member failed: {:?}", p.status),
                    _ => {}
                }
            }
            assert!(
                Instant::now() < deadline,
                "the benchmark member never ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(logs.join(uid).join("kv.log")).unwrap();
        let line = log
            .lines()
            .find(|l| l.starts_with("set_p50_ns="))
            .unwrap_or_else(|| panic!("no figures in the member's log:\n{log}"));
        parse(line)
    });
    let reference = tokio::task::block_in_place(|| native(bed.dir.path(), n));
    println!(
        "| operation | from a wasm member: p50 | p99 | ops/s | native KvStore: p50 | p99 | ops/s | p50 ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let ops = |total: Duration| n as f64 / total.as_secs_f64();
    for (name, m, r) in [
        (
            "set (synced)",
            (member.set_p50, member.set_p99, member.set_total),
            (reference.set_p50, reference.set_p99, reference.set_total),
        ),
        (
            "get",
            (member.get_p50, member.get_p99, member.get_total),
            (reference.get_p50, reference.get_p99, reference.get_total),
        ),
    ] {
        println!(
            "| {name} | {} | {} | {:.0} | {} | {} | {:.0} | {:.1}× |",
            us(m.0),
            us(m.1),
            ops(m.2),
            us(r.0),
            us(r.1),
            ops(r.2),
            m.0.as_secs_f64() / r.0.as_secs_f64()
        );
    }
    println!(
        "\nOne member, one operation at a time (ops/s = {n} / the run's time). The member's path: host call → a stream of the node's QUIC link (mutual TLS, loopback) → the scheduler authorizes the pod and bucket → the same `KvStore::run` the reference calls → the answer back. Sets are synced on both sides (one redb transaction each).\n"
    );
    bed.stop().await;
}
