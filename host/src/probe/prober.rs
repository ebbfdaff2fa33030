//! The prober: one thread of the agent's that holds the schedule of every
//! `tcp` probe and runs their checks itself, inside each pod's network
//! namespace, waking the pod's supervisor only when a probe's verdict
//! changes (passed ↔ failed at its thresholds). A thousand pods probed
//! every second cost this one thread's wake-ups — checks that fall due
//! within [`SLACK`] of each other share one, and a pod's probes share one
//! `setns` — instead of a timer, a task and two thread hand-offs per check.
//!
//! It also opens connections for the checks that need more than a connect
//! (`http` probes and hooks, see [`Prober::dial`]): made in the pod's
//! namespace here, finished on the agent's runtime.
//!
//! On loopback a connection is made or refused within `connect(2)`; one
//! still in progress (a full backlog) waits in the thread's `poll(2)` until
//! it is decided or its timeout passes, while other checks go on. A tcp
//! check's connection is closed normally, not reset: a reset would spare
//! the pod's namespace its `TIME_WAIT` sockets, but a Rust program on
//! WASI 0.2 (std over wasi-libc) traps when it accepts a connection that
//! was reset before it got to it.

use super::Streak;
use flotilla_api::probe::Kind;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Checks due within this much of the earliest one run in the same wake-up
/// (up to this much early).
pub const SLACK: Duration = Duration::from_millis(10);

/// A probe's verdict, sent when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: Kind,
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub why: String,
}

/// A tcp probe for the prober to run.
pub struct Schedule {
    /// The pod's network namespace (`None`: the agent's).
    pub netns: Option<Arc<File>>,
    pub port: u16,
    pub kind: Kind,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub streak: Streak,
    /// Where verdict changes go; the probe ends when it is closed.
    pub verdicts: tokio::sync::mpsc::UnboundedSender<Verdict>,
}

/// How a connection attempt stands.
pub enum Dialed {
    /// Connected already.
    Connected(OwnedFd),
    /// Still connecting (the peer's backlog was full, say): wait for it to
    /// become writable.
    Connecting(OwnedFd),
}

type Reply = tokio::sync::oneshot::Sender<io::Result<Dialed>>;

enum Cmd {
    Run(u64, Box<Schedule>),
    Forget(u64),
    Dial(Option<Arc<File>>, u16, Reply),
}

/// What the callers and the thread share.
struct Side {
    /// An eventfd the thread polls: written after every command.
    wake: OwnedFd,
    /// How many probes the thread holds ([`Prober::held`]).
    held: AtomicU64,
}

impl Side {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: write(2) of 8 bytes to our eventfd. It can only fail
        // when the counter is near overflow, i.e. the thread is awake.
        unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}

/// The callers' end: when the last is gone, the thread ends.
struct Shared {
    tx: Sender<Cmd>,
    side: Arc<Side>,
    ids: AtomicU64,
}

impl Shared {
    fn send(&self, cmd: Cmd) -> io::Result<()> {
        self.tx
            .send(cmd)
            .map_err(|_| io::Error::other("the agent's prober has stopped"))?;
        self.side.wake();
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Close the channel first, then wake the thread to find it closed.
        drop(std::mem::replace(
            &mut self.tx,
            std::sync::mpsc::channel().0,
        ));
        self.side.wake();
    }
}

/// The handle the agent keeps (started at the first probe that needs it).
#[derive(Default)]
pub struct Prober {
    shared: OnceLock<Arc<Shared>>,
}

/// A running tcp probe; dropping it ends the probe.
pub struct Running {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shared.send(Cmd::Forget(self.id));
    }
}

impl Prober {
    fn shared(&self) -> io::Result<&Arc<Shared>> {
        if let Some(s) = self.shared.get() {
            return Ok(s);
        }
        let home = File::open("/proc/thread-self/ns/net")?;
        // SAFETY: eventfd(2) with constant flags; owned at once below.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let (tx, rx) = std::sync::mpsc::channel();
        let side = Arc::new(Side {
            wake,
            held: AtomicU64::new(0),
        });
        let shared = Arc::new(Shared {
            tx,
            side: side.clone(),
            ids: AtomicU64::new(0),
        });
        // Two callers racing here: the loser's thread ends with its channel.
        if self.shared.set(shared).is_ok() {
            std::thread::Builder::new()
                .name("prober".into())
                .spawn(move || Thread::new(home, rx, &side).run())?;
        }
        Ok(self.shared.get().expect("set"))
    }

