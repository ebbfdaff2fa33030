//! End-to-end tests: the real binary, all-in-one, on loopback.

mod common;

use common::*;
use flotilla_samples as samples;
use std::time::Duration;

#[test]
fn up_apply_running_logs_delete() {
    let up = Up::start();
    let m = up.manifest(
        "pods.toml",
        &format!(
            "{}---\n{}",
            pod(
                "counter",
                samples::COUNTER_P2,
                "env = { INTERVAL_MS = \"50\" }"
            ),
            pod(
                "hello",
                samples::HELLO_P1,
                "args = [\"x\", \"y\"]\nrestart = \"Never\""
            )
        ),
    );
    let out = up.ok(&["apply", "-f", &m]);
    assert_eq!(out, "pod/counter created\npod/hello created\n");
    up.wait_phase("counter", "Running");
    up.wait_phase("hello", "Succeeded");

    assert_eq!(
        up.ok(&["logs", "hello"]),
        "Hello from Flotilla!\nargs: x y\nhello: done\n"
    );
    wait_until(Duration::from_secs(10), "counter output", || {
        up.ok(&["logs", "counter"]).contains("count 3\n")
    });
    let tail = up.ok(&["logs", "counter", "--tail", "1"]);
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.starts_with("count "));

    // get: a tidy table and machine output.
    let table = up.ok(&["get", "pods", "-o", "wide"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("STATUS") && header.ends_with("NODE"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("counter ") && l.contains("Running") && l.ends_with("local")),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "pod", "hello", "-o", "json"])).unwrap();
    assert_eq!(
        json["status"]["members"][0]["state"]["Terminated"]["exit_code"],
        0
    );

    let desc = up.ok(&["describe", "pod", "hello"]);
    assert!(desc.contains("Status:       Succeeded"), "{desc}");
    assert!(
        desc.contains("Scheduled") && desc.contains("assigned to node local"),
        "{desc}"
    );

    // Follow streams new lines as they are written.
    let mut follow = up
        .command()
        .args(["logs", "-f", "counter"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).lines().count() > 40 {
                break;
            }
        }
        String::from_utf8(seen).unwrap()
    });
    let seen = reader.join().unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen.lines().count() > 40, "follow saw {seen}");

    assert_eq!(
        up.ok(&["delete", "pod", "counter"]),
        "pod/counter deleted\n"
    );
    assert!(up.pod("counter").is_none());
    let err = up.cli(&["logs", "counter"]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("pod counter not found in namespace default")
    );
    // The agent stops the pod and removes its logs.
    let logs = up.data_dir().join("agent/logs");
    wait_until(Duration::from_secs(10), "the pod's log dir to go", || {
        std::fs::read_dir(&logs).unwrap().count() == 1
    });
}

#[test]
fn deployment_keeps_n_replicas() {
    let up = Up::start();
    let m = up.manifest("d.toml", &deployment("web", 3, samples::COUNTER_P2, ""));
    up.ok(&["apply", "-f", &m]);
    let running = |up: &Up| {
        up.pods()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(20), "3 running replicas", || {
        running(&up).len() == 3
    });
    let before = running(&up);

    // A deleted replica is replaced by a new pod.
    up.ok(&["delete", "pod", &before[0]]);
    wait_until(Duration::from_secs(20), "a replacement", || {
        let now = running(&up);
        now.len() == 3 && !now.contains(&before[0])
    });
    let dep: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "deploy", "web", "-o", "json"])).unwrap();
    assert_eq!(dep["status"]["ready"], 3);

    up.ok(&["scale", "deployment", "web", "--replicas", "1"]);
    wait_until(Duration::from_secs(20), "scale down to 1", || {
        up.pods().len() == 1
    });
    up.ok(&["scale", "deployment/web", "--replicas", "2"]);
    wait_until(Duration::from_secs(20), "scale up to 2", || {
        running(&up).len() == 2
    });
    let table = up.ok(&["get", "deployments"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..3], ["web", "2/2", "2"], "{table}");

    // Deleting the deployment takes its pods with it.
    up.ok(&["delete", "deployment", "web"]);
    wait_until(Duration::from_secs(10), "pods to go", || {
        up.pods().is_empty()
    });
}

