//! The agent side of the scheduler link as a sans-IO state machine, in the
//! manner of quinn-proto: fed connection events, frames and time; asked what to
//! do next. No sockets, no clocks: tests drive it on virtual time.

pub mod client;
pub mod fetch;
pub mod join;
pub mod kv;

/// DNS name in the scheduler's certificate (see the scheduler's pki module).
pub const SCHEDULER_NAME: &str = "flotilla-scheduler";

use crate::backoff::Backoff;
use flotilla_api::proto::{AgentMsg, NodeInfo, PROTOCOL_VERSION, Reassembly, SchedulerMsg};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Timing of the link.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// How often to send a heartbeat once registered (the scheduler may override).
    pub heartbeat: Duration,
    /// With nothing heard from the scheduler for this long, the link is dead.
    pub dead_after: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            heartbeat: Duration::from_millis(500),
            dead_after: Duration::from_secs(3),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// What the driver should do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Open a connection and a control stream, then call `connected` or `connect_failed`.
    Connect,
    Send(AgentMsg),
    /// Close the connection (if any) for this reason.
    Close(String),
    /// The scheduler accepted this node under `epoch`: resend every pod's status.
    Registered {
        epoch: u64,
        /// The node's block of pod addresses (empty: none).
        pod_cidr: String,
        /// The whole cluster's pod CIDR (other nodes' pods are in it).
        cluster_cidr: String,
    },
    /// Hand this message to the pod reconciler.
    Deliver(SchedulerMsg),
    /// The node's lease ran out: stop the pods that must not outlive it.
    LeaseExpired,
    /// The scheduler reached does not lead: connect to the leader's QUIC
    /// address next (empty: to the next scheduler of the list).
    Redirect(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting to (re)connect.
    Idle,
    Connecting,
    /// Connected, `Hello` sent, waiting for `Welcome`.
    Handshaking,
    Ready {
        epoch: u64,
    },
}

/// The link's state machine.
pub struct LinkCore {
    cfg: LinkConfig,
    node: NodeInfo,
    phase: Phase,
    backoff: Backoff,
    retry_at: Instant,
    last_heard: Instant,
    next_heartbeat: Instant,
    heartbeat: Duration,
    /// Silence after which the link is dead: the configured value, or six
    /// heartbeats when the scheduler asks for slow ones.
    dead_after: Duration,
    seq: u64,
    /// The lease granted in `Welcome` less a safety margin (zero: none).
    lease: Duration,
    /// When the lease runs out, while the node holds one.
    lease_until: Option<Instant>,
    /// Send times of recent heartbeats: an ack extends the lease from the
    /// moment its heartbeat left, which is never later than the scheduler
    /// saw it.
    sent: VecDeque<(u64, Instant)>,
    /// When the current connection's `Hello` was sent.
    hello_at: Instant,
    out: VecDeque<Action>,
    /// Tables arriving in parts on the current connection.
    tables: Reassembly,
    /// Why the link last went down, for status displays.
    pub last_error: Option<String>,
}

