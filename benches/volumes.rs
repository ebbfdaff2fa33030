//! Volumes: pod start with three volumes against none, sequential I/O
//! through a wasm member's preopened directory against bare wasmtime with
//! `--dir`, and how long a ConfigMap change takes to reach a running
//! member's file.

use crate::{InProcess, ms, pct};
use flotilla_api::{Object, PodPhase};
use std::process::Command;
use std::time::{Duration, Instant};

/// apply → Running for pods with an `empty_dir`, a config and a secret
/// volume mounted, alternated with pods without volumes; `n` of each.
pub async fn start_with_volumes(n: usize) {
    println!("## Pod start with three volumes vs none ({n} pods each, alternated)\n");
    let bed = InProcess::start(2 * n + 40).await;
    let store = bed.sched.cluster.store.clone();
    let mut https = tokio::task::block_in_place(|| bed.https());
    let (with, without) = tokio::task::block_in_place(move || {
        let (_, mut rx) = store.watch_from(store.revision()).unwrap();
        let bytes = std::fs::read(flotilla_samples::COUNTER_P1).unwrap();
        let digest = flotilla_api::manifest::digest_of(&bytes);
        let module = serde_json::json!({"digest": digest, "size": bytes.len()});
        assert!(https.send("PUT", &format!("/v1/blobs/{digest}"), bytes) < 300);
        let inputs = serde_json::json!({"objects": [
            {"kind": "ConfigMap", "metadata": {"name": "app", "namespace": "default"},
             "data": {"mode": "fast", "app.conf": "level=3\n"}},
            {"kind": "Secret", "metadata": {"name": "db", "namespace": "default"},
             "data": {"password": "hunter2"}}
        ]});
        assert_eq!(
            https.send("POST", "/v1/apply", serde_json::to_vec(&inputs).unwrap()),
            200
        );
        let (mut with, mut without) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..2 * (n + 20) {
            let volumes = i % 2 == 0;
            let name = format!("pod-{i}");
            let mut spec = serde_json::json!({"members": [{"name": "c", "module": module,
                "env": {"INTERVAL_MS": "600000"}, "resources": {"memory": "2Mi"}}]});
            if volumes {
                spec["volumes"] = serde_json::json!([
                    {"name": "scratch", "empty_dir": {}},
                    {"name": "cfg", "config": {"name": "app"}},
                    {"name": "creds", "secret": {"name": "db"}}
                ]);
                spec["members"][0]["mounts"] = serde_json::json!([
                    {"volume": "scratch", "path": "/scratch"},
                    {"volume": "cfg", "path": "/etc/app"},
                    {"volume": "creds", "path": "/creds"}
                ]);
            }
            let body = serde_json::json!({"objects": [{"kind": "Pod",
                "metadata": {"name": name, "namespace": "default"}, "spec": spec}]});
            let t = Instant::now();
            assert_eq!(
                https.send("POST", "/v1/apply", serde_json::to_vec(&body).unwrap()),
                200
            );
            crate::wait_running(&mut rx, &name);
            // The first 20 of each warm up caches and connections.
            if i >= 40 {
                if volumes {
                    with.push(t.elapsed());
                } else {
                    without.push(t.elapsed());
                }
            }
        }
        with.sort();
        without.sort();
        (with, without)
    });
    println!("| pods | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (what, v) in [
        ("three volumes (empty_dir, config, secret on tmpfs)", &with),
        ("no volumes", &without),
    ] {
        println!(
            "| {what} | {} | {} | {} |",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(*v.last().unwrap())
        );
    }
    let extra = pct(&with, 0.5).as_secs_f64() - pct(&without, 0.5).as_secs_f64();
    println!(
        "\nExtra at p50: **{:.2} ms** (target ≤ 1 ms); ratio {:.2}. Each sample is apply → Running as in the apply benchmark; the kinds alternate in one cluster, so both see the same number of pods already running.\n",
        extra * 1000.0,
        pct(&with, 0.5).as_secs_f64() / pct(&without, 0.5).as_secs_f64()
    );
    bed.stop().await;
}

