//! The supervisor on fakes: no wasmtime, no runc, no root; tokio's paused
//! clock stands in for time, so backoff and grace periods are exact.

use super::*;
use crate::executor::{BoxFuture, Run};
use flotilla_api::RestartPolicy;
use std::collections::VecDeque;
use tokio::time::Instant as VInstant;

/// How a fake run ends.
#[derive(Clone)]
enum Script {
    /// Exits with this code after this long.
    Exit(i32, Duration),
    /// Runs until stopped.
    Forever,
}

#[derive(Default)]
struct Journal {
    /// (virtual time since the test began, what happened).
    events: Vec<(Duration, String)>,
}

struct FakeMember {
    t0: VInstant,
    script: Mutex<VecDeque<Script>>,
    recover: Mutex<Option<Recovered>>,
    journal: Arc<Mutex<Journal>>,
    name: &'static str,
}

impl FakeMember {
    fn new(
        name: &'static str,
        script: Vec<Script>,
        journal: Arc<Mutex<Journal>>,
    ) -> Arc<FakeMember> {
        Arc::new(FakeMember {
            t0: VInstant::now(),
            script: Mutex::new(script.into()),
            recover: Mutex::new(None),
            journal,
            name,
        })
    }

    fn note(journal: &Mutex<Journal>, t0: VInstant, what: String) {
        journal.lock().unwrap().events.push((t0.elapsed(), what));
    }
}

struct FakeRun {
    t0: VInstant,
    script: Script,
    journal: Arc<Mutex<Journal>>,
    name: &'static str,
}

impl Run for FakeRun {
    fn started_ms(&self) -> u64 {
        7
    }
    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        let script = self.script.clone();
        Box::pin(async move {
            match script {
                Script::Exit(code, after) => {
                    tokio::time::sleep(after).await;
                    let reason = if code == 0 {
                        TerminationReason::Completed
                    } else {
                        TerminationReason::Error
                    };
                    Exit::new(code, reason, "")
                }
                Script::Forever => std::future::pending().await,
            }
        })
    }
    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            FakeMember::note(
                &self.journal,
                self.t0,
                format!("{} stop grace={}s", self.name, grace.as_secs()),
            );
        })
    }
    fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            FakeMember::note(&self.journal, self.t0, format!("{} finish", self.name));
        })
    }
}

impl Prepared for FakeMember {
    fn runtime(&self) -> &'static str {
        "fake"
    }
    fn recover<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Recovered> {
        let r = self
            .recover
            .lock()
            .unwrap()
            .take()
            .unwrap_or(Recovered::Nothing);
        Box::pin(async move { r })
    }
    fn start<'a>(&'a self, cx: RunCx<'a>) -> BoxFuture<'a, Result<Box<dyn Run>, Exit>> {
        FakeMember::note(
            &self.journal,
            self.t0,
            format!("{} start restarts={}", self.name, cx.restarts),
        );
        let script = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Script::Forever);
        let run = FakeRun {
            t0: self.t0,
            script,
            journal: self.journal.clone(),
            name: self.name,
        };
        Box::pin(async move { Ok(Box::new(run) as Box<dyn Run>) })
    }
}

impl PreparedMember for FakeMember {
    fn attach_net(&self, _: Option<&Arc<PodThread>>, _: bool, _: Option<&Path>, _: Option<&str>) {}
}

/// Every member state reported, in order.
#[derive(Default)]
struct Statuses {
    now: Mutex<Vec<MemberStatus>>,
    history: Mutex<Vec<(usize, MemberState, u32)>>,
}

impl StatusSink for Statuses {
    fn set_member(&self, idx: usize, f: &mut dyn FnMut(&mut MemberStatus)) {
        let mut now = self.now.lock().unwrap();
        f(&mut now[idx]);
        self.history
            .lock()
            .unwrap()
            .push((idx, now[idx].state.clone(), now[idx].restarts));
    }
}

