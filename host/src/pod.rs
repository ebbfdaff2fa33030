//! One pod on the agent: prepares every member, starts them together, restarts
//! them per policy with backoff, and stops them together.

use crate::backoff::Backoff;
use crate::container::{self, ContainerRuntime, Found, StartSpec};
use crate::image::{ImageStore, Platform};
use crate::logs::{LogPaths, LogSink};
use crate::podnet::{PodNetwork, PodThread, Sandbox};
use crate::wasm::{Exit, Prepared, RunSpec, WasmRuntime};
use flotilla_api::proto::Assignment;
use flotilla_api::time::now_ms;
use flotilla_api::{
    MemberSource, MemberSpec, MemberState, MemberStatus, PodPhase, PodStatus, Termination,
    TerminationReason,
};
use futures_util::FutureExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Environment variables every member gets, naming its pod and itself.
pub const ENV_POD: &str = "FLOTILLA_POD";
pub const ENV_NAMESPACE: &str = "FLOTILLA_NAMESPACE";
pub const ENV_MEMBER: &str = "FLOTILLA_MEMBER";
pub const ENV_POD_UID: &str = "FLOTILLA_POD_UID";

/// Shared settings and services of every pod on this agent.
pub struct PodEnv {
    pub runtime: Arc<WasmRuntime>,
    /// Uploaded modules: the node's cache, filled from the scheduler.
    pub modules: Arc<crate::fetch::ModuleFetcher>,
    /// Image store for `oci://` wasm members (none: such members fail).
    pub images: Option<Arc<ImageStore>>,
    /// Container executor (none: this node has no runc).
    pub containers: Option<Arc<ContainerRuntime>>,
    /// Pod sandboxes (network namespaces, the node bridge).
    pub network: Arc<PodNetwork>,
    /// The service table and proxy.
    pub proxy: Arc<crate::proxy::Proxy>,
    pub log_dir: PathBuf,
    pub log_cap: u64,
    pub restart_min: Duration,
    pub restart_max: Duration,
    pub restart_reset: Duration,
    /// Receives `(pod uid, status)` whenever a pod's status changes.
    pub status_tx: mpsc::UnboundedSender<(String, PodStatus)>,
}

impl PodEnv {
    pub fn pod_log_dir(&self, uid: &str) -> PathBuf {
        self.log_dir.join(uid)
    }
}

/// A running pod's handle: its live status and a way to stop it.
pub struct PodHandle {
    pub assignment: Assignment,
    pub status: Arc<Mutex<PodStatus>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    env: Arc<PodEnv>,
}

impl PodHandle {
    /// Starts the pod's supervisor task.
    pub fn start(env: Arc<PodEnv>, assignment: Assignment) -> PodHandle {
        let status = Arc::new(Mutex::new(PodStatus {
            phase: PodPhase::Scheduled,
            members: assignment
                .spec
                .members
                .iter()
                .map(|m| MemberStatus {
                    name: m.name.clone(),
                    state: MemberState::Waiting {
                        reason: "Preparing".into(),
                    },
                    restarts: 0,
                    last_termination: None,
                })
                .collect(),
            ..PodStatus::default()
        }));
        let (stop, stop_rx) = watch::channel(false);
        let pod = Arc::new(PodCx {
            env: env.clone(),
            uid: assignment.uid.clone(),
            namespace: assignment.namespace.clone(),
            name: assignment.name.clone(),
            status: status.clone(),
            networked: assignment.spec.needs_network(),
            pod_ip: assignment.pod_ip.parse().ok(),
        });
        let task = tokio::spawn(run_pod(pod, assignment.spec.members.clone(), stop_rx));
        PodHandle {
            assignment,
            status,
            stop,
            task,
            env,
        }
    }

    /// Asks every member to stop; the returned future resolves when they
    /// have and the pod's network is gone.
    pub fn stop(self) -> impl Future<Output = ()> + Send + 'static {
        let _ = self.stop.send(true);
        async move {
            let _ = self.task.await;
            if self.assignment.spec.needs_network() {
                let (network, uid) = (self.env.network.clone(), self.assignment.uid.clone());
                let _ = tokio::task::spawn_blocking(move || network.release(&uid)).await;
            }
        }
    }
}

