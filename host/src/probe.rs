//! Member health probes (issue 16 item 1), run by the agent while a member
//! runs: `startup` first (until it passes once), then `liveness` (failing
//! `failure_threshold` times in a row restarts the member, reason
//! `Unhealthy`) and `readiness` (its verdict is the member's `ready`, which
//! keeps the pod out of service endpoints while false).
//!
//! `http` and `tcp` probes connect to `127.0.0.1:PORT` **inside the pod's
//! network namespace** (so a member listening on loopback only is probed
//! too): the [`Dialer`] thread enters the namespace to make the socket and
//! start connecting — on loopback the connection is made or refused right
//! there, so a tcp check usually never reaches the agent's reactor. `exec` runs a command in the
//! container ([`crate::executor::Prepared::exec`]); `health` calls a wasm
//! component's `flotilla:health/check` in a fresh instance beside the run
//! ([`crate::executor::Prepared::health`]). A member without
//! probes costs nothing: no task, no thread, no timer.

use crate::executor::BoxFuture;
use flotilla_api::probe::{Action, Kind, Probe};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Reply = tokio::sync::oneshot::Sender<io::Result<Dialed>>;
/// A request to the dialer thread: a connection to 127.0.0.1:PORT in this
/// namespace, please.
type Request = (Arc<File>, u16, Reply);

/// Opens probes' TCP connections inside pods' network namespaces: one
/// thread of the agent's, started at the first probe that needs it, which
/// enters a pod's namespace to make the socket and start connecting to
/// 127.0.0.1 there. On loopback a connection is made (or refused) at once,
/// so most checks end on this thread, without the agent's reactor. Requests
/// queued for the same namespace share one entry; the thread returns to
/// the agent's namespace whenever the queue is empty.
#[derive(Default)]
pub struct Dialer {
    tx: OnceLock<Mutex<std::sync::mpsc::Sender<Request>>>,
}

/// How a connection attempt stands.
pub enum Dialed {
    /// Connected already.
    Connected(OwnedFd),
    /// Still connecting (the peer's backlog was full, say): wait for it to
    /// become writable.
    Connecting(OwnedFd),
}

/// Starts a non-blocking TCP connection to 127.0.0.1:`port` in the calling
/// thread's network namespace.
fn dial(port: u16) -> io::Result<Dialed> {
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect(2) on our socket with a sockaddr_in of the right size.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(Dialed::Connected(fd));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINPROGRESS) {
        return Err(e);
    }
    // On loopback the handshake is usually over already.
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own, not waiting.
    if unsafe { libc::poll(&mut p, 1, 0) } != 1 {
        return Ok(Dialed::Connecting(fd));
    }
    match socket_error(&fd)? {
        None => Ok(Dialed::Connected(fd)),
        Some(e) => Err(e),
    }
}

/// The pending error of a socket (`SO_ERROR`), if any.
fn socket_error(fd: &OwnedFd) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) into a c_int of the stated size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

impl Dialer {
    fn sender(&self) -> io::Result<std::sync::mpsc::Sender<Request>> {
        if let Some(tx) = self.tx.get() {
            return Ok(tx.lock().expect("poisoned").clone());
        }
        let home = File::open("/proc/thread-self/ns/net")?;
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("probe-dialer".into())
            .spawn(move || dialer_thread(&home, &rx))?;
        let _ = self.tx.set(Mutex::new(tx));
        Ok(self
            .tx
            .get()
            .expect("set")
            .lock()
            .expect("poisoned")
            .clone())
    }

    /// Starts a connection to 127.0.0.1:`port` in the namespace `ns`
    /// (`None`: the agent's own).
    pub async fn dial(&self, ns: Option<&Arc<File>>, port: u16) -> io::Result<Dialed> {
        let Some(ns) = ns else {
            return dial(port);
        };
        let (reply, made) = tokio::sync::oneshot::channel();
        self.sender()?
            .send((ns.clone(), port, reply))
            .map_err(|_| io::Error::other("the probe dialer has stopped"))?;
        made.await
            .map_err(|_| io::Error::other("the probe dialer has stopped"))?
    }
}