    /// How many tcp probes the thread runs now.
    pub fn held(&self) -> u64 {
        self.shared
            .get()
            .map_or(0, |s| s.side.held.load(Ordering::Relaxed))
    }

    /// Starts running `s` until the returned handle is dropped.
    pub fn run(&self, s: Schedule) -> io::Result<Running> {
        let shared = self.shared()?.clone();
        let id = shared.ids.fetch_add(1, Ordering::Relaxed);
        shared.send(Cmd::Run(id, Box::new(s)))?;
        Ok(Running { id, shared })
    }

    /// Starts a connection to 127.0.0.1:`port` in the namespace `ns`
    /// (`None`: the agent's own).
    pub async fn dial(&self, ns: Option<&Arc<File>>, port: u16) -> io::Result<Dialed> {
        let Some(ns) = ns else {
            return dial(port);
        };
        let (reply, made) = tokio::sync::oneshot::channel();
        self.shared()?
            .send(Cmd::Dial(Some(ns.clone()), port, reply))?;
        made.await
            .map_err(|_| io::Error::other("the agent's prober has stopped"))?
    }
}

/// Starts a non-blocking TCP connection to 127.0.0.1:`port` in the calling
/// thread's network namespace.
pub fn dial(port: u16) -> io::Result<Dialed> {
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
pub fn socket_error(fd: &OwnedFd) -> io::Result<Option<io::Error>> {
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

/// A probe on the thread.
struct Probe {
    s: Box<Schedule>,
    /// The last verdict sent.
    told: Option<bool>,
    /// When its next check is due.
    due: Instant,
}

/// A check waiting for its connection.
struct InFlight {
    id: u64,
    fd: OwnedFd,
    deadline: Instant,
}

struct Thread<'a> {
    home: File,
    rx: Receiver<Cmd>,
    side: &'a Side,
    probes: HashMap<u64, Probe>,
    /// Due times (entries of forgotten probes are skipped when popped).
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    inflight: Vec<InFlight>,
    /// The namespace the thread is in (`None`: home).
    inside: Option<Arc<File>>,
}

impl<'a> Thread<'a> {
    fn new(home: File, rx: Receiver<Cmd>, side: &'a Side) -> Self {
        Thread {
            home,
            rx,
            side,
            probes: HashMap::new(),
            queue: BinaryHeap::new(),
            inflight: Vec::new(),
            inside: None,
        }
    }

    fn run(mut self) {
        loop {
            if !self.commands() {
                return;
            }
            let now = Instant::now();
            self.due_checks(now);
            self.side
                .held
                .store(self.probes.len() as u64, Ordering::Relaxed);
            self.expire(now);
            // Never sleep inside a pod's namespace (it would keep it alive).
            if self.inside.take().is_some()
                && let Err(e) = crate::net::sys::enter(&self.home)
            {
                tracing::error!("the prober cannot return to the agent's namespace: {e}");
                return;
            }
            self.sleep();
        }
    }

    /// Takes the queued commands; false when the agent is gone.
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Cmd::Run(id, s)) => {
                    let due = Instant::now() + s.initial_delay;
                    self.probes.insert(id, Probe { s, told: None, due });
                    self.queue.push(Reverse((due, id)));
                }
                Ok(Cmd::Forget(id)) => {
                    self.probes.remove(&id);
                    self.inflight.retain(|f| f.id != id);
                }
                Ok(Cmd::Dial(ns, port, reply)) => {
                    let r = self.enter(ns.as_ref()).and_then(|()| dial(port));
                    let _ = reply.send(r);
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Enters `ns` (`None`: home) unless the thread is there already.
    fn enter(&mut self, ns: Option<&Arc<File>>) -> io::Result<()> {
        match (ns, &self.inside) {
            (None, None) => Ok(()),
            (Some(want), Some(cur)) if Arc::ptr_eq(want, cur) => Ok(()),
            (None, Some(_)) => {
                crate::net::sys::enter(&self.home)?;
                self.inside = None;
                Ok(())
            }
            (Some(want), _) => {
                // A failed setns leaves the thread where it was.
                crate::net::sys::enter(want)?;
                self.inside = Some(want.clone());
                Ok(())
            }
        }
    }

    /// Runs every check due by `now` + [`SLACK`], a namespace at a time.
    fn due_checks(&mut self, now: Instant) {
        let horizon = now + SLACK;
        let mut batch = Vec::new();
        while let Some(&Reverse((due, id))) = self.queue.peek()
            && due <= horizon
        {
            self.queue.pop();
            if self.probes.get(&id).is_some_and(|p| p.due == due) {
                batch.push(id);
            }
        }
        let ns_of = |p: &Probe| p.s.netns.as_ref().map_or(0, |f| Arc::as_ptr(f) as usize);
        batch.sort_by_key(|id| ns_of(&self.probes[id]));
        for id in batch {
            let p = &self.probes[&id];
            if p.s.verdicts.is_closed() {
                self.probes.remove(&id);
                continue;
            }
            let (ns, port, timeout) = (p.s.netns.clone(), p.s.port, p.s.timeout);
            let r = self.enter(ns.as_ref()).and_then(|()| dial(port));
            match r {
                Ok(Dialed::Connected(fd)) => {
                    drop(fd);
                    self.record(id, Ok(()), now);
                }
                Ok(Dialed::Connecting(fd)) => self.inflight.push(InFlight {
                    id,
                    fd,
                    deadline: now + timeout,
                }),
                Err(e) => self.record(id, Err(format!("connecting to port {port}: {e}")), now),
            }
        }
    }

    /// Fails the checks whose connection is not made within its timeout.
    fn expire(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.inflight.len() {
            if self.inflight[i].deadline <= now {
                let f = self.inflight.swap_remove(i);
                let why = self
                    .probes
                    .get(&f.id)
                    .map(|p| format!("no answer within {:?}", p.s.timeout))
                    .unwrap_or_default();
                self.record(f.id, Err(why), now);
            } else {
                i += 1;
            }
        }
    }

    /// Counts a check's result, tells a changed verdict, and plans the next.
    fn record(&mut self, id: u64, r: Result<(), String>, now: Instant) {
        let Some(p) = self.probes.get_mut(&id) else {
            return;
        };
        if let Some(passed) = p.s.streak.count(r)
            && p.told != Some(passed)
        {
            p.told = Some(passed);
            let why = if passed {
                String::new()
            } else {
                p.s.streak.why(p.s.kind)
            };
            let _ = p.s.verdicts.send(Verdict {
                kind: p.s.kind,
                passed,
                why,
            });
        }
        // A late check delays the next one rather than bunching them.
        let mut next = p.due + p.s.period;
        if next <= now {
            next = now + p.s.period;
        }
        p.due = next;
        self.queue.push(Reverse((next, id)));
    }

    /// Waits for the next due check, a connection, or a command.
    fn sleep(&mut self) {
        let now = Instant::now();
        let next = self
            .queue
            .peek()
            .map(|Reverse((t, _))| *t)
            .into_iter()
            .chain(self.inflight.iter().map(|f| f.deadline))
            .min();
        let timeout: libc::c_int = match next {
            None => -1,
            Some(t) => t
                .saturating_duration_since(now)
                .as_micros()
                .div_ceil(1000)
                .min(60_000) as libc::c_int,
        };
        let mut fds = Vec::with_capacity(1 + self.inflight.len());
        fds.push(libc::pollfd {
            fd: self.side.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        fds.extend(self.inflight.iter().map(|f| libc::pollfd {
            fd: f.fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        }));
        // SAFETY: poll(2) over pollfds we own, for their count.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 {
            return;
        }
        if fds[0].revents != 0 {
            let mut count: u64 = 0;
            // SAFETY: read(2) of the eventfd's 8-byte counter.
            unsafe { libc::read(self.side.wake.as_raw_fd(), (&raw mut count).cast(), 8) };
        }
        // Settled connections, from the back so indices stay valid.
        let now = Instant::now();
        for i in (0..self.inflight.len()).rev() {
            if fds[i + 1].revents == 0 {
                continue;
            }
            let f = self.inflight.swap_remove(i);
            let port = self.probes.get(&f.id).map_or(0, |p| p.s.port);
            let r = match socket_error(&f.fd) {
                Ok(None) => Ok(()),
                Ok(Some(e)) | Err(e) => Err(format!("connecting to port {port}: {e}")),
            };
            drop(f.fd);
            self.record(f.id, r, now);
        }
    }
}
