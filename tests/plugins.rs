//! Issue 18: plugins through the real binary — the sample admission
//! plugins (`require_labels`, `allowed_registries`) and scheduler plugin
//! (`zone_spread`) uploaded with `flotilla apply`, denying and mutating
//! writes in the namespaces they select, placing pods over zones of
//! simulated nodes, and a misbehaving plugin failing only its calls.

mod common;

use common::{BIN, Up, wait_until};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);

fn plugins() -> String {
    format!(
        r#"kind = "Plugin"
name = "require-labels"
wasm = "{}"
hook = "admission"
selector = {{ kinds = ["Pod", "Deployment"], namespaces = ["prod"] }}
config = {{ REQUIRED = "team", DEFAULTS = "tier=web" }}
---
kind = "Plugin"
name = "allowed-registries"
wasm = "{}"
hook = "admission"
selector = {{ kinds = ["Pod"], namespaces = ["prod"] }}
config = {{ ALLOWED = "registry.internal:5000" }}
---
kind = "Plugin"
name = "zone-spread"
wasm = "{}"
hook = "scheduler"
selector = {{ namespaces = ["prod"] }}
config = {{ MAX_PER_ZONE = "1" }}
"#,
        flotilla_samples::REQUIRE_LABELS_P2,
        flotilla_samples::ALLOWED_REGISTRIES_P2,
        flotilla_samples::ZONE_SPREAD_P2,
    )
}

fn pod(ns: &str, name: &str, labels: &str, member: &str) -> String {
    format!(
        "kind = \"Pod\"\nname = \"{name}\"\nnamespace = \"{ns}\"\nlabels = {{ {labels} }}\n[[members]]\nname = \"app\"\n{member}\n"
    )
}

fn wasm() -> String {
    format!("wasm = \"{}\"", flotilla_samples::COUNTER_P1)
}

/// `flotilla simulate`: one simulated node labelled `zone=ZONE`.
struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn simulate(up: &Up, quic: &str, token: &str, prefix: &str, zone: &str) -> Sim {
    let log = std::fs::File::create(up.dir.path().join(format!("{prefix}.log"))).unwrap();
    Sim(Command::new(BIN)
        .args(["simulate", "--join", quic, "--token", token, "--count", "1"])
        .args(["--prefix", prefix, "--label", &format!("zone={zone}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap())
}

/// Applies the manifest at `path`, which must fail; what the CLI said.
fn refused(up: &Up, path: &str) -> String {
    let out = up.cli(&["apply", "-f", path]);
    assert!(!out.status.success(), "applied: {path}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn node_of(up: &Up, ns: &str, name: &str) -> Option<String> {
    let out = up.cli(&["get", "pod", name, "-n", ns, "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["status"]["node"].as_str().map(String::from)
}

fn pending_message(up: &Up, ns: &str, name: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "pod", name, "-n", ns, "-o", "json"])).unwrap();
    v["status"]["message"].as_str().unwrap_or("").to_string()
}

#[test]
fn sample_plugins_admit_mutate_deny_and_place_through_the_real_binary() {
    let up = Up::start();
    let applied = up.ok(&["apply", "-f", &up.manifest("plugins.toml", &plugins())]);
    assert!(
        applied.contains("plugin/require-labels created"),
        "{applied}"
    );
    let table = up.ok(&["get", "plugins"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("zone-spread") && l.contains("scheduler") && l.contains("prod")),
        "{table}"
    );

    // Denied, with the plugin's reason, and nothing stored.
    let err = refused(
        &up,
        &up.manifest("bare.toml", &pod("prod", "bare", "app = \"x\"", &wasm())),
    );
    assert!(
        err.contains(
            "admission plugin \"require-labels\" denied: pod \"bare\" has no label \"team\""
        ),
        "{err}"
    );
    assert!(
        !up.cli(&["get", "pod", "bare", "-n", "prod"])
            .status
            .success()
    );

    // Admitted and mutated: the default label is there, and it runs.
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "good.toml",
            &pod("prod", "good", "team = \"shop\"", &wasm()),
        ),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "pod", "good", "-n", "prod", "-o", "json"])).unwrap();
    assert_eq!(v["metadata"]["labels"]["tier"], "web");
    // The registry check: a container image from elsewhere is refused
    // (the scheduler cannot reach that registry, so it stays unresolved
    // and the plugin decides on the reference).
    let out = up.cli(&[
        "apply",
        "-f",
        &up.manifest(
            "foreign.toml",
            &pod(
                "prod",
                "foreign",
                "team = \"shop\"",
                "image = \"127.0.0.1:9/app:1\"",
            ),
        ),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admission plugin \"allowed-registries\" denied: pod \"foreign\" member \"app\" comes from registry \"127.0.0.1:9\""),
        "{err}"
    );
    // Another namespace is not the plugins' business.
    up.ok(&[
        "apply",
        "-f",
        &up.manifest("dev.toml", &pod("dev", "bare", "app = \"x\"", &wasm())),
    ]);

    // Zone spread over two simulated nodes in zones a and b (the local
    // node has no zone): one pod of an app per zone, the third waits.
    let quic = up
        .log()
        .split("agents on quic://")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("up logs its QUIC address")
        .to_string();
    let token = up
        .ok(&["token", "create", "--join", "--ttl", "10m"])
        .trim()
        .to_string();
    let _a = simulate(&up, &quic, &token, "za", "a");
    let _b = simulate(&up, &quic, &token, "zb", "b");
    wait_until(LONG, "both simulated nodes Ready", || {
        let nodes = up.ok(&["get", "nodes"]);
        nodes
            .lines()
            .filter(|l| l.starts_with('z') && l.contains(" Ready"))
            .count()
            == 2
    });
    for i in 1..=3 {
        up.ok(&[
            "apply",
            "-f",
            &up.manifest(
                &format!("web-{i}.toml"),
                &pod(
                    "prod",
                    &format!("web-{i}"),
                    "team = \"shop\", app = \"web\"",
                    &wasm(),
                ),
            ),
        ]);
    }
    wait_until(LONG, "web-1 and web-2 placed", || {
        node_of(&up, "prod", "web-1").is_some() && node_of(&up, "prod", "web-2").is_some()
    });
    let mut zones = [
        node_of(&up, "prod", "web-1").unwrap(),
        node_of(&up, "prod", "web-2").unwrap(),
    ];
    zones.sort();
    assert_eq!(zones, ["za-00000", "zb-00000"]);
    wait_until(LONG, "web-3 to say why it waits", || {
        pending_message(&up, "prod", "web-3") == "0/3 nodes fit: 3 zone-spread"
    });
    assert_eq!(node_of(&up, "prod", "web-3"), None);

    // Deleting the scheduler plugin lets the waiting pod go anywhere.
    up.ok(&["delete", "plugin", "zone-spread"]);
    wait_until(LONG, "web-3 placed without the plugin", || {
        node_of(&up, "prod", "web-3").is_some()
    });
}

