//! Whole commands: `flotilla run` of a module already cached on the node
//! against `wasmtime run` of the same module precompiled (process start-up
//! counted on both sides), and an upload of a 20 MB module to a scheduler
//! plus its first start on an agent in another process against a raw HTTPS
//! transfer of the same bytes on loopback.

use std::path::{Path, PathBuf};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn p50(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_command(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .status()
        .unwrap();
    let d = t.elapsed();
    assert!(st.success(), "{cmd:?}: {st}");
    d
}

/// `flotilla run` (cached on the node) vs `wasmtime run` (precompiled).
pub fn run_vs_wasmtime(n: usize) {
    println!("## `flotilla run` vs `wasmtime run` ({n} runs each, whole commands)\n");
    let Some(wasmtime) = which("wasmtime") else {
        println!(
            "Not measured: `wasmtime` (wasmtime-cli 48) is not on PATH; `cargo install wasmtime-cli --version 48.0.8 --locked` provides it.\n"
        );
        return;
    };
    let version = Command::new(&wasmtime)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // `flotilla up` on loopback, HTTPS (the default): the tests' harness.
    let up = crate::common::Up::start();
    let module = flotilla_samples::HELLO_P1;
    let cwasm = up.dir.path().join("hello.cwasm");
    let st = Command::new(&wasmtime)
        .args(["compile", module, "-o"])
        .arg(&cwasm)
        .status()
        .unwrap();
    assert!(st.success());
    // Warm: the module is uploaded and compiled on the node once.
    let flotilla = |_: ()| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        c.args(["run", module]).env("FLOTILLA_CONFIG", up.config());
        c
    };
    let bare = |_: ()| {
        let mut c = Command::new(&wasmtime);
        c.args(["run", "--allow-precompiled"]).arg(&cwasm);
        c
    };
    for _ in 0..5 {
        time_command(&mut flotilla(()));
        time_command(&mut bare(()));
    }
    let (mut ours, mut theirs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        ours.push(time_command(&mut flotilla(())));
        theirs.push(time_command(&mut bare(())));
    }
    let (o, t) = (p50(&mut ours), p50(&mut theirs));
    println!("| command | p50 | max |");
    println!("|---|---|---|");
    println!(
        "| `flotilla run hello.wasm` (all-in-one over HTTPS; upload skipped, compiled artifact cached) | {} | {} |",
        ms(o),
        ms(*ours.last().unwrap())
    );
    println!(
        "| `wasmtime run --allow-precompiled hello.cwasm` ({version}) | {} | {} |",
        ms(t),
        ms(*theirs.last().unwrap())
    );
    println!(
        "\nRatio (p50): **{:.2}** (target ≤ 1.5). Alternated runs in one invocation; process start-up on both sides. `flotilla run` here: HEAD for the module, create the pod, wait for its end (long poll), read the log, delete the pod — one kept-alive TLS connection from a fresh process. Fewer than 1,000 samples: max, not p99.\n",
        o.as_secs_f64() / t.as_secs_f64()
    );
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let home_bin = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(home_bin)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A wasm module of about `size` bytes: one memory, a data segment filling
/// it with a pattern, and an empty `_start` (compiles in no time: the
/// transfer is what is measured).
fn big_module(size: usize) -> Vec<u8> {
    fn leb(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(body.len() as u64, out);
        out.extend_from_slice(body);
    }
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut m);
    section(3, &[1, 0], &mut m);
    let pages = size.div_ceil(65536) as u64 + 1;
    let mut mem = vec![1, 0];
    leb(pages, &mut mem);
    section(5, &mem, &mut m);
    section(7, &[1, 6, b'_', b's', b't', b'a', b'r', b't', 0, 0], &mut m);
    section(10, &[1, 2, 0, 0x0b], &mut m);
    let mut data = vec![1, 0, 0x41, 0, 0x0b];
    leb(size as u64, &mut data);
    data.extend((0..size).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    section(11, &data, &mut m);
    m
}

/// An HTTPS server on loopback that reads request bodies and discards them:
/// the raw transfer the upload is compared with. Returns its port and the
/// CA file for curl.
fn discard_server(dir: &Path) -> u16 {
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("raw-ca.pem"), cert.pem()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc =
                        hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                            let mut body = req.into_body();
                            let mut n = 0usize;
                            while let Some(Ok(f)) = body.frame().await {
                                if let Some(d) = f.data_ref() {
                                    n += d.len();
                                }
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(hyper::body::Bytes::from(n.to_string())),
                            ))
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
    });
    port
}

