//! Member health probes (issue 16 item 1), run by the agent while a member
//! runs: `startup` first (until it passes once), then `liveness` (failing
//! `failure_threshold` times in a row restarts the member, reason
//! `Unhealthy`) and `readiness` (its verdict is the member's `ready`, which
//! keeps the pod out of service endpoints while false).
//!
//! `http` and `tcp` probes connect to `127.0.0.1:PORT` **inside the pod's
//! network namespace** (so a member listening on loopback only is probed
//! too). A `tcp` probe runs entirely on the agent's [`Prober`] thread,
//! which holds every tcp probe's schedule and wakes the member's
//! supervisor only when the verdict changes; an `http` probe's connection
//! is made there and its request sent from the agent's runtime. `exec`
//! runs a command in the container ([`crate::executor::Prepared::exec`]);
//! `health` calls a wasm component's `flotilla:health/check` in a fresh
//! instance beside the run ([`crate::executor::Prepared::health`]). A
//! member without probes costs nothing: no task, no thread, no timer.

pub mod prober;

use crate::executor::BoxFuture;
use flotilla_api::probe::{Action, Kind, Probe};
pub use prober::Prober;
use prober::{Dialed, Verdict};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where a pod's probes run.
pub struct Target {
    /// The pod's network namespace (`None`: the node's network).
    pub netns: Option<Arc<File>>,
    pub prober: Arc<Prober>,
}

/// Runs `exec` and `health` probes (the member's runtime); [`check`]
/// bounds their time.
pub trait Exec: Send + Sync {
    fn exec<'a>(&'a self, cmd: &'a [String]) -> BoxFuture<'a, Result<(), String>>;
    /// One call of the component's health export.
    fn health(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Largest part of an HTTP answer read (its status line is all that counts).
const HTTP_READ: usize = 1024;

/// Connects to 127.0.0.1:`port` in the pod: the connected socket, still
/// outside the agent's reactor (a tcp check only closes it).
async fn connect(target: &Target, port: u16) -> Result<OwnedFd, String> {
    let failed = |e: io::Error| format!("connecting to port {port}: {e}");
    match target
        .prober
        .dial(target.netns.as_ref(), port)
        .await
        .map_err(failed)?
    {
        Dialed::Connected(fd) => Ok(fd),
        Dialed::Connecting(fd) => {
            let s = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))
                .map_err(|e| format!("cannot watch a socket: {e}"))?;
            s.writable().await.map_err(failed)?;
            if let Some(e) = s.take_error().map_err(failed)? {
                return Err(failed(e));
            }
            Ok(s.into_std().map_err(failed)?.into())
        }
    }
}

/// One check of `action`, within `timeout`: `Ok` passes, `Err` says why not.
pub async fn check(
    action: &Action<'_>,
    target: &Target,
    exec: &dyn Exec,
    timeout: Duration,
) -> Result<(), String> {
    let run = async {
        match action {
            Action::Tcp { port } => connect(target, *port).await.map(drop),
            Action::Http { port, path } => {
                let fd = connect(target, *port).await?;
                let mut s = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))
                    .map_err(|e| format!("cannot watch a socket: {e}"))?;
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: flotilla-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes())
                    .await
                    .map_err(|e| format!("sending the request: {e}"))?;
                let mut buf = vec![0u8; HTTP_READ];
                let mut got = 0;
                while got < buf.len() && !buf[..got].contains(&b'\n') {
                    let n = s
                        .read(&mut buf[got..])
                        .await
                        .map_err(|e| format!("reading the answer: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                let line = String::from_utf8_lossy(&buf[..got]);
                let code = line
                    .strip_prefix("HTTP/1.")
                    .and_then(|r| r.get(2..5))
                    .and_then(|c| c.parse::<u16>().ok())
                    .ok_or_else(|| "the answer is not HTTP".to_string())?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("GET {path} answered HTTP {code}"))
                }
            }
            Action::Exec(cmd) => exec.exec(cmd).await,
            Action::Health => exec.health().await,
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// A probe's streak of results against its thresholds.
pub struct Streak {
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
    last_error: String,
}

impl Streak {
    pub fn new(probe: &Probe) -> Streak {
        Streak {
            success_threshold: probe.success_threshold,
            failure_threshold: probe.failure_threshold,
            successes: 0,
            failures: 0,
            last_error: String::new(),
        }
    }

    /// Counts a result: `Some(true)` passed (success threshold reached),
    /// `Some(false)` failed (failure threshold reached), `None` undecided.
    pub fn count(&mut self, r: Result<(), String>) -> Option<bool> {
        match r {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                (self.successes >= self.success_threshold).then_some(true)
            }
            Err(e) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                self.last_error = e;
                (self.failures >= self.failure_threshold).then_some(false)
            }
        }
    }

    pub fn why(&self, kind: Kind) -> String {
        format!(
            "{kind} probe failed {} times in a row: {}",
            self.failures, self.last_error
        )
    }
}

