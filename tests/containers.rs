//! Container members through the real runc shim, with images from a real
//! registry: logs and exit codes, restart policies, OOM kills, hardening seen
//! from inside, re-adoption after the agent is killed, mixed pods, wasm
//! artifacts pushed with `flotilla push`, placement by runtime.

mod common;

use common::registry::{
    Auth, Layer, OCI_CONFIG, OCI_LAYER_GZIP, Registry, image_config, registry_with_busybox,
};
use common::{Up, wait_until};
use flotilla_host::image::ImageStore;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn container_pod(name: &str, image: &str, script: &str, extra: &str) -> String {
    format!(
        "kind = \"Pod\"\nname = \"{name}\"\n\n[[members]]\nname = \"box\"\nimage = \"{image}\"\nargs = [\"sh\", \"-c\", '''{script}''']\ngrace_period = 1\n{extra}\n"
    )
}

/// Applies a one-container pod running `script` in busybox's sh.
fn apply_box(up: &Up, name: &str, image: &str, script: &str, extra: &str) {
    apply(up, name, &container_pod(name, image, script, extra));
}

fn apply(up: &Up, name: &str, text: &str) {
    let f = up.manifest(&format!("{name}.toml"), text);
    up.ok(&["apply", "-f", &f]);
}

fn member(up: &Up, pod: &str, idx: usize) -> serde_json::Value {
    up.pod(pod).unwrap()["status"]["members"][idx].clone()
}

fn logs(up: &Up, pod: &str, extra: &[&str]) -> String {
    let mut args = vec!["logs", pod];
    args.extend_from_slice(extra);
    String::from_utf8_lossy(&up.cli(&args).stdout).into_owned()
}

