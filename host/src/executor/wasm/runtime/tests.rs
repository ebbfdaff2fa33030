use super::*;
use crate::logs::{LogPaths, read_log};
use flotilla_samples as samples;

/// A run of a spinner with no arguments, logging under `dir`, held to
/// `cpu_millis` (0: no limit).
fn spinner_spec<'a>(env: &'a Labels, dir: &Path, cpu_millis: u64) -> RunSpec<'a> {
    RunSpec {
        preopens: &[],
        blocking_io: false,
        argv0: "s",
        args: &[],
        env,
        memory_limit: None,
        cpu_time: None,
        cpu_millis,
        log: LogSink::new(LogPaths::new(dir, "s"), 1 << 20),
        network: false,
        usage: None,
        outgoing: Default::default(),
        workload: Box::leak(Box::default()),
    }
}

fn runtime(dir: &Path) -> Arc<WasmRuntime> {
    let mut cfg = WasmConfig::new(dir.join("cache"));
    cfg.max_instances = 16;
    Arc::new(WasmRuntime::new(cfg).unwrap())
}

struct Run {
    exit: Exit,
    log: String,
}

async fn run(
    rt: &Arc<WasmRuntime>,
    dir: &Path,
    path: &str,
    env: &[(&str, &str)],
    memory: Option<u64>,
    cpu: Option<Duration>,
) -> Run {
    let prepared = rt.prepare(Path::new(path), "").await.unwrap();
    let paths = LogPaths::new(dir, "m");
    let _ = std::fs::remove_file(&paths.current);
    let env: Labels = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let spec = RunSpec {
        preopens: &[],
        blocking_io: false,
        argv0: "m",
        args: &["a1".to_string()],
        env: &env,
        memory_limit: memory,
        cpu_time: cpu,
        cpu_millis: 0,
        log: LogSink::new(paths.clone(), 1 << 20),
        network: false,
        usage: None,
        outgoing: Default::default(),
        workload: &Default::default(),
    };
    let exit = match rt.start(&prepared, spec).await {
        Ok(s) => s.run().await,
        Err(e) => e,
    };
    let log = String::from_utf8(read_log(&paths, false, None).unwrap()).unwrap();
    Run { exit, log }
}

#[tokio::test]
async fn hello_runs_as_module_and_component_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    for path in [samples::HELLO_P1, samples::HELLO_P2] {
        let r = run(&rt, dir.path(), path, &[("GREETING", "Howdy")], None, None).await;
        assert!(r.exit.success(), "{path}: {:?}", r.exit);
        assert_eq!(
            r.log, "Howdy from Flotilla!\nargs: a1\nhello: done\n",
            "{path}"
        );
    }
}

#[tokio::test]
async fn exit_codes_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    // wasi:cli/exit in WASI 0.2 carries only ok/err, so a component's code is 1.
    for (path, code) in [(samples::CRASHER_P1, 7), (samples::CRASHER_P2, 1)] {
        let r = run(&rt, dir.path(), path, &[("EXIT_CODE", "7")], None, None).await;
        assert_eq!(r.exit.code, code, "{path}");
        assert_eq!(r.exit.reason, TerminationReason::Error);
        assert!(r.log.contains("about to exit with 7"));
    }
}

#[tokio::test]
async fn memory_hog_is_oom_killed_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    for path in [samples::MEMHOG_P1, samples::MEMHOG_P2] {
        let r = run(&rt, dir.path(), path, &[], Some(16 << 20), None).await;
        assert_eq!(
            r.exit.reason,
            TerminationReason::OOMKilled,
            "{path}: {:?}",
            r.exit
        );
        let held: Vec<u32> = r
            .log
            .lines()
            .filter_map(|l| {
                l.strip_prefix("memhog: holding ")?
                    .strip_suffix(" MiB")?
                    .parse()
                    .ok()
            })
            .collect();
        let max = *held.iter().max().unwrap();
        assert!(
            (8..16).contains(&max),
            "{path} held {max} MiB under a 16 MiB limit"
        );
    }
}

