//! ConfigMaps, Secrets and volumes end to end, through `flotilla up` and the
//! CLI: values as variables and as files in wasm members and containers, a
//! pod waiting for what it misses, config updates reaching running members,
//! read-only mounts, a tmpfs size limit, an `empty_dir` shared by a wasm
//! member and a container, `host_path` refused for the edit role.

mod common;

use common::registry::registry_with_busybox;
use common::{Up, wait_until};
use std::time::Duration;

fn logs(up: &Up, pod: &str, member: &str) -> String {
    let out = up.cli(&["logs", pod, "-c", member]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for a line starting with `prefix` in a member's log; returns it.
fn wait_line(up: &Up, pod: &str, member: &str, prefix: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30) * common::slack();
    loop {
        let log = logs(up, pod, member);
        if let Some(line) = log.lines().find(|l| l.starts_with(prefix)) {
            return line.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for '{prefix}' in the log of {pod}/{member}:\n{log}\npod: {:#}\nagent: {}",
            up.pod(pod).unwrap_or_default(),
            up.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn apply(up: &Up, name: &str, text: &str) {
    let f = up.manifest(&format!("{name}.toml"), text);
    up.ok(&["apply", "-f", &f]);
}

fn files_args(cmds: &[&str]) -> String {
    let mut out = Vec::new();
    for (i, c) in cmds.iter().enumerate() {
        if i > 0 {
            out.push("\";\"".to_string());
        }
        out.extend(c.split(' ').map(|w| format!("\"{w}\"")));
    }
    format!("[{}]", out.join(", "))
}

#[test]
fn configs_and_secrets_reach_a_wasm_member_as_variables_and_files() {
    let up = Up::start();
    let conf = up.manifest("app.conf", "level=3");
    let out = up.ok(&[
        "create",
        "configmap",
        "app",
        "--from-literal",
        "mode=fast",
        "--from-file",
        &conf,
    ]);
    assert!(out.contains("configmap/app created"), "{out}");
    up.ok(&[
        "create",
        "secret",
        "db",
        "--from-literal",
        "password=hunter2-s3cret",
        "--from-literal",
        "user=app",
    ]);
    // `create` never changes what exists.
    let again = up.cli(&["create", "configmap", "app", "--from-literal", "mode=x"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{again:?}"
    );
    let args = files_args(&[
        "env",
        "cat /cfg/mode",
        "cat /cfg/app.conf",
        "cat /creds/password",
        "write /scratch/note hi",
        "cat /scratch/note",
        "write /cfg/mode changed",
        "watch /cfg/mode slow",
    ]);
    apply(
        &up,
        "reader",
        &format!(
            r#"kind = "Pod"
name = "reader"
service_links = false
[[volumes]]
name = "cfg"
config = "app"
[[volumes]]
name = "creds"
secret = {{ name = "db", items = [{{ key = "password", path = "password" }}] }}
[[volumes]]
name = "scratch"
empty_dir = {{}}
[[members]]
name = "files"
wasm = "{wasm}"
restart = "Never"
args = {args}
env_from = [{{ config = "app", prefix = "CFG_" }}]
env = {{ PASS = {{ secret = "db", key = "password" }}, POD = {{ field = "pod.name" }}, NODE = {{ field = "node.name" }}, MISSING = {{ config = "app", key = "nope", optional = true }} }}
mounts = [{{ volume = "cfg", path = "/cfg" }}, {{ volume = "creds", path = "/creds" }}, {{ volume = "scratch", path = "/scratch" }}]
"#,
            wasm = flotilla_samples::FILES_P1
        ),
    );
    let env = wait_line(&up, "reader", "files", "env: ");
    let node = up.ok(&["get", "nodes", "-o", "json"]);
    let node: serde_json::Value = serde_json::from_str(&node).unwrap();
    let node = node[0]["metadata"]["name"].as_str().unwrap().to_string();
    // Exactly what the manifest asked for: no FLOTILLA_* variables, no
    // service links, the optional missing key unset.
    assert_eq!(
        env,
        format!(
            "env: CFG_app.conf=level=3 CFG_mode=fast NODE={node} PASS=hunter2-s3cret POD=reader"
        ),
        "the member's whole environment"
    );
    let log = logs(&up, "reader", "files");
    assert!(log.contains("cat /cfg/mode: fast"), "{log}");
    assert!(log.contains("cat /cfg/app.conf: level=3"), "{log}");
    assert!(log.contains("cat /creds/password: hunter2-s3cret"), "{log}");
    assert!(log.contains("cat /scratch/note: hi"), "{log}");
    let refused = wait_line(&up, "reader", "files", "write /cfg/mode: error");
    assert!(
        refused.contains("not permitted")
            || refused.contains("ermission denied")
            || refused.contains("ead-only"),
        "a config volume is read-only: {refused}"
    );
    // A change reaches the running member's file.
    apply(
        &up,
        "app-v2",
        "kind = \"ConfigMap\"\nname = \"app\"\ndata = { mode = \"slow\", \"app.conf\" = \"level=3\" }\n",
    );
    wait_line(&up, "reader", "files", "saw slow");
    up.wait_phase("reader", "Succeeded");
    // The secret's value is in no file of the scheduler or the agent: not
    // the store (sealed), the agent's pod state, volumes, audit log or
    // anything else kept. (The member printed it to its own log on
    // purpose: that file is the member's output, not bookkeeping.)
    let agent = up.data_dir().join("agent");
    let holding = |value: &[u8]| {
        let mut found = Vec::new();
        let mut stack = vec![up.data_dir()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    stack.push(p);
                } else if ft.is_file()
                    && !p.starts_with(agent.join("logs"))
                    && let Ok(bytes) = std::fs::read(&p)
                    && bytes.windows(value.len()).any(|w| w == value)
                {
                    found.push(p);
                }
            }
        }
        found
    };
    assert_eq!(holding(b"hunter2-s3cret"), Vec::<std::path::PathBuf>::new());
    // The test can see a value it put there: the scan would find one.
    assert!(!holding(b"level=3").is_empty());
    // A new key: every Secret sealed again, still readable.
    let out = up.ok(&["secrets", "rotate-key"]);
    assert!(
        out.contains("sealed with key 2") && out.contains("1 sealed again"),
        "{out}"
    );
    let got = up.ok(&["get", "secrets", "db", "-o", "json"]);
    assert!(got.contains("hunter2-s3cret"), "{got}");
    assert_eq!(holding(b"hunter2-s3cret"), Vec::<std::path::PathBuf>::new());
    // Deleting the pod removes its volumes.
    up.ok(&["delete", "pod", "reader"]);
    wait_until(Duration::from_secs(20), "volumes removed", || {
        std::fs::read_dir(agent.join("volumes"))
            .map(|d| d.count() == 0)
            .unwrap_or(true)
    });
    // Viewers see keys, not values.
    let view = up.ok(&["token", "create", "--role", "view"]);
    let out = up.ok(&["--token", view.trim(), "get", "secrets", "db", "-o", "json"]);
    assert!(
        out.contains("<hidden>") && !out.contains("hunter2"),
        "{out}"
    );
}

#[test]
fn a_pod_waits_for_a_missing_secret_names_it_and_starts_when_it_appears() {
    let up = Up::start();
    apply(
        &up,
        "late",
        &format!(
            r#"kind = "Pod"
name = "late"
[[members]]
name = "files"
wasm = "{wasm}"
restart = "Never"
args = ["env"]
env = {{ TOKEN = {{ secret = "late", key = "token" }} }}
"#,
            wasm = flotilla_samples::FILES_P2
        ),
    );
    let reason = |up: &Up| {
        up.pod("late").map_or(String::new(), |p| {
            p["status"]["reason"].as_str().unwrap_or("").to_string()
        })
    };
    wait_until(Duration::from_secs(20), "the missing secret named", || {
        reason(&up) == "secret \"late\" not found"
    });
    let describe = up.ok(&["describe", "pod", "late"]);
    assert!(describe.contains("secret \"late\" not found"), "{describe}");
    let events = up.ok(&["events"]);
    assert!(
        events.contains("member files cannot start: secret \"late\" not found"),
        "{events}"
    );
    up.ok(&["create", "secret", "late", "--from-literal", "other=1"]);
    wait_until(Duration::from_secs(20), "the missing key named", || {
        reason(&up) == "secret \"late\" has no key \"token\""
    });
    apply(
        &up,
        "late-secret",
        "kind = \"Secret\"\nname = \"late\"\ndata = { token = \"t0ken\" }\n",
    );
    up.wait_phase("late", "Succeeded");
    let env = wait_line(&up, "late", "files", "env: ");
    assert!(env.contains("TOKEN=t0ken"), "{env}");
}

#[test]
fn a_pod_whose_disk_scratch_grows_past_its_size_limit_is_evicted() {
    let up = Up::start();
    let args = files_args(&["fill /scratch/big 3145728", "sleep 600"]);
    apply(
        &up,
        "hog",
        &format!(
            r#"kind = "Pod"
name = "hog"
[[volumes]]
name = "scratch"
empty_dir = {{ size_limit = "1Mi" }}
[[members]]
name = "files"
wasm = "{wasm}"
args = {args}
mounts = [{{ volume = "scratch", path = "/scratch" }}]
"#,
            wasm = flotilla_samples::FILES_P1
        ),
    );
    // No wait for the guest's "filled" line: the eviction check may stop the
    // member while it is still writing, before it can print anything.
    up.wait_phase("hog", "Failed");
    let pod = up.pod("hog").unwrap();
    assert_eq!(pod["status"]["reason"], "Evicted", "{pod:#}");
    let message = pod["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("empty_dir \"scratch\" holds") && message.contains("over its size_limit"),
        "{message}"
    );
}

/// Issue 14 item 15: a container's own filesystem (its writable layer)
/// has a disk cap (`resources.disk`, else the node's default); writing past
/// it evicts the pod, naming the member and the figures. A wasm member
/// cannot ask for one (it writes only to volumes).
#[test]
fn a_container_writing_past_its_disk_limit_is_evicted() {
    let (reg, image) = registry_with_busybox();
    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    apply(
        &up,
        "filler",
        &format!(
            r#"kind = "Pod"
name = "filler"
[[members]]
name = "box"
image = "{image}"
grace_period = 1
resources = {{ disk = "2Mi" }}
args = ["sh", "-c", "dd if=/dev/zero of=/fill bs=1024 count=4096 && sync && exec sleep 100000"]
"#
        ),
    );
    up.wait_phase("filler", "Failed");
    let pod = up.pod("filler").unwrap();
    assert_eq!(pod["status"]["reason"], "Evicted", "{pod:#}");
    let message = pod["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("container \"box\" wrote")
            && message.contains("over its disk limit of 2Mi (resources.disk)"),
        "{message}"
    );
    // Refused at apply for a wasm member.
    let f = up.manifest(
        "wasm-disk.toml",
        &format!(
            "kind = \"Pod\"\nname = \"w\"\n[[members]]\nname = \"m\"\nwasm = \"{}\"\nresources = {{ disk = \"1Mi\" }}\n",
            flotilla_samples::FILES_P1
        ),
    );
    let o = up.cli(&["apply", "-f", &f]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("resources.disk caps a container's writable layer"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_persistent_volume_keeps_its_data_and_cannot_be_deleted_while_used() {
    let mut up = Up::start();
    apply(
        &up,
        "vol",
        "kind = \"Volume\"\nname = \"data\"\ncapacity = \"64Mi\"\n",
    );
    let pod = |name: &str, cmds: &[&str]| {
        format!(
            r#"kind = "Pod"
name = "{name}"
[[volumes]]
name = "data"
persistent = "data"
[[members]]
name = "files"
wasm = "{wasm}"
restart = "Never"
args = {args}
mounts = [{{ volume = "data", path = "/data" }}]
"#,
            wasm = flotilla_samples::FILES_P2,
            args = files_args(cmds)
        )
    };
    apply(&up, "w", &pod("w", &["write /data/kept yes", "sleep 600"]));
    wait_line(&up, "w", "files", "wrote /data/kept");
    let table = up.ok(&["get", "volumes"]);
    assert!(
        table.contains("NAME") && table.contains("64Mi") && table.contains("local"),
        "{table}"
    );
    let out = up.cli(&["delete", "volume", "data"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("volume data is used by pod w"), "{err}");
    up.ok(&["delete", "pod", "w"]);
    wait_until(Duration::from_secs(20), "pod w gone", || {
        up.pod("w").is_none()
    });
    // The agent (and the scheduler with it) restarts: the data is still
    // there for the next pod.
    up.stop();
    up.spawn();
    apply(&up, "r", &pod("r", &["cat /data/kept"]));
    let line = wait_line(&up, "r", "files", "cat /data/kept: ");
    assert_eq!(line, "cat /data/kept: yes");
    up.wait_phase("r", "Succeeded");
    // A finished pod does not hold it.
    up.ok(&["delete", "volume", "data"]);
}

#[test]
fn misspelled_fields_and_bad_references_are_refused_with_positions() {
    let up = Up::start();
    let f = up.manifest(
        "bad.toml",
        "kind = \"Pod\"\nname = \"bad\"\n[[members]]\nwasm = \"oci://127.0.0.1:5/x:1\"\nenv = { A = { secrte = \"db\", key = \"k\" } }\n",
    );
    let out = up.cli(&["apply", "-f", &f]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml:5:"), "{err}");
    assert!(err.contains("secrte"), "{err}");
    let f = up.manifest(
        "mount.toml",
        "kind = \"Pod\"\nname = \"bad\"\n[[volumes]]\nname = \"data\"\nempty_dir = {}\n[[members]]\nwasm = \"oci://127.0.0.1:5/x:1\"\nmounts = [{ volume = \"dta\", path = \"/data\" }]\n",
    );
    let out = up.cli(&["apply", "-f", &f]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mount.toml:3:"), "{err}");
    assert!(
        err.contains("volume 'dta', which the pod does not declare"),
        "{err}"
    );
}

#[test]
fn host_path_volumes_are_for_admins_only() {
    let up = Up::start();
    let edit = up.ok(&["token", "create", "--role", "edit", "-n", "default"]);
    let token = edit.trim();
    let text = format!(
        "kind = \"Pod\"\nname = \"host\"\n[[volumes]]\nname = \"etc\"\nhost_path = \"/etc\"\n[[members]]\nwasm = \"{}\"\nrestart = \"Never\"\nargs = [\"cat\", \"/host/hostname\"]\nmounts = [{{ volume = \"etc\", path = \"/host\" }}]\n",
        flotilla_samples::FILES_P1
    );
    let f = up.manifest("host.toml", &text);
    let out = up.cli(&["--token", token, "apply", "-f", &f]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host_path, which only the admin role may use"),
        "{err}"
    );
    assert!(up.pod("host").is_none());
    up.ok(&["apply", "-f", &f]);
    let line = wait_line(&up, "host", "files", "cat /host/hostname: ");
    let want = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    if !want.is_empty() {
        assert_eq!(line, format!("cat /host/hostname: {}", want.trim_end()));
    }
}

#[test]
fn a_wasm_member_and_a_container_share_an_empty_dir_and_see_configs_alike() {
    let (reg, image) = registry_with_busybox();
    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    up.ok(&["create", "configmap", "app", "--from-literal", "mode=fast"]);
    up.ok(&[
        "create",
        "secret",
        "db",
        "--from-literal",
        "password=box-s3cret",
    ]);
    apply(
        &up,
        "keep",
        "kind = \"Volume\"\nname = \"keep\"\ncapacity = \"16Mi\"\n",
    );
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("motd"), "from the node").unwrap();
    let args = files_args(&[
        "write /data/from-wasm hello-from-wasm",
        "wait /data/from-box",
        "cat /cfg/mode",
    ]);
    apply(
        &up,
        "shared",
        &format!(
            r#"kind = "Pod"
name = "shared"
[[volumes]]
name = "data"
empty_dir = {{}}
[[volumes]]
name = "cfg"
config = "app"
[[volumes]]
name = "small"
empty_dir = {{ medium = "memory", size_limit = "1Mi" }}
[[volumes]]
name = "creds"
secret = "db"
[[volumes]]
name = "host"
host_path = "{host}"
[[volumes]]
name = "keep"
persistent = "keep"
[[volumes]]
name = "root"
empty_dir = {{}}
[[members]]
name = "comp"
wasm = "{component}"
restart = "Never"
args = {root_args}
mounts = [{{ volume = "root", path = "/" }}, {{ volume = "keep", path = "/keep" }}]

[[members]]
name = "files"
wasm = "{wasm}"
restart = "Never"
args = {args}
mounts = [{{ volume = "data", path = "/data" }}, {{ volume = "cfg", path = "/cfg" }}]
[[members]]
name = "box"
image = "{image}"
restart = "Never"
grace_period = 1
env = {{ MODE = {{ config = "app", key = "mode" }} }}
mounts = [{{ volume = "data", path = "/data" }}, {{ volume = "cfg", path = "/etc/app", read_only = true }}, {{ volume = "small", path = "/small" }}, {{ volume = "creds", path = "/creds" }}, {{ volume = "host", path = "/host" }}, {{ volume = "keep", path = "/keep" }}]
args = ["sh", "-c", '''
i=0; while [ ! -f /data/from-wasm ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
echo "box read: $(cat /data/from-wasm)"
echo "box env: MODE=$MODE"
echo "box cfg: $(cat /etc/app/mode)"
echo x > /etc/app/new 2>/dev/null && echo "box wrote config" || echo "box config write refused"
echo "box secret: $(cat /creds/password)"
echo "box host: $(cat /host/motd)"
echo x > /host/new 2>/dev/null && echo "box wrote host" || echo "box host write refused"
dd if=/dev/zero of=/small/fill bs=1024 count=2048 2>/small-err; echo "box dd exit: $?"
cat /small-err | grep -o "No space left on device" | head -1
echo kept-by-box > /keep/from-box
echo hello-from-box > /data/from-box
''']
"#,
            wasm = flotilla_samples::FILES_P1,
            component = flotilla_samples::FILES_P2,
            host = host_dir.path().display(),
            root_args = files_args(&[
                "write /note at-the-root",
                "cat /note",
                "wait /keep/from-box",
            ])
        ),
    );
    wait_line(&up, "shared", "box", "box read: hello-from-wasm");
    let wasm_saw = wait_line(&up, "shared", "files", "cat /data/from-box: ");
    assert_eq!(wasm_saw, "cat /data/from-box: hello-from-box");
    let log = logs(&up, "shared", "box");
    assert!(log.contains("box env: MODE=fast"), "{log}");
    assert!(log.contains("box cfg: fast"), "{log}");
    assert!(log.contains("box config write refused"), "{log}");
    assert!(log.contains("box secret: box-s3cret"), "{log}");
    assert!(log.contains("box host: from the node"), "{log}");
    assert!(log.contains("box host write refused"), "{log}");
    assert!(!host_dir.path().join("new").exists());
    assert!(log.contains("box dd exit: 1"), "{log}");
    assert!(log.contains("No space left on device"), "{log}");
    let wasm_log = logs(&up, "shared", "files");
    assert!(wasm_log.contains("cat /cfg/mode: fast"), "{wasm_log}");
    // A component with a volume at `/` and the persistent volume the
    // container wrote to.
    let comp = logs(&up, "shared", "comp");
    assert!(comp.contains("cat /note: at-the-root"), "{comp}");
    assert_eq!(
        wait_line(&up, "shared", "comp", "cat /keep/from-box: "),
        "cat /keep/from-box: kept-by-box"
    );
    up.wait_phase("shared", "Succeeded");
}