fn statuses(n: usize) -> Arc<Statuses> {
    let s = Statuses::default();
    *s.now.lock().unwrap() = (0..n)
        .map(|i| MemberStatus {
            name: format!("m{i}"),
            state: MemberState::Waiting {
                reason: "Preparing".into(),
            },
            restarts: 0,
            last_termination: None,
            ready: None,
        })
        .collect();
    Arc::new(s)
}

fn cx(idx: usize, restart: RestartPolicy, grace: Option<u32>, dir: &Path) -> MemberCx {
    let mut spec = MemberSpec {
        name: format!("m{idx}"),
        restart,
        ..MemberSpec::default()
    };
    if let Some(g) = grace {
        spec.source = flotilla_api::MemberSource::Container {
            image: "127.0.0.1:5000/x:1".into(),
            digest: String::new(),
            options: flotilla_api::ContainerOptions {
                grace_period: Some(g),
                ..Default::default()
            },
        };
    }
    MemberCx {
        probes: None,
        meters: None,
        workload: Default::default(),
        idx,
        pod_uid: "uid".into(),
        pod_name: "pod".into(),
        log: LogPaths::new(dir, &spec.name),
        spec,
        env: Default::default(),
        mounts: Vec::new(),
        log_dir: dir.to_path_buf(),
        log_cap: 1 << 20,
        backoff: Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(2),
            Duration::from_secs(10),
        ),
    }
}

fn starts(j: &Mutex<Journal>) -> Vec<(Duration, String)> {
    j.lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e.1.contains("start"))
        .cloned()
        .collect()
}

const MS: fn(u64) -> Duration = Duration::from_millis;

#[tokio::test(start_paused = true)]
async fn always_restarts_with_doubling_backoff_and_reports_the_crash_loop() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Mutex::new(Journal::default()));
    let crash = Script::Exit(1, MS(50));
    let m = FakeMember::new(
        "m0",
        vec![crash.clone(), crash.clone(), crash.clone(), crash],
        j.clone(),
    );
    let st = statuses(1);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(supervise(
        cx(0, RestartPolicy::Always, None, dir.path()),
        m,
        st.clone(),
        stop,
    ));
    // Four crashing runs of 50 ms, then a fifth that runs on.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let s = starts(&j);
    let at: Vec<u128> = s.iter().map(|e| e.0.as_millis()).collect();
    // Each start: the previous run's 50 ms plus 200, 400, 800, 1600 ms of backoff.
    assert_eq!(at, [0, 250, 700, 1550, 3200]);
    let counts: Vec<&str> = s.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(
        counts,
        [
            "m0 start restarts=0",
            "m0 start restarts=1",
            "m0 start restarts=2",
            "m0 start restarts=3",
            "m0 start restarts=4"
        ]
    );
    let history = st.history.lock().unwrap().clone();
    assert!(history.iter().any(
        |(_, s, r)| matches!(s, MemberState::Waiting { reason } if reason == "CrashLoopBackOff")
            && *r == 1
    ));
    let now = st.now.lock().unwrap()[0].clone();
    assert!(matches!(now.state, MemberState::Running { .. }));
    assert_eq!(now.restarts, 4);
    assert_eq!(now.last_termination.as_ref().unwrap().exit_code, 1);
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn on_failure_and_never_policies() {
    let dir = tempfile::tempdir().unwrap();
    // OnFailure: a failure restarts, a success ends it.
    let j = Arc::new(Mutex::new(Journal::default()));
    let m = FakeMember::new(
        "m0",
        vec![Script::Exit(2, MS(10)), Script::Exit(0, MS(10))],
        j.clone(),
    );
    let st = statuses(1);
    let (_tx, stop) = watch::channel(false);
    supervise(
        cx(0, RestartPolicy::OnFailure, None, dir.path()),
        m,
        st.clone(),
        stop,
    )
    .await;
    assert_eq!(starts(&j).len(), 2);
    let now = st.now.lock().unwrap()[0].clone();
    assert!(
        matches!(&now.state, MemberState::Terminated(t) if t.exit_code == 0 && t.reason == TerminationReason::Completed)
    );
    assert_eq!(now.restarts, 1);

    // Never: one run, whatever its end.
    let j = Arc::new(Mutex::new(Journal::default()));
    let m = FakeMember::new("m0", vec![Script::Exit(3, MS(10))], j.clone());
    let st = statuses(1);
    let (_tx, stop) = watch::channel(false);
    supervise(
        cx(0, RestartPolicy::Never, None, dir.path()),
        m,
        st.clone(),
        stop,
    )
    .await;
    assert_eq!(starts(&j).len(), 1);
    let now = st.now.lock().unwrap()[0].clone();
    assert!(
        matches!(&now.state, MemberState::Terminated(t) if t.exit_code == 3 && t.reason == TerminationReason::Error)
    );
    assert_eq!(now.restarts, 0);
    // The finished run was released.
    assert!(j.lock().unwrap().events.iter().any(|e| e.1 == "m0 finish"));
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_backoff_ends_it_without_another_start() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Mutex::new(Journal::default()));
    let m = FakeMember::new("m0", vec![Script::Exit(1, MS(10))], j.clone());
    let st = statuses(1);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(supervise(
        cx(0, RestartPolicy::Always, None, dir.path()),
        m,
        st.clone(),
        stop,
    ));
    // In the 200 ms backoff after the first run.
    tokio::time::sleep(MS(100)).await;
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(starts(&j).len(), 1);
    let now = st.now.lock().unwrap()[0].clone();
    assert!(matches!(&now.state, MemberState::Terminated(t) if t.exit_code == 1));
}