#[tokio::test]
async fn spinner_is_stopped_when_its_cpu_time_is_used_up() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    for path in [samples::SPINNER_P1, samples::SPINNER_P2] {
        let r = run(
            &rt,
            dir.path(),
            path,
            &[],
            None,
            Some(Duration::from_millis(200)),
        )
        .await;
        assert_eq!(
            r.exit.reason,
            TerminationReason::Timeout,
            "{path}: {:?}",
            r.exit
        );
        assert_eq!(r.exit.code, 137);
    }
}

#[tokio::test]
async fn a_spinning_guest_stops_when_its_future_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let prepared = rt
        .prepare(Path::new(samples::SPINNER_P2), "")
        .await
        .unwrap();
    let env = Labels::new();
    let started = rt
        .start(&prepared, spinner_spec(&env, dir.path(), 0))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = started.run() => "exited",
            _ = rx => "stopped",
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send(()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert_eq!(outcome.unwrap().unwrap(), "stopped");
}

#[tokio::test]
async fn compiled_artifacts_are_cached_on_disk_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    // Many pods of one module at once share one compilation.
    let all = futures_join(&rt, 8).await;
    assert!(all.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    rt.prepare(Path::new(samples::HELLO_P2), "").await.unwrap();
    assert_eq!(rt.prepared_count(), 1);
    let bytes = std::fs::read(samples::HELLO_P2).unwrap();
    let hex = digest_of(&bytes).trim_start_matches("sha256:").to_string();
    let cached = dir
        .path()
        .join("cache")
        .join(format!("{hex}.component.cwasm"));
    assert!(cached.exists());
    drop(rt);
    // A fresh runtime (agent restart) loads the artifact instead of compiling.
    let mtime = std::fs::metadata(&cached).unwrap().modified().unwrap();
    let rt = runtime(dir.path());
    let r = run(&rt, dir.path(), samples::HELLO_P2, &[], None, None).await;
    assert!(r.exit.success());
    assert_eq!(
        std::fs::metadata(&cached).unwrap().modified().unwrap(),
        mtime
    );

    // A damaged artifact is discarded and rebuilt, not trusted. (Artifacts are
    // mapped while in use, so they are only ever replaced by rename.)
    drop(rt);
    let tmp = cached.with_extension("tmp");
    std::fs::write(&tmp, b"garbage").unwrap();
    std::fs::rename(&tmp, &cached).unwrap();
    let rt = runtime(dir.path());
    let r = run(&rt, dir.path(), samples::HELLO_P2, &[], None, None).await;
    assert!(r.exit.success());
    assert!(std::fs::metadata(&cached).unwrap().len() > 1000);
}

#[tokio::test]
async fn hostile_or_mismatched_modules_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x01\0\0\0\x01\xff\xff\xff\xff\x0f").unwrap();
    let err = rt.prepare(&bad, "").await.err().unwrap();
    assert!(matches!(err, PrepareError::Compile(_)), "{err}");

    let err = rt
        .prepare(Path::new(samples::HELLO_P1), "sha256:0000")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("re-apply"), "{err}");

    // A module without _start (a library, not a command) cannot be a member.
    let lib = dir.path().join("lib.wasm");
    std::fs::write(&lib, b"\0asm\x01\0\0\0").unwrap();
    let err = rt.prepare(&lib, "").await.err().unwrap();
    assert!(err.to_string().contains("_start"), "{err}");
}

async fn futures_join(rt: &Arc<WasmRuntime>, n: usize) -> Vec<Arc<Prepared>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.prepare(Path::new(samples::HELLO_P2), "").await.unwrap() })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn compiled_code_no_pod_holds_leaves_memory_and_comes_back_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let held = rt.prepare(Path::new(samples::HELLO_P1), "").await.unwrap();
    let other = rt.prepare(Path::new(samples::HELLO_P2), "").await.unwrap();
    drop(other);
    // Only the module nobody holds is dropped.
    assert_eq!(rt.release_unused(), 1);
    assert_eq!(rt.prepared_count(), 1);
    drop(held);
    assert_eq!(rt.release_unused(), 1);
    assert_eq!(rt.prepared_count(), 0);
    // Needed again: loaded from the on-disk artifact, not recompiled.
    let bytes = std::fs::read(samples::HELLO_P2).unwrap();
    let hex = digest_of(&bytes).trim_start_matches("sha256:").to_string();
    let cached = dir
        .path()
        .join("cache")
        .join(format!("{hex}.component.cwasm"));
    let mtime = std::fs::metadata(&cached).unwrap().modified().unwrap();
    let r = run(&rt, dir.path(), samples::HELLO_P2, &[], None, None).await;
    assert!(r.exit.success());
    assert_eq!(
        std::fs::metadata(&cached).unwrap().modified().unwrap(),
        mtime
    );
}

