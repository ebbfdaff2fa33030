//! The control plane on etcd against the embedded redb store (issue 19,
//! `BENCH_ONLY=store`): apply → Running through the real API with a real
//! agent, and placement end to end over simulated nodes with the real
//! scheduler process — each on both stores in the same invocation, with
//! the same settings. etcd is Debian's, one member on loopback, its data
//! on the same disk.

use crate::fleet::{fleet_config, round, start_scheduler_with, wait};
use crate::{InProcess, apply_latencies, ms, pct};
use flotilla_host::sim::SimFleet;
use flotilla_scheduler::server::StoreBackend;
use flotilla_scheduler::store::{EtcdConfig, LocalEtcd};
use std::time::Duration;

pub struct Sizes {
    /// apply → Running samples per store.
    pub applies: usize,
    /// Simulated nodes and the Deployment placed over them.
    pub nodes: usize,
    pub pods: usize,
    pub rounds: usize,
}

pub fn store(rt: &tokio::runtime::Runtime, sz: &Sizes) {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-store-bench")
        .tempdir()
        .unwrap();
    let etcd_dir = dir.path().join("etcd");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    let etcd = LocalEtcd::start(&etcd_dir);

    // --- apply → Running.
    let latencies = |backend: StoreBackend| {
        rt.block_on(async {
            let bed = InProcess::start_on(sz.applies, backend).await;
            let store = bed.sched.cluster.store.clone();
            let (api, ca, auth) = (
                bed.sched.api_addr,
                bed.sched.ca_pem().to_string(),
                bed.auth.clone(),
            );
            let n = sz.applies;
            let lat =
                tokio::task::spawn_blocking(move || apply_latencies(store, api, &ca, &auth, n))
                    .await
                    .unwrap();
            bed.stop().await;
            lat
        })
    };
    let on_redb = latencies(StoreBackend::Redb);
    let cfg = EtcdConfig::parse(&format!("{}/apply", etcd.url())).unwrap();
    let on_etcd = latencies(StoreBackend::Etcd(cfg));
    println!(
        "## apply → Running on etcd and on redb ({} pods each, one apply each)\n",
        sz.applies
    );
    println!("| store | p50 | p90 | p99 | max | p50 vs redb | p99 vs redb |");
    println!("|---|---|---|---|---|---|---|");
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    for (name, lat) in [("redb (embedded)", &on_redb), ("etcd (1 member)", &on_etcd)] {
        println!(
            "| {name} | {} | {} | {} | {} | {:.2}× | {:.2}× |",
            ms(pct(lat, 0.5)),
            ms(pct(lat, 0.9)),
            ms(pct(lat, 0.99)),
            ms(*lat.last().unwrap()),
            ratio(pct(lat, 0.5), pct(&on_redb, 0.5)),
            ratio(pct(lat, 0.99), pct(&on_redb, 0.99)),
        );
    }
    println!(
        "\nThe same in-process scheduler and real agent, the store the only difference: each sample is an HTTPS POST of one Pod (a write that is durable when acknowledged: redb fsyncs, etcd commits to its WAL) → placement (a binding write) → QUIC Assign → instantiate → the agent's status report (a third write) → the scheduler's watch shows it Running. On etcd every write is a gRPC transaction and returns once the store's own watch has applied it. Pods stay running; the last starts beside {} others. redb ran first, then etcd.\n",
        sz.applies
    );

    // --- Placement end to end, 1 scheduler process per store.
    let mut rows = Vec::new();
    for (name, store) in [
        ("redb (embedded)", None),
        ("etcd (1 member)", Some(format!("{}/placement", etcd.url()))),
    ] {
        let extra: Vec<&str> = match &store {
            Some(url) => vec!["--store", url],
            None => vec![],
        };
        let s = start_scheduler_with(
            &dir.path().join(name.split(' ').next().unwrap()),
            "500ms",
            "2500ms",
            &extra,
        );
        let fleet: SimFleet = rt
            .block_on(flotilla_host::sim::start(
                fleet_config(&s, "n", sz.nodes, 16),
                |_| {},
            ))
            .unwrap();
        wait("nodes ready", Duration::from_secs(120), || {
            s.ready_nodes() == sz.nodes
        });
        let module = crate::upload(&s.http, &s.url, &s.auth, flotilla_samples::COUNTER_P1);
        let took: Vec<Duration> = (0..sz.rounds)
            .map(|_| round(&s, &fleet, "default", "wide", &module, sz.pods))
            .collect();
        let mut sorted = took.clone();
        sorted.sort();
        rows.push((name, sorted[sz.rounds / 2], took));
        rt.block_on(fleet.shutdown());
    }
    println!(
        "## Placement end to end on etcd and on redb ({} simulated nodes, a Deployment of {}, median of {} rounds)\n",
        sz.nodes, sz.pods, sz.rounds
    );
    println!(
        "| store | apply → all on their agents | pods/s | share of redb | each round, in order |"
    );
    println!("|---|---|---|---|---|");
    let rate = |d: Duration| sz.pods as f64 / d.as_secs_f64();
    for (name, d, each) in &rows {
        let each: Vec<String> = each.iter().map(|d| format!("{:.0}", rate(*d))).collect();
        println!(
            "| {name} | {} | {:.0} | {:.0} % | {} pods/s |",
            ms(*d),
            rate(*d),
            rate(*d) / rate(rows[0].1) * 100.0,
            each.join(", ")
        );
    }
    println!(
        "\nThe real scheduler process (`flotilla scheduler`, then `flotilla scheduler --store etcd://…`), {} simulated agents over QUIC; each round applies the Deployment over the API and stops the clock when every replica is on its agent (created, placed, written, sent as `Assign`), then deletes it and waits until the agents and the store hold none. On etcd, the placement pass's bindings go out in transactions of 64.\n",
        sz.nodes
    );
}