struct PodCx {
    env: Arc<PodEnv>,
    uid: String,
    namespace: String,
    name: String,
    status: Arc<Mutex<PodStatus>>,
    /// The pod has a network namespace (ports or containers).
    networked: bool,
    pod_ip: Option<std::net::Ipv4Addr>,
}

impl PodCx {
    fn update(&self, f: impl FnOnce(&mut PodStatus)) {
        let snapshot = {
            let mut st = self.status.lock().expect("poisoned");
            f(&mut st);
            derive_phase(&mut st);
            st.clone()
        };
        let _ = self.env.status_tx.send((self.uid.clone(), snapshot));
    }

    fn set_member(&self, idx: usize, f: impl FnOnce(&mut MemberStatus)) {
        self.update(|st| f(&mut st.members[idx]));
    }
}

/// Computes the pod's phase and reason from its members (level-triggered).
pub fn derive_phase(st: &mut PodStatus) {
    let running = st
        .members
        .iter()
        .filter(|m| matches!(m.state, MemberState::Running { .. }))
        .count();
    let terminated: Vec<&Termination> = st
        .members
        .iter()
        .filter_map(|m| match &m.state {
            MemberState::Terminated(t) => Some(t),
            _ => None,
        })
        .collect();
    let ever_started = st.members.iter().any(|m| {
        m.restarts > 0
            || m.last_termination.is_some()
            || !matches!(m.state, MemberState::Waiting { .. })
    });
    st.reason.clear();
    st.message.clear();
    if terminated.len() == st.members.len() && !st.members.is_empty() {
        let failed = terminated
            .iter()
            .find(|t| t.reason != TerminationReason::Completed);
        match failed {
            None => st.phase = PodPhase::Succeeded,
            Some(t) => {
                st.phase = PodPhase::Failed;
                st.reason = t.reason.to_string();
                st.message = t.message.clone();
            }
        }
        return;
    }
    if running > 0 || ever_started {
        st.phase = PodPhase::Running;
        if st.started_ms == 0 {
            st.started_ms = now_ms();
        }
    }
    if let Some(reason) = st.members.iter().find_map(|m| match &m.state {
        MemberState::Waiting { reason } if reason != "Preparing" => Some(reason.clone()),
        _ => None,
    }) {
        st.reason = reason;
    }
}