#[tokio::test]
async fn verified_blobs_compile_once_into_an_artifact_that_later_runs_load_alone() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(samples::HELLO_P2).unwrap();
    let digest = digest_of(&bytes);
    let rt = runtime(dir.path());
    rt.prepare_verified(Path::new(samples::HELLO_P2), &digest)
        .await
        .unwrap();
    let artifact = dir.path().join(format!(
        "cache/{}.component.cwasm",
        digest.trim_start_matches("sha256:")
    ));
    assert!(artifact.is_file(), "compiled into the cache");
    drop(rt);

    // A restarted agent needs only the artifact: the module file may be gone.
    let rt = runtime(dir.path());
    let gone = dir.path().join("gone.wasm");
    let p = rt.prepare_verified(&gone, &digest).await.unwrap();
    assert!(matches!(&*p, Prepared::Component { .. }));
    drop((p, rt));

    // A damaged artifact is dropped and the module compiled again.
    std::fs::write(&artifact, b"not an artifact").unwrap();
    let rt = runtime(dir.path());
    rt.prepare_verified(Path::new(samples::HELLO_P2), &digest)
        .await
        .unwrap();
    assert!(std::fs::metadata(&artifact).unwrap().len() > 1000);
    let copy = dir.path().join("hello.wasm");
    std::fs::write(&copy, &bytes).unwrap();
    let out = run(&rt, dir.path(), copy.to_str().unwrap(), &[], None, None).await;
    assert_eq!(out.exit.code, 0, "{}", out.log);
}

/// A WASI command with `memories` linear memories of `pages` 64 KiB pages
/// each, whose `_start` returns at once.
fn many_memories(memories: u8, pages: u8) -> Vec<u8> {
    fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        out.push(body.len() as u8);
        out.extend_from_slice(body);
    }
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut m);
    section(3, &[1, 0], &mut m);
    let mut mem = vec![memories];
    for _ in 0..memories {
        mem.extend_from_slice(&[0, pages]);
    }
    section(5, &mem, &mut m);
    // _start, and memory 0 as "memory" (WASI expects one).
    section(
        7,
        &[
            2, 6, b'_', b's', b't', b'a', b'r', b't', 0, 0, 6, b'm', b'e', b'm', b'o', b'r', b'y',
            2, 0,
        ],
        &mut m,
    );
    section(10, &[1, 2, 0, 0x0b], &mut m);
    m
}

#[tokio::test]
async fn the_memory_limit_counts_all_of_a_members_memories_together() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    // Two memories of 6 MiB: each under an 8 MiB limit, together over it.
    let two = dir.path().join("two.wasm");
    std::fs::write(&two, many_memories(2, 96)).unwrap();
    let r = run(
        &rt,
        dir.path(),
        two.to_str().unwrap(),
        &[],
        Some(8 << 20),
        None,
    )
    .await;
    assert_eq!(r.exit.reason, TerminationReason::OOMKilled, "{:?}", r.exit);
    // One of them fits.
    let one = dir.path().join("one.wasm");
    std::fs::write(&one, many_memories(1, 96)).unwrap();
    let r = run(
        &rt,
        dir.path(),
        one.to_str().unwrap(),
        &[],
        Some(8 << 20),
        None,
    )
    .await;
    assert_eq!(r.exit.reason, TerminationReason::Completed, "{:?}", r.exit);
    // More memories than a member may have: refused before it runs,
    // however small they are.
    let many = dir.path().join("many.wasm");
    std::fs::write(&many, many_memories(MEMBER_MEMORIES as u8 + 1, 0)).unwrap();
    let err = rt
        .prepare(&many, "")
        .await
        .err()
        .expect("17 memories prepared");
    assert!(
        err.to_string()
            .contains("defined memories count of 17 exceeds the per-instance limit of 16"),
        "{err}"
    );
}

