//! Several real processes on loopback: `flotilla scheduler` and `flotilla host`
//! agents that join it with a token.

mod common;

use common::*;
use flotilla_samples as samples;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Cluster {
    dir: tempfile::TempDir,
    _sched: Spawned,
    quic: String,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let quic = format!("127.0.0.1:{}", free_udp_port());
        let data = dir.path().join("sched");
        let log = std::fs::File::create(dir.path().join("sched.log")).unwrap();
        let child = Command::new(BIN)
            .args([
                "scheduler",
                "--listen",
                "127.0.0.1:0",
                "--quic",
                &quic,
                "--node-timeout",
                "2s",
            ])
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(10), "scheduler up", || {
            data.join("api.addr").exists()
        });
        Cluster {
            dir,
            _sched: Spawned(Some(child)),
            quic,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("sched/config.toml")
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .env("FLOTILLA_CONFIG", self.config())
            .env_remove("FLOTILLA_SERVER")
            .env_remove("FLOTILLA_TOKEN")
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn host(&self, name: &str, token: &str) -> Spawned {
        let data = self.dir.path().join(name);
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new(BIN)
            .args([
                "host",
                "--join",
                &self.quic,
                "--name",
                name,
                "--token",
                token,
                "--max-instances",
                "64",
            ])
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Spawned(Some(child))
    }

    fn nodes(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["nodes", "-o", "json"])).unwrap()
    }

    fn ready(&self, name: &str) -> Option<bool> {
        self.nodes()
            .iter()
            .find(|n| n["metadata"]["name"] == name)
            .map(|n| n["status"]["ready"] == true)
    }

    fn pods(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["get", "pods", "-o", "json"])).unwrap()
    }

    fn running_on(&self, node: &str) -> usize {
        self.pods()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["node"] == node)
            .count()
    }

    fn manifest(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

#[test]
fn hosts_join_with_tokens_and_workloads_move_between_them() {
    let c = Cluster::start();
    let token = c
        .ok(&["token", "create", "--join", "--ttl", "10m"])
        .trim()
        .to_string();
    assert!(token.starts_with("FLT1."), "{token}");

    // A wrong token is refused on both sides and registers nothing.
    let mut bad = c.host("intruder", &format!("{}x", token));
    wait_until(Duration::from_secs(10), "the intruder to give up", || {
        bad.0.as_mut().unwrap().try_wait().unwrap().is_some()
    });
    assert!(
        c.log("intruder")
            .contains("the scheduler refused to admit this node: join refused: unknown join token"),
        "{}",
        c.log("intruder")
    );
    assert!(!exists(&c.dir.path().join("intruder/pki/node.pem")));

    let mut h1 = c.host("h1", &token);
    let mut h2 = c.host("h2", &token);
    wait_until(Duration::from_secs(15), "both nodes ready", || {
        c.ready("h1") == Some(true) && c.ready("h2") == Some(true)
    });
    assert_eq!(c.nodes().len(), 2, "the intruder never registered");
    let table = c.ok(&["nodes"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("h1") && l.contains("Ready")),
        "{table}"
    );

    let d = c.manifest(
        "web.toml",
        &format!("kind = \"Deployment\"\nname = \"web\"\nreplicas = 4\n[template]\n[[template.members]]\nname = \"c\"\nwasm = \"{}\"\n", samples::COUNTER_P2),
    );
    c.ok(&["apply", "-f", &d]);
    wait_until(Duration::from_secs(20), "spread over both nodes", || {
        c.running_on("h1") == 2 && c.running_on("h2") == 2
    });

    // Cordon keeps running pods but places new ones elsewhere; drain moves them.
    assert_eq!(c.ok(&["cordon", "h1"]), "node/h1 cordoned\n");
    assert!(
        c.ok(&["nodes"])
            .lines()
            .any(|l| l.starts_with("h1") && l.contains("SchedulingDisabled"))
    );
    let o = c.cli(&["drain", "h1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_until(Duration::from_secs(20), "drained to h2", || {
        c.running_on("h1") == 0 && c.running_on("h2") == 4
    });
    c.ok(&["uncordon", "h1"]);

    // A bare pod blocks a drain unless forced.
    let bare = c.manifest("bare.toml", &format!("kind = \"Pod\"\nname = \"bare\"\nnode_selector = {{ \"flotilla.dev/hostname\" = \"h2\" }}\n[[members]]\nwasm = \"{}\"\n", samples::COUNTER_P1));
    c.ok(&["apply", "-f", &bare]);
    wait_until(Duration::from_secs(20), "bare running on h2", || {
        c.running_on("h2") == 5
    });
    let o = c.cli(&["drain", "h2"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("runs pods no Deployment would re-create: default/bare")
    );

    // kill -9 of h2: NotReady, its Deployment pods re-run on h1, the bare pod is Lost.
    h2.kill9();
    wait_until(Duration::from_secs(15), "h2 NotReady", || {
        c.ready("h2") == Some(false)
    });
    wait_until(Duration::from_secs(20), "replacements on h1", || {
        c.running_on("h1") == 4
    });
    let bare = c
        .pods()
        .into_iter()
        .find(|p| p["metadata"]["name"] == "bare")
        .unwrap();
    assert_eq!(bare["status"]["phase"], "Lost");
    let events = c.ok(&["events"]);
    assert!(events.contains("NodeLost"), "{events}");

    // h2 restarts with its saved certificate (no token) and runs nothing it lost.
    let mut h2b = Spawned(Some(
        Command::new(BIN)
            .args([
                "host",
                "--join",
                &c.quic,
                "--name",
                "h2",
                "--max-instances",
                "64",
            ])
            .arg("--data-dir")
            .arg(c.dir.path().join("h2"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(c.dir.path().join("h2b.log")).unwrap())
            .spawn()
            .unwrap(),
    ));
    wait_until(Duration::from_secs(15), "h2 back", || {
        c.ready("h2") == Some(true)
    });
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(c.running_on("h2"), 0, "fenced pods stay stopped");
    assert_eq!(c.running_on("h1"), 4, "exactly N replicas");
    h1.kill9();
    h2b.kill9();
}