async fn run_pod(pod: Arc<PodCx>, members: Vec<MemberSpec>, mut stop: watch::Receiver<bool>) {
    let log_dir = pod.env.pod_log_dir(&pod.uid);
    if let Err(e) = tokio::fs::create_dir_all(&log_dir).await {
        fail_all(&pod, &members, format!("cannot create log directory: {e}"));
        return;
    }
    // Prepare every member before starting any, so they start together.
    let mut prepared = Vec::with_capacity(members.len());
    for (idx, m) in members.iter().enumerate() {
        let waiting = match &m.source {
            MemberSource::Module { digest, size } if !pod.env.modules.has(digest, *size) => {
                Some("FetchingModule")
            }
            MemberSource::Module { .. } => None,
            MemberSource::Artifact { .. } | MemberSource::Container { .. } => Some("PullingImage"),
        };
        if let Some(reason) = waiting {
            pod.set_member(idx, |s| {
                s.state = MemberState::Waiting {
                    reason: reason.into(),
                }
            });
        }
        let res = tokio::select! {
            r = prepare(&pod.env, m) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match res {
            Ok(p) => prepared.push(p),
            Err(e) => {
                fail_all(&pod, &members, format!("member {}: {e}", m.name));
                return;
            }
        }
    }
    // The sandbox, then the thread its wasm members run on.
    let sandbox = if pod.networked {
        let (network, uid, ip) = (pod.env.network.clone(), pod.uid.clone(), pod.pod_ip);
        let made = tokio::task::spawn_blocking(move || network.sandbox(&uid, ip))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match made {
            Ok(s) => {
                // Spare namespaces for the next pods, off this one's path.
                let network = pod.env.network.clone();
                tokio::task::spawn_blocking(move || network.refill());
                Some(s)
            }
            Err(e) => {
                fail_all(&pod, &members, format!("pod network: {e}"));
                return;
            }
        }
    } else {
        None
    };
    let thread = match &sandbox {
        Some(s) if prepared.iter().any(|p| matches!(p, Ready::Wasm(_))) => {
            match PodThread::start(&pod.uid, s.netns.as_deref()) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    fail_all(&pod, &members, format!("pod network: {e}"));
                    return;
                }
            }
        }
        _ => None,
    };
    let resolv_conf = match (&sandbox, pod.env.network.cidr()) {
        (Some(Sandbox { ip: Some(_), .. }), Some(cidr)) => Some(format!(
            "nameserver {}\nsearch {}.{d} {d}\noptions ndots:2\n",
            cidr.gateway(),
            pod.namespace,
            d = crate::dns::DOMAIN
        )),
        _ => None,
    };
    let net = Arc::new(MemberNet {
        sandbox,
        thread,
        resolv_conf,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (idx, (m, p)) in members.into_iter().zip(prepared).enumerate() {
        tasks.spawn(run_member(
            pod.clone(),
            idx,
            m,
            p,
            log_dir.clone(),
            stop.clone(),
            net.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
}

/// What members of a networked pod share: the sandbox and the pod thread.
struct MemberNet {
    sandbox: Option<Sandbox>,
    thread: Option<Arc<PodThread>>,
    /// /etc/resolv.conf for containers: the node's DNS responder.
    resolv_conf: Option<String>,
}

/// A member ready to start.
enum Ready {
    Wasm(Arc<Prepared>),
    Container(Arc<container::Prepared>),
}

async fn prepare(env: &PodEnv, m: &MemberSpec) -> Result<Ready, String> {
    let (path, digest) = match &m.source {
        MemberSource::Module { digest, size } => {
            let path = env
                .modules
                .get(digest, *size)
                .await
                .map_err(|e| e.to_string())?;
            (path, digest.clone())
        }
        MemberSource::Container { image, .. } => {
            // `image =` naming a wasm artifact runs in wasmtime, like
            // `wasm = "oci://…"`.
            let artifact = match &env.images {
                Some(images) => {
                    let rec = images
                        .ensure(image, &Platform::host(), &mut |_| {})
                        .await
                        .map_err(|e| e.to_string())?;
                    rec.kind == crate::image::ImageKind::Wasm
                }
                None => false,
            };
            if !artifact {
                let rt = env
                    .containers
                    .as_ref()
                    .ok_or("this node cannot run containers (runc was not found)")?;
                return rt.prepare(image).await.map(Ready::Container);
            }
            registry_wasm(env, image).await?
        }
        MemberSource::Artifact { reference, .. } => registry_wasm(env, reference).await?,
    };
    env.runtime
        .prepare(&path, &digest)
        .await
        .map(Ready::Wasm)
        .map_err(|e| e.to_string())
}

/// The `.wasm` of a registry artifact, pulled into the image store.
async fn registry_wasm(env: &PodEnv, reference: &str) -> Result<(PathBuf, String), String> {
    let images = env
        .images
        .clone()
        .ok_or("this node has no image store for oci:// members")?;
    let rec = images
        .ensure(reference, &Platform::host(), &mut |_| {})
        .await
        .map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || images.wasm(&rec))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

fn fail_all(pod: &PodCx, members: &[MemberSpec], message: String) {
    tracing::warn!(pod = %pod.uid, "{message}");
    pod.update(|st| {
        for m in st.members.iter_mut() {
            m.state = MemberState::Terminated(Termination {
                exit_code: -1,
                reason: TerminationReason::StartError,
                message: message.clone(),
                finished_ms: now_ms(),
            });
        }
    });
    debug_assert_eq!(
        members.len(),
        pod.status.lock().expect("poisoned").members.len()
    );
}

async fn run_member(
    pod: Arc<PodCx>,
    idx: usize,
    spec: MemberSpec,
    prepared: Ready,
    log_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
    net: Arc<MemberNet>,
) {
    let env = &pod.env;
    let paths = LogPaths::new(&log_dir, &spec.name);
    let mut backoff = Backoff::new(env.restart_min, env.restart_max, env.restart_reset);
    // What a member may know about itself (see the sdk crate).
    let mut member_env = spec.env.clone();
    member_env.insert(ENV_POD.into(), pod.name.clone());
    member_env.insert(ENV_NAMESPACE.into(), pod.namespace.clone());
    member_env.insert(ENV_MEMBER.into(), spec.name.clone());
    member_env.insert(ENV_POD_UID.into(), pod.uid.clone());
    // Services of the pod's namespace known when it starts (as Kubernetes
    // does); the member's own variables win.
    for (k, v) in crate::proxy::service_env(&env.proxy.table(), &pod.namespace) {
        member_env.entry(k).or_insert(v);
    }
    let mut restarts: u32 = 0;
    // A container left running (or ended) while the agent was away.
    let mut found = match (&prepared, &env.containers) {
        (Ready::Container(_), Some(rt)) => rt.find(&pod.uid, &spec.name),
        _ => Found::Nothing,
    };
    loop {
        let began = Instant::now();
        let outcome = match &prepared {
            Ready::Wasm(p) => {
                if let Err(e) = paths.start_new_run() {
                    tracing::warn!(pod = %pod.uid, member = %spec.name, "cannot rotate log: {e}");
                }
                let log = LogSink::new(paths.clone(), env.log_cap);
                pod.set_member(idx, |m| {
                    m.state = MemberState::Running { since_ms: now_ms() };
                    m.restarts = restarts;
                });
                let run = {
                    let (runtime, p, spec, member_env, log) = (
                        env.runtime.clone(),
                        p.clone(),
                        spec.clone(),
                        member_env.clone(),
                        log.clone(),
                    );
                    let network = net.thread.is_some();
                    async move {
                        let spec_run = RunSpec {
                            argv0: &spec.name,
                            args: &spec.args,
                            env: &member_env,
                            memory_limit: spec.resources.memory.map(|b| b.0),
                            cpu_time: spec.resources.cpu_time.map(|m| m.as_duration()),
                            log,
                            network,
                        };
                        match runtime.start(&p, spec_run).await {
                            Ok(started) => started.run().await,
                            Err(exit) => exit,
                        }
                    }
                };
                // Members of a networked pod run on the pod's thread, inside
                // its namespace; the others on the agent's runtime.
                let run = async {
                    match &net.thread {
                        Some(t) => t.spawn(run).await.unwrap_or_else(|e| {
                            Exit::new(-1, TerminationReason::Error, format!("pod thread: {e}"))
                        }),
                        None => run.await,
                    }
                };
                let outcome = tokio::select! {
                    exit = run => Some(exit),
                    _ = stop.wait_for(|s| *s) => None,
                };
                if let Some(exit) = &outcome
                    && !exit.message.is_empty()
                {
                    let _ = log.write_all(
                        format!("[flotilla] {}: {}\n", exit.reason, exit.message).as_bytes(),
                    );
                }
                outcome
            }
            Ready::Container(p) => {
                let rt = env.containers.as_ref().expect("prepared as a container");
                let outcome = run_container(
                    &pod,
                    idx,
                    rt,
                    p,
                    &spec,
                    &paths,
                    (
                        &log_dir,
                        net.sandbox.as_ref().and_then(|s| s.netns.as_deref()),
                        net.resolv_conf.as_deref(),
                    ),
                    &member_env,
                    &mut restarts,
                    std::mem::replace(&mut found, Found::Nothing),
                    &mut stop,
                )
                .await;
                if let Some(exit) = &outcome
                    && !exit.message.is_empty()
                {
                    let log = LogSink::new(paths.clone(), env.log_cap);
                    let _ = log.write_all(
                        format!("[flotilla] {}: {}\n", exit.reason, exit.message).as_bytes(),
                    );
                }
                outcome
            }
        };
        let Some(exit) = outcome else {
            pod.set_member(idx, |m| {
                m.state = MemberState::Terminated(termination(&Exit {
                    code: 137,
                    reason: TerminationReason::Stopped,
                    message: "pod stopped".into(),
                }))
            });
            return;
        };
        let term = termination(&exit);
        if !spec.restart.restarts(exit.success()) {
            pod.set_member(idx, |m| {
                m.last_termination = Some(term.clone());
                m.state = MemberState::Terminated(term);
            });
            return;
        }
        let delay = backoff.next(began.elapsed());
        restarts = restarts.saturating_add(1);
        pod.set_member(idx, |m| {
            m.last_termination = Some(term.clone());
            m.restarts = restarts;
            m.state = MemberState::Waiting {
                reason: "CrashLoopBackOff".into(),
            };
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => {
                pod.set_member(idx, |m| m.state = MemberState::Terminated(term));
                return;
            }
        }
    }
}

/// One run of a container member: starts it (or re-adopts the one a previous
/// agent left), waits for its end or for the pod to stop. `None`: stopped.
#[allow(clippy::too_many_arguments)]
async fn run_container(
    pod: &PodCx,
    idx: usize,
    rt: &ContainerRuntime,
    prepared: &container::Prepared,
    spec: &MemberSpec,
    paths: &LogPaths,
    (log_dir, netns, resolv_conf): (&Path, Option<&Path>, Option<&str>),
    member_env: &flotilla_api::Labels,
    restarts: &mut u32,
    found: Found,
    stop: &mut watch::Receiver<bool>,
) -> Option<Exit> {
    let mut running = match found {
        Found::Running(r) => {
            tracing::info!(pod = %pod.uid, member = %spec.name, pid = r.pid, "re-adopted running container");
            *restarts = r.restarts;
            *r
        }
        Found::Exited { exit, restarts: r } => {
            // It ended while the agent was away: that run counts.
            *restarts = r;
            rt.remove(&ContainerRuntime::id(&pod.uid, &spec.name)).await;
            return Some(exit);
        }
        Found::Nothing => {
            if let Err(e) = paths.start_new_run() {
                tracing::warn!(pod = %pod.uid, member = %spec.name, "cannot rotate log: {e}");
            }
            // What the agent adds to the member's own variables (those
            // are in the spec already): its identity and the services.
            let extra: Vec<(String, String)> = member_env
                .iter()
                .filter(|(k, _)| !spec.env.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let start_spec = StartSpec {
                pod_uid: &pod.uid,
                pod_name: &pod.name,
                member: spec,
                log_dir,
                extra_env: &extra,
                restarts: *restarts,
                netns,
                resolv_conf,
            };
            // A start is not cancelled half-way (the shim could be left
            // running with nobody to clean up after it); a stop asked for
            // meanwhile is honoured right after.
            match rt.start(prepared, &start_spec).await {
                Ok(r) => r,
                Err(exit) => return Some(exit),
            }
        }
    };
    let since = running.started_ms;
    let count = *restarts;
    pod.set_member(idx, |m| {
        m.state = MemberState::Running { since_ms: since };
        m.restarts = count;
    });
    let grace = Duration::from_secs(u64::from(
        spec.container_options()
            .and_then(|c| c.grace_period)
            .unwrap_or(10),
    ));
    let exited = if *stop.borrow() {
        None
    } else {
        tokio::select! {
            exit = running.wait() => Some(exit),
            _ = stop.wait_for(|s| *s).map(|_| ()) => None,
        }
    };
    let outcome = match exited {
        Some(exit) => Some(exit),
        None => {
            running.stop(grace).await;
            None
        }
    };
    rt.remove(&running.id).await;
    outcome
}

fn termination(exit: &Exit) -> Termination {
    Termination {
        exit_code: exit.code,
        reason: exit.reason,
        message: exit.message.clone(),
        finished_ms: now_ms(),
    }
}