impl LinkCore {
    pub fn new(cfg: LinkConfig, node: NodeInfo, now: Instant) -> LinkCore {
        LinkCore {
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max, Duration::MAX),
            heartbeat: cfg.heartbeat,
            dead_after: cfg.dead_after,
            cfg,
            node,
            phase: Phase::Idle,
            retry_at: now,
            last_heard: now,
            next_heartbeat: now,
            seq: 0,
            lease: Duration::ZERO,
            lease_until: None,
            sent: VecDeque::new(),
            hello_at: now,
            out: VecDeque::new(),
            tables: Reassembly::default(),
            last_error: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready { .. })
    }

    /// The next action for the driver, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = self.link_timeout();
        match (link, self.lease_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the node's lease runs out, if it holds one.
    pub fn lease_until(&self) -> Option<Instant> {
        self.lease_until
    }

    fn link_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Idle => Some(self.retry_at),
            Phase::Connecting => None,
            Phase::Handshaking => Some(self.last_heard + self.dead_after),
            Phase::Ready { .. } => Some(self.next_heartbeat.min(self.last_heard + self.dead_after)),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.lease_until.is_some_and(|u| now >= u) {
            self.lease_until = None;
            self.out.push_back(Action::LeaseExpired);
            // Pods stopped for want of a lease come back only through a new
            // registration's Sync, so a link that is still up is renewed.
            if matches!(self.phase, Phase::Handshaking | Phase::Ready { .. }) {
                self.drop_link(now, "the node's lease ran out".into());
                return;
            }
        }
        match self.phase {
            Phase::Idle if now >= self.retry_at => {
                self.phase = Phase::Connecting;
                self.out.push_back(Action::Connect);
            }
            Phase::Handshaking | Phase::Ready { .. }
                if now >= self.last_heard + self.dead_after =>
            {
                let why = format!(
                    "nothing heard from the scheduler for {} ms",
                    self.dead_after.as_millis()
                );
                self.drop_link(now, why);
            }
            Phase::Ready { .. } if now >= self.next_heartbeat => {
                self.seq += 1;
                // Ahead of whatever is queued (a burst of status reports):
                // the lease depends on it.
                self.out
                    .push_front(Action::Send(AgentMsg::Heartbeat { seq: self.seq }));
                if self.sent.len() >= 64 {
                    self.sent.pop_front();
                }
                self.sent.push_back((self.seq, now));
                self.next_heartbeat = now + self.heartbeat;
            }
            _ => {}
        }
    }

    /// The connection and control stream are open.
    pub fn connected(&mut self, now: Instant) {
        if self.phase != Phase::Connecting {
            return;
        }
        self.phase = Phase::Handshaking;
        self.last_heard = now;
        self.hello_at = now;
        self.out.push_back(Action::Send(AgentMsg::Hello {
            version: PROTOCOL_VERSION,
            node: self.node.clone(),
        }));
    }

    pub fn connect_failed(&mut self, now: Instant, why: String) {
        if self.phase == Phase::Connecting {
            self.go_idle(now, why);
        }
    }

    /// The connection ended (closed by the peer, reset, read error …).
    pub fn closed(&mut self, now: Instant, why: String) {
        if matches!(self.phase, Phase::Handshaking | Phase::Ready { .. }) {
            self.go_idle(now, why);
        }
    }

    /// A message arrived from the scheduler.
    pub fn received(&mut self, msg: SchedulerMsg, now: Instant) {
        self.last_heard = now;
        match (self.phase, msg) {
            (
                Phase::Handshaking,
                SchedulerMsg::Welcome {
                    epoch,
                    heartbeat_ms,
                    lease_ms,
                    pod_cidr,
                    cluster_cidr,
                },
            ) => {
                // A tenth of the lease is kept back so the pods stop before
                // the scheduler may act, even with some timer slack.
                let lease = Duration::from_millis(lease_ms);
                self.lease = lease - lease / 10;
                self.sent.clear();
                self.lease_until = (lease_ms > 0).then(|| self.hello_at + self.lease);
                self.phase = Phase::Ready { epoch };
                self.backoff.reset();
                self.last_error = None;
                if heartbeat_ms > 0 {
                    self.heartbeat = Duration::from_millis(heartbeat_ms);
                }
                self.dead_after = self.cfg.dead_after.max(self.heartbeat * 6);
                self.next_heartbeat = now + self.heartbeat;
                self.out.push_back(Action::Registered {
                    epoch,
                    pod_cidr,
                    cluster_cidr,
                });
            }
            (Phase::Handshaking, SchedulerMsg::Refused { reason }) => {
                self.drop_link(now, format!("scheduler refused this node: {reason}"));
            }
            (Phase::Handshaking, SchedulerMsg::Redirect { to }) => {
                let why = if to.is_empty() {
                    "this scheduler does not lead and knows no leader yet".to_string()
                } else {
                    format!("this scheduler does not lead; the leader is at {to}")
                };
                self.drop_link(now, why);
                self.out.push_back(Action::Redirect(to));
            }
            (Phase::Ready { .. }, SchedulerMsg::HeartbeatAck { seq }) => {
                if let Some(&(_, at)) = self.sent.iter().find(|(s, _)| *s == seq)
                    && !self.lease.is_zero()
                {
                    let until = at + self.lease;
                    self.lease_until = Some(self.lease_until.map_or(until, |u| u.max(until)));
                }
            }
            (
                Phase::Ready { .. },
                m @ (SchedulerMsg::Sync { .. }
                | SchedulerMsg::Assign(_)
                | SchedulerMsg::Unassign { .. }
                | SchedulerMsg::Services { .. }
                | SchedulerMsg::Peers { .. }
                | SchedulerMsg::Input(_)
                | SchedulerMsg::Renewed { .. }),
            ) => {
                // A table comes out once whole: the agent never acts on part
                // of its desired set.
                if let Some(m) = self.tables.add(m) {
                    self.out.push_back(Action::Deliver(m));
                }
            }
            (phase, m) => {
                let why = format!(
                    "protocol error: unexpected {} while {phase:?}",
                    msg_name(&m)
                );
                self.drop_link(now, why);
            }
        }
    }

    /// Queues a message for the scheduler if the link is up; returns whether it was.
    pub fn send(&mut self, msg: AgentMsg) -> bool {
        if self.is_ready() {
            self.out.push_back(Action::Send(msg));
            true
        } else {
            false
        }
    }

    fn drop_link(&mut self, now: Instant, why: String) {
        self.out.push_back(Action::Close(why.clone()));
        self.go_idle(now, why);
    }

    fn go_idle(&mut self, now: Instant, why: String) {
        self.phase = Phase::Idle;
        self.tables.clear();
        let delay = self.backoff.next(Duration::ZERO);
        // Spread reconnects of many agents: up to a quarter of the delay, derived
        // from the node name so it is deterministic per node.
        let spread = name_hash(&self.node.name) % (delay.as_millis() as u64 / 4 + 1);
        self.retry_at = now + delay + Duration::from_millis(spread);
        self.last_error = Some(why);
    }
}

fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn msg_name(m: &SchedulerMsg) -> &'static str {
    match m {
        SchedulerMsg::Welcome { .. } => "Welcome",
        SchedulerMsg::Refused { .. } => "Refused",
        SchedulerMsg::Redirect { .. } => "Redirect",
        SchedulerMsg::HeartbeatAck { .. } => "HeartbeatAck",
        SchedulerMsg::Sync { .. } => "Sync",
        SchedulerMsg::Assign(_) => "Assign",
        SchedulerMsg::Unassign { .. } => "Unassign",
        SchedulerMsg::Joined { .. } => "Joined",
        SchedulerMsg::Renewed { .. } => "Renewed",
        SchedulerMsg::Services { .. } => "Services",
        SchedulerMsg::Peers { .. } => "Peers",
        SchedulerMsg::Input(_) => "Input",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::Capacity;

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            labels: Default::default(),
            allocatable: Capacity {
                cpu: 1000,
                memory: 1 << 30,
                ..Default::default()
            },
            arch: "x86_64".into(),
            version: "test".into(),
            runtimes: vec!["wasm".into()],
            pod_network: String::new(),
            gateway_tls: false,
        }
    }

    fn drain(core: &mut LinkCore) -> Vec<Action> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn registered(t0: Instant) -> LinkCore {
        let mut c = LinkCore::new(LinkConfig::default(), node(), t0);
        c.handle_timeout(t0);
        assert_eq!(drain(&mut c), [Action::Connect]);
        c.connected(t0);
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Send(AgentMsg::Hello {
                version: PROTOCOL_VERSION,
                ..
            })]
        ));
        c.received(
            SchedulerMsg::Welcome {
                epoch: 4,
                heartbeat_ms: 0,
                lease_ms: 0,
                pod_cidr: String::new(),
                cluster_cidr: String::new(),
            },
            t0,
        );
        assert_eq!(
            drain(&mut c),
            [Action::Registered {
                epoch: 4,
                pod_cidr: String::new(),
                cluster_cidr: String::new(),
            }]
        );
        c
    }

    #[test]
    fn a_heartbeat_overtakes_queued_reports() {
        let t0 = Instant::now();
        let mut c = registered(t0);
        for i in 0..1000 {
            assert!(c.send(AgentMsg::Released {
                uid: format!("pod-{i}")
            }));
        }
        c.handle_timeout(t0 + ms(500));
        assert_eq!(
            c.poll_action(),
            Some(Action::Send(AgentMsg::Heartbeat { seq: 1 }))
        );
        // The reports follow, in their order.
        assert_eq!(
            c.poll_action(),
            Some(Action::Send(AgentMsg::Released {
                uid: "pod-0".into()
            }))
        );
        assert_eq!(drain(&mut c).len(), 999);
    }

    #[test]
    fn registers_then_heartbeats_on_schedule() {
        let t0 = Instant::now();
        let mut c = registered(t0);
        assert_eq!(c.phase(), Phase::Ready { epoch: 4 });
        assert_eq!(c.poll_timeout(), Some(t0 + ms(500)));
        c.handle_timeout(t0 + ms(499));
        assert!(drain(&mut c).is_empty());
        let mut t = t0;
        for seq in 1..=3 {
            t += ms(500);
            c.handle_timeout(t);
            assert_eq!(drain(&mut c), [Action::Send(AgentMsg::Heartbeat { seq })]);
            c.received(SchedulerMsg::HeartbeatAck { seq }, t);
        }
        assert!(c.is_ready());
    }

    /// Registered at `t0` with a 1 s lease (900 ms after the margin).
    fn leased(t0: Instant) -> LinkCore {
        let mut c = LinkCore::new(LinkConfig::default(), node(), t0);
        c.handle_timeout(t0);
        c.connected(t0);
        c.received(
            SchedulerMsg::Welcome {
                epoch: 2,
                heartbeat_ms: 200,
                lease_ms: 1_000,
                pod_cidr: String::new(),
                cluster_cidr: String::new(),
            },
            t0 + ms(30),
        );
        drain(&mut c);
        c
    }

    #[test]
    fn the_lease_runs_from_when_the_acknowledged_heartbeat_left() {
        let t0 = Instant::now();
        let mut c = leased(t0);
        // From the Hello, not from the Welcome's arrival.
        assert_eq!(c.lease_until(), Some(t0 + ms(900)));
        c.handle_timeout(t0 + ms(230));
        assert_eq!(
            drain(&mut c),
            [Action::Send(AgentMsg::Heartbeat { seq: 1 })]
        );
        // The ack arrives late; the lease counts from the heartbeat's departure.
        c.received(SchedulerMsg::HeartbeatAck { seq: 1 }, t0 + ms(700));
        assert_eq!(c.lease_until(), Some(t0 + ms(1_130)));
        // An ack for a heartbeat never sent extends nothing.
        c.received(SchedulerMsg::HeartbeatAck { seq: 99 }, t0 + ms(710));
        assert_eq!(c.lease_until(), Some(t0 + ms(1_130)));
        // A duplicate, older ack does not shorten it either.
        c.handle_timeout(t0 + ms(430));
        drain(&mut c);
        c.received(SchedulerMsg::HeartbeatAck { seq: 2 }, t0 + ms(720));
        c.received(SchedulerMsg::HeartbeatAck { seq: 1 }, t0 + ms(730));
        assert_eq!(c.lease_until(), Some(t0 + ms(1_330)));
    }

    #[test]
    fn an_expired_lease_stops_pods_once_and_renews_the_link() {
        let t0 = Instant::now();
        let mut c = leased(t0);
        // Heartbeats go out; no ack comes back (a one-way partition).
        let mut t = t0;
        let mut acts = Vec::new();
        while !acts.contains(&Action::LeaseExpired) {
            t = c.poll_timeout().unwrap();
            c.handle_timeout(t);
            acts = drain(&mut c);
        }
        assert_eq!(t, t0 + ms(900), "expires exactly at the lease's end");
        assert_eq!(acts[0], Action::LeaseExpired);
        assert!(matches!(acts[1], Action::Close(_)), "{acts:?}");
        assert!(!c.is_ready());
        assert_eq!(c.lease_until(), None);
        // Offline, it never fires again.
        c.handle_timeout(t0 + ms(5_000));
        assert!(!drain(&mut c).contains(&Action::LeaseExpired));
    }

    #[test]
    fn no_lease_no_expiry() {
        let t0 = Instant::now();
        let mut c = registered(t0);
        assert_eq!(c.lease_until(), None);
        c.closed(t0 + ms(10), "gone".into());
        c.handle_timeout(t0 + ms(60_000));
        assert!(!drain(&mut c).contains(&Action::LeaseExpired));
    }

    #[test]
    fn slow_heartbeats_asked_by_the_scheduler_stretch_the_dead_link_timer() {
        let t0 = Instant::now();
        let mut c = LinkCore::new(LinkConfig::default(), node(), t0);
        c.handle_timeout(t0);
        c.connected(t0);
        c.received(
            SchedulerMsg::Welcome {
                epoch: 1,
                heartbeat_ms: 5_000,
                lease_ms: 0,
                pod_cidr: String::new(),
                cluster_cidr: String::new(),
            },
            t0,
        );
        drain(&mut c);
        // The default 3 s would drop the link before the first heartbeat.
        assert_eq!(c.poll_timeout(), Some(t0 + ms(5_000)));
        c.handle_timeout(t0 + ms(5_000));
        assert_eq!(
            drain(&mut c),
            [Action::Send(AgentMsg::Heartbeat { seq: 1 })]
        );
        c.received(SchedulerMsg::HeartbeatAck { seq: 1 }, t0 + ms(5_010));
        c.handle_timeout(t0 + ms(10_000));
        drain(&mut c);
        // Silence: dead after six heartbeats (30 s), not 3 s.
        c.handle_timeout(t0 + ms(35_000));
        assert!(c.is_ready());
        c.handle_timeout(t0 + ms(35_011));
        assert!(!c.is_ready());
    }

    #[test]
    fn heartbeat_loss_drops_the_link_and_reconnects_with_growing_backoff() {
        let t0 = Instant::now();
        let mut c = registered(t0);
        // Heartbeats go out but nothing comes back.
        let mut t = t0;
        while c.is_ready() {
            t = c.poll_timeout().unwrap();
            c.handle_timeout(t);
        }
        assert_eq!(t, t0 + ms(3000));
        let acts = drain(&mut c);
        assert!(matches!(acts.last(), Some(Action::Close(why)) if why.contains("nothing heard")));
        // Reconnect attempts back off: 100, 200, 400 ms (+ a small per-node spread).
        let mut gaps = Vec::new();
        for _ in 0..3 {
            let at = c.poll_timeout().unwrap();
            gaps.push(at - t);
            c.handle_timeout(at);
            assert_eq!(drain(&mut c), [Action::Connect]);
            c.connect_failed(at, "refused".into());
            t = at;
        }
        for (gap, base) in gaps.iter().zip([100, 200, 400]) {
            assert!(
                *gap >= ms(base) && *gap <= ms(base + base / 4),
                "{gap:?} vs {base}"
            );
        }
        // A successful registration resets the backoff.
        let at = c.poll_timeout().unwrap();
        c.handle_timeout(at);
        c.connected(at);
        c.received(
            SchedulerMsg::Welcome {
                epoch: 5,
                heartbeat_ms: 200,
                lease_ms: 0,
                pod_cidr: String::new(),
                cluster_cidr: String::new(),
            },
            at,
        );
        drain(&mut c);
        c.closed(at, "reset".into());
        assert!(c.poll_timeout().unwrap() - at <= ms(125));
    }

    #[test]
    fn a_follower_redirect_closes_the_link_and_names_the_leader() {
        let t0 = Instant::now();
        let mut c = LinkCore::new(LinkConfig::default(), node(), t0);
        c.handle_timeout(t0);
        c.connected(t0);
        drain(&mut c);
        c.received(
            SchedulerMsg::Redirect {
                to: "10.0.0.9:7371".into(),
            },
            t0,
        );
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Close(w), Action::Redirect(to)]
                if w.contains("the leader is at 10.0.0.9:7371") && to == "10.0.0.9:7371"
        ));
        assert_eq!(c.phase(), Phase::Idle);
        // It connects again soon (the shortest backoff).
        assert!(c.poll_timeout().unwrap() - t0 <= ms(125));
    }

    #[test]
    fn refusal_and_protocol_errors_close_the_link() {
        let t0 = Instant::now();
        let mut c = LinkCore::new(LinkConfig::default(), node(), t0);
        c.handle_timeout(t0);
        c.connected(t0);
        drain(&mut c);
        c.received(
            SchedulerMsg::Refused {
                reason: "bad token".into(),
            },
            t0,
        );
        assert!(matches!(&drain(&mut c)[..], [Action::Close(w)] if w.contains("bad token")));
        assert_eq!(c.phase(), Phase::Idle);

        // An assignment before Welcome is out of order.
        let t1 = c.poll_timeout().unwrap();
        c.handle_timeout(t1);
        c.connected(t1);
        drain(&mut c);
        c.received(SchedulerMsg::Unassign { uid: "x".into() }, t1);
        assert!(
            matches!(&drain(&mut c)[..], [Action::Close(w)] if w.contains("unexpected Unassign"))
        );
    }

    #[test]
    fn duplicate_and_out_of_order_frames_close_the_link() {
        let t0 = Instant::now();
        // A second Welcome on an established link is a protocol error.
        let mut c = registered(t0);
        c.received(
            SchedulerMsg::Welcome {
                epoch: 9,
                heartbeat_ms: 0,
                lease_ms: 0,
                pod_cidr: String::new(),
                cluster_cidr: String::new(),
            },
            t0,
        );
        assert!(
            matches!(&drain(&mut c)[..], [Action::Close(w)] if w.contains("unexpected Welcome"))
        );
        assert_eq!(c.phase(), Phase::Idle);
        // An ack before the handshake finished is out of order.
        let t1 = c.poll_timeout().unwrap();
        c.handle_timeout(t1);
        c.connected(t1);
        drain(&mut c);
        c.received(SchedulerMsg::HeartbeatAck { seq: 1 }, t1);
        assert!(
            matches!(&drain(&mut c)[..], [Action::Close(w)] if w.contains("unexpected HeartbeatAck"))
        );
        // Frames for a connection that is already gone change nothing.
        let before = c.poll_timeout();
        c.closed(t1, "late".into());
        assert_eq!(c.poll_timeout(), before);
        // Duplicate assignments are delivered as they come; the reconciler
        // (Agent::assign) ignores a uid it already runs.
        let mut c = registered(t0);
        let a = SchedulerMsg::Unassign { uid: "u".into() };
        c.received(a.clone(), t0);
        c.received(a.clone(), t0);
        assert_eq!(
            drain(&mut c),
            [Action::Deliver(a.clone()), Action::Deliver(a)]
        );
    }

    #[test]
    fn a_table_in_parts_is_delivered_whole_and_a_dropped_link_forgets_its_parts() {
        let t0 = Instant::now();
        let mut c = registered(t0);
        let part = |uid: &str, more| SchedulerMsg::Sync {
            pods: vec![flotilla_api::proto::Assignment {
                uid: uid.into(),
                namespace: "default".into(),
                name: uid.into(),
                spec: Default::default(),
                epoch: 1,
                pod_ip: String::new(),
            }],
            more,
        };
        c.received(part("a", true), t0);
        assert_eq!(drain(&mut c), []);
        c.received(part("b", false), t0);
        let SchedulerMsg::Sync { pods, more: false } = part("a", false) else {
            unreachable!()
        };
        let b = match part("b", false) {
            SchedulerMsg::Sync { pods, .. } => pods,
            _ => unreachable!(),
        };
        assert_eq!(
            drain(&mut c),
            [Action::Deliver(SchedulerMsg::Sync {
                pods: [pods, b].concat(),
                more: false
            })]
        );
        // The link drops after one part: the next connection's table does
        // not include it.
        c.received(part("a", true), t0);
        c.closed(t0, "reset".into());
        let t1 = c.poll_timeout().unwrap();
        c.handle_timeout(t1);
        assert_eq!(drain(&mut c), [Action::Connect]);
        c.connected(t1);
        c.received(
            SchedulerMsg::Welcome {
                epoch: 5,
                heartbeat_ms: 0,
                lease_ms: 0,
                pod_cidr: String::new(),
                cluster_cidr: String::new(),
            },
            t1,
        );
        drain(&mut c);
        c.received(part("c", false), t1);
        assert_eq!(drain(&mut c), [Action::Deliver(part("c", false))]);
    }

    #[test]
    fn assignments_are_delivered_in_order_and_sends_need_a_link() {
        let t0 = Instant::now();
        let mut c = LinkCore::new(LinkConfig::default(), node(), t0);
        assert!(!c.send(AgentMsg::Heartbeat { seq: 0 }));
        let mut c = registered(t0);
        c.received(
            SchedulerMsg::Sync {
                pods: vec![],
                more: false,
            },
            t0,
        );
        c.received(SchedulerMsg::Unassign { uid: "a".into() }, t0);
        assert_eq!(
            drain(&mut c),
            [
                Action::Deliver(SchedulerMsg::Sync {
                    pods: vec![],
                    more: false
                }),
                Action::Deliver(SchedulerMsg::Unassign { uid: "a".into() })
            ]
        );
        assert!(c.send(AgentMsg::Heartbeat { seq: 9 }));
        // Frames keep the link alive past the dead interval.
        for i in 1..10 {
            let t = t0 + ms(1000 * i);
            c.received(SchedulerMsg::HeartbeatAck { seq: i }, t);
            c.handle_timeout(t);
        }
        assert!(c.is_ready());
    }
}