/// The dialer thread: serves requests, entering each one's namespace
/// (staying while the next is for the same one), and goes home when idle.
fn dialer_thread(home: &File, rx: &std::sync::mpsc::Receiver<Request>) {
    use std::sync::mpsc::TryRecvError;
    let mut inside: Option<Arc<File>> = None;
    loop {
        let (ns, port, reply) = match rx.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => {
                if inside.take().is_some()
                    && let Err(e) = crate::net::sys::enter(home)
                {
                    // Never serve another request from a pod's namespace.
                    tracing::error!("probe dialer cannot return to the agent's namespace: {e}");
                    return;
                }
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
            Err(TryRecvError::Disconnected) => return,
        };
        if !inside.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, &ns)) {
            // A failed setns leaves the thread where it was.
            if let Err(e) = crate::net::sys::enter(&ns) {
                let _ = reply.send(Err(e));
                continue;
            }
            inside = Some(ns);
        }
        let _ = reply.send(dial(port));
    }
}

/// Where a pod's probes run.
pub struct Target {
    /// The pod's network namespace (`None`: the node's network).
    pub netns: Option<Arc<File>>,
    pub dialer: Arc<Dialer>,
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
        .dialer
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

/// A probe's streak of results.
struct Streak<'a> {
    probe: &'a Probe,
    action: Action<'a>,
    successes: u32,
    failures: u32,
    last_error: String,
}

impl<'a> Streak<'a> {
    fn new(probe: &'a Probe) -> Option<Streak<'a>> {
        Some(Streak {
            action: probe.action().ok()?,
            probe,
            successes: 0,
            failures: 0,
            last_error: String::new(),
        })
    }

    /// Counts a result: `Some(true)` passed (success threshold reached),
    /// `Some(false)` failed (failure threshold reached), `None` undecided.
    fn count(&mut self, r: Result<(), String>) -> Option<bool> {
        match r {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                (self.successes >= self.probe.success_threshold).then_some(true)
            }
            Err(e) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                self.last_error = e;
                (self.failures >= self.probe.failure_threshold).then_some(false)
            }
        }
    }

    fn why(&self, kind: Kind) -> String {
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
    if let Some(p) = startup
        && let Some(mut s) = Streak::new(p)
    {
        let mut tick = interval(p.initial_delay.duration(), p.period.duration());
        loop {
            tick.tick().await;
            match s.count(check(&s.action, target, exec, p.timeout.duration()).await) {
                Some(true) => break,
                Some(false) => return s.why(Kind::Startup),
                None => {}
            }
        }
    }
    let mut live = liveness.and_then(Streak::new);
    let mut read = readiness.and_then(Streak::new);
    let mut live_tick = liveness.map(|p| interval(p.initial_delay.duration(), p.period.duration()));
    let mut read_tick =
        readiness.map(|p| interval(p.initial_delay.duration(), p.period.duration()));
    let mut is_ready = false;
    loop {
        tokio::select! {
            _ = async { live_tick.as_mut().expect("guarded").tick().await }, if live_tick.is_some() && live.is_some() => {
                let s = live.as_mut().expect("guarded");
                let r = check(&s.action, target, exec, s.probe.timeout.duration()).await;
                if s.count(r) == Some(false) {
                    return s.why(Kind::Liveness);
                }
            }
            _ = async { read_tick.as_mut().expect("guarded").tick().await }, if read_tick.is_some() && read.is_some() => {
                let s = read.as_mut().expect("guarded");
                let r = check(&s.action, target, exec, s.probe.timeout.duration()).await;
                match s.count(r) {
                    Some(v) if v != is_ready => {
                        is_ready = v;
                        ready(v);
                    }
                    _ => {}
                }
            }
            else => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            dialer: Arc::new(Dialer::default()),
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
}