/// Waits for a pod phase; on timeout shows the pod, its containers' files
/// and the agent's log.
fn wait_phase(up: &Up, name: &str, phase: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while up.phase(name) != phase {
        if std::time::Instant::now() > deadline {
            let pod = up.pod(name);
            let mut dump = format!(
                "status: {}\n",
                pod.as_ref()
                    .map(|p| p["status"].to_string())
                    .unwrap_or_default()
            );
            for id in container_ids(up) {
                for f in ["shim.log", "state.json", "exit.json", "runc.log"] {
                    let text = std::fs::read_to_string(containers_dir(up).join(&id).join(f));
                    dump.push_str(&format!("{id}/{f}: {}\n", text.unwrap_or_default()));
                }
            }
            let log = up.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "pod {name} is not {phase}:\n{dump}agent log (last lines first):\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn containers_dir(up: &Up) -> PathBuf {
    up.data_dir().join("agent/containers")
}

/// Container directories (one per running container).
fn container_ids(up: &Up) -> Vec<String> {
    std::fs::read_dir(containers_dir(up))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

fn state(up: &Up, id: &str) -> serde_json::Value {
    let b = std::fs::read(containers_dir(up).join(id).join("state.json")).unwrap();
    serde_json::from_slice(&b).unwrap()
}

fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn mounts_under(dir: &Path) -> usize {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.display().to_string();
    m.lines().filter(|l| l.contains(&d)).count()
}

#[test]
fn a_container_logs_exits_with_its_code_and_restarts_per_policy() {
    let (reg, image) = registry_with_busybox();
    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    apply_box(
        &up,
        "once",
        &image,
        "echo hello from $FLOTILLA_POD; echo to stderr >&2; exit 3",
        "restart = \"Never\"\nenv = { FLOTILLA_POD = { field = \"pod.name\" } }",
    );
    wait_phase(&up, "once", "Failed");
    let m = member(&up, "once", 0);
    assert_eq!(m["state"]["Terminated"]["exit_code"], 3, "{m}");
    assert_eq!(m["state"]["Terminated"]["reason"], "Error", "{m}");
    let out = logs(&up, "once", &[]);
    assert!(out.contains("hello from once"), "{out}");
    assert!(out.contains("to stderr"), "{out}");

    apply_box(
        &up,
        "crash",
        &image,
        "echo run; sleep 0.2; exit 1",
        "restart = \"OnFailure\"",
    );
    wait_until(Duration::from_secs(30), "two restarts", || {
        member(&up, "crash", 0)["restarts"].as_u64().unwrap_or(0) >= 2
    });
    let prev = logs(&up, "crash", &["--previous"]);
    assert!(prev.contains("run"), "{prev}");
    assert!(prev.contains("exited with code 1"), "{prev}");

    apply_box(&up, "done", &image, "exit 0", "restart = \"OnFailure\"");
    wait_phase(&up, "done", "Succeeded");
    assert_eq!(member(&up, "done", 0)["restarts"], 0);

    // Deleting stops and removes everything of the containers.
    up.ok(&["delete", "pod", "once", "crash", "done"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !container_ids(&up).is_empty() {
        if std::time::Instant::now() > deadline {
            let log = up.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "container dirs left: {:?}\n{}",
                container_ids(&up),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mounts_under(&containers_dir(&up)), 0);
}

#[test]
fn a_memory_hog_is_oom_killed_and_the_status_says_so() {
    let (reg, image) = registry_with_busybox();
    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    apply_box(
        &up,
        "hog",
        &image,
        "echo growing; a=aaaaaaaa; while true; do a=\"$a$a\"; done; echo survived",
        "restart = \"Never\"\nresources = { memory = \"24Mi\" }",
    );
    wait_phase(&up, "hog", "Failed");
    let m = member(&up, "hog", 0);
    assert_eq!(m["state"]["Terminated"]["reason"], "OOMKilled", "{m}");
    assert_eq!(m["state"]["Terminated"]["exit_code"], 137, "{m}");
    let out = logs(&up, "hog", &[]);
    assert!(!out.contains("survived"), "{out}");
    assert!(out.contains("memory limit"), "{out}");
}

/// Issue 14 item 5: a pod with `user_namespace = true` runs its containers
/// with root mapped to a host ID range of its own — another pod's range is
/// another — while root inside still owns the image's files and the pod's
/// volume. Seen from inside: the mapping, and a file host root made private
/// refused to the container's root; seen from the host: the container's
/// process runs as the range's first ID. Without it (and the node's
/// default off), root is host root. Ranges go back when the pods go.
#[test]
fn a_pod_in_a_user_namespace_is_root_only_inside() {
    let (reg, image) = registry_with_busybox();
    let mut up = Up::start_with(&["--registry-config", &reg.config_file()]);
    let script = "cat /proc/self/uid_map; echo uid=$(id -u); touch /etc/made && echo wrote-etc; echo x > /data/f && echo wrote-volume; while [ ! -f /data/host-only ]; do sleep 0.1; done; cat /data/host-only || echo refused-host-file; sleep 600";
    let volume = "[[volumes]]\nname = \"data\"\nempty_dir = {}\n";
    let mounts = "mounts = [{ volume = \"data\", path = \"/data\" }]";
    for (name, userns) in [
        ("inside-a", "true"),
        ("inside-b", "true"),
        ("plain", "false"),
    ] {
        let text = format!(
            "kind = \"Pod\"\nname = \"{name}\"\nuser_namespace = {userns}\n{volume}\n[[members]]\nname = \"box\"\nimage = \"{image}\"\nargs = [\"sh\", \"-c\", '''{script}''']\ngrace_period = 1\n{mounts}\n"
        );
        apply(&up, name, &text);
    }
    let uid_of = |pod: &str| {
        up.pod(pod).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for name in ["inside-a", "inside-b", "plain"] {
        wait_phase(&up, name, "Running");
        wait_until(Duration::from_secs(30), "the volume written", || {
            logs(&up, name, &[]).contains("wrote-volume")
        });
        // Host root leaves a file only its owner may read.
        let f = up
            .data_dir()
            .join("agent/volumes")
            .join(uid_of(name))
            .join("data/host-only");
        std::fs::write(&f, "host-secret\n").unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let mut hosts = Vec::new();
    for name in ["inside-a", "inside-b"] {
        wait_until(Duration::from_secs(30), "the host file tried", || {
            logs(&up, name, &[]).contains("refused-host-file")
        });
        let out = logs(&up, name, &[]);
        let map: Vec<u64> = out
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(map[0], 0, "{out}");
        assert_eq!(map[2], 65536, "{out}");
        assert!(map[1] >= 1 << 30 && map[1] + 65536 <= 1 << 31, "{out}");
        for line in ["uid=0", "wrote-etc", "wrote-volume", "refused-host-file"] {
            assert!(out.lines().any(|l| l == line), "{name}: {line}: {out}");
        }
        assert!(!out.contains("host-secret"), "{out}");
        // From the host, the container's root is the range's first ID.
        let id = format!("{}-box", uid_of(name));
        let pid = state(&up, &id)["pid"].as_i64().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(
            uids.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap(),
            map[1],
            "{uids}"
        );
        hosts.push(map[1]);
    }
    assert_ne!(hosts[0], hosts[1], "each pod has a range of its own");
    wait_until(Duration::from_secs(30), "the host file read", || {
        logs(&up, "plain", &[]).contains("host-secret")
    });
    let plain = logs(&up, "plain", &[]);
    assert!(
        plain.starts_with("         0          0 4294967295"),
        "{plain}"
    );
    let ranges = up.data_dir().join("agent/containers/.userns");
    assert_eq!(std::fs::read_dir(&ranges).unwrap().count(), 2);

    // The agent dies and comes back: the container is re-adopted and its
    // pod keeps its range, so a new pod gets another.
    let a_id = format!("{}-box", uid_of("inside-a"));
    let a_pid = state(&up, &a_id)["pid"].clone();
    up.kill9();
    up.spawn();
    wait_until(Duration::from_secs(30), "inside-a re-adopted", || {
        up.log().contains("re-adopted running container")
    });
    assert_eq!(state(&up, &a_id)["pid"], a_pid, "the same container");
    apply(
        &up,
        "inside-c",
        &container_pod(
            "inside-c",
            &image,
            "head -1 /proc/self/uid_map; sleep 600",
            "",
        )
        .replace("[[members]]", "user_namespace = true\n\n[[members]]"),
    );
    wait_phase(&up, "inside-c", "Running");
    wait_until(Duration::from_secs(30), "inside-c's mapping", || {
        logs(&up, "inside-c", &[]).contains("65536")
    });
    let c_host: u64 = logs(&up, "inside-c", &[])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(!hosts.contains(&c_host), "{c_host} vs {hosts:?}");
    up.ok(&["delete", "pod", "inside-a", "inside-b", "plain", "inside-c"]);
    wait_until(Duration::from_secs(30), "the ranges freed", || {
        std::fs::read_dir(&ranges).unwrap().count() == 0
    });
}

#[test]
fn containers_are_hardened_as_seen_from_inside() {
    let (reg, image) = registry_with_busybox();
    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    apply_box(
        &up,
        "probe",
        &image,
        "grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status; id; if mount -t tmpfs none /tmp 2>/dev/null; then echo MOUNT-ALLOWED; else echo mount-refused; fi; if cat /proc/kcore >/dev/null 2>&1; then echo KCORE-READ; else echo kcore-masked; fi; if echo 1 > /proc/sys/kernel/panic 2>/dev/null; then echo SYSCTL-WRITTEN; else echo sysctl-readonly; fi; adjtimex >/dev/null 2>/tmp/adj && echo ADJTIMEX-READ || sed 's/^/adjtimex: /' /tmp/adj; unshare -n true 2>/dev/null && echo UNSHARE-ALLOWED || echo unshare-refused",
        "restart = \"Never\"",
    );
    wait_phase(&up, "probe", "Succeeded");
    let out = logs(&up, "probe", &[]);
    let default = format!(
        "{:016x}",
        flotilla_host::executor::container::runc::cap_mask(
            &flotilla_host::executor::container::runc::DEFAULT_CAPABILITIES
        )
    );
    assert!(out.contains(&format!("CapEff:\t{default}")), "{out}");
    assert!(out.contains(&format!("CapBnd:\t{default}")), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("uid=0(root)"), "{out}");
    assert!(out.contains("mount-refused"), "{out}");
    assert!(out.contains("kcore-masked"), "{out}");
    assert!(out.contains("sysctl-readonly"), "{out}");
    // Even reading the clock discipline is refused (adjtimex is denied by
    // the filter, not by a missing capability: a read needs none).
    assert!(
        out.contains("adjtimex: ") && out.contains("Operation not permitted"),
        "{out}"
    );
    assert!(out.contains("unshare-refused"), "{out}");

    // A non-root user keeps no capabilities; an added capability shows up.
    apply_box(
        &up,
        "nobody",
        &image,
        "grep -E '^(CapEff|CapBnd):' /proc/self/status; id -u; touch /x 2>/dev/null || echo rootfs-readonly",
        "restart = \"Never\"\nuser = \"nobody\"\nread_only = true\ncapabilities = [\"NET_RAW\"]",
    );
    wait_phase(&up, "nobody", "Succeeded");
    let out = logs(&up, "nobody", &[]);
    let with_raw = flotilla_host::executor::container::runc::cap_mask(
        &flotilla_host::executor::container::runc::DEFAULT_CAPABILITIES,
    ) | flotilla_host::executor::container::runc::cap_mask(&["NET_RAW"]);
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains(&format!("CapBnd:\t{with_raw:016x}")), "{out}");
    assert!(out.contains("65534"), "{out}");
    assert!(out.contains("rootfs-readonly"), "{out}");

    // An edit user may add a safe capability, not one reaching past the
    // container; the admin may.
    let edit = up.ok(&["token", "create", "--role", "edit", "-n", "default"]);
    let as_edit = |name: &str, cap: &str| {
        let f = up.manifest(
            &format!("{name}.toml"),
            &container_pod(
                name,
                &image,
                "true",
                &format!("restart = \"Never\"\ncapabilities = [\"{cap}\"]"),
            ),
        );
        up.cli(&["--token", edit.trim(), "apply", "-f", &f])
    };
    let out = as_edit("admin-cap", "sys_admin");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("adds capability SYS_ADMIN, which only the admin role may grant"),
        "{err}"
    );
    assert!(up.pod("admin-cap").is_none());
    assert!(as_edit("raw-cap", "NET_RAW").status.success());
    apply_box(
        &up,
        "clock",
        &image,
        "true",
        "restart = \"Never\"\ncapabilities = [\"SYS_TIME\"]",
    );
    wait_phase(&up, "clock", "Succeeded");
}

#[test]
fn containers_survive_an_agent_kill_and_are_readopted() {
    let (reg, image) = registry_with_busybox();
    let mut up = Up::start_with(&["--registry-config", &reg.config_file()]);
    apply_box(
        &up,
        "svc",
        &image,
        "echo up; while true; do sleep 0.1; done",
        "",
    );
    apply_box(
        &up,
        "flaky",
        &image,
        "echo start; sleep 2; exit 1",
        "restart = \"OnFailure\"",
    );
    wait_phase(&up, "svc", "Running");
    wait_phase(&up, "flaky", "Running");
    let svc_uid = up.pod("svc").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let svc_id = || {
        container_ids(&up)
            .into_iter()
            .find(|i| i.starts_with(&svc_uid))
    };
    wait_until(
        Duration::from_secs(10),
        "the container's state file",
        || svc_id().is_some_and(|id| containers_dir(&up).join(id).join("state.json").exists()),
    );
    let id = svc_id().unwrap();
    let before = state(&up, &id);
    let (pid, shim) = (
        before["pid"].as_i64().unwrap(),
        before["shim_pid"].as_i64().unwrap(),
    );
    let since = member(&up, "svc", 0)["state"]["Running"]["since_ms"].clone();

    up.kill9();
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(pid), "the container outlived the agent");
    assert!(alive(shim), "the shim outlived the agent");
    // Meanwhile `flaky` exits; its shim records it.
    std::thread::sleep(Duration::from_millis(2500));

    up.spawn();
    wait_until(Duration::from_secs(20), "the agent to re-adopt svc", || {
        up.log().contains("re-adopted running container")
    });
    wait_until(
        Duration::from_secs(20),
        "the pod reported Running again",
        || up.phase("svc") == "Running",
    );
    let after = state(&up, &id);
    assert_eq!(after["pid"], before["pid"], "same container process");
    let m = member(&up, "svc", 0);
    assert_eq!(m["restarts"], 0, "{m}");
    assert_eq!(m["state"]["Running"]["since_ms"], since, "{m}");
    assert!(
        up.log().contains("re-adopted running container"),
        "{}",
        up.log()
    );
    // Logs keep flowing through the same shim.
    assert!(logs(&up, "svc", &[]).contains("up"));
    // The run that ended while the agent was away counts, and it restarts.
    wait_until(
        Duration::from_secs(15),
        "flaky's restart after the away exit",
        || member(&up, "flaky", 0)["restarts"].as_u64().unwrap_or(0) >= 1,
    );
    let f = member(&up, "flaky", 0);
    assert_eq!(f["last_termination"]["exit_code"], 1, "{f}");
    up.ok(&["delete", "pod", "flaky"]);

    // Deleting the pod stops the adopted container.
    up.ok(&["delete", "pod", "svc"]);
    wait_until(
        Duration::from_secs(20),
        "the adopted container to stop",
        || !alive(pid) && !alive(shim) && container_ids(&up).is_empty(),
    );
    assert_eq!(mounts_under(&containers_dir(&up)), 0);
}

#[test]
fn a_mixed_pod_starts_and_stops_as_one() {
    let (reg, image) = registry_with_busybox();
    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    let text = format!(
        "kind = \"Pod\"\nname = \"mixed\"\n\n[[members]]\nname = \"counter\"\nwasm = \"{}\"\n\n[[members]]\nname = \"box\"\nimage = \"{image}\"\nargs = [\"sh\", \"-c\", \"echo box-started; while true; do sleep 0.1; done\"]\ngrace_period = 1\n",
        flotilla_samples::COUNTER_P1
    );
    apply(&up, "mixed", &text);
    wait_phase(&up, "mixed", "Running");
    wait_until(Duration::from_secs(10), "both members running", || {
        let p = up.pod("mixed").unwrap();
        p["status"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["state"]["Running"].is_object())
    });
    assert!(logs(&up, "mixed", &["-c", "box"]).contains("box-started"));
    wait_until(Duration::from_secs(10), "the wasm member's output", || {
        !logs(&up, "mixed", &["-c", "counter"]).is_empty()
    });
    let id = container_ids(&up)[0].clone();
    let pid = state(&up, &id)["pid"].as_i64().unwrap();
    up.ok(&["delete", "pod", "mixed"]);
    wait_until(Duration::from_secs(20), "both members stopped", || {
        !alive(pid) && container_ids(&up).is_empty() && up.pod("mixed").is_none()
    });
}

#[test]
fn a_wasm_artifact_pushed_with_flotilla_push_runs() {
    let reg = Registry::start(Auth::Anonymous);
    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    let reference = format!("{}/wasm/hello:1", reg.addr);
    let pushed = up.cli(&["push", flotilla_samples::HELLO_P2, &reference]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let out = String::from_utf8_lossy(&pushed.stdout).into_owned();
    assert!(out.trim().starts_with("sha256:"), "{out}");
    let bar = String::from_utf8_lossy(&pushed.stderr);
    assert!(
        bar.contains("[########################]"),
        "a finished progress bar: {bar}"
    );
    // `flotilla pull` into a store of its own gets the same manifest.
    let elsewhere = tempfile::tempdir().unwrap();
    let pulled = up.cli(&[
        "pull",
        &reference,
        "--agent-dir",
        elsewhere.path().to_str().unwrap(),
    ]);
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&pulled.stdout).trim(), out.trim());
    let progress = String::from_utf8_lossy(&pulled.stderr);
    assert!(
        progress.contains("1 layer(s)") && progress.contains("pulled"),
        "{progress}"
    );
    let text = format!(
        "kind = \"Pod\"\nname = \"artifact\"\nrestart = \"Never\"\n\n[[members]]\nname = \"hello\"\nwasm = \"oci://{reference}\"\n"
    );
    apply(&up, "artifact", &text);
    wait_phase(&up, "artifact", "Succeeded");
    let out = logs(&up, "artifact", &[]);
    assert!(out.to_lowercase().contains("hello"), "{out}");

    // `image =` naming a wasm artifact runs it in wasmtime too.
    let text = format!(
        "kind = \"Pod\"\nname = \"as-image\"\nrestart = \"Never\"\n\n[[members]]\nname = \"hello\"\nimage = \"{reference}\"\n"
    );
    apply(&up, "as-image", &text);
    wait_phase(&up, "as-image", "Succeeded");
    assert!(logs(&up, "as-image", &[]).to_lowercase().contains("hello"));
    assert!(
        container_ids(&up).is_empty(),
        "no container was made for it"
    );
    up.ok(&["delete", "pod", "as-image"]);

    // A single-layer image holding one .wasm runs as wasm when asked.
    let in_image = format!("{}/wasm/packed:1", reg.addr);
    let wasm = std::fs::read(flotilla_samples::HELLO_P1).unwrap();
    let layer = Layer::new()
        .dir("app", 0o755)
        .file("app/hello.wasm", 0o644, &wasm)
        .gzip();
    let dir = tempfile::tempdir().unwrap();
    let s = ImageStore::open(dir.path(), reg.config()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(s.push_layers(
            &in_image,
            (OCI_CONFIG, image_config(&[], &[], &[], "/")),
            vec![(OCI_LAYER_GZIP.to_string(), layer)],
        ))
        .unwrap();
    let text = format!(
        "kind = \"Pod\"\nname = \"packed\"\nrestart = \"Never\"\n\n[[members]]\nname = \"hello\"\nwasm = \"oci://{in_image}\"\n"
    );
    apply(&up, "packed", &text);
    wait_phase(&up, "packed", "Succeeded");
    assert!(logs(&up, "packed", &[]).to_lowercase().contains("hello"));

    // The node's store lists both, and prune keeps nothing unused.
    let agent = up.data_dir().join("agent");
    let list = up.ok(&["images", "--agent-dir", agent.to_str().unwrap()]);
    assert!(
        list.contains("wasm/hello:1") && list.contains("wasm/packed:1"),
        "{list}"
    );
    up.ok(&["delete", "pod", "artifact", "packed"]);
    wait_until(Duration::from_secs(10), "pods gone from the agent", || {
        let saved = std::fs::read_to_string(agent.join("pods.json")).unwrap_or_default();
        !saved.contains("artifact") && !saved.contains("packed")
    });
    let pruned = up.ok(&["prune", "--agent-dir", agent.to_str().unwrap()]);
    assert!(pruned.contains("removed 2 image(s)"), "{pruned}");
    let list = up.ok(&[
        "images",
        "--agent-dir",
        agent.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert_eq!(list.trim(), "[]");

    // A missing artifact is refused at apply with the registry's answer,
    // and nothing is created.
    let text = format!(
        "kind = \"Pod\"\nname = \"missing\"\nrestart = \"Never\"\n\n[[members]]\nname = \"m\"\nwasm = \"oci://{}/wasm/none:1\"\n",
        reg.addr
    );
    let m = up.manifest("missing.toml", &text);
    let o = up.cli(&["apply", "-f", &m]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("wasm/none:1") && err.contains("no such image"),
        "{err}"
    );
    assert!(up.pod("missing").is_none());
}

#[test]
fn a_wasm_artifact_named_by_image_is_resolved_at_apply_and_lands_on_a_node_without_runc() {
    let reg = Registry::start(Auth::Anonymous);
    let up = Up::start_with(&["--no-containers", "--registry-config", &reg.config_file()]);
    let reference = format!("{}/wasm/hello:1", reg.addr);
    let pushed = up.cli(&["push", flotilla_samples::HELLO_P2, &reference]);
    assert!(pushed.status.success());
    let digest = String::from_utf8_lossy(&pushed.stdout).trim().to_string();
    let text = format!(
        "kind = \"Pod\"\nname = \"as-image\"\nrestart = \"Never\"\n\n[[members]]\nname = \"hello\"\nimage = \"{reference}\"\n"
    );
    apply(&up, "as-image", &text);
    wait_phase(&up, "as-image", "Succeeded");
    assert!(logs(&up, "as-image", &[]).to_lowercase().contains("hello"));
    // The stored spec says what it is and pins what ran: the tag and the
    // digest the registry gave at apply.
    let pod = up.pod("as-image").unwrap();
    let source = &pod["spec"]["members"][0]["artifact"];
    assert_eq!(source["reference"], reference.as_str(), "{pod}");
    assert_eq!(source["digest"], digest.as_str(), "{pod}");
    // Re-applying the same manifest changes nothing (same digest).
    let m = up.manifest("again.toml", &text);
    assert!(up.ok(&["apply", "-f", &m]).contains("unchanged"));
    // A container image still needs runc, and says so.
    let busybox = reg.push_busybox("test/busybox:1");
    apply(&up, "boxed", &container_pod("boxed", &busybox, "true", ""));
    wait_until(Duration::from_secs(10), "the Pending reason", || {
        up.pod("boxed").unwrap()["status"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("1 missing runtime runc")
    });
    let boxed = up.pod("boxed").unwrap();
    assert!(
        boxed["spec"]["members"][0]["container"]["digest"]
            .as_str()
            .unwrap_or("")
            .starts_with("sha256:"),
        "{boxed}"
    );
}

#[test]
fn container_pods_wait_for_a_node_with_runc() {
    let up = Up::start_with(&["--no-containers"]);
    let nodes = up.ok(&["get", "nodes", "-o", "json"]);
    assert!(!nodes.contains("\"runc\""), "{nodes}");
    apply(
        &up,
        "needs",
        &container_pod("needs", "127.0.0.1:5/x/y:1", "true", ""),
    );
    wait_until(Duration::from_secs(10), "the Pending reason", || {
        up.pod("needs").unwrap()["status"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("1 missing runtime runc")
    });
    assert_eq!(up.phase("needs"), "Pending");
}

#[test]
fn stopping_sends_sigterm_then_sigkill_after_the_grace_period() {
    let (reg, image) = registry_with_busybox();
    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    apply(
        &up,
        "polite",
        &container_pod(
            "polite",
            &image,
            "trap 'echo got TERM; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
            "",
        )
        .replace("grace_period = 1", "grace_period = 5"),
    );
    apply(
        &up,
        "stubborn",
        &container_pod(
            "stubborn",
            &image,
            "trap '' TERM; echo ready; while true; do sleep 0.1; done",
            "",
        )
        .replace("grace_period = 1", "grace_period = 2"),
    );
    for name in ["polite", "stubborn"] {
        wait_phase(&up, name, "Running");
        wait_until(Duration::from_secs(10), "the trap to be set", || {
            logs(&up, name, &[]).contains("ready")
        });
    }
    let ids = container_ids(&up);
    let pid_of = |pod: &str| {
        let uid = up.pod(pod).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        let id = ids.iter().find(|i| i.starts_with(&uid)).unwrap().clone();
        state(&up, &id)["pid"].as_i64().unwrap()
    };
    let (polite, stubborn) = (pid_of("polite"), pid_of("stubborn"));
    let t = std::time::Instant::now();
    up.ok(&["delete", "pod", "polite", "stubborn"]);
    wait_until(
        Duration::from_secs(10),
        "the polite container to exit",
        || !alive(polite),
    );
    let polite_took = t.elapsed();
    wait_until(
        Duration::from_secs(10),
        "the stubborn container to be killed",
        || !alive(stubborn),
    );
    let stubborn_took = t.elapsed();
    assert!(
        polite_took < Duration::from_millis(2500),
        "exited on SIGTERM, well before its 5 s grace period: {polite_took:?}"
    );
    assert!(
        stubborn_took >= Duration::from_millis(1800),
        "killed only after its 2 s grace period: {stubborn_took:?}"
    );
}
