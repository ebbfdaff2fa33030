//! A scheduler and agents, each in its own network namespace joined by a test
//! bridge that the test creates and removes: join, refused joins, agent kill,
//! partition (link down) and heal, scheduler down, agent kill -9 and restart
//! offline, certificate rotation under load. Needs root and iproute2 (as CI has).
//!
//! Nothing touches the root namespace's network: the bridge lives in a
//! namespace of its own, and the CLI runs inside the scheduler's namespace.

mod common;

use common::lab::*;
use common::*;
use flotilla_samples as samples;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn web(replicas: u32) -> String {
    format!(
        "kind = \"Deployment\"\nname = \"web\"\nreplicas = {replicas}\n[template]\n[[template.members]]\nname = \"c\"\nwasm = \"{}\"\n",
        samples::COUNTER_P2
    )
}

#[test]
fn scheduler_and_agents_in_separate_namespaces() {
    let lab = Lab::start(&["sched", "a1", "a2", "a3"], &["--node-timeout", "2s"]);
    let mut agents: Vec<Proc> = (1..4).map(|i| lab.agent(i)).collect();
    wait_until(Duration::from_secs(20), "three agents ready", || {
        ["a1", "a2", "a3"].iter().all(|n| lab.ready(n))
    });
    for n in lab.nodes() {
        assert!(
            n["status"]["address"]
                .as_str()
                .unwrap()
                .starts_with("10.77."),
            "{n}"
        );
    }
    lab.apply("web.toml", &web(3));
    wait_until(Duration::from_secs(20), "one replica per agent", || {
        ["a1", "a2", "a3"].iter().all(|n| lab.running_on(n) == 1)
    });

    // Agent killed: NotReady, replacement elsewhere; it comes back with its certificate.
    agents[2].kill9();
    wait_until(Duration::from_secs(10), "a3 NotReady", || !lab.ready("a3"));
    wait_until(Duration::from_secs(10), "3 running without a3", || {
        lab.running() == 3 && lab.running_on("a3") == 0
    });
    agents[2] = lab.agent(3);
    wait_until(Duration::from_secs(20), "a3 back", || lab.ready("a3"));

    // Partition a2 (its link goes down): NotReady, its replica rescheduled.
    let lost_uids: Vec<String> = lab
        .pods()
        .iter()
        .filter(|p| p["status"]["node"] == "a2" && p["status"]["phase"] == "Running")
        .map(|p| p["metadata"]["uid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(lost_uids.len(), 1);
    lab.net.link(2, false);
    wait_until(Duration::from_secs(10), "a2 NotReady", || !lab.ready("a2"));
    wait_until(Duration::from_secs(10), "3 running elsewhere", || {
        lab.running() == 3 && lab.running_on("a2") == 0
    });
    // Heal: a2 reconnects, drops the replica that moved away, and N stays exact.
    lab.net.link(2, true);
    wait_until(Duration::from_secs(30), "a2 back", || lab.ready("a2"));
    let state = lab.data("a2").join("pods.json");
    wait_until(
        Duration::from_secs(10),
        "a2 stopped the moved replica",
        || {
            let saved = std::fs::read_to_string(&state).unwrap_or_default();
            !lost_uids.iter().any(|u| saved.contains(u.as_str()))
        },
    );
    assert_eq!(
        lab.running(),
        3,
        "exactly N replicas after the partition heals"
    );
    let lost = lab
        .pods()
        .into_iter()
        .filter(|p| p["status"]["phase"] == "Lost")
        .count();
    assert_eq!(lost, 0, "Lost Deployment pods are replaced and removed");
    drop(agents);
}

/// Runs of a member seen while watching its current log: a run starts a new
/// file (the previous run's log is moved aside), so each change of inode is
/// one more run. (Inodes are reused, so changes are counted, not inodes.)
/// Stops early once `enough` runs were seen.
fn runs_seen(log: &std::path::Path, watch: Duration, enough: usize) -> usize {
    use std::os::unix::fs::MetadataExt;
    let mut runs = 0;
    let mut last = None;
    let end = std::time::Instant::now() + watch;
    while std::time::Instant::now() < end && runs < enough {
        if let Ok(m) = std::fs::metadata(log) {
            let now = (m.ino(), m.ctime_nsec(), m.ctime());
            if last.is_none_or(|l: (u64, i64, i64)| l.0 != now.0 || (l.2, l.1) > (now.2, now.1)) {
                runs += 1;
            }
            last = Some(now);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    runs
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

fn pod_field(
    pods: &[serde_json::Value],
    name: &str,
    f: impl Fn(&serde_json::Value) -> serde_json::Value,
) -> serde_json::Value {
    pods.iter()
        .find(|p| p["metadata"]["name"] == name)
        .map(f)
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn refused_joins_and_a_scheduler_outage_across_namespaces() {
    let mut lab = Lab::start(&["sched", "a1", "a2", "rogue"], &["--node-timeout", "2s"]);

    // A token with this cluster's pin and a forged secret: refused by the scheduler.
    let mut forged = lab.token.rsplit_once('.').unwrap().0.to_string();
    forged.push_str(".0000000000000000000000000000000000000000");
    let mut args = lab.host_args(1, Some(&forged));
    args[4] = "intruder".into();
    args[8] = lab.data("intruder").to_str().unwrap().to_string();
    let (st, log) = lab.agent_once(1, &args);
    assert!(!st.success());
    assert!(log.contains("refused to admit this node"), "{log}");
    assert!(!lab.data("intruder").join("pki/node.pem").exists());

    // Another cluster's scheduler in its own namespace, with its own CA.
    let rogue_ip = lab.net.addr(3);
    let rogue_data = lab.dir.path().join("rogue-sched");
    let _rogue = lab.net.spawn(
        3,
        &[
            "scheduler",
            "--listen",
            &format!("{rogue_ip}:7370"),
            "--quic",
            &format!("{rogue_ip}:7371"),
            "--data-dir",
            rogue_data.to_str().unwrap(),
        ],
        lab.log("rogue-sched"),
    );
    wait_until(Duration::from_secs(15), "rogue scheduler up", || {
        rogue_data.join("api.addr").exists()
    });
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.net.ns(3), BIN])
        .env("FLOTILLA_CONFIG", rogue_data.join("config.toml"))
        .args(["token", "create", "--join"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let rogue_token = String::from_utf8(o.stdout).unwrap().trim().to_string();
    // The rogue cluster's token, used against ours: the agent sees the CA
    // does not match the pin and sends nothing.
    let mut args = lab.host_args(1, Some(&rogue_token));
    args[4] = "stray".into();
    args[8] = lab.data("stray").to_str().unwrap().to_string();
    let (st, log) = lab.agent_once(1, &args);
    assert!(!st.success());
    assert!(log.contains("CA does not match the token's pin"), "{log}");
    // A node that joined the rogue cluster, pointed at ours: its certificate
    // is from another CA, so the TLS handshake fails and nothing registers.
    let turncoat = lab.data("turncoat");
    let mut args = vec![
        "host".to_string(),
        "--join".into(),
        format!("{rogue_ip}:7371"),
        "--name".into(),
        "turncoat".into(),
        "--data-dir".into(),
        turncoat.to_str().unwrap().into(),
        "--token".into(),
        rogue_token.clone(),
    ];
    let mut p = lab.net.spawn(
        1,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        lab.log("turncoat"),
    );
    wait_until(
        Duration::from_secs(15),
        "turncoat joined the rogue cluster",
        || turncoat.join("pki/node.pem").exists(),
    );
    p.kill9();
    args[2] = lab.join_addr();
    args.truncate(7);
    let log = lab.log("turncoat-ours");
    let _p = lab.net.spawn(
        1,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        log.clone(),
    );
    wait_until(Duration::from_secs(15), "turncoat told why", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cannot connect to the scheduler")
    });
    let names: Vec<String> = lab
        .nodes()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.is_empty(), "nothing registered: {names:?}");
    drop(_p);

    // Two agents, a Deployment across them and a crashing pod on a1.
    let _a2 = lab.agent(2);
    let mut a1 = lab.agent(1);
    wait_until(Duration::from_secs(20), "agents ready", || {
        lab.ready("a1") && lab.ready("a2")
    });
    lab.apply("web.toml", &web(2));
    wait_until(Duration::from_secs(20), "one replica per agent", || {
        lab.running_on("a1") == 1 && lab.running_on("a2") == 1
    });
    let before = lab.pods();
    let web_on = |node: &str| -> String {
        before
            .iter()
            .find(|p| p["status"]["node"] == node)
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .unwrap()
    };
    let (web1, web2) = (web_on("a1"), web_on("a2"));
    let uid = |name: &str| pod_field(&before, name, |p| p["metadata"]["uid"].clone());
    lab.apply(
        "crasher.toml",
        &format!(
            "kind = \"Pod\"\nname = \"crasher\"\nnode_selector = {{ \"flotilla.dev/hostname\" = \"a1\" }}\n[[members]]\nname = \"main\"\nwasm = \"{}\"\nenv = {{ DELAY_MS = \"100\" }}\n",
            samples::CRASHER_P1
        ),
    );
    let crasher_uid = loop {
        let u = pod_field(&lab.pods(), "crasher", |p| p["metadata"]["uid"].clone());
        if let Some(u) = u.as_str() {
            break u.to_string();
        }
    };
    let a1_logs = lab.data("a1").join("logs");
    let crasher_log = a1_logs.join(&crasher_uid).join("main.log");
    wait_until(Duration::from_secs(10), "crasher ran on a1", || {
        crasher_log.exists()
    });

    // The scheduler goes away.
    lab.sched.kill9();
    let web1_dir = a1_logs.join(uid(&web1).as_str().unwrap());
    let web1_log = web1_dir.join("c.log");
    let len0 = file_len(&web1_log);
    assert!(
        runs_seen(&crasher_log, Duration::from_secs(30), 3) >= 3,
        "restart policy keeps working without the scheduler"
    );
    wait_until(Duration::from_secs(5), "logs keep being written", || {
        file_len(&web1_log) > len0
    });

    // a1 is killed with kill -9 (its workloads die with it, as in a reboot)
    // and started again while the scheduler is still down. The member runs
    // in the agent's process, so once kill9 has reaped it nothing writes.
    a1.kill9();
    let old_run = std::fs::read(&web1_log).unwrap();
    a1 = lab.agent(1);
    let seen = runs_seen(&crasher_log, Duration::from_secs(30), 3);
    assert!(seen >= 3, "the crasher is back and restarting: {seen} runs");
    // The restored member is a new run: its first run's log moved aside
    // whole (nothing was written while the agent was dead), and the new log
    // counts from 0 again. (Comparing the new log's length with the old
    // one's made this test depend on how long the first run had lasted.)
    let previous = web1_dir.join("c.previous.log");
    wait_until(
        Duration::from_secs(10),
        "a1 restored its pods offline",
        || {
            std::fs::read(&previous).is_ok_and(|p| p == old_run)
                && std::fs::read_to_string(&web1_log)
                    .is_ok_and(|l| l.starts_with("count 0\n") && l.contains("count 1\n"))
        },
    );

    // The scheduler returns: agents resync; the healthy pods are the same pods.
    lab.start_scheduler();
    wait_until(Duration::from_secs(20), "agents back", || {
        lab.ready("a1") && lab.ready("a2")
    });
    wait_until(Duration::from_secs(10), "both replicas Running", || {
        lab.running_on("a1") >= 1 && lab.running_on("a2") == 1
    });
    let after = lab.pods();
    for name in [&web1, &web2] {
        assert_eq!(
            pod_field(&after, name, |p| p["metadata"]["uid"].clone()),
            uid(name),
            "{name} kept, not replaced"
        );
    }
    assert_eq!(
        pod_field(&after, &web2, |p| p["status"]["started_ms"].clone()),
        pod_field(&before, &web2, |p| p["status"]["started_ms"].clone()),
        "the healthy pod on a2 was not restarted by the resync"
    );
    // Restarts made offline are reported once the agent resyncs (the
    // restored agent counts from its own start: at least the 3 runs seen).
    let mut last = serde_json::Value::Null;
    wait_until(Duration::from_secs(10), "crasher restarts reported", || {
        last = pod_field(&lab.pods(), "crasher", |p| p["status"].clone());
        last["members"][0]["restarts"].as_u64().unwrap_or(0) >= 2
    });
    let web_pods = after
        .iter()
        .filter(|p| p["metadata"]["name"].as_str().unwrap().starts_with("web-"))
        .count();
    assert_eq!(web_pods, 2);
    drop(a1);
}

#[test]
fn certificates_rotate_under_load_without_restarting_pods() {
    let lab = Lab::start(&["sched", "a1"], &["--node-cert-ttl", "4"]);
    let _a1 = lab.agent(1);
    wait_until(Duration::from_secs(20), "a1 ready", || lab.ready("a1"));
    lab.apply("web.toml", &web(2));
    wait_until(Duration::from_secs(20), "2 running", || {
        lab.running_on("a1") == 2
    });
    let before = lab.pods();
    let cert = lab.data("a1").join("pki/node.pem");
    let mut certs = std::collections::HashSet::new();
    certs.insert(std::fs::read(&cert).unwrap());
    // Load: the Deployment is scaled up and down while certificates expire
    // every 4 s and are renewed at 2/3 of their life.
    let end = std::time::Instant::now() + Duration::from_secs(12);
    let mut n = 2;
    while std::time::Instant::now() < end {
        n = if n >= 8 { 3 } else { n + 1 };
        lab.cli(&["scale", "web", "--replicas", &n.to_string()]);
        certs.insert(std::fs::read(&cert).unwrap());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        certs.len() >= 3,
        "certificate renewed at least twice ({} seen)",
        certs.len()
    );
    wait_until(Duration::from_secs(10), "all replicas running", || {
        lab.running_on("a1") == n
    });
    let after = lab.pods();
    for p in &before {
        let name = p["metadata"]["name"].as_str().unwrap();
        // Scaling down removes the newest pods first: the first two stay.
        let a = after
            .iter()
            .find(|q| q["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{name} was removed"));
        assert_eq!(a["metadata"]["uid"], p["metadata"]["uid"]);
        assert_eq!(
            a["status"]["started_ms"], p["status"]["started_ms"],
            "{name} restarted"
        );
        assert_eq!(a["status"]["members"][0]["restarts"], 0);
    }
    assert!(lab.ready("a1"));
}

/// Watches a log file from another thread; the wall-clock time (ms) it last
/// grew, read when the watch ends.
struct Growth {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Growth {
    fn watch(path: PathBuf) -> Growth {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut len, mut at) = (0, 0);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let l = file_len(&path);
                if l > len {
                    (len, at) = (l, flotilla_api::time::now_ms());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            at
        });
        Growth {
            stop,
            thread: Some(thread),
        }
    }

    fn last_growth_ms(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn overlap_of_moved_pods_is_bounded_by_the_lease() {
    let lab = Lab::start(&["sched", "a1", "a2"], &["--node-timeout", "2s"]);
    let _a1 = lab.agent(1);
    let _a2 = lab.agent(2);
    wait_until(Duration::from_secs(20), "agents ready", || {
        lab.ready("a1") && lab.ready("a2")
    });
    // a1 compiles the module once now, so a replacement's start below is
    // not delayed by compilation (which would flatter the measured gap).
    lab.apply(
        "warm.toml",
        &format!(
            "kind = \"Pod\"\nname = \"warm\"\nnode_selector = {{ \"flotilla.dev/hostname\" = \"a1\" }}\n[[members]]\nname = \"c\"\nwasm = \"{}\"\n",
            samples::COUNTER_P2
        ),
    );
    wait_until(Duration::from_secs(30), "warm-up pod on a1", || {
        lab.running_on("a1") == 1
    });
    lab.cli(&["delete", "pod", "warm"]);
    // Both pods start on a2 (a1 cordoned meanwhile).
    lab.cli(&["cordon", "a1"]);
    let deployment = |name: &str, policy: &str| {
        format!(
            "kind = \"Deployment\"\nname = \"{name}\"\nreplicas = 1\n[template]\non_disconnect = \"{policy}\"\n[[template.members]]\nname = \"c\"\nwasm = \"{}\"\nenv = {{ INTERVAL_MS = \"20\" }}\n",
            samples::COUNTER_P2
        )
    };
    lab.apply("fenced.toml", &deployment("fenced", "Stop"));
    lab.apply("edge.toml", &deployment("edge", "Keep"));
    wait_until(Duration::from_secs(20), "both on a2", || {
        lab.running_on("a2") == 2
    });
    lab.cli(&["uncordon", "a1"]);
    let old: Vec<(String, String)> = lab
        .pods()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["metadata"]["uid"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let old_uid = |prefix: &str| {
        old.iter()
            .find(|(n, _)| n.starts_with(prefix))
            .map(|(_, u)| u.clone())
            .unwrap()
    };
    let log_of = |uid: &str| lab.data("a2").join("logs").join(uid).join("c.log");
    let fenced_watch = Growth::watch(log_of(&old_uid("fenced-")));
    let edge_watch = Growth::watch(log_of(&old_uid("edge-")));

    lab.net.link(2, false);
    let replacement_started = |prefix: &str| -> Option<u64> {
        lab.pods()
            .iter()
            .find(|p| {
                p["metadata"]["name"].as_str().unwrap().starts_with(prefix)
                    && p["status"]["node"] == "a1"
                    && p["status"]["phase"] == "Running"
            })
            .and_then(|p| p["status"]["started_ms"].as_u64())
    };
    wait_until(
        Duration::from_secs(15),
        "replacements Running on a1",
        || replacement_started("fenced-").is_some() && replacement_started("edge-").is_some(),
    );
    let (new_fenced, new_edge) = (
        replacement_started("fenced-").unwrap(),
        replacement_started("edge-").unwrap(),
    );
    // The edge pod keeps running on the far side of the partition for a while.
    std::thread::sleep(Duration::from_secs(1));
    let healed = flotilla_api::time::now_ms();
    lab.net.link(2, true);
    wait_until(Duration::from_secs(30), "a2 back", || lab.ready("a2"));
    wait_until(Duration::from_secs(15), "a2 stopped the edge copy", || {
        !log_of(&old_uid("edge-")).exists()
    });
    let fenced_last = fenced_watch.last_growth_ms();
    let edge_last = edge_watch.last_growth_ms();
    let gap = new_fenced as i64 - fenced_last as i64;
    eprintln!(
        "fencing: on_disconnect=Stop copy stopped {gap} ms before its replacement started; on_disconnect=Keep copies overlapped {} ms, the old one stopping {} ms after the partition healed",
        edge_last as i64 - new_edge as i64,
        edge_last as i64 - healed as i64
    );
    assert!(
        gap > 0,
        "a Stop pod must stop before its replacement starts (gap {gap} ms)"
    );
    assert!(
        edge_last > new_edge,
        "a Keep pod runs on while partitioned (edge autonomy)"
    );
    assert!(
        edge_last < healed + 12_000,
        "after the heal the old copy stops within the agent's reconnect backoff"
    );
    assert_eq!(lab.running(), 2, "exactly one copy of each");
}

/// What `ls -A dir` shows inside the mount namespace of process `pid`.
fn seen_by(pid: u32, dir: &std::path::Path) -> String {
    let o = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "ls", "-A"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn modules_are_uploaded_from_a_directory_neither_scheduler_nor_agent_can_see() {
    // The client's directory: a module and a manifest naming it by a
    // relative path. The scheduler and the agent each run in a mount
    // namespace of their own with an empty filesystem over that directory.
    let client = tempfile::Builder::new()
        .prefix("flotilla-client")
        .tempdir()
        .unwrap();
    std::fs::copy(samples::COUNTER_P2, client.path().join("app.wasm")).unwrap();
    let manifest = client.path().join("app.toml");
    std::fs::write(
        &manifest,
        "kind = \"Pod\"\nname = \"app\"\n[[members]]\nname = \"c\"\nwasm = \"./app.wasm\"\nenv = { INTERVAL_MS = \"100\" }\n",
    )
    .unwrap();
    let lab = Lab::start_hiding(&["sched", "a1"], &[], &[client.path().to_path_buf()]);
    let a1 = lab.agent(1);
    wait_until(Duration::from_secs(20), "a1 ready", || lab.ready("a1"));
    for p in [&lab.sched, &a1] {
        let pid = p.0.as_ref().unwrap().id();
        assert_eq!(seen_by(pid, client.path()), "", "hidden from pid {pid}");
    }
    assert!(seen_by(std::process::id(), client.path()).contains("app.wasm"));

    // The CLI, outside both mount namespaces, uploads the module and applies.
    let o = lab.cli_raw(&["apply", "-f", manifest.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("uploaded app.wasm"), "{stderr}");
    wait_until(Duration::from_secs(20), "the pod Running on a1", || {
        lab.running_on("a1") == 1
    });
    let pod = lab.pods().remove(0);
    let digest = pod["spec"]["members"][0]["module"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        digest,
        flotilla_api::manifest::digest_of(&std::fs::read(samples::COUNTER_P2).unwrap())
    );
    assert_eq!(
        pod["spec"]["members"][0]["module"]["size"],
        std::fs::metadata(samples::COUNTER_P2).unwrap().len()
    );
    let log = lab
        .data("a1")
        .join("logs")
        .join(pod["metadata"]["uid"].as_str().unwrap())
        .join("c.log");
    wait_until(Duration::from_secs(10), "the member counts", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("count 1\n"))
    });
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert!(lab.data("sched").join("blobs/sha256").join(hex).is_file());
    assert!(lab.data("a1").join("modules/sha256").join(hex).is_file());

    // Applied again: the scheduler has it, nothing is uploaded.
    let o = lab.cli_raw(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("uploaded"));

    // `flotilla run` from the same hidden directory: output and exit codes.
    std::fs::copy(samples::CRASHER_P1, client.path().join("crasher.wasm")).unwrap();
    let crasher = client.path().join("crasher.wasm");
    for code in ["0", "3"] {
        let o = lab.cli_raw(&[
            "run",
            crasher.to_str().unwrap(),
            "-e",
            &format!("EXIT_CODE={code}"),
        ]);
        assert_eq!(
            o.status.code(),
            Some(code.parse().unwrap()),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(&format!("about to exit with {code}")),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let trap = client.path().join("trap.wasm");
    std::fs::write(&trap, TRAP_MODULE).unwrap();
    let o = lab.cli_raw(&["run", trap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(134));
    assert!(String::from_utf8_lossy(&o.stderr).contains("wasm trap"));
    let trap = client.path().join("trap.wasm");
    std::fs::write(&trap, TRAP_MODULE).unwrap();
    let o = lab.cli_raw(&["run", trap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(134));
    assert!(String::from_utf8_lossy(&o.stderr).contains("wasm trap"));
    drop(a1);
}

#[test]
fn nodes_without_a_route_to_the_registry_pull_through_the_scheduler() {
    use common::registry::{Auth, Registry};
    let mut lab = Lab::start(&["sched", "a1"], &["--pull-through"]);
    // The registry listens on the scheduler's loopback: the scheduler
    // reaches it, a1 (its own namespace, its own loopback) cannot.
    let ns0 = format!("/run/netns/{}", lab.net.ns(0));
    let reg = Registry::start_in(Auth::Anonymous, Some(&ns0));
    // A registry on loopback is one the scheduler's own config lists.
    lab.sched.kill9();
    lab.sched_args
        .extend(["--registry-config".to_string(), reg.config_file()]);
    lab.start_scheduler();
    let wasm_ref = format!("{}/site/counter:1", reg.addr);
    lab.cli(&["push", samples::COUNTER_P2, &wasm_ref]);
    let image_ref = in_netns(&ns0, || reg.push_busybox("site/busybox:1"));
    let probe = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", reg.addr);
    assert!(tcp_exchange(&lab.net, 0, &reg.addr, &probe).starts_with("HTTP/"));
    assert_eq!(
        tcp_exchange(&lab.net, 1, &reg.addr, &probe),
        "",
        "a1 has no route"
    );

    let a1 = lab.agent_with(1, &["--pull-via-scheduler"]);
    wait_until(Duration::from_secs(20), "a1 ready", || lab.ready("a1"));
    lab.apply(
        "site",
        &format!(
            "kind = \"Pod\"\nname = \"site\"\n\n[[members]]\nname = \"counter\"\nwasm = \"oci://{wasm_ref}\"\nenv = {{ INTERVAL_MS = \"100\" }}\n\n[[members]]\nname = \"box\"\nimage = \"{image_ref}\"\nargs = [\"sh\", \"-c\", \"echo from the site cache; sleep 600\"]\ngrace_period = 1\n"
        ),
    );
    wait_until(Duration::from_secs(60), "the pod Running on a1", || {
        lab.running_on("a1") == 1
    });
    let pod = lab.pods().remove(0);
    let logs = lab
        .data("a1")
        .join("logs")
        .join(pod["metadata"]["uid"].as_str().unwrap());
    wait_until(Duration::from_secs(20), "both members print", || {
        std::fs::read_to_string(logs.join("counter.log")).is_ok_and(|l| l.contains("count 1\n"))
            && lab
                .cli(&["logs", "site", "-c", "box"])
                .contains("from the site cache")
    });
    // Both came through the scheduler's cache, pinned at apply.
    let members = pod["spec"]["members"].as_array().unwrap();
    for m in members {
        let digest = ["artifact", "container"]
            .iter()
            .find_map(|k| m[k]["digest"].as_str())
            .unwrap_or_else(|| panic!("no pinned digest: {m}"));
        let hex = digest.strip_prefix("sha256:").unwrap();
        assert!(
            lab.data("sched").join("blobs/sha256").join(hex).is_file(),
            "{digest} is in the site cache"
        );
    }
    // The scheduler that pulled is the second one started (with the config).
    let sched_log: String = std::fs::read_dir(lab.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("sched-")
        })
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        sched_log.contains("pulled into the site cache"),
        "{sched_log}"
    );
    drop(a1);
}