#[tokio::test(start_paused = true)]
async fn a_pod_stop_stops_every_member_with_its_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Mutex::new(Journal::default()));
    let st = statuses(2);
    let (stop_tx, stop) = watch::channel(false);
    let wasm = FakeMember::new("m0", vec![Script::Forever], j.clone());
    let ctr = FakeMember::new("m1", vec![Script::Forever], j.clone());
    let a = tokio::spawn(supervise(
        cx(0, RestartPolicy::Always, None, dir.path()),
        wasm,
        st.clone(),
        stop.clone(),
    ));
    let b = tokio::spawn(supervise(
        cx(1, RestartPolicy::Always, Some(3), dir.path()),
        ctr,
        st.clone(),
        stop,
    ));
    tokio::time::sleep(Duration::from_secs(60)).await;
    // Nothing is stopped before the pod is.
    assert!(
        !j.lock()
            .unwrap()
            .events
            .iter()
            .any(|e| e.1.contains("stop"))
    );
    stop_tx.send(true).unwrap();
    a.await.unwrap();
    b.await.unwrap();
    let stops: Vec<String> = j
        .lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e.1.contains("stop"))
        .map(|e| e.1.clone())
        .collect();
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert!(
        stops.contains(&"m0 stop grace=10s".to_string()),
        "default grace: {stops:?}"
    );
    assert!(stops.contains(&"m1 stop grace=3s".to_string()), "{stops:?}");
    for m in st.now.lock().unwrap().iter() {
        assert!(
            matches!(&m.state, MemberState::Terminated(t) if t.reason == TerminationReason::Stopped),
            "{m:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_left_by_an_earlier_agent_is_adopted_not_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Mutex::new(Journal::default()));
    let m = FakeMember::new("m0", vec![], j.clone());
    *m.recover.lock().unwrap() = Some(Recovered::Running {
        run: Box::new(FakeRun {
            t0: m.t0,
            script: Script::Exit(0, MS(500)),
            journal: j.clone(),
            name: "m0",
        }),
        restarts: 4,
    });
    let st = statuses(1);
    let (_tx, stop) = watch::channel(false);
    supervise(
        cx(0, RestartPolicy::OnFailure, None, dir.path()),
        m,
        st.clone(),
        stop,
    )
    .await;
    assert!(
        starts(&j).is_empty(),
        "adopted, not started: {:?}",
        j.lock().unwrap().events
    );
    let history = st.history.lock().unwrap().clone();
    assert!(
        matches!(history[0], (0, MemberState::Running { since_ms: 7 }, 4)),
        "{history:?}"
    );
    let now = st.now.lock().unwrap()[0].clone();
    assert!(matches!(&now.state, MemberState::Terminated(t) if t.exit_code == 0));
    assert_eq!(now.restarts, 4);
}

#[tokio::test(start_paused = true)]
async fn a_run_that_ended_while_the_agent_was_away_counts() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Mutex::new(Journal::default()));
    let m = FakeMember::new("m0", vec![Script::Forever], j.clone());
    *m.recover.lock().unwrap() = Some(Recovered::Exited {
        exit: Exit::new(1, TerminationReason::Error, "exited while away"),
        restarts: 2,
    });
    let st = statuses(1);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(supervise(
        cx(0, RestartPolicy::OnFailure, None, dir.path()),
        m,
        st.clone(),
        stop,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The away run counts (restarts 3), and the next start is told so.
    assert_eq!(
        starts(&j).iter().map(|e| e.1.clone()).collect::<Vec<_>>(),
        ["m0 start restarts=3"]
    );
    let now = st.now.lock().unwrap()[0].clone();
    assert_eq!(now.restarts, 3);
    assert_eq!(
        now.last_termination.as_ref().unwrap().message,
        "exited while away"
    );
    // Its reason went into the member's log.
    let log = std::fs::read_to_string(dir.path().join("m0.log")).unwrap_or_default()
        + &std::fs::read_to_string(dir.path().join("m0.previous.log")).unwrap_or_default();
    assert!(log.contains("[flotilla] Error: exited while away"), "{log}");
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

/// Issue 16 item 1: a liveness probe failing `failure_threshold` times in a
/// row stops the run (with its grace period) and restarts it, reason
/// `Unhealthy` naming the probe; with `Never`, the member ends there.
#[tokio::test(start_paused = true)]
async fn a_failing_liveness_probe_restarts_the_member_as_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let liveness: flotilla_api::probe::Probe = serde_json::from_value(serde_json::json!({
        "exec": ["check"], "period": "1s", "failure_threshold": 2, "initial_delay": "3s"
    }))
    .unwrap();
    let target = Arc::new(crate::probe::Target {
        netns: None,
        prober: Arc::default(),
    });
    for (policy, runs) in [(RestartPolicy::Always, 3), (RestartPolicy::Never, 1)] {
        let j = Arc::new(Mutex::new(Journal::default()));
        // Runs forever, answering no exec (the fake has none).
        let m = FakeMember::new("m0", vec![], j.clone());
        let st = statuses(1);
        let (tx, stop) = watch::channel(false);
        let mut c = cx(0, policy, Some(1), dir.path());
        c.spec.liveness = Some(liveness.clone());
        c.probes = Some(target.clone());
        let task = tokio::spawn(supervise(c, m, st.clone(), stop));
        let deadline = VInstant::now() + Duration::from_secs(60);
        while starts(&j).len() < runs && VInstant::now() < deadline {
            tokio::time::sleep(MS(100)).await;
        }
        if policy == RestartPolicy::Never {
            task.await.unwrap();
        } else {
            let _ = tx.send(true);
            task.await.unwrap();
        }
        let events = j.lock().unwrap().events.clone();
        let stops: Vec<_> = events
            .iter()
            .filter(|e| e.1 == "m0 stop grace=1s")
            .collect();
        assert!(stops.len() >= runs, "{events:?}");
        // The first stop: 3 s of delay, then checks at 3 s and 4 s.
        assert_eq!(stops[0].0, Duration::from_secs(4), "{events:?}");
        let now = st.now.lock().unwrap()[0].clone();
        let last = now.last_termination.clone().unwrap();
        assert_eq!(last.reason, TerminationReason::Unhealthy, "{now:?}");
        assert_eq!(
            last.message,
            "liveness probe failed 2 times in a row: exec runs in containers only"
        );
        if policy == RestartPolicy::Never {
            assert_eq!(starts(&j).len(), 1);
            assert!(
                matches!(now.state, MemberState::Terminated(ref t) if t.reason == TerminationReason::Unhealthy)
            );
        } else {
            assert!(now.restarts >= 2, "{now:?}");
        }
    }
}
