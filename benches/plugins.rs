//! Plugins (issue 18): what an admission plugin adds to a write, and
//! placement throughput with a scoring plugin against placement without
//! one — the scheduler's real code paths (`Plugins::admit`,
//! `placement::place_with` with a `plugins::scheduling::Pass`) on a
//! cluster state in a temporary store, no network.

use super::{ms, pct, us};
use flotilla_api::plugin::{Hook, Plugin, PluginSpec};
use flotilla_api::{Capacity, MemberSource, Object, ObjectMeta, Pod, PodPhase};
use flotilla_scheduler::cluster::{Cluster, ClusterConfig};
use flotilla_scheduler::placement::{Extension, NodeView, PodRequest, place, place_with};
use flotilla_scheduler::plugins::scheduling::Pass;
use flotilla_scheduler::store::{Expect, RedbStore, WriteDurability};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cluster(dir: &std::path::Path) -> Arc<Cluster> {
    let store = RedbStore::open(&dir.join("s.redb")).unwrap();
    Cluster::new(
        Arc::new(store),
        flotilla_api::content::ContentStore::open(dir.join("blobs")).unwrap(),
        ClusterConfig {
            data_dir: dir.to_path_buf(),
            node_timeout: Duration::from_secs(3600),
            heartbeat: Duration::from_millis(500),
            node_cert_ttl: Duration::from_secs(3600),
            pod_cidr: flotilla_scheduler::ipam::DEFAULT_POD_CIDR,
            blob_grace: Duration::from_secs(3600),
            pull_through: false,
            node_ports: flotilla_api::net::DEFAULT_NODE_PORTS,
            registries: Default::default(),
        },
        None,
    )
}

/// Stores `path` as an uploaded module and a Plugin running it.
fn install(c: &Cluster, name: &str, path: &str, hook: Hook, config: &[(&str, &str)]) {
    let bytes = std::fs::read(path).unwrap();
    let source = MemberSource::module(&bytes);
    let MemberSource::Module { digest, .. } = &source else {
        unreachable!()
    };
    c.blobs.put(digest, &bytes, u64::MAX).unwrap();
    let mut spec = PluginSpec::new(source, hook);
    for (k, v) in config {
        spec.config.insert(k.to_string(), v.to_string());
    }
    let plugin = Plugin {
        metadata: ObjectMeta {
            name: name.into(),
            ..Default::default()
        },
        spec,
    };
    c.plugins.check(&c.blobs, &plugin).unwrap();
    c.store
        .put(
            Object::Plugin(plugin),
            Expect::Absent,
            WriteDurability::Lazy,
        )
        .unwrap();
}

fn pod(i: usize) -> Pod {
    let mut p = Pod::default();
    p.metadata.name = format!("web-{i}");
    p.metadata.namespace = "prod".into();
    p.metadata.uid = format!("uid-{i}");
    p.metadata.labels.insert("app".into(), "web".into());
    p.metadata.labels.insert("team".into(), "shop".into());
    p.spec.members.push(flotilla_api::MemberSpec {
        name: "app".into(),
        source: MemberSource::Module {
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 1000,
        },
        ..Default::default()
    });
    p.status.phase = PodPhase::Pending;
    p
}

pub fn plugins(samples: usize, pods: usize) {
    admission(samples);
    placement(pods);
}

/// `Plugins::admit` of one pod with the require_labels sample selecting
/// it (a fresh instance for the write: mutate, then validate) against the
/// same call with no plugin stored.
fn admission(samples: usize) {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let obj = Object::Pod(pod(0));
    let run = |n: usize| -> Vec<Duration> {
        let mut v: Vec<Duration> = (0..n)
            .map(|_| {
                let o = obj.clone();
                let t = Instant::now();
                let admitted = c.plugins.admit(&c, o, |_| Ok(()));
                let took = t.elapsed();
                assert!(admitted.is_ok());
                took
            })
            .collect();
        v.sort();
        v
    };
    let without = run(samples);
    install(
        &c,
        "require-labels",
        flotilla_samples::REQUIRE_LABELS_P2,
        Hook::Admission,
        &[("REQUIRED", "team"), ("DEFAULTS", "tier=web")],
    );
    run(20);
    let with = run(samples);
    let overhead = |p: f64| pct(&with, p).saturating_sub(pct(&without, p));
    println!("## Admission plugin overhead per write ({samples} writes each)\n");
    println!(
        "Each sample: `Plugins::admit` of one pod — list the Plugins, then for `require_labels` (SDK, Rust, 131 kB component) a fresh instance that serves the write's `mutate` and then its `validate`, the object lowered to and lifted from the WIT records — against the same call with no Plugin stored. Same process, same store, warm (the component compiled at install).\n"
    );
    println!("| | no plugin | one plugin | overhead | target |");
    println!("|---|---|---|---|---|");
    let verdict = |d: Duration| {
        if d <= Duration::from_micros(100) {
            "met"
        } else {
            "**missed**"
        }
    };
    println!(
        "| p50 | {} | {} | **{}** | ≤ 100 µs ({}) |",
        us(pct(&without, 0.5)),
        us(pct(&with, 0.5)),
        us(overhead(0.5)),
        verdict(overhead(0.5))
    );
    println!(
        "| p99 | {} | {} | {} | — |",
        us(pct(&without, 0.99)),
        us(pct(&with, 0.99)),
        us(overhead(0.99))
    );
    println!();
}

