//! Issue 16 item 1: health probes of each kind on wasm members and
//! containers, run by the agent inside the pod's network namespace,
//! against a running `flotilla up`: a member that falls sick while it keeps
//! running is restarted by its liveness probe (reason `Unhealthy`, an
//! event), a member failing readiness leaves its service's endpoints and
//! returns when it passes, and a startup probe holds the others back.

mod common;

use common::registry::registry_with_busybox;
use common::{HostNetwork, Up, wait_until};
use std::time::Duration;

const TCP: &str = flotilla_samples::TCP_P2;

fn apply(up: &Up, name: &str, text: &str) {
    let f = up.manifest(&format!("{name}.toml"), text);
    up.ok(&["apply", "-f", &f]);
}

fn member(up: &Up, pod: &str) -> serde_json::Value {
    up.pod(pod)
        .map(|p| p["status"]["members"][0].clone())
        .unwrap_or_default()
}

/// GET /alive through the service's node port on this node (so through
/// the node's proxy and its endpoint table).
fn alive_via_node_port() -> Result<(), String> {
    let (status, _) = common::http_get(31879, "/alive", Duration::from_secs(10))?;
    status
        .contains(" 200 ")
        .then_some(())
        .ok_or_else(|| format!("answered {status}"))
}

fn endpoints(up: &Up, svc: &str) -> Vec<String> {
    let all: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "services", "-o", "json"])).unwrap();
    let s = all
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["metadata"]["name"] == svc)
        .unwrap_or_else(|| panic!("no service {svc}: {all}"));
    let mut v: Vec<String> = s["status"]["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["pod"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const LONG: Duration = Duration::from_secs(60);

#[test]
fn wasm_members_are_probed_over_http_and_tcp() {
    let up = Up::start();
    // Answers 200 three times, then 500 while it keeps running.
    apply(
        &up,
        "sick",
        &format!(
            "kind = \"Pod\"\nname = \"sick\"\n[[members]]\nname = \"web\"\nwasm = \"{TCP}\"\nargs = [\"http\", \"8080\", \"3\"]\nports = [8080]\nliveness = {{ http = {{ port = 8080, path = \"/healthz\" }}, period = 0.2, failure_threshold = 2 }}\n"
        ),
    );
    // Two pods of one app: one listens where its readiness probe looks,
    // the other never does. (Loopback pod networks, as `Up` runs them: the
    // probes reach inside each pod's namespace; endpoints are checked on a
    // bridged network in the other test.)
    let behind = |name: &str, listen: u16| {
        format!(
            "kind = \"Pod\"\nname = \"{name}\"\nlabels = {{ app = \"probed\" }}\n[[members]]\nname = \"tcp\"\nwasm = \"{TCP}\"\nargs = [\"serve\", \"{listen}\"]\nports = [9090]\nreadiness = {{ tcp = {{ port = 9090 }}, period = 0.2 }}\n"
        )
    };
    apply(&up, "serving", &behind("serving", 9090));
    apply(&up, "waiting", &behind("waiting", 9191));

    wait_until(LONG, "sick restarted by its liveness probe", || {
        let m = member(&up, "sick");
        m["restarts"].as_u64().unwrap_or(0) >= 1 && m["last_termination"]["reason"] == "Unhealthy"
    });
    let m = member(&up, "sick");
    let why = m["last_termination"]["message"].as_str().unwrap();
    assert_eq!(
        why, "liveness probe failed 2 times in a row: GET /healthz answered HTTP 500",
        "{m}"
    );
    // Its log shows the probe's requests, inside the pod (127.0.0.1).
    // (Between runs, the last ended run's log is the current one.)
    let log = ["logs", "logs --previous"]
        .iter()
        .map(|a| {
            let mut args: Vec<&str> = a.split(' ').collect();
            args.push("sick");
            String::from_utf8_lossy(&up.cli(&args).stdout).into_owned()
        })
        .collect::<String>();
    assert!(log.contains("GET /healthz HTTP/1.1 -> 200 OK"), "{log}");
    assert!(log.contains("GET /healthz HTTP/1.1 -> 500"), "{log}");
    let events = up.ok(&["events"]);
    assert!(
        events.contains("Unhealthy") && events.contains("member web was stopped (Unhealthy"),
        "{events}"
    );

    wait_until(LONG, "serving ready", || {
        member(&up, "serving")["ready"] == true
    });
    // Running, but not ready, and READY says so.
    let waiting = member(&up, "waiting");
    assert_eq!(waiting["ready"], false, "{waiting}");
    assert!(waiting["state"]["Running"].is_object(), "{waiting}");
    let table = up.ok(&["get", "pods"]);
    let row = table.lines().find(|l| l.starts_with("waiting ")).unwrap();
    assert!(row.contains("0/1"), "{table}");
    let row = table.lines().find(|l| l.starts_with("serving ")).unwrap();
    assert!(row.contains("1/1"), "{table}");
}

#[test]
fn containers_are_probed_by_exec_http_and_tcp_and_leave_endpoints_while_unready() {
    let (reg, image) = registry_with_busybox();
    // A bridged pod network: endpoints are pod addresses. (The only test
    // here on the node's bridge; the other keeps to loopback networks.)
    // Dropped after `up`: the bridge and the filter go with the test.
    let _network = HostNetwork::taken();
    let up = Up::start_with(&[
        "--registry-config",
        &reg.config_file(),
        "--pod-network",
        "bridge",
    ]);
    // httpd serves /data/www; /data/www/alive is its liveness, the file
    // /data/ready its readiness (both on a volume the test reaches).
    // /out (a directory of the test's, an admin's host_path) keeps the
    // order of the pre_stop hook and the TERM past the pod's deletion.
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().display();
    let text = format!(
        "kind = \"Pod\"\nname = \"box\"\nlabels = {{ app = \"box\" }}\n[[volumes]]\nname = \"data\"\nempty_dir = {{}}\n[[volumes]]\nname = \"out\"\nhost_path = {{ path = \"{out}\", writable = true }}\n[[members]]\nname = \"web\"\nimage = \"{image}\"\nargs = [\"sh\", \"-c\", \"busybox mkdir -p /data/www && echo ok > /data/www/alive && busybox httpd -p 8080 -h /data/www && trap 'echo got TERM >> /out/trace; exit 0' TERM && while true; do sleep 0.1; done\"]\nmounts = [{{ volume = \"data\", path = \"/data\" }}, {{ volume = \"out\", path = \"/out\" }}]\ngrace_period = 1\nstartup = {{ tcp = {{ port = 8080 }}, period = 0.2, failure_threshold = 100 }}\nliveness = {{ http = {{ port = 8080, path = \"/alive\" }}, period = 0.2, failure_threshold = 2 }}\nreadiness = {{ exec = [\"busybox\", \"test\", \"-f\", \"/data/ready\"], period = 0.2, failure_threshold = 1 }}\npre_stop = {{ exec = [\"sh\", \"-c\", \"echo pre-stop-ran >> /out/trace\"] }}\n"
    );
    apply(&up, "box", &text);
    apply(
        &up,
        "box",
        "kind = \"Service\"\nname = \"box\"\nselector = { app = \"box\" }\nports = [{ port = 8080, node_port = 31879 }]\n",
    );
    wait_until(LONG, "box running", || {
        member(&up, "box")["state"]["Running"].is_object()
    });
    let uid = up.pod("box").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let data = up.data_dir().join("agent/volumes").join(&uid).join("data");
    // Not ready until the file exists: no endpoint.
    assert_eq!(member(&up, "box")["ready"], false);
    assert!(endpoints(&up, "box").is_empty());
    std::fs::write(data.join("ready"), "").unwrap();
    wait_until(LONG, "box ready and an endpoint", || {
        member(&up, "box")["ready"] == true && endpoints(&up, "box") == ["box"]
    });
    // Unready: out of the endpoints; ready again: back.
    std::fs::remove_file(data.join("ready")).unwrap();
    wait_until(LONG, "box out of the endpoints", || {
        member(&up, "box")["ready"] == false && endpoints(&up, "box").is_empty()
    });
    std::fs::write(data.join("ready"), "").unwrap();
    wait_until(LONG, "box back in the endpoints", || {
        endpoints(&up, "box") == ["box"]
    });
    assert_eq!(member(&up, "box")["restarts"], 0);
    let events = up.ok(&["events"]);
    assert!(events.contains("fails its readiness probe"), "{events}");

    // httpd keeps running but /alive is gone: 404 → restarted as Unhealthy.
    std::fs::remove_file(data.join("www/alive")).unwrap();
    wait_until(LONG, "box restarted by liveness", || {
        let m = member(&up, "box");
        m["restarts"].as_u64().unwrap_or(0) >= 1 && m["last_termination"]["reason"] == "Unhealthy"
    });
    let m = member(&up, "box");
    assert_eq!(
        m["last_termination"]["message"],
        "liveness probe failed 2 times in a row: GET /alive answered HTTP 404",
        "{m}"
    );
    // The new run writes /alive again and comes back ready (the file on the
    // volume outlived the restart).
    wait_until(LONG, "box running, ready and an endpoint again", || {
        let m = member(&up, "box");
        m["state"]["Running"].is_object() && m["ready"] == true && endpoints(&up, "box") == ["box"]
    });

    // (The liveness restart ran the hook and the TERM once already.)
    let trace = out_dir.path().join("trace");
    assert_eq!(
        std::fs::read_to_string(&trace).unwrap(),
        "pre-stop-ran\ngot TERM\n"
    );
    std::fs::remove_file(&trace).unwrap();

    // The scheduler lists the endpoint before the node's proxy has it: wait
    // until the node's proxy reaches the pod, so the delete below finds it
    // in the node's table.
    wait_until(LONG, "the node's proxy reaching box", || {
        alive_via_node_port().is_ok()
    });
    // Deleted: it leaves the endpoints first, then its pre_stop hook runs,
    // then the container gets SIGTERM.
    up.ok(&["delete", "pod", "box"]);
    wait_until(LONG, "the container's TERM", || {
        std::fs::read_to_string(&trace).is_ok_and(|t| t.contains("got TERM"))
    });
    assert_eq!(
        std::fs::read_to_string(&trace).unwrap(),
        "pre-stop-ran\ngot TERM\n"
    );
    // Out of the endpoints before its members stopped: either the node
    // waited for the table to drop it, or the table had dropped it already
    // when the stop reached the node.
    let agent = up.log();
    assert!(
        agent.contains("the pod left the service endpoints; stopping its members")
            || agent.contains("the pod is in no service's endpoints; stopping its members"),
        "{agent}"
    );
}

/// The wasm-native kind: a component exporting `flotilla:health/check`
/// (`wit/health.wit`) is probed by calling it, each check in a fresh
/// instance beside the run with the member's volumes. A member that hangs
/// (stops beating, keeps running) is restarted with the guest's own reason;
/// members that cannot answer are refused at apply, and say why.
#[test]
fn wasm_components_are_probed_through_their_health_export() {
    let up = Up::start();
    let health = flotilla_samples::HEALTH_P2;
    apply(
        &up,
        "beating",
        &format!(
            "kind = \"Pod\"\nname = \"beating\"\n[[volumes]]\nname = \"data\"\nempty_dir = {{}}\n[[members]]\nname = \"app\"\nwasm = \"{health}\"\nmounts = [{{ volume = \"data\", path = \"/data\" }}]\nliveness = {{ health = {{}}, period = 0.3, failure_threshold = 3 }}\nreadiness = {{ health = {{}}, period = 0.3 }}\n"
        ),
    );
    wait_until(LONG, "beating ready", || {
        member(&up, "beating")["ready"] == true
    });
    assert_eq!(member(&up, "beating")["restarts"], 0);
    let uid = up.pod("beating").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let data = up.data_dir().join("agent/volumes").join(&uid).join("data");
    assert_eq!(std::fs::read_to_string(data.join("beat")).unwrap(), "beat");

    // It hangs: still running, no more beats; its check says so.
    std::fs::write(data.join("hang"), "").unwrap();
    wait_until(LONG, "beating restarted by its health export", || {
        let m = member(&up, "beating");
        m["restarts"].as_u64().unwrap_or(0) >= 1 && m["last_termination"]["reason"] == "Unhealthy"
    });
    std::fs::remove_file(data.join("hang")).unwrap();
    let m = member(&up, "beating");
    let why = m["last_termination"]["message"].as_str().unwrap();
    assert!(
        why.starts_with("liveness probe failed 3 times in a row: no heartbeat for "),
        "{m}"
    );
    let events = up.ok(&["events"]);
    assert!(events.contains("no heartbeat for"), "{events}");
    // The new run beats again and is ready.
    wait_until(LONG, "beating ready again", || {
        let m = member(&up, "beating");
        m["state"]["Running"].is_object() && m["ready"] == true
    });

    // Refused at apply: a component without the export, a core module.
    let refused = |name: &str, wasm: &str| {
        let f = up.manifest(
            &format!("{name}.toml"),
            &format!(
                "kind = \"Pod\"\nname = \"{name}\"\n[[members]]\nname = \"app\"\nwasm = \"{wasm}\"\nreadiness = {{ health = {{}} }}\n"
            ),
        );
        let out = up.cli(&["apply", "-f", &f]);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(up.pod(name).is_none(), "{name} exists");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = refused("plain", TCP);
    assert!(
        e.contains("member app: readiness probe: module sha256:")
            && e.contains(
                "does not export flotilla:health/check@0.1.0, which a health probe calls"
            ),
        "{e}"
    );
    let e = refused("core", flotilla_samples::HEALTH_P1);
    assert!(e.contains("is a core module, not a component"), "{e}");
}
