//! A real registry for tests: Debian's `docker-registry` (distribution 2.8)
//! on 127.0.0.1 with a config of our own — anonymous, htpasswd, or token
//! auth with a small token endpoint served here — plus builders for test
//! images made from busybox-static.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const USER: &str = "fleet";
pub const PASSWORD: &str = "s3cret-pass";

pub enum Auth {
    Anonymous,
    Htpasswd,
    Token,
}

pub struct Registry {
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub dir: tempfile::TempDir,
    child: Child,
    token: Option<TokenServer>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn registry_binary() -> &'static str {
    for p in ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!(
        "docker-registry is not installed; run `bash scripts/setup` (apt package docker-registry)"
    )
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        Registry::start_in(auth, None)
    }

    /// Like [`Registry::start`], inside the network namespace at `netns`
    /// (its loopback, reachable only from that namespace).
    pub fn start_in(auth: Auth, netns: Option<&str>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut token = None;
        let auth_yaml = match auth {
            Auth::Anonymous => String::new(),
            Auth::Htpasswd => {
                let hash = bcrypt::hash(PASSWORD, 5).unwrap();
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, format!("{USER}:{hash}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: flotilla-test\n    path: {}\n",
                    file.display()
                )
            }
            Auth::Token => {
                let t = TokenServer::start(dir.path());
                let yaml = format!(
                    "auth:\n  token:\n    realm: http://{}/token\n    service: flotilla-test\n    issuer: flotilla-test-issuer\n    rootcertbundle: {}\n",
                    t.addr,
                    t.cert_file.display()
                );
                token = Some(t);
                yaml
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  secret: flotilla-test-secret\n{auth_yaml}",
            dir.path().join("data").display()
        );
        let cfg_file = dir.path().join("config.yml");
        std::fs::write(&cfg_file, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={ns}")).arg(registry_binary());
                c
            }
            None => Command::new(registry_binary()),
        };
        let child = cmd
            .arg("serve")
            .arg(&cfg_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut reg = Registry {
            addr,
            dir,
            child,
            token,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = reg.child.try_wait().unwrap() {
                panic!("docker-registry exited with {status}:\n{}", reg.log());
            }
            let answers = || {
                let Ok(mut s) = TcpStream::connect(&reg.addr) else {
                    return false;
                };
                let _ = write!(s, "GET /v2/ HTTP/1.0\r\n\r\n");
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("HTTP/")
            };
            let up = match netns {
                Some(ns) => super::lab::in_netns(ns, answers),
                None => answers(),
            };
            if up {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "registry did not start:\n{}",
                reg.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        reg
    }

    /// The registry config a node or scheduler needs to pull from this
    /// registry: loopback registries are refused unless listed (issue 14
    /// item 12).
    pub fn config(&self) -> flotilla_host::image::RegistryConfig {
        flotilla_host::image::RegistryConfig::listing([self.addr.as_str()])
    }

    /// [`Registry::config`] as a file, for `--registry-config`.
    pub fn config_file(&self) -> String {
        let p = self.dir.path().join("registries.toml");
        std::fs::write(&p, format!("[registry.\"{}\"]\n", self.addr)).unwrap();
        p.to_string_lossy().into_owned()
    }

    /// Pushes a busybox image as `repo:tag`; returns its reference.
    pub fn push_busybox(&self, name: &str) -> String {
        let reference = format!("{}/{name}", self.addr);
        let dir = tempfile::tempdir().unwrap();
        let s = flotilla_host::image::ImageStore::open(dir.path(), self.config()).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(s.push_layers(
                &reference,
                (
                    OCI_CONFIG,
                    image_config(&[], &["/bin/sh"], &["PATH=/bin"], "/"),
                ),
                vec![(OCI_LAYER_GZIP.to_string(), busybox_layer())],
            ))
            .unwrap();
        reference
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry keeps a blob's bytes (to tamper with them).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// How many tokens the token endpoint issued and refused.
    pub fn token_counts(&self) -> (usize, usize) {
        let t = self.token.as_ref().expect("not a token-auth registry");
        (
            t.issued.load(std::sync::atomic::Ordering::SeqCst),
            t.refused.load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token endpoint of a token-auth registry: checks HTTP basic
/// credentials and answers with an ES256 JWT granting what was asked.
struct TokenServer {
    addr: String,
    cert_file: PathBuf,
    stop: Arc<AtomicBool>,
    issued: Arc<std::sync::atomic::AtomicUsize>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    fn start(dir: &Path) -> TokenServer {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec());
        let kp = rcgen::KeyPair::try_from(&der).unwrap();
        let params = rcgen::CertificateParams::new(vec!["flotilla-test-issuer".into()]).unwrap();
        let cert = params.self_signed(&kp).unwrap();
        let cert_file = dir.join("token-ca.pem");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        let x5c = b64(cert.der(), false);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, i, r) = (stop.clone(), issued.clone(), refused.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let ok = serve_token(conn, &key, &rng, &x5c);
                        if ok { &i } else { &r }.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TokenServer {
            addr,
            cert_file,
            stop,
            issued,
            refused,
            thread: Some(thread),
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one token request; true when a token was issued.
fn serve_token(
    conn: TcpStream,
    key: &ring::signature::EcdsaKeyPair,
    rng: &ring::rand::SystemRandom,
    x5c: &str,
) -> bool {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request = String::new();
    reader.read_line(&mut request).unwrap();
    let mut authorized = false;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((name, value)) = h.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            let want = format!(
                "Basic {}",
                b64(format!("{USER}:{PASSWORD}").as_bytes(), false)
            );
            authorized = value.trim() == want;
        }
    }
    let mut conn = conn;
    if !authorized {
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        let _ = write!(
            conn,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return false;
    }
    // scope=repository:NAME:ACTIONS (possibly several), service=...
    let query = request
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.split_once('?'))
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    let mut access = Vec::new();
    for pair in query.split('&') {
        if let Some(scope) = pair.strip_prefix("scope=") {
            let scope = url_decode(scope);
            let parts: Vec<&str> = scope.split(':').collect();
            if parts.len() == 3 {
                let actions: Vec<&str> = parts[2].split(',').collect();
                access.push(
                    serde_json::json!({"type": parts[0], "name": parts[1], "actions": actions}),
                );
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": "flotilla-test-issuer",
        "sub": USER,
        "aud": "flotilla-test",
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", access.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes(), true),
        b64(claims.to_string().as_bytes(), true)
    );
    let sig = key.sign(rng, signing_input.as_bytes()).unwrap();
    let jwt = format!("{signing_input}.{}", b64(sig.as_ref(), true));
    let body =
        serde_json::json!({"token": jwt, "access_token": jwt, "expires_in": 300}).to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    true
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// Base64 (standard alphabet with padding, or URL-safe without).
pub fn b64(data: &[u8], url: bool) -> String {
    let alphabet: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if !url {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// The static busybox this machine has.
pub fn busybox() -> PathBuf {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("busybox is not installed; run `bash scripts/setup` (apt package busybox-static)")
}

pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// A tar layer builder.
pub struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Layer {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Layer {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        self.tar.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Layer {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    /// A raw entry whose name is written as given (for hostile layers).
    pub fn raw_file(mut self, name: &str, data: &[u8]) -> Layer {
        let mut h = tar::Header::new_old();
        {
            let bytes = h.as_mut_bytes();
            bytes[..name.len()].copy_from_slice(name.as_bytes());
        }
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
        self
    }

    /// The layer as gzip-compressed tar bytes.
    pub fn gzip(self) -> Vec<u8> {
        let tar = self.tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }
}

/// A root filesystem with static busybox and the applets tests use.
pub fn busybox_layer() -> Vec<u8> {
    let bb = std::fs::read(busybox()).unwrap();
    let mut l = Layer::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("tmp", 0o1777)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("dev", 0o755)
        .dir("home", 0o755)
        .file("bin/busybox", 0o755, &bb)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n");
    for applet in [
        "sh", "echo", "cat", "sleep", "grep", "head", "dd", "ls", "env", "id", "true", "false",
        "yes", "pwd", "tail", "wc", "printf", "kill", "trap", "tr",
    ] {
        l = l.symlink(&format!("bin/{applet}"), "busybox");
    }
    l.gzip()
}

/// An OCI image config running `cmd` with `env`.
pub fn image_config(entrypoint: &[&str], cmd: &[&str], env: &[&str], workdir: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "Env": env,
            "WorkingDir": workdir,
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .unwrap()
}

/// Reads a whole file.
pub fn read(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

/// A registry holding a busybox image; returns it and the image reference.
pub fn registry_with_busybox() -> (Registry, String) {
    let reg = Registry::start(Auth::Anonymous);
    let reference = reg.push_busybox("test/busybox:1");
    (reg, reference)
}