/// A quota's bookkeeping on virtual time: a guest that uses a whole tick
/// of CPU each time it runs is held to its share (100 millicores: a tenth
/// of the time); one that uses a tenth of what it may is never held back.
#[test]
fn a_cpu_quota_holds_a_spinning_guest_to_its_share() {
    let tick = Duration::from_millis(10);
    let base = Instant::now();
    // Spinning: each tick of real time it runs is a tick of CPU.
    let mut q = CpuQuota::new(100, base);
    let mut now = base;
    let mut ran = Duration::ZERO;
    let end = base + Duration::from_secs(20);
    while now < end {
        now += tick;
        ran += tick;
        q.spend(tick.as_nanos() as u64);
        if let Some(wait) = q.settle(now) {
            now += wait;
        }
    }
    let share = ran.as_secs_f64() / now.duration_since(base).as_secs_f64();
    assert!((0.09..=0.11).contains(&share), "ran {ran:?}: {share}");
    // Light: a millisecond of CPU per 100 ms.
    let mut q = CpuQuota::new(100, base);
    let mut now = base;
    for _ in 0..1000 {
        now += Duration::from_millis(100);
        q.spend(1_000_000);
        assert_eq!(q.settle(now), None);
    }
}

/// The meter counts only the thread's own CPU time while the guest runs:
/// a stretch spent asleep costs nothing, one spent computing costs about
/// what it took, and a stretch that moved threads is not counted.
#[test]
fn the_cpu_meter_counts_the_threads_cpu_time_only() {
    let mut q = CpuQuota::new(1000, Instant::now());
    let start = q.tokens;
    mark_start(&q.mark);
    std::thread::sleep(Duration::from_millis(50));
    q.stop();
    assert!(
        start - q.tokens < 5_000_000,
        "sleeping cost {} ns",
        start - q.tokens
    );
    let before = q.tokens;
    mark_start(&q.mark);
    // Until this thread has used 5 ms of CPU, however long that takes.
    let c0 = crate::metrics::thread_cpu_ns();
    let mut x = 1u64;
    while crate::metrics::thread_cpu_ns() - c0 < 5_000_000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    std::hint::black_box(x);
    q.stop();
    assert!(
        before - q.tokens >= 5_000_000,
        "computing cost {} ns",
        before - q.tokens
    );
    // Started on another thread: not counted here.
    let mark = q.mark.clone();
    std::thread::spawn(move || mark_start(&mark))
        .join()
        .unwrap();
    let before = q.tokens;
    q.stop();
    assert_eq!(q.tokens, before);
}

/// A spinning guest with `cpu = 10` (a hundredth of a core) uses about its
/// burst and share of this thread's CPU over a second, not the second.
#[tokio::test]
async fn a_spinning_guest_is_held_to_its_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let prepared = rt
        .prepare(Path::new(samples::SPINNER_P1), "")
        .await
        .unwrap();
    let env = Labels::new();
    let started = rt
        .start(&prepared, spinner_spec(&env, dir.path(), 10))
        .await
        .unwrap();
    let c0 = crate::metrics::thread_cpu_ns();
    let t0 = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(1), started.run()).await;
    let used = Duration::from_nanos(crate::metrics::thread_cpu_ns() - c0);
    eprintln!(
        "spinner at 10 millicores used {used:?} of CPU in {:?}",
        t0.elapsed()
    );
    // A tick of CPU (10 ms) then about 10 ms a second: well under 100 ms.
    assert!(used < Duration::from_millis(100), "{used:?}");
}

