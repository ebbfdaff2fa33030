//! Leader failover (issue 19, `BENCH_ONLY=leader`): three `flotilla
//! scheduler` processes on a three-member etcd cluster; the leader is
//! killed with SIGKILL at a random point of its renewal cycle, and the
//! clock runs until a survivor says it leads. The reference, in the same
//! invocation on the same etcd: how long etcd takes to delete the key of a
//! lease with the same TTL once its holder stops renewing it — the floor
//! of any election on an etcd lease of that length.

use crate::fleet::{Sched, start_scheduler_with};
use crate::ms;
use flotilla_scheduler::store::LocalEtcd;
use std::path::Path;
use std::time::{Duration, Instant};

/// The scheduler's lease TTL and renewal period (store::etcd::elect).
const TTL_SECS: i64 = 3;
const RENEW: Duration = Duration::from_millis(500);

fn leads(s: &Sched) -> bool {
    s.http
        .get(&format!("{}/v1/leader", s.url.trim()))
        .timeout(Duration::from_millis(500))
        .call()
        .ok()
        .and_then(|r| r.into_json::<serde_json::Value>().ok())
        .is_some_and(|v| v["leading"] == true)
}

/// A pause of 0–`RENEW` derived from the trial number (spreads the kill
/// over the renewal cycle, the same spread on both sides).
fn phase(trial: usize) -> Duration {
    RENEW * ((trial * 7) % 10) as u32 / 10
}

fn start(dir: &Path, name: &str, store: &str, first: Option<&Path>) -> Sched {
    let data = dir.join(name);
    let _ = std::fs::remove_file(data.join("api.addr"));
    if let Some(first) = first
        && !data.join("secrets.key").exists()
    {
        std::fs::create_dir_all(data.join("pki")).unwrap();
        for f in std::fs::read_dir(first.join("pki")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), data.join("pki").join(f.file_name())).unwrap();
        }
        std::fs::copy(first.join("secrets.key"), data.join("secrets.key")).unwrap();
    }
    start_scheduler_with(&data, "500ms", "3s", &["--store", store])
}

pub fn leader(rt: &tokio::runtime::Runtime, trials: usize) {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-ha-bench")
        .tempdir()
        .unwrap();
    let etcd = LocalEtcd::start_cluster(&dir.path().join("etcd"), 3);
    let endpoints: Vec<String> = etcd.iter().map(|e| e.endpoint()).collect();
    let store = format!("etcd://{}", endpoints.join(","));
    let first = dir.path().join("s0");
    let mut scheds = vec![start(dir.path(), "s0", &store, None)];
    for name in ["s1", "s2"] {
        scheds.push(start(dir.path(), name, &store, Some(&first)));
    }
    let names = ["s0", "s1", "s2"];

    // --- Flotilla: kill -9 of the leader → a survivor leads.
    let mut ours = Vec::new();
    for trial in 0..trials {
        let deadline = Instant::now() + Duration::from_secs(60);
        let l = loop {
            if let Some(l) = (0..3).find(|i| leads(&scheds[*i])) {
                break l;
            }
            assert!(Instant::now() < deadline, "no leader");
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(phase(trial));
        let pid = scheds[l].pid();
        let killed = Instant::now();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let survivors: Vec<usize> = (0..3).filter(|i| *i != l).collect();
        let took = loop {
            if survivors.iter().any(|i| leads(&scheds[*i])) {
                break killed.elapsed();
            }
            assert!(killed.elapsed() < Duration::from_secs(60), "no new leader");
            std::thread::sleep(Duration::from_millis(10));
        };
        ours.push(took);
        // The killed one comes back as a follower for the next trial.
        scheds[l] = start(dir.path(), names[l], &store, Some(&first));
    }
    drop(scheds);

    // --- Reference: a bare lease of the same TTL, renewed at the same
    // rate, whose holder stops renewing at the same spread of phases.
    let reference: Vec<Duration> = rt.block_on(async {
        let mut c = etcd_client::Client::connect(endpoints.clone(), None)
            .await
            .unwrap();
        let mut out = Vec::new();
        for trial in 0..trials {
            let key = format!("/bench/lease-{trial}");
            let lease = c.lease_grant(TTL_SECS, None).await.unwrap().id();
            c.put(
                key.clone(),
                "x",
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await
            .unwrap();
            let (mut keeper, mut answers) = c.lease_keep_alive(lease).await.unwrap();
            // Renew for a while, then stop at the trial's phase.
            for _ in 0..3 {
                keeper.keep_alive().await.unwrap();
                let _ = answers.message().await;
                tokio::time::sleep(RENEW).await;
            }
            keeper.keep_alive().await.unwrap();
            let _ = answers.message().await;
            tokio::time::sleep(phase(trial)).await;
            drop(keeper);
            drop(answers);
            let stopped = Instant::now();
            loop {
                let r = c.get(key.clone(), None).await.unwrap();
                if r.kvs().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            out.push(stopped.elapsed());
        }
        out
    });
    drop(etcd);

    let sorted = |v: &[Duration]| {
        let mut s = v.to_vec();
        s.sort();
        s
    };
    let (o, r) = (sorted(&ours), sorted(&reference));
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "## Leader failover: kill -9 of the leading scheduler → another leads ({trials} trials)\n"
    );
    println!("| | min | median | mean | max | median vs reference | max vs reference |");
    println!("|---|---|---|---|---|---|---|");
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    for (name, v) in [
        ("Flotilla: 3 schedulers, the leader killed", &o),
        ("reference: a bare etcd lease left to expire", &r),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {:.2}× | {:.2}× |",
            ms(v[0]),
            ms(v[v.len() / 2]),
            ms(mean(v)),
            ms(*v.last().unwrap()),
            ratio(v[v.len() / 2], r[r.len() / 2]),
            ratio(*v.last().unwrap(), *r.last().unwrap()),
        );
    }
    println!(
        "\nThree `flotilla scheduler --store etcd://…` processes on a three-member etcd cluster (Debian's etcd, loopback), lease TTL {TTL_SECS} s renewed every {} ms. Each trial kills the leader (SIGKILL, after a pause of 0–{} ms spreading the kill over the renewal cycle) and polls the two survivors' `GET /v1/leader` every 10 ms until one leads; the killed scheduler is restarted as a follower before the next trial. The reference holds a key on a lease of the same TTL with the same renewals, stops renewing at the same phases, and polls etcd every 10 ms until the key is gone. Target: a new leader within 5 s — worst here {}.\n",
        RENEW.as_millis(),
        RENEW.as_millis(),
        ms(*o.last().unwrap()),
    );
}
