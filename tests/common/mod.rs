//! Test harness: runs the real `flotilla` binary against a temporary data dir
//! on loopback ports chosen by the OS, and cleans up after itself.
#![allow(dead_code)]

pub mod lab;
pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

pub struct Up {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub url: String,
    extra: Vec<String>,
}

impl Up {
    /// Starts `flotilla up` in a fresh data dir and waits for its API.
    pub fn start() -> Up {
        Up::start_with(&[])
    }

    /// Like `start`, with extra `up` arguments.
    pub fn start_with(extra: &[&str]) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let mut up = Up {
            dir,
            child: None,
            url: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        up.spawn();
        up
    }

    /// Replaces the extra `up` arguments for the next [`Up::spawn`].
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// The admin client config `up` wrote.
    pub fn config(&self) -> PathBuf {
        self.data_dir().join("config.toml")
    }

    /// A command running the CLI against this cluster.
    pub fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("FLOTILLA_CONFIG", self.config())
            .env_remove("FLOTILLA_SERVER")
            .env_remove("FLOTILLA_TOKEN");
        c
    }

    /// The admin token of an `--insecure-http` cluster.
    pub fn admin_token(&self) -> String {
        let text = std::fs::read_to_string(self.config()).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        v["contexts"][0]["token"].as_str().unwrap().to_string()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// (Re)starts the process on the same data dir.
    pub fn spawn(&mut self) {
        let addr_file = self.data_dir().join("api.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["up", "--api", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
            // A small instance pool unless the test asks for another.
            .args(
                (!self.extra.iter().any(|a| a == "--max-instances"))
                    .then_some(["--max-instances", "256"])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.extra)
            // Tests here run in the machine's own namespace: pods get
            // loopback-only namespaces, never a bridge or addresses.
            .args(
                (!self.extra.iter().any(|a| a == "--pod-network"))
                    .then_some(["--pod-network", "loopback"])
                    .into_iter()
                    .flatten(),
            )
            .arg("--data-dir")
            .arg(self.data_dir())
            // FLOTILLA_TEST_LOG: another filter for a run being diagnosed.
            .env(
                "FLOTILLA_LOG",
                std::env::var("FLOTILLA_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(url) = std::fs::read_to_string(&addr_file)
                && !url.is_empty()
            {
                self.url = url;
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("flotilla up exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "flotilla up did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The local node registers right after the API comes up.
        wait_until(
            Duration::from_secs(10),
            "the local node to be Ready",
            || {
                let out = self.cli(&["get", "nodes", "-o", "json"]);
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout).contains("\"ready\": true")
            },
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// Graceful stop (SIGTERM), waiting for the process to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs the CLI and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "flotilla {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Writes a manifest into the test dir and returns its path.
    pub fn manifest(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    pub fn pods(&self) -> Vec<serde_json::Value> {
        let out = self.ok(&["get", "pods", "-o", "json"]);
        serde_json::from_str(&out).unwrap()
    }

    pub fn pod(&self, name: &str) -> Option<serde_json::Value> {
        self.pods()
            .into_iter()
            .find(|p| p["metadata"]["name"] == name)
    }

    pub fn phase(&self, name: &str) -> String {
        self.pod(name)
            .map(|p| p["status"]["phase"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    pub fn wait_phase(&self, name: &str, phase: &str) {
        wait_until(
            Duration::from_secs(20),
            &format!("pod {name} to be {phase}"),
            || self.phase(name) == phase,
        );
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.stop();
        reap_containers(&self.data_dir().join("agent"));
    }
}

/// Ends containers an agent left behind (after a kill -9 in a failed test):
/// their processes by PID, their runc state, their overlay mounts.
pub fn reap_containers(agent_dir: &Path) {
    let root = agent_dir.join("containers");
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return;
    };
    for d in dirs.flatten() {
        let id = d.file_name().to_string_lossy().into_owned();
        if id.starts_with('.') {
            continue;
        }
        if let Ok(b) = std::fs::read(d.path().join("state.json"))
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
        {
            for key in ["pid", "shim_pid"] {
                if let Some(pid) = v[key].as_i64() {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
        }
        let _ = Command::new("runc")
            .arg("--root")
            .arg(root.join(".runc"))
            .args(["delete", "--force", &id])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(d.path().join("bundle/rootfs"))
            .stderr(Stdio::null())
            .status();
    }
    // Pod network namespaces (bind mounts) the agent left.
    if let Ok(entries) = std::fs::read_dir(agent_dir.join("netns")) {
        for e in entries.flatten() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(e.path())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// How much longer than its nominal limit a poll may wait: the suite runs on
/// loaded 2-core machines with every test binary's tests in parallel, so a
/// limit is a bound on a hang, not a timing assertion (timings belong in
/// `scripts/bench`). `FLOTILLA_TEST_SLACK` overrides the factor.
pub fn slack() -> u32 {
    std::env::var("FLOTILLA_TEST_SLACK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&f| f >= 1)
        .unwrap_or(4)
}

/// Polls `f` until it holds, failing the test with `what` after `limit`
/// (times [`slack`]).
pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit * slack();
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A one-member pod manifest for a sample module.
pub fn pod(name: &str, wasm: &str, extra: &str) -> String {
    format!(
        "kind = \"Pod\"\nname = \"{name}\"\n\n[[members]]\nname = \"main\"\nwasm = \"{wasm}\"\n{extra}\n"
    )
}

/// A Deployment manifest for a sample module.
pub fn deployment(name: &str, replicas: u32, wasm: &str, extra: &str) -> String {
    format!(
        "kind = \"Deployment\"\nname = \"{name}\"\nreplicas = {replicas}\n[template]\nlabels = {{ app = \"{name}\" }}\n[[template.members]]\nname = \"main\"\nwasm = \"{wasm}\"\n{extra}\n"
    )
}

pub fn names_with_prefix(pods: &[serde_json::Value], prefix: &str) -> Vec<String> {
    pods.iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// A QUIC client config that trusts `ca_pem` and presents `cert` (PEM cert, PEM key), if any.
pub fn quic_client(ca_pem: &str, cert: Option<(&str, &str)>) -> quinn::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut tls = match cert {
        Some((c, k)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(c.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![flotilla_api::proto::ALPN.to_vec()];
    quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

/// Async form of [`wait_until`] for tests on a tokio runtime (15 s limit).
pub async fn wait_for(what: &str, f: impl FnMut() -> bool) {
    wait_for_up_to(Duration::from_secs(15), what, f).await
}

/// [`wait_for`] with another limit (times [`slack`]).
pub async fn wait_for_up_to(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit * slack();
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Puts a sample module into an in-process scheduler's content store (as an
/// upload would) and returns the member's `module` source as JSON.
pub fn uploaded(cluster: &flotilla_scheduler::cluster::Cluster, path: &str) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let digest = flotilla_api::manifest::digest_of(&bytes);
    cluster
        .blobs
        .put(&digest, &bytes, flotilla_api::manifest::MAX_MODULE_BYTES)
        .unwrap();
    serde_json::json!({"digest": digest, "size": bytes.len()})
}

/// A preview 1 module whose `_start` executes `unreachable`: a trap.
pub const TRAP_MODULE: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: () -> ()
    0x03, 0x02, 0x01, 0x00, // one function of that type
    0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, // export _start
    0x0a, 0x05, 0x01, 0x03, 0x00, 0x00, 0x0b, // body: unreachable, end
];

/// Removes what a bridged `up` leaves in the root network namespace (the
/// bridge `flt0` and the nftables table `inet flotilla`), unless they were
/// there before the test. The host has one `flt0`: the bridged tests of a
/// test binary take turns (test binaries run one after another).
pub struct HostNetwork {
    had_bridge: bool,
    had_table: bool,
    _turn: std::sync::MutexGuard<'static, ()>,
}

static BRIDGE_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl HostNetwork {
    pub fn taken() -> HostNetwork {
        // A test that failed holding it poisons it; the next one still runs.
        let turn = BRIDGE_TURN.lock().unwrap_or_else(|e| e.into_inner());
        HostNetwork {
            had_bridge: std::path::Path::new("/sys/class/net/flt0").exists(),
            had_table: has_table(),
            _turn: turn,
        }
    }
}

fn has_table() -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", "flotilla"])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Drop for HostNetwork {
    fn drop(&mut self) {
        if !self.had_bridge {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", "flt0"])
                .status();
        }
        if !self.had_table && has_table() {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", "flotilla"])
                .status();
        }
    }
}

/// One `GET path` (HTTP/1.0) to `127.0.0.1:port` — a node port, through
/// the node's proxy — read to the end within `timeout`: the status line
/// and the body; `Err` says why not and keeps what arrived.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(String, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    if let Err(e) = s.read_to_end(&mut got) {
        return Err(format!("{e} (got {:?})", String::from_utf8_lossy(&got)));
    }
    let got = String::from_utf8_lossy(&got);
    match got.split_once("\r\n\r\n") {
        Some((head, body)) => Ok((
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        )),
        None => Err(format!("bad answer: {got:?}")),
    }
}

/// A child process, killed by PID when dropped (SIGTERM, then reaped).
pub struct Spawned(pub Option<Child>);

impl Spawned {
    /// SIGKILL, by PID, and reaped.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }
}

/// A UDP port free on loopback now.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