/// Issue 16 item 1, the wasm-native probe: each check is a fresh instance
/// of the component with the member's volumes and environment, whose
/// `flotilla:health/check.check` decides; `main` never runs in it.
#[tokio::test]
async fn a_health_check_calls_the_components_export_in_a_fresh_instance() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mounts = [crate::volume::ResolvedMount {
        host: data.clone(),
        guest: "/data".into(),
        read_only: false,
    }];
    let health = rt.prepare(Path::new(samples::HEALTH_P2), "").await.unwrap();
    health.health_export().unwrap();
    let check = |env: Labels| {
        let (rt, health, mounts, dir) = (
            rt.clone(),
            health.clone(),
            mounts.clone(),
            dir.path().to_path_buf(),
        );
        async move {
            let spec = RunSpec {
                preopens: &mounts,
                blocking_io: false,
                argv0: "health",
                args: &[],
                env: &env,
                memory_limit: None,
                cpu_time: None,
                cpu_millis: 0,
                log: LogSink::new(LogPaths::new(&dir, "health"), 1 << 20),
                network: false,
                usage: None,
                outgoing: Default::default(),
                workload: &Default::default(),
            };
            rt.check_health(&health, spec).await
        }
    };
    // No heartbeat yet: the guest's own reason. (Had `main` run in the
    // check's instance, it would have written one first.)
    let e = check(Labels::new()).await.unwrap_err();
    assert!(e.starts_with("no heartbeat at /data/beat"), "{e}");
    assert!(!data.join("beat").exists());
    std::fs::write(data.join("beat"), "beat").unwrap();
    check(Labels::new()).await.unwrap();
    // The member's environment reaches the check.
    let env: Labels = [(
        "HEALTH_SAYS".to_string(),
        "the database is gone".to_string(),
    )]
    .into();
    assert_eq!(check(env).await.unwrap_err(), "the database is gone");
    // A stale beat fails with the guest's reason.
    let old = std::time::SystemTime::now() - Duration::from_secs(30);
    std::fs::File::options()
        .write(true)
        .open(data.join("beat"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let e = check(Labels::new()).await.unwrap_err();
    assert!(e.starts_with("no heartbeat for 3"), "{e}");

    // Members without the export say why.
    let plain = rt.prepare(Path::new(samples::TCP_P2), "").await.unwrap();
    let e = plain.health_export().unwrap_err();
    assert!(
        e.contains("does not export flotilla:health/check@0.1.0"),
        "{e}"
    );
    let module = rt.prepare(Path::new(samples::HEALTH_P1), "").await.unwrap();
    let e = module.health_export().unwrap_err();
    assert!(e.starts_with("a core module cannot export"), "{e}");
}

/// A client connects and resets the connection before the guest accepts
/// it: wasi-libc's `accept` would abort on the missing peer (a trap), so
/// one reset from anyone could end a wasm server. The runtime drops such a
/// connection; the server goes on serving the next client.
#[tokio::test]
async fn a_connection_reset_before_accept_does_not_end_a_wasm_server() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let prepared = rt.prepare(Path::new(samples::TCP_P2), "").await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Labels::new();
    let args = ["serve".to_string(), port.to_string()];
    let paths = LogPaths::new(dir.path(), "srv");
    let spec = RunSpec {
        preopens: &[],
        blocking_io: false,
        argv0: "tcp",
        args: &args,
        env: &env,
        memory_limit: None,
        cpu_time: None,
        cpu_millis: 0,
        log: LogSink::new(paths.clone(), 1 << 20),
        network: true,
        usage: None,
        outgoing: Default::default(),
        workload: &Default::default(),
    };
    let started = rt.start(&prepared, spec).await.unwrap();
    let serving = tokio::spawn(started.run());
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // Until it listens.
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let talk = move |line: &str| -> std::io::Result<String> {
        let mut c = std::net::TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        writeln!(c, "{line}")?;
        let mut got = String::new();
        std::io::BufReader::new(&c).read_line(&mut got)?;
        Ok(got)
    };
    let first = tokio::task::spawn_blocking(move || {
        loop {
            match talk("one") {
                Ok(got) => return got,
                Err(e) => {
                    assert!(std::time::Instant::now() < end, "never served: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(first, "wasm got: one\n");
    // Connected and reset at once, a few times: the guest is busy with none
    // of them yet when they go.
    for _ in 0..5 {
        use std::os::fd::AsRawFd;
        let c = std::net::TcpStream::connect(addr).unwrap();
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt(2) with a linger of its size on our socket.
        let r = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const l).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        drop(c);
    }
    let after = tokio::task::spawn_blocking(move || talk("two"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after, "wasm got: two\n");
    assert!(!serving.is_finished(), "the server ended");
    serving.abort();
}