fn interval(start_after: Duration, period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + start_after, period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

type Verdicts = tokio::sync::mpsc::UnboundedSender<Verdict>;

/// Runs one probe for as long as it is polled, sending its verdict to
/// `tell` whenever it changes. A `tcp` probe is handed to the prober
/// thread (and taken back when this is dropped); the others check from
/// here, one check at a time.
async fn probing(kind: Kind, p: &Probe, target: &Target, exec: &dyn Exec, tell: Verdicts) {
    let Ok(action) = p.action() else {
        return std::future::pending().await;
    };
    if let Action::Tcp { port } = action {
        let schedule = prober::Schedule {
            netns: target.netns.clone(),
            port,
            kind,
            initial_delay: p.initial_delay.duration(),
            period: p.period.duration(),
            timeout: p.timeout.duration(),
            streak: Streak::new(p),
            verdicts: tell.clone(),
        };
        match target.prober.run(schedule) {
            Ok(_running) => return std::future::pending().await,
            // No thread for it: the probe checks from here instead.
            Err(e) => {
                tracing::warn!("the prober is not running ({e}); probing from the member's task")
            }
        }
    }
    probing_here(kind, p, &action, target, exec, Streak::new(p), &tell).await
}

async fn probing_here(
    kind: Kind,
    p: &Probe,
    action: &Action<'_>,
    target: &Target,
    exec: &dyn Exec,
    mut streak: Streak,
    tell: &Verdicts,
) {
    let mut tick = interval(p.initial_delay.duration(), p.period.duration());
    let mut told = None;
    loop {
        tick.tick().await;
        let r = check(action, target, exec, p.timeout.duration()).await;
        if let Some(passed) = streak.count(r)
            && told != Some(passed)
        {
            told = Some(passed);
            let why = if passed {
                String::new()
            } else {
                streak.why(kind)
            };
            if tell.send(Verdict { kind, passed, why }).is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// Runs `probe` (if any) until dropped.
async fn maybe(
    kind: Kind,
    probe: Option<&Probe>,
    target: &Target,
    exec: &dyn Exec,
    tell: &Verdicts,
) {
    match probe {
        Some(p) => probing(kind, p, target, exec, tell.clone()).await,
        None => std::future::pending().await,
    }
}

/// Probes one run of a member until it is unhealthy (startup or liveness
/// failed): resolves to why. `ready` is told each readiness verdict that
/// changes it. Never resolves for a member without startup and liveness
/// probes once its readiness is settled by the caller dropping it.
pub async fn watch(
    startup: Option<&Probe>,
    liveness: Option<&Probe>,
    readiness: Option<&Probe>,
    target: &Target,
    exec: &dyn Exec,
    ready: &mut (dyn FnMut(bool) + Send),
) -> String {
    let (tell, mut told) = tokio::sync::mpsc::unbounded_channel();
    if startup.is_some_and(|p| p.action().is_ok()) {
        let run = maybe(Kind::Startup, startup, target, exec, &tell);
        tokio::pin!(run);
        loop {
            tokio::select! {
                () = &mut run => {}
                v = told.recv() => match v {
                    Some(v) if v.passed => break,
                    Some(v) => return v.why,
                    None => std::future::pending::<()>().await,
                },
            }
        }
    }
    // Both run side by side (neither check cancels the other); their
    // verdicts arrive here.
    let both = async {
        tokio::join!(
            maybe(Kind::Liveness, liveness, target, exec, &tell),
            maybe(Kind::Readiness, readiness, target, exec, &tell)
        )
    };
    tokio::pin!(both);
    let mut is_ready = false;
    loop {
        tokio::select! {
            _ = &mut both => {}
            v = told.recv() => {
                let Some(v) = v else {
                    return std::future::pending().await;
                };
                match v.kind {
                    Kind::Liveness if !v.passed => return v.why,
                    Kind::Readiness if v.passed != is_ready => {
                        is_ready = v.passed;
                        ready(v.passed);
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::Mutex;

    struct NoExec;
    impl Exec for NoExec {
        fn exec<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Err("no exec here".into()) })
        }
        fn health(&self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async { Err("no health export here".into()) })
        }
    }

    /// Exec answers from a script of results.
    struct Scripted(Mutex<Vec<bool>>);
    impl Exec for Scripted {
        fn exec<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<(), String>> {
            let ok = self.0.lock().unwrap().pop().unwrap_or(false);
            Box::pin(async move { if ok { Ok(()) } else { Err("exit 1".into()) } })
        }
        fn health(&self) -> BoxFuture<'_, Result<(), String>> {
            self.exec(&[])
        }
    }

    fn probe(text: &str) -> Probe {
        #[derive(serde::Deserialize)]
        struct Doc {
            p: Probe,
        }
        toml::from_str::<Doc>(&format!("p = {text}")).unwrap().p
    }

    fn here() -> Target {
        Target {
            netns: None,
            prober: Arc::new(Prober::default()),
        }
    }

    /// A loopback server answering each connection with `answer`.
    async fn server(answer: &'static [u8]) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_passes_on_2xx_3xx_and_fails_with_the_code_otherwise() {
        let ok = server(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let moved = server(b"HTTP/1.0 302 Found\r\n\r\n").await;
        let bad = server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let junk = server(b"SSH-2.0-x\r\n").await;
        let t = here();
        let check_http = |port| {
            let t = &t;
            async move {
                check(
                    &Action::Http {
                        port,
                        path: "/healthz",
                    },
                    t,
                    &NoExec,
                    Duration::from_secs(10),
                )
                .await
            }
        };
        assert_eq!(check_http(ok).await, Ok(()));
        assert_eq!(check_http(moved).await, Ok(()));
        assert_eq!(
            check_http(bad).await,
            Err("GET /healthz answered HTTP 503".into())
        );
        assert_eq!(check_http(junk).await, Err("the answer is not HTTP".into()));
        // Nothing listening: refused, with the port.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = check(
            &Action::Tcp { port: closed },
            &t,
            &NoExec,
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(
            e.starts_with(&format!("connecting to port {closed}")),
            "{e}"
        );
        assert_eq!(
            check(
                &Action::Tcp { port: ok },
                &t,
                &NoExec,
                Duration::from_secs(10)
            )
            .await,
            Ok(())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // Accepted by the kernel's backlog, never read or answered.
        let e = check(
            &Action::Http { port, path: "/" },
            &here(),
            &NoExec,
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert_eq!(e, "no answer within 300ms");
        drop(l);
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_after_its_threshold_and_startup_holds_it_back() {
        // Exec results are popped from the end: startup fails twice then
        // passes; liveness then passes once and fails three times.
        let script = Scripted(Mutex::new(vec![
            false, false, false, true, true, false, false,
        ]));
        let startup = probe("{ exec = [\"x\"], period = 1, failure_threshold = 5 }");
        let liveness = probe("{ exec = [\"x\"], period = 1, failure_threshold = 3 }");
        let mut verdicts = Vec::new();
        let began = tokio::time::Instant::now();
        let why = watch(
            Some(&startup),
            Some(&liveness),
            None,
            &here(),
            &script,
            &mut |v| verdicts.push(v),
        )
        .await;
        assert_eq!(why, "liveness probe failed 3 times in a row: exit 1");
        assert!(verdicts.is_empty());
        // Startup: checks at 0, 1, 2 s; liveness: 2, 3, 4, 5 s.
        assert_eq!(began.elapsed(), Duration::from_secs(5));
        // A startup that never passes fails on its own.
        let never = Scripted(Mutex::new(Vec::new()));
        let why = watch(
            Some(&startup),
            Some(&liveness),
            None,
            &here(),
            &never,
            &mut |_| {},
        )
        .await;
        assert_eq!(why, "startup probe failed 5 times in a row: exit 1");
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_reports_only_changes_and_never_ends_the_run() {
        // pass, pass (ready), fail (still ready: threshold 2), fail (not
        // ready), pass (success threshold 2 not yet), pass (ready).
        let script = Scripted(Mutex::new(vec![true, true, false, false, true, true]));
        let readiness =
            probe("{ exec = [\"x\"], period = 1, failure_threshold = 2, success_threshold = 2 }");
        let mut verdicts = Vec::new();
        let watched = tokio::time::timeout(
            Duration::from_secs(20),
            watch(None, None, Some(&readiness), &here(), &script, &mut |v| {
                verdicts.push(v)
            }),
        )
        .await;
        assert!(watched.is_err(), "readiness alone never ends the run");
        // After the script, every check fails (pop of an empty script):
        // ready false once more.
        assert_eq!(verdicts, [true, false, true, false]);
    }

    /// Polls `f` until true (generous deadline: a loaded machine).
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(std::time::Instant::now() < end, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn tcp_probes_run_on_the_prober_and_tell_only_changes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = here();
        let readiness = probe(&format!(
            "{{ tcp = {{ port = {port} }}, period = \"100ms\", failure_threshold = 2 }}"
        ));
        let verdicts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = verdicts.clone();
        let watching = tokio::spawn({
            let t = Target {
                netns: None,
                prober: t.prober.clone(),
            };
            async move {
                watch(None, None, Some(&readiness), &t, &NoExec, &mut |v| {
                    seen.lock().unwrap().push(v)
                })
                .await
            }
        });
        until("ready", || *verdicts.lock().unwrap() == [true]).await;
        assert_eq!(t.prober.held(), 1, "the prober holds the probe");
        // Each check connected and closed (an end of file, not a reset:
        // WASI programs trap on accepting a reset connection).
        let accepted = l.accept().unwrap().0;
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &accepted, &mut b).unwrap(), 0);
        // Nothing listens any more: not ready after two refusals, told once.
        drop(l);
        until("not ready", || *verdicts.lock().unwrap() == [true, false]).await;
        // The member's run ends: the prober lets the probe go.
        watching.abort();
        let _ = watching.await;
        until("the probe is forgotten", || t.prober.held() == 0).await;
    }

    #[tokio::test]
    async fn a_tcp_liveness_probe_ends_the_run_with_the_refusal() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let liveness = probe(&format!(
            "{{ tcp = {{ port = {closed} }}, period = \"100ms\", failure_threshold = 3 }}"
        ));
        let why = watch(None, Some(&liveness), None, &here(), &NoExec, &mut |_| {}).await;
        assert!(
            why.starts_with(&format!(
                "liveness probe failed 3 times in a row: connecting to port {closed}: "
            )) && why.contains("refused"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn a_connection_the_backlog_never_takes_times_out_on_the_prober() {
        // A listener with the smallest backlog, never accepting: once its
        // queue is full the kernel drops further SYNs, so a connection
        // stays in progress.
        // SAFETY: plain socket calls on a descriptor owned right away.
        let fd = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            OwnedFd::from_raw_fd(fd)
        };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: bind/listen on our socket with a sockaddr_in of its size.
        unsafe {
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len), 0);
            assert_eq!(libc::listen(fd.as_raw_fd(), 0), 0);
        }
        let l = std::net::TcpListener::from(fd);
        let port = l.local_addr().unwrap().port();
        let fill: Vec<_> = (0..3)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(
                    &l.local_addr().unwrap(),
                    Duration::from_millis(300),
                )
                .ok()
            })
            .collect();
        assert!(!fill.is_empty(), "the queue took none");
        let liveness = probe(&format!(
            "{{ tcp = {{ port = {port} }}, period = \"100ms\", timeout = \"300ms\", failure_threshold = 1 }}"
        ));
        let why = watch(None, Some(&liveness), None, &here(), &NoExec, &mut |_| {}).await;
        assert_eq!(
            why,
            "liveness probe failed 1 times in a row: no answer within 300ms"
        );
        drop(fill);
    }
}