#[test]
fn a_misbehaving_plugin_fails_only_its_calls_and_an_edit_user_cannot_install_one() {
    let up = Up::start();
    let chaos = format!(
        "kind = \"Plugin\"\nname = \"chaos\"\nwasm = \"{}\"\nhook = \"admission\"\ntimeout = \"200ms\"\nfuel = 100000000000\nmemory = \"32Mi\"\nfailure_policy = \"{{POLICY}}\"\n",
        flotilla_samples::PLUGIN_CHAOS_P2
    );
    up.ok(&[
        "apply",
        "-f",
        &up.manifest("chaos.toml", &chaos.replace("{POLICY}", "Fail")),
    ]);
    for (name, chaos, said) in [
        ("trap", "trap", "chaos: trap requested"),
        ("spin", "spin", "ran past its timeout (200ms)"),
        ("hog", "hog", "ran out of memory (memory = 32Mi)"),
    ] {
        let out = up.cli(&[
            "apply",
            "-f",
            &up.manifest(
                &format!("{name}.toml"),
                &pod("default", name, &format!("chaos = \"{chaos}\""), &wasm()),
            ),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}");
        assert!(
            err.contains("admission plugin \"chaos\" failed:") && err.contains(said),
            "{name}: {err}"
        );
        // The API answers the next request at once, and admits it.
        up.ok(&["get", "pods"]);
    }
    let events = up.ok(&["events", "-A"]);
    assert!(events.contains("CallFailed"), "{events}");
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "calm.toml",
            &pod("default", "calm", "app = \"calm\"", &wasm()),
        ),
    ]);
    up.wait_phase("calm", "Running");
    let v = up.pod("calm").unwrap();
    assert_eq!(v["metadata"]["labels"]["chaos-seen"], "yes");

    // Ignore: the same failures let the writes through.
    up.ok(&[
        "apply",
        "-f",
        &up.manifest("chaos.toml", &chaos.replace("{POLICY}", "Ignore")),
    ]);
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "trap.toml",
            &pod("default", "trap", "chaos = \"trap\"", &wasm()),
        ),
    ]);
    assert!(up.pod("trap").is_some());

    // Plugins are an admin's: an edit user may not install one.
    let token = up
        .ok(&[
            "token", "create", "--role", "edit", "-n", "default", "--ttl", "10m",
        ])
        .trim()
        .to_string();
    let out = up
        .command()
        .arg("--token")
        .arg(&token)
        .args([
            "apply",
            "-f",
            &up.manifest(
                "chaos2.toml",
                &chaos
                    .replace("chaos\"", "chaos2\"")
                    .replace("{POLICY}", "Fail"),
            ),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") || err.contains("admin"), "{err}");
    assert!(!up.cli(&["get", "plugin", "chaos2"]).status.success());
}

/// Builds the project in `dir` for wasm32-wasip2 (offline: the crates it
/// needs are the ones the samples were built with).
fn cargo_build(dir: &std::path::Path, target: &std::path::Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--quiet",
        "--offline",
        "--target",
        "wasm32-wasip2",
    ])
    .env("CARGO_TARGET_DIR", target)
    .current_dir(dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "building {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_new_plugin_project_builds_and_works_as_written() {
    let up = Up::start();
    let root = up.dir.path();
    let target = root.join("target");
    for (name, hook) in [("team-check", "admission"), ("zoned", "scheduler")] {
        let dir = root.join(name);
        let said = up.ok(&[
            "plugin",
            "new",
            name,
            "--hook",
            hook,
            "--dir",
            dir.to_str().unwrap(),
        ]);
        assert!(
            said.contains("cargo build --release --target wasm32-wasip2"),
            "{said}"
        );
        cargo_build(&dir, &target);
        // The manifest names the build under the project's own target dir.
        let manifest = std::fs::read_to_string(dir.join("plugin.toml"))
            .unwrap()
            .replace("target/", &format!("{}/", target.display()));
        up.ok(&[
            "apply",
            "-f",
            &up.manifest(&format!("{name}.toml"), &manifest),
        ]);
    }
    let out = up.cli(&[
        "apply",
        "-f",
        &up.manifest(
            "nameless.toml",
            &pod("default", "nameless", "app = \"x\"", &wasm()),
        ),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "admission plugin \"team-check\" denied: pod \"nameless\" has no label \"owner\""
        ),
        "{err}"
    );
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "owned.toml",
            &pod("default", "owned", "owner = \"me\"", &wasm()),
        ),
    ]);
    // The local node has no zone label: the scheduler template keeps the
    // pod off it.
    wait_until(LONG, "owned to say why it waits", || {
        pending_message(&up, "default", "owned") == "0/1 nodes fit: 1 zoned"
    });
    // A name that is not a DNS label is refused before anything is written.
    let out = up.cli(&[
        "plugin",
        "new",
        "Bad_Name",
        "--dir",
        root.join("bad").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(!root.join("bad").exists());
}

/// A Plugin from a registry (`wasm = "oci://…"`): pinned to its manifest
/// digest and pulled by the scheduler at apply, then run like an uploaded
/// one; a reference the registry does not have is refused at apply.
#[test]
fn a_plugin_from_a_registry_is_pinned_pulled_and_run() {
    use common::registry::{Auth, Registry};
    let reg = Registry::start(Auth::Anonymous);
    let up = Up::start_with(&["--registry-config", &reg.config_file()]);
    let reference = format!("{}/plugins/require-labels:1", reg.addr);
    up.ok(&["push", flotilla_samples::REQUIRE_LABELS_P2, &reference]);
    let plugin = |r: &str| {
        format!(
            "kind = \"Plugin\"\nname = \"require-labels\"\nwasm = \"oci://{r}\"\nhook = \"admission\"\nselector = {{ namespaces = [\"prod\"] }}\nconfig = {{ REQUIRED = \"team\" }}\n"
        )
    };
    let applied = up.ok(&["apply", "-f", &up.manifest("p.toml", &plugin(&reference))]);
    assert!(
        applied.contains("plugin/require-labels created"),
        "{applied}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "plugin", "require-labels", "-o", "json"])).unwrap();
    let pinned = v["spec"]["artifact"]["digest"].as_str().unwrap_or_default();
    assert!(pinned.starts_with("sha256:"), "{v}");
    let err = refused(
        &up,
        &up.manifest("bare.toml", &pod("prod", "bare", "app = \"x\"", &wasm())),
    );
    assert!(
        err.contains(
            "admission plugin \"require-labels\" denied: pod \"bare\" has no label \"team\""
        ),
        "{err}"
    );
    up.ok(&[
        "apply",
        "-f",
        &up.manifest("ok.toml", &pod("prod", "ok", "team = \"a\"", &wasm())),
    ]);
    // Not in the registry: refused, and the stored plugin is untouched.
    let missing = format!("{}/plugins/none:1", reg.addr);
    let err = refused(&up, &up.manifest("p2.toml", &plugin(&missing)));
    assert!(err.contains("plugins/none:1"), "{err}");
    let again: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "plugin", "require-labels", "-o", "json"])).unwrap();
    assert_eq!(again["spec"]["artifact"]["digest"], pinned);
}