#[test]
fn deployment_replaces_crashed_pods() {
    let up = Up::start();
    let m = up.manifest(
        "d.toml",
        &deployment(
            "flaky",
            2,
            samples::CRASHER_P1,
            "restart = \"Never\"\nenv = { DELAY_MS = \"300\" }",
        ),
    );
    up.ok(&["apply", "-f", &m]);
    let mut seen = std::collections::BTreeSet::new();
    wait_until(
        Duration::from_secs(30),
        "crashed pods to be replaced",
        || {
            seen.extend(names_with_prefix(&up.pods(), "flaky-"));
            seen.len() >= 5
        },
    );
    // Never more than the desired count alive at once.
    let alive = up
        .pods()
        .iter()
        .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Failed" | "Succeeded")))
        .count();
    assert!(alive <= 2, "{alive} alive");
    let events = up.ok(&["events"]);
    assert!(events.contains("ReplacingPod"), "{events}");
}

#[test]
fn restart_policies_and_backoff() {
    let up = Up::start();
    let m = up.manifest(
        "p.toml",
        &format!(
            "{}---\n{}---\n{}",
            pod(
                "onfailure",
                samples::CRASHER_P1,
                "restart = \"OnFailure\"\nenv = { DELAY_MS = \"100\", EXIT_CODE = \"4\" }"
            ),
            pod("never", samples::CRASHER_P1, "restart = \"Never\""),
            pod("always", samples::HELLO_P1, "restart = \"Always\"")
        ),
    );
    up.ok(&["apply", "-f", &m]);
    up.wait_phase("never", "Failed");
    let never = up.pod("never").unwrap();
    assert_eq!(never["status"]["members"][0]["restarts"], 0);
    assert_eq!(
        never["status"]["members"][0]["state"]["Terminated"]["exit_code"],
        3
    );

    let restarts = |name: &str| {
        up.pod(name).unwrap()["status"]["members"][0]["restarts"]
            .as_u64()
            .unwrap_or(0)
    };
    // A successful exit is restarted under Always.
    wait_until(Duration::from_secs(20), "always to restart", || {
        restarts("always") >= 2
    });
    wait_until(Duration::from_secs(20), "onfailure to restart", || {
        restarts("onfailure") >= 2
    });
    let p = up.pod("onfailure").unwrap();
    assert_eq!(
        p["status"]["members"][0]["last_termination"]["exit_code"],
        4
    );
    // Crash-looping is visible as such.
    wait_until(Duration::from_secs(10), "CrashLoopBackOff", || {
        up.ok(&["get", "pods"])
            .lines()
            .any(|l| l.starts_with("onfailure") && l.contains("CrashLoopBackOff"))
    });
    // Backoff doubles from 200 ms, so in the next 3 s a 100 ms crasher restarts
    // at most a handful of times (without backoff it would be ~20).
    let r0 = restarts("onfailure");
    std::thread::sleep(Duration::from_secs(3));
    let grown = restarts("onfailure") - r0;
    assert!(
        grown <= 4,
        "{grown} restarts in 3 s: backoff is not growing"
    );
    // --previous shows the last finished run.
    let prev = up.ok(&["logs", "onfailure", "--previous"]);
    assert!(prev.contains("about to exit with 4"), "{prev}");
}