/// Placement of `pods` pending pods over 1,000 nodes: the pure function
/// alone against the same with the least_loaded scoring plugin (a pass:
/// one instance, one `filter` and one `score` call per pod over every
/// candidate node).
fn placement(pods: usize) {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let flat_dir = tempfile::tempdir().unwrap();
    let flat = cluster(flat_dir.path());
    install(
        &c,
        "least-loaded",
        flotilla_samples::LEAST_LOADED_P2,
        Hook::Scheduler,
        &[],
    );
    install(
        &flat,
        "least-loaded",
        flotilla_samples::LEAST_LOADED_P2,
        Hook::Scheduler,
        &[("FLAT", "1")],
    );
    let n = 1000;
    let nodes: Vec<NodeView> = (0..n)
        .map(|i| NodeView {
            name: format!("node-{i:05}"),
            labels: [("zone".to_string(), format!("z{}", i % 4))].into(),
            ready: true,
            unschedulable: false,
            allocatable: Capacity {
                cpu: 64_000,
                memory: 256 << 30,
                ..Default::default()
            },
            allocated: Capacity {
                cpu: (i as u64 * 37) % 1500,
                memory: 0,
                ..Default::default()
            },
            pods: i % 7,
            runtimes: vec!["wasm".into()],
            free_ips: 253,
        })
        .collect();
    let pending: Vec<Pod> = (0..pods).map(pod).collect();
    let reqs: Vec<PodRequest> = pending
        .iter()
        .map(|p| PodRequest {
            id: p.metadata.uid.clone(),
            cpu: 10,
            memory: 16 << 20,
            slots: 1,
            node_selector: Default::default(),
            runtimes: vec!["wasm"],
            needs_ip: false,
            on_node: None,
        })
        .collect();
    let refs: Vec<&Pod> = pending.iter().collect();
    // Warm both paths once.
    let _ = place(&nodes, &reqs[..reqs.len().min(10)]);
    let with_pass = |c: &Cluster| {
        let t = Instant::now();
        let mut pass = Pass::new(c, &nodes, &refs, &[]).expect("a scheduler plugin is stored");
        let plan = place_with(&nodes, &reqs, Some(&mut pass as &mut dyn Extension));
        drop(pass);
        assert_eq!(plan.bindings.len(), pods);
        t.elapsed()
    };
    let mut rounds = Vec::new();
    // More rounds (`BENCH_PLUGIN_ROUNDS`) for a profiler to look at.
    for _ in 0..crate::arg_count("BENCH_PLUGIN_ROUNDS", 3) {
        let t = Instant::now();
        let plain = place(&nodes, &reqs);
        let without = t.elapsed();
        assert_eq!(plain.bindings.len(), pods);
        rounds.push((without, with_pass(&c), with_pass(&flat)));
    }
    rounds.sort_by_key(|r| r.1);
    let (without, with, flat_took) = rounds[rounds.len() / 2];
    let rate = |d: Duration| pods as f64 / d.as_secs_f64();
    let share = rate(with) / rate(without);
    println!(
        "## Placement with a scoring plugin ({pods} pods over {n} nodes, median of {} rounds)\n",
        rounds.len()
    );
    println!(
        "Each round: `placement::place` (built-in filters and least-allocated scoring over every node for every pod) against `place_with` and a `Pass` with the least_loaded sample (SDK, Rust): the pass gives the instance the 1,000 nodes once (`begin`), then per pod calls `filter` and `score` once each over the candidates' indices, and `update-node` after each binding. Same nodes, same pods, same process.\n"
    );
    println!("| | time | pods/s | share of no plugin | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| no plugin | {} | {:.0} | 100 % | — |",
        ms(without),
        rate(without)
    );
    println!(
        "| least_loaded plugin | {} | {:.0} | **{:.0} %** | ≥ 50 % ({}) |",
        ms(with),
        rate(with),
        share * 100.0,
        if share >= 0.5 { "met" } else { "**missed**" }
    );
    let flat_share = rate(flat_took) / rate(without);
    println!(
        "| the same plugin with `FLAT` (every node 50, no work per node) | {} | {:.0} | {:.0} % | — |",
        ms(flat_took),
        rate(flat_took),
        flat_share * 100.0
    );
    println!(
        "\nPer pod: {:.1} µs without a plugin, {:.1} µs with least_loaded, of which {:.1} µs is the calls themselves (the FLAT row: two calls, the pod record, 1,000 indices each way) and {:.1} µs its per-node work in wasm (two u64 divisions per node, under fuel metering).\n",
        without.as_secs_f64() * 1e6 / pods as f64,
        with.as_secs_f64() * 1e6 / pods as f64,
        (flat_took.saturating_sub(without)).as_secs_f64() * 1e6 / pods as f64,
        (with.saturating_sub(flat_took)).as_secs_f64() * 1e6 / pods as f64,
    );
}
