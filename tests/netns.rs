//! A scheduler and three agents, each in its own network namespace joined by
//! a test bridge that this test creates and removes: join, agent kill,
//! partition (link down) and heal. Needs root and iproute2 (as CI has).
//!
//! Nothing touches the root namespace's network: the bridge lives in a
//! namespace of its own, and the CLI runs inside the scheduler's namespace.

mod common;

use common::*;
use flotilla_samples as samples;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 is installed");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces, veths and a bridge; all removed on drop.
struct Net {
    tag: String,
    subnet: u8,
    hosts: Vec<String>,
}

impl Net {
    fn new(hosts: &[&str]) -> Net {
        let tag = format!("{:04x}", std::process::id() & 0xffff);
        let subnet = 100 + (std::process::id() % 100) as u8;
        let net = Net {
            tag: tag.clone(),
            subnet,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        let br = net.bridge();
        let sw = net.switch();
        ip(&["netns", "add", &sw]);
        ip(&[
            "netns", "exec", &sw, "ip", "link", "add", "name", &br, "type", "bridge",
        ]);
        ip(&["netns", "exec", &sw, "ip", "link", "set", &br, "up"]);
        for (i, _) in hosts.iter().enumerate() {
            let ns = net.ns(i);
            let (outer, inner) = (format!("fv{tag}{i}"), format!("fp{tag}{i}"));
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "netns", &sw]);
            ip(&[
                "netns", "exec", &sw, "ip", "link", "set", &outer, "master", &br,
            ]);
            ip(&["netns", "exec", &sw, "ip", "link", "set", &outer, "up"]);
            ip(&[
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", net.addr(i)),
                "dev",
                &inner,
            ]);
            ip(&["netns", "exec", &ns, "ip", "link", "set", &inner, "up"]);
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        }
        net
    }

    fn bridge(&self) -> String {
        format!("flb{}", self.tag)
    }

    /// The namespace holding the bridge (the test network's switch).
    fn switch(&self) -> String {
        format!("flt{}-switch", self.tag)
    }

    fn ns(&self, i: usize) -> String {
        format!("flt{}-{}", self.tag, self.hosts[i])
    }

    fn addr(&self, i: usize) -> String {
        format!("10.77.{}.{}", self.subnet, i + 1)
    }

    /// Takes host `i`'s only link down (a partition) or up again.
    fn link(&self, i: usize, up: bool) {
        let inner = format!("fp{}{i}", self.tag);
        ip(&[
            "netns",
            "exec",
            &self.ns(i),
            "ip",
            "link",
            "set",
            &inner,
            if up { "up" } else { "down" },
        ]);
    }

    /// Runs the flotilla binary inside host `i`'s namespace.
    fn spawn(&self, i: usize, args: &[&str], log: PathBuf) -> Proc {
        let log = std::fs::File::create(log).unwrap();
        Proc(Some(
            Command::new("ip")
                .args(["netns", "exec", &self.ns(i), BIN])
                .args(args)
                .env("FLOTILLA_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        ))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch()])
            .status();
    }
}

struct Proc(Option<Child>);

impl Proc {
    fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[test]
fn scheduler_and_agents_in_separate_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let net = Net::new(&["sched", "a1", "a2", "a3"]);
    let sched_ip = net.addr(0);
    let data = dir.path().join("sched");
    let _sched = net.spawn(
        0,
        &[
            "scheduler",
            "--listen",
            &format!("{sched_ip}:7370"),
            "--quic",
            &format!("{sched_ip}:7371"),
            "--node-timeout",
            "2s",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        dir.path().join("sched.log"),
    );
    wait_until(Duration::from_secs(15), "scheduler up", || {
        data.join("api.addr").exists()
    });
    let config = data.join("config.toml");
    let cli = |args: &[&str]| {
        let o = Command::new("ip")
            .args(["netns", "exec", &net.ns(0), BIN])
            .env("FLOTILLA_CONFIG", &config)
            .env_remove("FLOTILLA_SERVER")
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let token = cli(&["token", "create", "--join"]).trim().to_string();
    let join = format!("{sched_ip}:7371");
    let agent = |i: usize, with_token: bool| {
        let name = net.hosts[i].clone();
        let d = dir.path().join(&name);
        let mut args = vec![
            "host",
            "--join",
            &join,
            "--name",
            &name,
            "--max-instances",
            "64",
            "--data-dir",
            d.to_str().unwrap(),
        ];
        if with_token {
            args.extend(["--token", &token]);
        }
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        net.spawn(
            i,
            &args,
            dir.path()
                .join(format!("{name}-{}.log", if with_token { 1 } else { 2 })),
        )
    };
    let mut agents: Vec<Proc> = (1..4).map(|i| agent(i, true)).collect();
    let nodes = || -> Vec<serde_json::Value> {
        serde_json::from_str(&cli(&["nodes", "-o", "json"])).unwrap()
    };
    let ready = |n: &str| {
        nodes()
            .iter()
            .any(|x| x["metadata"]["name"] == n && x["status"]["ready"] == true)
    };
    wait_until(Duration::from_secs(20), "three agents ready", || {
        ["a1", "a2", "a3"].iter().all(|n| ready(n))
    });
    for n in nodes() {
        assert!(
            n["status"]["address"]
                .as_str()
                .unwrap()
                .starts_with("10.77."),
            "{n}"
        );
    }

    let m = dir.path().join("web.toml");
    std::fs::write(&m, format!("kind = \"Deployment\"\nname = \"web\"\nreplicas = 3\n[template]\n[[template.members]]\nname = \"c\"\nwasm = \"{}\"\n", samples::COUNTER_P2)).unwrap();
    cli(&["apply", "-f", m.to_str().unwrap()]);
    let pods = || -> Vec<serde_json::Value> {
        serde_json::from_str(&cli(&["get", "pods", "-o", "json"])).unwrap()
    };
    let running_on = |n: &str| {
        pods()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["node"] == n)
            .count()
    };
    let running = || {
        pods()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count()
    };
    wait_until(Duration::from_secs(20), "one replica per agent", || {
        ["a1", "a2", "a3"].iter().all(|n| running_on(n) == 1)
    });

    // Agent killed: NotReady, replacement elsewhere; it comes back with its certificate.
    agents[2].kill9();
    wait_until(Duration::from_secs(10), "a3 NotReady", || !ready("a3"));
    wait_until(Duration::from_secs(10), "3 running without a3", || {
        running() == 3 && running_on("a3") == 0
    });
    agents[2] = agent(3, false);
    wait_until(Duration::from_secs(20), "a3 back", || ready("a3"));

    // Partition a2 (its link goes down): NotReady, its replica rescheduled.
    let lost_uids: Vec<String> = pods()
        .iter()
        .filter(|p| p["status"]["node"] == "a2" && p["status"]["phase"] == "Running")
        .map(|p| p["metadata"]["uid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(lost_uids.len(), 1);
    net.link(2, false);
    wait_until(Duration::from_secs(10), "a2 NotReady", || !ready("a2"));
    wait_until(Duration::from_secs(10), "3 running elsewhere", || {
        running() == 3 && running_on("a2") == 0
    });
    // Heal: a2 reconnects, drops the replica that moved away, and N stays exact.
    net.link(2, true);
    wait_until(Duration::from_secs(30), "a2 back", || ready("a2"));
    let state = dir.path().join("a2/pods.json");
    wait_until(
        Duration::from_secs(10),
        "a2 stopped the moved replica",
        || {
            let saved = std::fs::read_to_string(&state).unwrap_or_default();
            !lost_uids.iter().any(|u| saved.contains(u.as_str()))
        },
    );
    assert_eq!(running(), 3, "exactly N replicas after the partition heals");
    let lost = pods()
        .into_iter()
        .filter(|p| p["status"]["phase"] == "Lost")
        .count();
    assert_eq!(lost, 0, "Lost Deployment pods are replaced and removed");
    drop(agents);
}