#[test]
fn memory_hog_and_spinner_are_stopped_with_reasons() {
    let up = Up::start();
    let m = up.manifest(
        "p.toml",
        &format!(
            "{}---\n{}",
            pod(
                "hog",
                samples::MEMHOG_P2,
                "restart = \"Never\"\nresources = { memory = \"24Mi\" }"
            ),
            pod(
                "spin",
                samples::SPINNER_P1,
                "restart = \"Never\"\nresources = { cpu_time = \"300ms\" }"
            )
        ),
    );
    up.ok(&["apply", "-f", &m]);
    up.wait_phase("hog", "Failed");
    up.wait_phase("spin", "Failed");
    let hog = up.pod("hog").unwrap();
    assert_eq!(hog["status"]["reason"], "OOMKilled");
    assert_eq!(
        hog["status"]["members"][0]["state"]["Terminated"]["reason"],
        "OOMKilled"
    );
    let spin = up.pod("spin").unwrap();
    assert_eq!(spin["status"]["reason"], "Timeout");
    let desc = up.ok(&["describe", "pod", "hog"]);
    assert!(
        desc.contains("Terminated (OOMKilled, exit code 137)"),
        "{desc}"
    );
    let log = up.ok(&["logs", "hog"]);
    assert!(log.contains("[flotilla] OOMKilled"), "{log}");
}

#[test]
fn stopping_a_pod_interrupts_a_spinning_member() {
    let up = Up::start();
    let m = up.manifest("p.toml", &pod("spin", samples::SPINNER_P2, ""));
    up.ok(&["apply", "-f", &m]);
    up.wait_phase("spin", "Running");
    up.ok(&["delete", "pod", "spin"]);
    // The agent's log dir for the pod disappears only once its member stopped.
    let logs = up.data_dir().join("agent/logs");
    wait_until(Duration::from_secs(5), "the spinner to stop", || {
        std::fs::read_dir(&logs).unwrap().count() == 0
    });
}

#[test]
fn malformed_manifests_name_the_position_and_create_nothing() {
    let up = Up::start();
    let bad = up.manifest(
        "bad.toml",
        &format!("kind = \"Deployment\"\nname = \"web\"\nreplcas = 3\n[template]\n[[template.members]]\nwasm = \"{}\"\n", samples::HELLO_P1),
    );
    let out = up.cli(&["apply", "-f", &bad]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3:1: unknown field `replcas`"),
        "{err}"
    );
    assert!(err.contains("did you mean 'replicas'?"), "{err}");

    let missing = up.manifest("missing.toml", &pod("p", "nowhere/app.wasm", ""));
    let out = up.cli(&["apply", "-f", &missing]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("missing.toml:6:8: module file ") && err.contains("not found"),
        "{err}"
    );

    // One bad file in a directory means nothing from it is applied.
    let dir = up.dir.path().join("mixed");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.toml"), pod("good", samples::HELLO_P1, "")).unwrap();
    std::fs::write(
        dir.join("b.toml"),
        "kind = \"Pod\"\nname = \"x\"\nmembers = 5\n",
    )
    .unwrap();
    let out = up.cli(&["apply", "-f", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("b.toml:3:11: invalid type"));
    assert!(up.pods().is_empty());
}

#[test]
fn reapply_is_idempotent_and_pods_are_immutable() {
    let up = Up::start();
    let m = up.manifest(
        "p.toml",
        &format!(
            "{}---\n{}",
            pod("p", samples::COUNTER_P2, ""),
            deployment("d", 1, samples::COUNTER_P2, "")
        ),
    );
    assert_eq!(
        up.ok(&["apply", "-f", &m]),
        "pod/p created\ndeployment/d created\n"
    );
    up.wait_phase("p", "Running");
    let rv = up.pod("p").unwrap()["metadata"]["resource_version"].clone();
    assert_eq!(
        up.ok(&["apply", "-f", &m]),
        "pod/p unchanged\ndeployment/d unchanged\n"
    );
    assert_eq!(up.pod("p").unwrap()["metadata"]["resource_version"], rv);

    let changed = up.manifest(
        "p2.toml",
        &pod("p", samples::COUNTER_P2, "args = [\"new\"]"),
    );
    let out = up.cli(&["apply", "-f", &changed]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pods are immutable"), "{err}");
    assert!(err.contains("Deployment"), "{err}");

    // Changing a Deployment's template replaces its pods.
    let before = names_with_prefix(&up.pods(), "d-");
    let d2 = up.manifest(
        "d2.toml",
        &deployment("d", 1, samples::COUNTER_P2, "args = [\"v2\"]"),
    );
    assert_eq!(up.ok(&["apply", "-f", &d2]), "deployment/d configured\n");
    wait_until(
        Duration::from_secs(20),
        "the template change to roll out",
        || {
            let now = names_with_prefix(&up.pods(), "d-");
            now.len() == 1 && now != before
        },
    );
    let dep: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "deploy", "d", "-o", "json"])).unwrap();
    assert_eq!(dep["metadata"]["generation"], 2);
}

