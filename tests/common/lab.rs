//! A test network: namespaces per test host joined by a bridge in a
//! namespace of its own (all created by the test and removed on drop), and a
//! cluster on it — the scheduler in host 0's namespace, agents in theirs.
//! Processes enter a host's network namespace only (`nsenter --net`), so
//! the mounts they make (pod namespaces) are visible to the test.

use super::*;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub fn ip(args: &[&str]) {
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
pub struct Net {
    pub tag: String,
    pub subnet: u8,
    pub hosts: Vec<String>,
    /// Directories hidden from every process spawned on this network: each
    /// runs in a private mount namespace with an empty tmpfs over them.
    pub hide: Vec<PathBuf>,
}

impl Net {
    pub fn new(hosts: &[&str]) -> Net {
        // Unique per test process and per network within it (tests run in parallel).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{:03x}{n}", std::process::id() & 0xfff);
        let subnet = 100 + (std::process::id() % 100) as u8;
        let net = Net {
            tag: tag.clone(),
            subnet,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            hide: Vec::new(),
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

    pub fn bridge(&self) -> String {
        format!("flb{}", self.tag)
    }

    /// The namespace holding the bridge (the test network's switch).
    pub fn switch(&self) -> String {
        format!("flt{}-switch", self.tag)
    }

    pub fn ns(&self, i: usize) -> String {
        format!("flt{}-{}", self.tag, self.hosts[i])
    }

    pub fn addr(&self, i: usize) -> String {
        format!("10.77.{}.{}", self.subnet, i + 1)
    }

    /// Takes host `i`'s only link down (a partition) or up again.
    pub fn link(&self, i: usize, up: bool) {
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
    pub fn spawn(&self, i: usize, args: &[&str], log: PathBuf) -> Proc {
        let log = std::fs::File::create(log).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns(i)));
        if self.hide.is_empty() {
            cmd.arg(BIN);
        } else {
            // The mount namespace (and its tmpfs mounts) ends with the process.
            cmd.args([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "for d in $FLT_HIDE; do mount -t tmpfs -o size=64k hidden \"$d\" || exit 97; done; exec \"$0\" \"$@\"",
                BIN,
            ])
            .env(
                "FLT_HIDE",
                self.hide
                    .iter()
                    .map(|p| p.to_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        Proc(Some(
            cmd.args(args)
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

pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn kill9(&mut self) {
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

/// A cluster on a test network: the scheduler runs in host 0's namespace.
pub struct Lab {
    pub net: Net,
    pub dir: tempfile::TempDir,
    pub sched_args: Vec<String>,
    pub sched: Proc,
    pub token: String,
    pub runs: std::cell::Cell<u32>,
}

impl Lab {
    pub fn start(hosts: &[&str], sched_extra: &[&str]) -> Lab {
        Lab::start_hiding(hosts, sched_extra, &[])
    }

    /// Like [`Lab::start`]; the scheduler and agents cannot see `hide`.
    pub fn start_hiding(hosts: &[&str], sched_extra: &[&str], hide: &[PathBuf]) -> Lab {
        // FLOTILLA_TEST_KEEP=1 keeps the logs and data for a look afterwards.
        let dir = tempfile::Builder::new()
            .prefix("flotilla-netns")
            .disable_cleanup(std::env::var_os("FLOTILLA_TEST_KEEP").is_some())
            .tempdir()
            .unwrap();
        if std::env::var_os("FLOTILLA_TEST_KEEP").is_some() {
            eprintln!("test data in {}", dir.path().display());
        }
        let mut net = Net::new(hosts);
        net.hide = hide.to_vec();
        let a = net.addr(0);
        let data = dir.path().join("sched");
        let mut sched_args: Vec<String> = [
            "scheduler",
            "--listen",
            &format!("{a}:7370"),
            "--quic",
            &format!("{a}:7371"),
            "--data-dir",
            data.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sched_args.extend(sched_extra.iter().map(|s| s.to_string()));
        let mut lab = Lab {
            net,
            dir,
            sched_args,
            sched: Proc(None),
            token: String::new(),
            runs: std::cell::Cell::new(0),
        };
        lab.start_scheduler();
        lab.token = lab.cli(&["token", "create", "--join"]).trim().to_string();
        lab
    }

    pub fn start_scheduler(&mut self) {
        let addr = self.dir.path().join("sched/api.addr");
        let _ = std::fs::remove_file(&addr);
        let args: Vec<&str> = self.sched_args.iter().map(String::as_str).collect();
        self.sched = self.net.spawn(0, &args, self.log("sched"));
        wait_until(Duration::from_secs(15), "scheduler up", || addr.exists());
    }

    /// A fresh log file name for a process.
    pub fn log(&self, name: &str) -> PathBuf {
        self.runs.set(self.runs.get() + 1);
        self.dir
            .path()
            .join(format!("{name}-{}.log", self.runs.get()))
    }

    pub fn join_addr(&self) -> String {
        format!("{}:7371", self.net.addr(0))
    }

    pub fn data(&self, host: &str) -> PathBuf {
        self.dir.path().join(host)
    }

    /// The CLI, run in the scheduler's namespace with the admin config.
    pub fn cli_raw(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.net.ns(0)))
            .arg(BIN)
            .env("FLOTILLA_CONFIG", self.dir.path().join("sched/config.toml"))
            .env_remove("FLOTILLA_SERVER")
            .args(args)
            .output()
            .unwrap()
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let o = self.cli_raw(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn host_args(&self, i: usize, token: Option<&str>) -> Vec<String> {
        let name = &self.net.hosts[i];
        let mut args: Vec<String> = [
            "host",
            "--join",
            &self.join_addr(),
            "--name",
            name,
            "--max-instances",
            "64",
            "--data-dir",
            self.data(name).to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(t) = token {
            args.extend(["--token".to_string(), t.to_string()]);
        }
        args
    }

    /// Starts the agent of host `i` (joining with the lab's token on first start).
    pub fn agent(&self, i: usize) -> Proc {
        self.agent_with(i, &[])
    }

    /// Like [`Lab::agent`], with extra `flotilla host` arguments.
    pub fn agent_with(&self, i: usize, extra: &[&str]) -> Proc {
        let mut args = self.host_args(i, Some(&self.token));
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.net.spawn(i, &args, self.log(&self.net.hosts[i]))
    }

    /// Runs an agent that is expected to exit; its status and log.
    pub fn agent_once(&self, i: usize, args: &[String]) -> (std::process::ExitStatus, String) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.log(&format!("{}-once", self.net.hosts[i]));
        let mut p = self.net.spawn(i, &args, log.clone());
        let mut child = p.0.take().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "agent did not give up: {}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, std::fs::read_to_string(log).unwrap())
    }

    pub fn nodes(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.cli(&["nodes", "-o", "json"])).unwrap()
    }

    pub fn ready(&self, n: &str) -> bool {
        self.nodes()
            .iter()
            .any(|x| x["metadata"]["name"] == n && x["status"]["ready"] == true)
    }

    pub fn pods(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.cli(&["get", "pods", "-o", "json"])).unwrap()
    }

    pub fn running_on(&self, n: &str) -> usize {
        self.pods()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["node"] == n)
            .count()
    }

    pub fn running(&self) -> usize {
        self.pods()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count()
    }

    pub fn apply(&self, name: &str, text: &str) {
        let m = self.dir.path().join(name);
        std::fs::write(&m, text).unwrap();
        self.cli(&["apply", "-f", m.to_str().unwrap()]);
    }
}

impl Drop for Lab {
    /// Containers and pod namespaces agents left (they were killed, not
    /// stopped); the namespaces of the test network go with `net`.
    fn drop(&mut self) {
        for h in &self.net.hosts {
            reap_containers(&self.data(h));
        }
    }
}

/// Runs `f` on a thread inside the network namespace at `path`: sockets it
/// opens live there (the test's other threads stay where they are).
pub fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(path).unwrap();
            // SAFETY: setns(2) on this thread only, with an fd we own.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// Sends `request` to `addr` from host `i`'s namespace and returns the
/// whole reply (empty when the connection fails); 3 s timeouts.
pub fn tcp_exchange(net: &Net, i: usize, addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    in_netns(&format!("/run/netns/{}", net.ns(i)), || {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = s.write_all(request.as_bytes());
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}
