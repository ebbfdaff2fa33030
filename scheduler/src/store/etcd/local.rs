//! A single-member etcd on loopback, for tests and benchmarks: Debian's
//! `etcd` binary in a directory of the caller's, ended by PID on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a member may take to answer `/health` after it is started
/// (generous: a loaded 2-core machine starts it in about a second).
const READY_WITHIN: Duration = Duration::from_secs(60);

/// TLS files for [`LocalEtcd::start_tls`]: the member's certificate and
/// key, and the CA its clients must present certificates from.
pub struct MemberTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// A running single-member etcd.
pub struct LocalEtcd {
    dir: PathBuf,
    client: u16,
    peer: u16,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    child: Option<Child>,
    /// The member's name and the whole cluster (`name=peer-url,…`).
    name: String,
    cluster: Option<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl LocalEtcd {
    /// Starts a member with its data in `dir/data`, plain HTTP.
    pub fn start(dir: &Path) -> LocalEtcd {
        Self::launch(dir, None)
    }

    /// Starts a member serving TLS that requires client certificates.
    pub fn start_tls(dir: &Path, tls: MemberTls) -> LocalEtcd {
        Self::launch(dir, Some((tls.cert, tls.key, tls.client_ca)))
    }

    fn launch(dir: &Path, tls: Option<(PathBuf, PathBuf, PathBuf)>) -> LocalEtcd {
        let mut e = LocalEtcd {
            dir: dir.to_path_buf(),
            client: free_port(),
            peer: free_port(),
            tls,
            child: None,
            name: "member".into(),
            cluster: None,
        };
        e.resume();
        e
    }

    /// Starts a cluster of `n` members on loopback (data in `dir/mI`);
    /// returns once every one is healthy (the cluster has a leader).
    pub fn start_cluster(dir: &Path, n: usize) -> Vec<LocalEtcd> {
        let mut members: Vec<LocalEtcd> = (0..n)
            .map(|i| {
                let d = dir.join(format!("m{i}"));
                std::fs::create_dir_all(&d).expect("member dir");
                LocalEtcd {
                    dir: d,
                    client: free_port(),
                    peer: free_port(),
                    tls: None,
                    child: None,
                    name: format!("m{i}"),
                    cluster: None,
                }
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.cluster = Some(cluster.clone());
            m.spawn();
        }
        for m in &mut members {
            m.wait_healthy();
        }
        members
    }

    /// `127.0.0.1:PORT` of the client URL.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }

    /// `etcd://127.0.0.1:PORT`, for `--store`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    /// Kills the member (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the member again on the same ports and data, and waits until
    /// it answers.
    pub fn resume(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the member is running");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd log file");
        let mut cmd = Command::new("etcd");
        let cluster = self
            .cluster
            .clone()
            .unwrap_or_else(|| format!("{}={peer}", self.name));
        cmd.arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={cluster}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        if let Some((cert, key, ca)) = &self.tls {
            cmd.arg(format!("--cert-file={}", cert.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--trusted-ca-file={}", ca.display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .spawn()
            .expect("cannot run etcd: install Debian's etcd-server (scripts/setup does)");
        self.child = Some(child);
    }

    fn wait_healthy(&mut self) {
        let began = Instant::now();
        let addr: SocketAddr = format!("127.0.0.1:{}", self.client)
            .parse()
            .expect("address");
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                panic!("etcd exited ({status}) before it was ready; its log ends:\n{tail}");
            }
            if self.tls.is_some() {
                // The client port speaks TLS only; a TCP accept is enough:
                // the member listens once it is ready to serve.
                if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                    return;
                }
            } else if health(addr) {
                return;
            }
            assert!(
                began.elapsed() < READY_WITHIN,
                "etcd did not answer /health within {READY_WITHIN:?} (log: {})",
                self.dir.join("etcd.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether `GET /health` at `addr` says the member is healthy.
fn health(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}