#[test]
fn stale_writes_get_409() {
    // Plain HTTP (development mode) so the test can speak raw HTTP with a token.
    let up = Up::start_with(&["--insecure-http"]);
    let m = up.manifest("d.toml", &deployment("d", 1, samples::COUNTER_P2, ""));
    up.ok(&["apply", "-f", &m]);
    let url = format!("{}/v1/deployments/default/d", up.url);
    let auth = format!("Bearer {}", up.admin_token());
    let get = || -> serde_json::Value {
        ureq::get(&url)
            .set("authorization", &auth)
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    let read = get();
    // The first writer reads, changes and writes; the Deployment's status
    // may move on in between (the controller writes it), and then it reads
    // again, as a client should.
    let mut latest = read.clone();
    loop {
        let mut first = latest.clone();
        first["spec"]["replicas"] = 2.into();
        match ureq::put(&url).set("authorization", &auth).send_json(first) {
            Ok(r) => {
                assert_eq!(r.status(), 200);
                break;
            }
            Err(ureq::Error::Status(409, _)) => latest = get(),
            Err(e) => panic!("{e}"),
        }
    }
    // A second writer still holding the old version is refused, not merged.
    let mut stale = read.clone();
    stale["spec"]["replicas"] = 5.into();
    match ureq::put(&url).set("authorization", &auth).send_json(stale) {
        Err(ureq::Error::Status(409, r)) => {
            let body = r.into_string().unwrap();
            assert!(body.contains("was modified"), "{body}");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    let now: serde_json::Value = ureq::get(&url)
        .set("authorization", &auth)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(now["spec"]["replicas"], 2);
}

#[test]
fn restart_of_up_keeps_state() {
    let mut up = Up::start();
    let m = up.manifest(
        "d.toml",
        &format!(
            "{}---\n{}",
            deployment("keep", 2, samples::COUNTER_P2, ""),
            pod("solo", samples::COUNTER_P1, "")
        ),
    );
    up.ok(&["apply", "-f", &m]);
    wait_until(Duration::from_secs(20), "3 running", || {
        up.pods()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count()
            == 3
    });
    let names: Vec<String> = names_with_prefix(&up.pods(), "");
    let uid = up.pod("solo").unwrap()["metadata"]["uid"].clone();
    up.stop();
    up.spawn();
    let after = names_with_prefix(&up.pods(), "");
    assert_eq!(after, names, "same pods after restart");
    assert_eq!(up.pod("solo").unwrap()["metadata"]["uid"], uid);
    wait_until(Duration::from_secs(20), "pods running again", || {
        up.pods()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count()
            == 3
    });
    wait_until(Duration::from_secs(10), "solo logging again", || {
        up.ok(&["logs", "solo"]).contains("count 0")
    });
}

#[test]
fn kill_9_during_applies_leaves_a_consistent_store() {
    let mut up = Up::start();
    let config = up.config();
    let dir = up.dir.path().to_path_buf();
    // A stream of applies, each acknowledged before the next.
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 0..10_000 {
            let name = format!("p{i}");
            let path = dir.join(format!("{name}.toml"));
            std::fs::write(&path, pod(&name, samples::HELLO_P1, "restart = \"Never\"")).unwrap();
            let out = std::process::Command::new(BIN)
                .args(["apply", "-f", path.to_str().unwrap()])
                .env("FLOTILLA_CONFIG", &config)
                .output()
                .unwrap();
            if !out.status.success() {
                break;
            }
            acked.push(name);
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(1500));
    up.kill9();
    let acked = writer.join().unwrap();
    assert!(
        acked.len() > 5,
        "only {} applies before the kill",
        acked.len()
    );
    // The store opens, every object in it parses, and no acknowledged write is lost.
    up.spawn();
    let pods = up.pods();
    let names = names_with_prefix(&pods, "p");
    for a in &acked {
        assert!(names.contains(a), "acknowledged {a} lost");
    }
    assert!(
        names.len() <= acked.len() + 1,
        "{} stored, {} acked",
        names.len(),
        acked.len()
    );
    for p in &pods {
        assert!(p["metadata"]["uid"].as_str().is_some_and(|u| !u.is_empty()));
        assert_eq!(p["spec"]["members"][0]["name"], "main");
    }
}

#[test]
fn unschedulable_pods_stay_pending_with_a_reason() {
    let up = Up::start();
    let m = up.manifest(
        "p.toml",
        &format!(
            "{}---\nkind = \"Pod\"\nname = \"picky\"\nnode_selector = {{ zone = \"mars\" }}\n[[members]]\nwasm = \"{}\"\n",
            pod("huge", samples::HELLO_P1, "resources = { memory = \"100000Gi\" }"),
            samples::HELLO_P1
        ),
    );
    up.ok(&["apply", "-f", &m]);
    wait_until(Duration::from_secs(10), "pending reasons", || {
        up.pod("huge").unwrap()["status"]["reason"] == "Unschedulable"
            && up.pod("picky").unwrap()["status"]["reason"] == "Unschedulable"
    });
    let d = up.ok(&["describe", "pod", "huge"]);
    assert!(d.contains("Status:       Pending"), "{d}");
    assert!(d.contains("0/1 nodes fit: 1 insufficient memory"), "{d}");
    assert!(d.contains("PodScheduled  False"), "{d}");
    assert!(d.contains("FailedScheduling"), "{d}");
    let d = up.ok(&["describe", "pod", "picky"]);
    assert!(d.contains("0/1 nodes fit: 1 node_selector mismatch"), "{d}");
    let table = up.ok(&["get", "pods"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("huge") && l.contains("Unschedulable")),
        "{table}"
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(up.phase("huge"), "Pending");
}

#[test]
fn members_of_a_pod_start_and_stop_together() {
    let up = Up::start();
    let two = format!(
        "kind = \"Pod\"\nname = \"duo\"\n[[members]]\nname = \"a\"\nwasm = \"{}\"\n[[members]]\nname = \"b\"\nwasm = \"{}\"\nenv = {{ INTERVAL_MS = \"20\" }}\n",
        samples::COUNTER_P1,
        samples::COUNTER_P2
    );
    let m = up.manifest("duo.toml", &two);
    up.ok(&["apply", "-f", &m]);
    wait_until(Duration::from_secs(20), "both members running", || {
        let p = up.pod("duo").unwrap();
        p["status"]["members"].as_array().map_or(0, |ms| {
            ms.iter()
                .filter(|m| m["state"]["Running"].is_object())
                .count()
        }) == 2
    });
    assert!(
        up.ok(&["describe", "pod", "duo"])
            .contains("Ready         True")
    );
    let out = up.cli(&["logs", "duo"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("choose one with -c: a, b"));
    wait_until(Duration::from_secs(10), "member b logs", || {
        up.ok(&["logs", "duo", "-c", "b"]).contains("count 2")
    });
    up.ok(&["delete", "pod", "duo"]);
    let logs = up.data_dir().join("agent/logs");
    wait_until(Duration::from_secs(5), "both members stopped", || {
        std::fs::read_dir(&logs).unwrap().count() == 0
    });

    // If one member cannot start, none does: a library module (no _start)
    // passes the apply-time check but cannot be linked as a command.
    let lib = up.dir.path().join("lib.wasm");
    std::fs::write(&lib, b"\0asm\x01\0\0\0").unwrap();
    let two = format!(
        "kind = \"Pod\"\nname = \"broken\"\n[[members]]\nname = \"good\"\nwasm = \"{}\"\n[[members]]\nname = \"bad\"\nwasm = \"{}\"\n",
        samples::COUNTER_P2,
        lib.display()
    );
    let m = up.manifest("broken.toml", &two);
    up.ok(&["apply", "-f", &m]);
    up.wait_phase("broken", "Failed");
    let p = up.pod("broken").unwrap();
    for member in p["status"]["members"].as_array().unwrap() {
        assert_eq!(member["state"]["Terminated"]["reason"], "StartError", "{p}");
    }
    assert!(
        p["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no _start export"),
        "{p}"
    );
    assert_eq!(
        up.ok(&["logs", "broken", "-c", "good"]),
        "",
        "the good member never ran"
    );
}

#[test]
fn selectors_stdin_and_namespaces() {
    let up = Up::start();
    let text = format!(
        "{}---\n{}",
        pod("a", samples::HELLO_P1, "").replace(
            "name = \"a\"\n",
            "name = \"a\"\nlabels = { tier = \"web\" }\n"
        ),
        pod("b", samples::HELLO_P1, "").replace(
            "name = \"b\"\n",
            "name = \"b\"\nnamespace = \"ops\"\nlabels = { tier = \"db\" }\n"
        )
    );
    let mut child = up
        .command()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pod/a created\npod/b created\n"
    );
    let names = |args: &[&str]| -> Vec<String> {
        let v: Vec<serde_json::Value> = serde_json::from_str(&up.ok(args)).unwrap();
        v.iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&["get", "pods", "-o", "json"]), ["a"]);
    assert_eq!(names(&["get", "pods", "-n", "ops", "-o", "json"]), ["b"]);
    assert_eq!(names(&["get", "pods", "-A", "-o", "json"]), ["a", "b"]);
    assert_eq!(
        names(&["get", "pods", "-A", "-l", "tier=db", "-o", "json"]),
        ["b"]
    );
    assert_eq!(
        names(&["get", "pods", "-A", "-l", "tier!=db", "-o", "json"]),
        ["a"]
    );
    let table = up.ok(&["get", "pods", "-A"]);
    assert!(table.starts_with("NAMESPACE   NAME"), "{table}");
    let err = up.cli(&["get", "pod", "b"]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("pod b not found in namespace default"));
}

#[test]
fn run_streams_output_returns_the_exit_code_and_removes_the_pod() {
    let up = Up::start();
    let run = |args: &[&str]| {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        up.cli(&all)
    };
    let pods = || -> Vec<serde_json::Value> {
        serde_json::from_slice(&up.cli(&["get", "pods", "-o", "json"]).stdout).unwrap()
    };
    // Exit 0, with the guest's output, arguments and environment.
    let o = run(&[samples::HELLO_P2, "-e", "GREETING=Ahoy", "--", "one", "two"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("Ahoy from Flotilla!"), "{stdout}");
    assert!(stdout.contains("args: one two"), "{stdout}");
    assert!(pods().is_empty(), "the pod is removed: {:?}", pods());
    // The member's own exit code.
    let o = run(&[samples::CRASHER_P1]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("about to exit with 3"));
    // A trap: 134, and the reason on stderr.
    let trap = up.dir.path().join("trap.wasm");
    std::fs::write(&trap, TRAP_MODULE).unwrap();
    let o = run(&[trap.to_str().unwrap(), "--keep", "--name", "trapper"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(134), "{stderr}");
    assert!(stderr.contains("wasm trap"), "{stderr}");
    // --keep keeps it, Failed, for a look.
    let kept = pods();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["metadata"]["name"], "trapper");
    assert_eq!(kept[0]["status"]["phase"], "Failed");
    // Not a module: refused before anything is created.
    let text = up.dir.path().join("notes.txt");
    std::fs::write(&text, "not wasm").unwrap();
    let o = run(&[text.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a wasm module"));
    assert_eq!(pods().len(), 1);
}