/// Upload of a `mb` MB module and its first start on an agent in another
/// process, against curl sending the same bytes to an HTTPS server that
/// discards them (process start-up on both sides).
pub fn upload_throughput(mb: usize, trials: usize) {
    println!(
        "## Upload of a {mb} MB module and first start on another process's agent ({trials} trials)\n"
    );
    if which("curl").is_none() {
        println!("Not measured: curl (the reference client) is not installed.\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_flotilla");
    let sched_dir = dir.path().join("sched");
    let quic = format!(
        "127.0.0.1:{}",
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let spawn = |args: &[&str], data: &Path| {
        Command::new(bin)
            .args(args)
            .arg("--data-dir")
            .arg(data)
            .env("FLOTILLA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut sched = spawn(
        &["scheduler", "--listen", "127.0.0.1:0", "--quic", &quic],
        &sched_dir,
    );
    while !sched_dir.join("api.addr").exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = sched_dir.join("config.toml");
    let cli = |args: &[&str]| -> std::process::Output {
        Command::new(bin)
            .args(args)
            .env("FLOTILLA_CONFIG", &config)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let token = String::from_utf8(cli(&["token", "create", "--join"]).stdout).unwrap();
    let mut host = spawn(
        &[
            "host",
            "--join",
            &quic,
            "--name",
            "far",
            "--token",
            token.trim(),
            "--pod-network",
            "loopback",
        ],
        &dir.path().join("far"),
    );
    let end = Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&cli(&["get", "nodes", "-o", "json"]).stdout)
        .contains("\"ready\": true")
    {
        assert!(Instant::now() < end, "the agent did not join");
        std::thread::sleep(Duration::from_millis(50));
    }
    let raw_port = discard_server(dir.path());
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for t in 0..trials {
        // A different module each trial (nothing cached anywhere).
        let mut bytes = big_module(mb * 1_000_000);
        let n = bytes.len();
        bytes[n - 1] = t as u8;
        let file = dir.path().join(format!("big{t}.wasm"));
        std::fs::write(&file, &bytes).unwrap();
        let manifest = dir.path().join(format!("big{t}.toml"));
        std::fs::write(
            &manifest,
            format!("kind = \"Pod\"\nname = \"big{t}\"\n[[members]]\nname = \"m\"\nwasm = \"./big{t}.wasm\"\nrestart = \"Never\"\n"),
        )
        .unwrap();
        let t0 = Instant::now();
        let o = cli(&["apply", "-f", manifest.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let out = cli(&["get", "pods", &format!("big{t}"), "-o", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let started = v["status"]["members"][0]["state"].get("Running").is_some()
                || v["status"]["members"][0]["state"]
                    .get("Terminated")
                    .is_some();
            if started {
                break;
            }
            assert!(Instant::now() < end, "big{t} did not start: {v}");
            std::thread::sleep(Duration::from_millis(5));
        }
        ours.push(t0.elapsed());
        raw.push(time_command(
            Command::new("curl")
                .args(["-sS", "--fail", "-o", "/dev/null", "--cacert"])
                .arg(dir.path().join("raw-ca.pem"))
                .arg("-T")
                .arg(&file)
                .arg(format!("https://127.0.0.1:{raw_port}/upload")),
        ));
        cli(&["delete", "pod", &format!("big{t}")]);
    }
    let _ = host.kill();
    let _ = host.wait();
    let _ = sched.kill();
    let _ = sched.wait();
    let (o, r) = (p50(&mut ours), p50(&mut raw));
    let size = big_module(mb * 1_000_000).len() as f64 / 1e6;
    println!("| path | p50 | throughput | max |");
    println!("|---|---|---|---|");
    println!(
        "| `flotilla apply` (HEAD, PUT streamed and verified into the scheduler's store, apply) → the agent fetches it over QUIC, verifies, caches, compiles, starts | {} | {:.0} MB/s | {} |",
        ms(o),
        size / o.as_secs_f64(),
        ms(*ours.last().unwrap())
    );
    println!(
        "| `curl -T` of the same bytes to an HTTPS server that discards them | {} | {:.0} MB/s | {} |",
        ms(r),
        size / r.as_secs_f64(),
        ms(*raw.last().unwrap())
    );
    println!(
        "\nThroughput ratio (p50): **{:.2}** (target ≥ 0.8). Both sides TLS 1.3 on loopback with process start-up (the CLI; curl). Ours also writes the module to disk twice (scheduler, node), hashes it twice, sends it a second time (over QUIC) and starts it; its end is seen by polling `get` every 5 ms.\n",
        r.as_secs_f64() / o.as_secs_f64()
    );
}