/// `n` ConfigMap changes, each timed from the HTTPS apply until a running
/// member has copied the new value out of its config volume.
pub async fn config_propagation(n: usize) {
    println!("## ConfigMap change → file seen by a running member ({n} changes)\n");
    let bed = InProcess::start(64).await;
    let store = bed.sched.cluster.store.clone();
    let agent_dir = bed.dir.path().join("agent");
    let mut https = tokio::task::block_in_place(|| bed.https());
    let (seen, acked) = tokio::task::block_in_place(move || {
        let bytes = std::fs::read(flotilla_samples::FILES_P1).unwrap();
        let digest = flotilla_api::manifest::digest_of(&bytes);
        let module = serde_json::json!({"digest": digest, "size": bytes.len()});
        assert!(https.send("PUT", &format!("/v1/blobs/{digest}"), bytes) < 300);
        let config = |v: usize| {
            serde_json::to_vec(&serde_json::json!({"objects": [{"kind": "ConfigMap",
                "metadata": {"name": "live", "namespace": "default"}, "data": {"v": v.to_string()}}]}))
            .unwrap()
        };
        assert_eq!(https.send("POST", "/v1/apply", config(0)), 200);
        let pod = serde_json::json!({"objects": [{"kind": "Pod",
            "metadata": {"name": "mirror", "namespace": "default"},
            "spec": {"volumes": [{"name": "cfg", "config": {"name": "live"}}, {"name": "out", "empty_dir": {}}],
                "members": [{"name": "m", "module": module, "args": ["mirror", "/cfg/v", "/out/v"],
                    "mounts": [{"volume": "cfg", "path": "/cfg"}, {"volume": "out", "path": "/out"}]}]}}]});
        assert_eq!(
            https.send("POST", "/v1/apply", serde_json::to_vec(&pod).unwrap()),
            200
        );
        let uid = loop {
            if let Some(Object::Pod(p)) = store.get("pods/default/mirror").as_deref()
                && p.status.phase == PodPhase::Running
            {
                break p.metadata.uid.clone();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = agent_dir.join("volumes").join(uid).join("out/v");
        let wait_for = |want: &str| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::fs::read_to_string(&out).ok().as_deref() != Some(want) {
                assert!(Instant::now() < deadline, "the member never saw {want}");
                std::thread::sleep(Duration::from_micros(200));
            }
        };
        wait_for("0");
        let (mut seen, mut acked) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 1..=n {
            let t = Instant::now();
            assert_eq!(https.send("POST", "/v1/apply", config(i)), 200);
            acked.push(t.elapsed());
            wait_for(&i.to_string());
            seen.push(t.elapsed());
        }
        seen.sort();
        acked.sort();
        (seen, acked)
    });
    let p99 = if n >= 1000 { "p99" } else { "max" };
    let tail = |v: &[Duration]| {
        if n >= 1000 {
            pct(v, 0.99)
        } else {
            *v.last().unwrap()
        }
    };
    println!("| | p50 | {p99} | target |");
    println!("|---|---|---|---|");
    println!(
        "| apply → the member's file holds the new value | {} | {} | ≤ 2 s |",
        ms(pct(&seen, 0.5)),
        ms(tail(&seen))
    );
    println!(
        "| reference: the same apply, answered (fsynced store write) | {} | {} | — |",
        ms(pct(&acked, 0.5)),
        ms(tail(&acked))
    );
    println!(
        "\nRatio to the apply alone (p50): {:.2}. Path: store watch → the node's session → `Input` frame → the agent rewrites the volume (new generation, `..data` renamed) → the member (polling every 1 ms) copies it to an `empty_dir` the benchmark polls every 0.2 ms.\n",
        pct(&seen, 0.5).as_secs_f64() / pct(&acked, 0.5).as_secs_f64()
    );
    bed.stop().await;
}

/// Sequential write then read of `mib` MiB through a wasm member's
/// preopened `empty_dir` against `wasmtime run --dir` on a directory of the
/// same filesystem; timed inside the guest on both sides.
pub fn preopen_io(mib: usize, trials: usize) {
    println!("## Sequential I/O through a preopened directory ({mib} MiB, {trials} trials each)\n");
    let Some(wasmtime) = crate::cli::which("wasmtime") else {
        println!(
            "Not measured: `wasmtime` (wasmtime-cli 48) is not on PATH; `cargo install wasmtime-cli --version 48.0.8 --locked` provides it.\n"
        );
        return;
    };
    let up = crate::common::Up::start();
    let bare_dir = tempfile::tempdir_in(up.dir.path()).unwrap();
    let parse = |line: &str| -> (f64, f64) {
        let field = |k: &str| -> f64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
        };
        (field("write_us="), field("read_us="))
    };
    let mb_s = |us: f64| (mib as f64) * 1.048_576 / (us / 1e6);
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for t in 0..trials {
        let name = format!("io-{t}");
        let manifest = format!(
            "kind = \"Pod\"\nname = \"{name}\"\n[[volumes]]\nname = \"data\"\nempty_dir = {{}}\n[[members]]\nname = \"files\"\nwasm = \"{}\"\nrestart = \"Never\"\nargs = [\"bench\", \"/data/f\", \"{mib}\"]\nmounts = [{{ volume = \"data\", path = \"/data\" }}]\n",
            flotilla_samples::FILES_P1
        );
        let f = up.manifest(&format!("{name}.toml"), &manifest);
        up.ok(&["apply", "-f", &f]);
        let line = loop {
            let out = up.cli(&["logs", &name]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(l) = text.lines().find(|l| l.starts_with("bench ")) {
                break l.to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        up.ok(&["delete", "pod", &name]);
        ours.push(parse(&line));
        let out = Command::new(&wasmtime)
            .arg("run")
            .arg("--dir")
            .arg(format!("{}::/data", bare_dir.path().display()))
            .arg(flotilla_samples::FILES_P1)
            .args(["bench", "/data/f", &mib.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("bench "))
            .unwrap_or_else(|| panic!("wasmtime: {text} {}", String::from_utf8_lossy(&out.stderr)));
        bare.push(parse(line));
        let _ = std::fs::remove_file(bare_dir.path().join("f"));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (mut ow, mut or): (Vec<f64>, Vec<f64>) = ours.iter().copied().unzip();
    let (mut bw, mut br): (Vec<f64>, Vec<f64>) = bare.iter().copied().unzip();
    let (ow, or, bw, br) = (
        median(&mut ow),
        median(&mut or),
        median(&mut bw),
        median(&mut br),
    );
    println!("| | write (with fsync) | read |");
    println!("|---|---|---|");
    println!(
        "| flotilla, `empty_dir` preopened at /data | {:.0} MB/s | {:.0} MB/s |",
        mb_s(ow),
        mb_s(or)
    );
    println!(
        "| `wasmtime run --dir HOST::/data` (same file size, same filesystem) | {:.0} MB/s | {:.0} MB/s |",
        mb_s(bw),
        mb_s(br)
    );
    println!(
        "\nThroughput ratio (median of {trials}): write **{:.2}**, read **{:.2}** (target ≥ 0.9). The same guest on both sides times its own 1 MiB writes (then fsync) and reads, so process and pod start-up count on neither side.\n",
        bw / ow,
        br / or
    );
}
