//! One pod on the agent: prepares every member, starts them together, restarts
//! them per policy with backoff, and stops them together.

use crate::backoff::Backoff;
use crate::executor::container::ContainerMember;
use crate::executor::container::runtime::ContainerRuntime;
use crate::executor::container::sys::IdMap;
use crate::executor::wasm::WasmMember;
use crate::executor::wasm::interfaces::{ConfigCell, KvAccess, Workload};
use crate::executor::wasm::runtime::{Exit, WasmRuntime};
use crate::executor::{Prepared, Recovered, RunCx};
use crate::image::{ImageStore, Platform};
use crate::logs::{LogPaths, LogSink};
use crate::net::podnet::{PodNetwork, PodThread, Sandbox};
use flotilla_api::proto::Assignment;
use flotilla_api::time::now_ms;
use flotilla_api::{
    MemberSource, MemberSpec, MemberState, MemberStatus, PodPhase, PodStatus, Termination,
    TerminationReason,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Shared settings and services of every pod on this agent.
pub struct PodEnv {
    pub runtime: Arc<WasmRuntime>,
    /// Uploaded modules: the node's cache, filled from the scheduler.
    pub modules: Arc<crate::link::fetch::ModuleFetcher>,
    /// Image store for `oci://` wasm members (none: such members fail).
    pub images: Option<Arc<ImageStore>>,
    /// Container executor (none: this node has no runc).
    pub containers: Option<Arc<ContainerRuntime>>,
    /// Pod sandboxes (network namespaces, the node bridge).
    pub network: Arc<PodNetwork>,
    /// The service table and proxy.
    pub proxy: Arc<crate::net::proxy::Proxy>,
    pub log_dir: PathBuf,
    pub log_cap: u64,
    pub restart_min: Duration,
    pub restart_max: Duration,
    pub restart_reset: Duration,
    /// Receives a pod's status whenever it changes, and its release.
    pub status_tx: mpsc::UnboundedSender<PodNews>,
    /// This node's name (`{ field = "node.name" }`).
    pub node_name: String,
    /// ConfigMaps and Secrets the scheduler sent for this node's pods.
    pub inputs: Arc<crate::inputs::InputStore>,
    /// Where pods' volumes are made (`<dir>/<pod uid>/<volume>`).
    pub volumes_dir: PathBuf,
    pub volume_sys: Arc<dyn crate::volume::VolumeSys>,
    /// Pod threads outside any namespace, started ahead for pods whose
    /// wasm members mount volumes (a thread and its runtime take about a
    /// millisecond to start).
    pub spare_threads: Mutex<Vec<PodThread>>,
    /// The runtime pods run on: threads of their own, so the link, its
    /// heartbeats and (all-in-one) the scheduler never wait in a queue
    /// behind thousands of starting members.
    pub workloads: tokio::runtime::Handle,
    /// Runs tcp probes and makes probe sockets inside pods' namespaces (started at first use).
    pub prober: Arc<crate::probe::Prober>,
    /// What running members use (metrics).
    pub meters: Arc<crate::metrics::Meters>,
    /// Where members' `wasi:keyvalue` operations go (the scheduler).
    pub kv: Arc<dyn crate::executor::wasm::interfaces::KvClient>,
}

/// What the link tells the scheduler about a node's pods.
#[derive(Clone, Debug, PartialEq)]
pub enum PodNews {
    /// `(pod uid, status)`: the pod's status changed.
    Status(String, PodStatus),
    /// The pod (uid) was stopped and its network removed: its address is free.
    Released(String),
    /// What the node and its members use now (sent only while connected).
    Usage(flotilla_api::proto::UsageReport),
    /// The gateway holds requests for the function behind this Service
    /// `(namespace, name)`, which has no ready instance (sent only while
    /// connected; the gateway repeats it while requests wait).
    Wake(String, String),
}

/// How many spare pod threads are kept ready.
const SPARE_THREADS: usize = 2;

impl PodEnv {
    pub fn pod_log_dir(&self, uid: &str) -> PathBuf {
        self.log_dir.join(uid)
    }

    pub fn pod_volumes_dir(&self, uid: &str) -> PathBuf {
        self.volumes_dir.join(uid)
    }

    /// A pod thread outside any namespace: a spare if one is ready (more
    /// are started off this path).
    fn thread_for_files(self: &Arc<Self>) -> Result<PodThread, String> {
        let spare = self.spare_threads.lock().expect("poisoned").pop();
        let env = self.clone();
        tokio::task::spawn_blocking(move || env.refill_threads());
        match spare {
            Some(t) => Ok(t),
            None => PodThread::start("files", None).map_err(|e| e.to_string()),
        }
    }

    fn refill_threads(&self) {
        while self.spare_threads.lock().expect("poisoned").len() < SPARE_THREADS {
            match PodThread::start("spare", None) {
                Ok(t) => self.spare_threads.lock().expect("poisoned").push(t),
                Err(e) => {
                    tracing::warn!("cannot start a spare pod thread: {e}");
                    return;
                }
            }
        }
    }

    /// Where the persistent Volumes of a namespace keep their data.
    pub fn persistent_dir(&self, namespace: &str) -> PathBuf {
        self.volumes_dir
            .with_file_name("persistent")
            .join(namespace)
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
                    ready: m.readiness.as_ref().map(|_| false),
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
        let task = env
            .workloads
            .spawn(run_pod(pod, assignment.spec.clone(), stop_rx));
        PodHandle {
            assignment,
            status,
            stop,
            task,
            env,
        }
    }

    /// Asks every member to stop; resolves once they have, and then to
    /// whether the pod's network is gone with them (true for a pod without
    /// one).
    pub fn stop(self) -> impl Future<Output = bool> + Send + 'static {
        let _ = self.stop.send(true);
        async move {
            let _ = self.task.await;
            if !self.assignment.spec.needs_network() {
                return true;
            }
            let (network, uid) = (self.env.network.clone(), self.assignment.uid.clone());
            tokio::task::spawn_blocking(move || network.release(&uid))
                .await
                .unwrap_or(false)
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
        let _ = self
            .env
            .status_tx
            .send(PodNews::Status(self.uid.clone(), snapshot));
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

async fn run_pod(pod: Arc<PodCx>, spec: flotilla_api::PodSpec, mut stop: watch::Receiver<bool>) {
    let members = spec.members.clone();
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
    // Environments and volumes, from the ConfigMaps and Secrets the
    // scheduler sent: a pod missing one waits, saying which, and starts by
    // itself once it arrives.
    let mut inputs_changed = pod.env.inputs.subscribe();
    let (envs, configs, volumes) = loop {
        inputs_changed.borrow_and_update();
        let objects = pod.env.inputs.snapshot();
        let held = flotilla_api::config::ByKey {
            namespace: &pod.namespace,
            objects: &objects,
        };
        match resolve_inputs(&pod, &spec, &held) {
            Ok(r) => break r,
            Err(reason) => {
                pod.update(|st| {
                    for m in st.members.iter_mut() {
                        m.state = MemberState::Waiting {
                            reason: reason.clone(),
                        };
                    }
                });
                tokio::select! {
                    r = inputs_changed.changed() => if r.is_err() { return },
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    };
    // Removed when the pod ends, however it ends.
    let volumes = VolumesGuard(volumes);
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
    // Wasm members of a pod with a network, or with volumes they mount,
    // run on a thread of the pod's own: inside its namespace, and free to
    // block on file I/O without holding up anyone else.
    let wasm = prepared
        .iter()
        .any(|p| p.runtime() == flotilla_api::RUNTIME_WASM);
    let mounts_files = members.iter().any(|m| !m.mounts.is_empty());
    let thread = if wasm && (sandbox.is_some() || mounts_files) {
        let made = match sandbox.as_ref() {
            Some(s) => PodThread::start(&pod.uid, s.netns.as_deref()).map_err(|e| e.to_string()),
            None => pod.env.thread_for_files(),
        };
        match made {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                fail_all(&pod, &members, format!("pod thread: {e}"));
                return;
            }
        }
    } else {
        None
    };
    let resolv_conf = match (&sandbox, pod.env.network.cidr()) {
        (Some(Sandbox { ip: Some(_), .. }), Some(cidr)) => Some(format!(
            "nameserver {}\nsearch {}.{d} {d}\noptions ndots:2\n",
            cidr.gateway(),
            pod.namespace,
            d = crate::net::dns::DOMAIN
        )),
        _ => None,
    };
    let netns = sandbox.as_ref().and_then(|s| s.netns.clone());
    for p in &prepared {
        p.attach_net(
            thread.as_ref(),
            sandbox.is_some(),
            netns.as_deref(),
            resolv_conf.as_deref(),
        );
    }
    // The sandbox lives as long as the members run.
    let _sandbox = sandbox;
    // A user namespace for the pod's containers: a host ID range the pod
    // holds until it ends here (kept through agent restarts).
    let userns = match &pod.env.containers {
        Some(rt)
            if prepared
                .iter()
                .any(|p| p.runtime() == flotilla_api::RUNTIME_RUNC)
                && spec
                    .user_namespace
                    .unwrap_or(rt.user_namespaces_by_default()) =>
        {
            match rt.user_ranges().acquire(&pod.uid) {
                Ok(map) => Some((rt.clone(), map)),
                Err(e) => {
                    fail_all(&pod, &members, format!("user namespace: {e}"));
                    return;
                }
            }
        }
        _ => None,
    };
    if let Some((_, map)) = &userns {
        for p in &prepared {
            p.attach_userns(*map);
        }
    }
    // Containers' writable layers, with their caps.
    let scratch: Vec<Scratch> = members
        .iter()
        .zip(&prepared)
        .filter_map(|(m, p)| {
            let (dir, default) = p.scratch(&pod.uid, &m.name)?;
            Some(Scratch {
                member: m.name.clone(),
                dir,
                limit: m.resources.disk.map_or(default, |b| b.0),
            })
        })
        .collect();
    // Where members' probes connect: inside the pod's namespace.
    let probe_target = if members
        .iter()
        .any(|m| m.probes().next().is_some() || m.pre_stop.is_some())
    {
        let ns = match netns.as_deref().map(std::fs::File::open).transpose() {
            Ok(ns) => ns.map(Arc::new),
            Err(e) => {
                fail_all(
                    &pod,
                    &members,
                    format!("opening the pod's namespace for probes: {e}"),
                );
                if let Some((rt, _)) = &userns {
                    rt.user_ranges().release(&pod.uid);
                }
                return;
            }
        };
        Some(Arc::new(crate::probe::Target {
            netns: ns,
            prober: pod.env.prober.clone(),
        }))
    } else {
        None
    };
    let sink: Arc<dyn StatusSink> = pod.clone();
    let mut tasks = tokio::task::JoinSet::new();
    // Members stop when the pod is stopped, or when the node evicts it.
    let (stop_members, members_stop) = watch::channel(false);
    // What each member's wasi:config answers, updated below as its
    // ConfigMaps change.
    let config_cells: Vec<ConfigCell> = configs.into_iter().map(ConfigCell::new).collect();
    for (idx, ((m, p), env)) in members.into_iter().zip(prepared).zip(envs).enumerate() {
        let workload = Workload {
            member: m.name.clone(),
            asked: m.wasi.clone(),
            config: config_cells[idx].clone(),
            kv: (!m.wasi.keyvalue.is_empty()).then(|| KvAccess {
                client: pod.env.kv.clone(),
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
            }),
        };
        let mounts = volumes.0.mounts(&m, &spec);
        if let Some((_, map)) = &userns
            && p.runtime() == flotilla_api::RUNTIME_RUNC
        {
            // The namespace's root owns the volumes it may write (their
            // top directories; what others wrote keeps its owner).
            for v in mounts.iter().filter(|v| !v.read_only) {
                if let Err(e) = std::os::unix::fs::chown(&v.host, Some(map.host), Some(map.host)) {
                    tracing::warn!(pod = %pod.uid, volume = %v.host.display(), "cannot hand the volume to the pod's user namespace: {e}");
                }
            }
        }
        let probes = if m.probes().next().is_some() || m.pre_stop.is_some() {
            probe_target.clone()
        } else {
            None
        };
        let cx = MemberCx {
            probes,
            idx,
            pod_uid: pod.uid.clone(),
            pod_name: pod.name.clone(),
            env,
            mounts,
            log: LogPaths::new(&log_dir, &m.name),
            log_dir: log_dir.clone(),
            log_cap: pod.env.log_cap,
            backoff: Backoff::new(
                pod.env.restart_min,
                pod.env.restart_max,
                pod.env.restart_reset,
            ),
            spec: m,
            meters: Some(pod.env.meters.clone()),
            workload,
        };
        tasks.spawn(supervise(cx, p, sink.clone(), members_stop.clone()));
    }
    let mut volumes = volumes;
    let mut evicted: Option<String> = None;
    let mut stopping = false;
    let mut leaving = false;
    let mut usage_check = tokio::time::interval(USAGE_CHECK);
    usage_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limited = volumes.0.has_disk_limits() || !scratch.is_empty();
    let follows = follows_inputs(&spec);
    loop {
        tokio::select! {
            done = tasks.join_next() => if done.is_none() { break },
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                leaving = true;
            }
            _ = usage_check.tick(), if limited && !stopping => {
                let over = volumes
                    .0
                    .over_limit()
                    .or_else(|| scratch.iter().find_map(Scratch::over));
                if let Some(why) = over {
                    tracing::warn!(pod = %pod.uid, "evicting: {why}");
                    evicted = Some(why);
                    stopping = true;
                    let _ = stop_members.send(true);
                }
            }
            r = inputs_changed.changed(), if follows => {
                if r.is_err() {
                    continue;
                }
                let objects = pod.env.inputs.snapshot();
                let held = flotilla_api::config::ByKey {
                    namespace: &pod.namespace,
                    objects: &objects,
                };
                for name in volumes.0.refresh(&held) {
                    tracing::info!(pod = %pod.uid, volume = %name, "volume updated");
                }
                for (m, cell) in spec.members.iter().zip(&config_cells) {
                    if m.wasi.config.is_empty() {
                        continue;
                    }
                    // A ConfigMap gone or not text keeps the last values.
                    match flotilla_api::config::config_values(m, &held) {
                        Ok(v) => {
                            if cell.set(v) {
                                tracing::info!(pod = %pod.uid, member = %m.name, "wasi:config updated");
                            }
                        }
                        Err(why) => tracing::warn!(pod = %pod.uid, member = %m.name, "wasi:config keeps its values: {why}"),
                    }
                }
            }
        }
        if std::mem::take(&mut leaving) {
            // Out of every service's endpoints before any member is told
            // to stop, so no new connection reaches a member going away.
            if let Some(ip) = pod.pod_ip {
                leave_endpoints(&pod.env.proxy, &ip.to_string(), LEAVE_ENDPOINTS).await;
                // The requests the node's proxy already brought finish.
                if !pod.env.proxy.drained(ip.into(), DRAIN).await {
                    tracing::info!(%ip, open = ?pod.env.proxy.open_conns(ip.into()), "connections to the pod still open after {DRAIN:?}; stopping its members");
                }
            }
            let _ = stop_members.send(true);
        }
    }
    if let Some(why) = evicted {
        pod.update(|st| {
            for m in st.members.iter_mut() {
                m.state = MemberState::Terminated(Termination {
                    exit_code: -1,
                    reason: TerminationReason::Evicted,
                    message: why.clone(),
                    finished_ms: now_ms(),
                });
            }
        });
    }
    // Every member has stopped and the pod's network goes next: a proxied
    // connection still open to it would never hear an answer or a close.
    if let Some(ip) = pod.pod_ip {
        let cut = pod.env.proxy.cut(ip.into());
        if cut > 0 {
            tracing::info!(%ip, "cut {cut} proxied connection(s) to the stopped pod");
        }
    }
    // Every member has stopped: the pod's ID range is free for others.
    if let Some((rt, _)) = userns {
        rt.user_ranges().release(&pod.uid);
    }
}

/// How long a stopping pod waits for the scheduler to take it out of the
/// service endpoints before its members are stopped anyway (a busy
/// scheduler may take seconds to publish the table; a pod stopped while
/// the node shuts down is not waited for: the node's table is emptied
/// first).
const LEAVE_ENDPOINTS: Duration = Duration::from_secs(10);

/// How long a pod out of the endpoints waits for the connections the
/// node's proxy holds to it to end.
const DRAIN: Duration = Duration::from_secs(5);

/// Waits until no service in the node's table lists `ip` as an endpoint
/// (at most `limit`); returns at once for a pod that is in none.
async fn leave_endpoints(proxy: &crate::net::proxy::Proxy, ip: &str, limit: Duration) {
    let mut table = proxy.subscribe();
    let listed = |t: &[flotilla_api::proto::ServiceView]| {
        t.iter().any(|s| s.endpoints.iter().any(|e| e == ip))
    };
    if !listed(&table.borrow_and_update()) {
        // The scheduler's table may already have dropped it (it often
        // publishes the change before the pod's stop reaches the node).
        tracing::info!(%ip, "the pod is in no service's endpoints; stopping its members");
        return;
    }
    let left = tokio::time::timeout(limit, table.wait_for(|t| !listed(t))).await;
    match left {
        Ok(_) => tracing::info!(%ip, "the pod left the service endpoints; stopping its members"),
        Err(_) => {
            tracing::info!(%ip, "the pod is still a service endpoint after {limit:?}; stopping its members")
        }
    }
}

/// A container's writable layer and what it may hold.
#[derive(Debug)]
struct Scratch {
    member: String,
    dir: std::path::PathBuf,
    limit: u64,
}

impl Scratch {
    /// Why the layer is over its cap, if it is.
    fn over(&self) -> Option<String> {
        let used = crate::volume::disk_usage(&self.dir);
        (used > self.limit).then(|| {
            format!(
                "container \"{}\" wrote {} to its own filesystem, over its disk limit of {} (resources.disk)",
                self.member,
                flotilla_api::quantity::Bytes(used).human(),
                flotilla_api::quantity::Bytes(self.limit).human()
            )
        })
    }
}

/// How often disk-backed scratch directories with a `size_limit`, and
/// containers' writable layers, are measured.
const USAGE_CHECK: Duration = Duration::from_secs(2);

/// Whether the pod has volumes that follow their ConfigMap or Secret, or
/// members whose `wasi:config` does.
fn follows_inputs(spec: &flotilla_api::PodSpec) -> bool {
    spec.volumes.iter().any(|v| v.input().is_some())
        || spec.members.iter().any(|m| !m.wasi.config.is_empty())
}

/// A pod's volumes, removed when the pod's task ends (or is dropped).
struct VolumesGuard(crate::volume::PodVolumes);

impl Drop for VolumesGuard {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// Every member's environment and `wasi:config` values and the pod's
/// volumes, or why they cannot be made yet (the first missing ConfigMap,
/// Secret or key).
fn resolve_inputs(
    pod: &PodCx,
    spec: &flotilla_api::PodSpec,
    held: &dyn flotilla_api::config::Inputs,
) -> Result<ResolvedInputs, String> {
    let mut envs = Vec::with_capacity(spec.members.len());
    let mut configs = Vec::with_capacity(spec.members.len());
    for m in &spec.members {
        envs.push(member_env(pod, spec, m, held)?);
        configs.push(flotilla_api::config::config_values(m, held)?);
    }
    let volumes = crate::volume::PodVolumes::make(
        pod.env.volume_sys.clone(),
        (
            pod.env.pod_volumes_dir(&pod.uid),
            pod.env.persistent_dir(&pod.namespace),
        ),
        spec,
        held,
    )?;
    Ok((envs, configs, volumes))
}

type ResolvedInputs = (
    Vec<flotilla_api::Labels>,
    Vec<std::collections::BTreeMap<String, String>>,
    crate::volume::PodVolumes,
);

/// Exactly the variables the manifest gives the member (`env_from`, `env`,
/// identity fields it asks for), and, unless the pod turned them off, the
/// services of its namespace known when it starts (as Kubernetes does; the
/// member's own variables win).
fn member_env(
    pod: &PodCx,
    spec: &flotilla_api::PodSpec,
    m: &MemberSpec,
    held: &dyn flotilla_api::config::Inputs,
) -> Result<flotilla_api::Labels, String> {
    let ip = pod.pod_ip.map(|ip| ip.to_string()).unwrap_or_default();
    let who = flotilla_api::config::Identity {
        pod: &pod.name,
        namespace: &pod.namespace,
        uid: &pod.uid,
        ip: &ip,
        node: &pod.env.node_name,
        member: &m.name,
    };
    let mut env: flotilla_api::Labels = flotilla_api::config::resolve_env(m, held, &who)?
        .into_iter()
        .collect();
    if spec.service_links {
        for (k, v) in crate::net::proxy::service_env(&pod.env.proxy.table(), &pod.namespace) {
            env.entry(k).or_insert(v);
        }
    }
    Ok(env)
}

/// A prepared member of either runtime, and how it joins the pod's network
/// (its sandbox is made after every member is prepared).
pub trait PreparedMember: Prepared {
    /// `thread`: the pod's own thread, if it has one; `networked`: the pod
    /// has a sandbox (its members may use sockets).
    fn attach_net(
        &self,
        thread: Option<&Arc<PodThread>>,
        networked: bool,
        netns: Option<&Path>,
        resolv: Option<&str>,
    );
    /// The pod's user namespace mapping (containers only run in one).
    fn attach_userns(&self, _map: IdMap) {}
}

impl PreparedMember for WasmMember {
    fn attach_net(
        &self,
        thread: Option<&Arc<PodThread>>,
        networked: bool,
        _: Option<&Path>,
        _: Option<&str>,
    ) {
        if let Some(t) = thread {
            let _ = self.thread.set(t.clone());
        }
        self.networked
            .store(networked, std::sync::atomic::Ordering::Relaxed);
    }
}

impl PreparedMember for ContainerMember {
    fn attach_net(
        &self,
        _: Option<&Arc<PodThread>>,
        _: bool,
        netns: Option<&Path>,
        resolv: Option<&str>,
    ) {
        let _ = self
            .net
            .set((netns.map(Path::to_path_buf), resolv.map(str::to_string)));
    }

    fn attach_userns(&self, map: IdMap) {
        let _ = self.userns.set(map);
    }
}

async fn prepare(env: &PodEnv, m: &MemberSpec) -> Result<Arc<dyn PreparedMember>, String> {
    let (path, digest) = match &m.source {
        MemberSource::Module { digest, size } => {
            let path = env
                .modules
                .get(digest, *size)
                .await
                .map_err(|e| e.to_string())?;
            (path, digest.clone())
        }
        MemberSource::Container { .. } => {
            let image = &m.pull_ref().unwrap_or_default();
            // `image =` naming a wasm artifact runs in wasmtime, like
            // `wasm = "oci://…"` (unless the scheduler already said so).
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
                let prepared = rt.prepare(image).await?;
                return Ok(Arc::new(ContainerMember::new(rt.clone(), prepared)));
            }
            registry_wasm(env, image).await?
        }
        MemberSource::Artifact { .. } => {
            registry_wasm(env, &m.pull_ref().unwrap_or_default()).await?
        }
    };
    let prepared = env
        .runtime
        .prepare_verified(&path, &digest)
        .await
        .map_err(|e| e.to_string())?;
    // A `health` probe needs the export (an uploaded module was checked at
    // apply; a registry artifact is known only now).
    if let Some((kind, _)) = m.probes().find(|(_, p)| p.calls_health()) {
        prepared
            .health_export()
            .map_err(|e| format!("{kind} probe: {e}"))?;
    }
    Ok(Arc::new(WasmMember::new(env.runtime.clone(), prepared)))
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

/// Where a supervisor reports its member's state.
pub trait StatusSink: Send + Sync {
    fn set_member(&self, idx: usize, f: &mut dyn FnMut(&mut MemberStatus));
}

impl StatusSink for PodCx {
    fn set_member(&self, idx: usize, f: &mut dyn FnMut(&mut MemberStatus)) {
        self.update(|st| f(&mut st.members[idx]));
    }
}

/// What one member's supervisor works with.
pub struct MemberCx {
    pub idx: usize,
    pub pod_uid: String,
    pub pod_name: String,
    pub spec: MemberSpec,
    /// The member's whole environment (resolved from its manifest, and
    /// the service links).
    pub env: flotilla_api::Labels,
    /// The pod's volumes this member mounts.
    pub mounts: Vec<crate::volume::ResolvedMount>,
    pub log: LogPaths,
    pub log_dir: PathBuf,
    pub log_cap: u64,
    pub backoff: Backoff,
    /// Where its probes run (`None`: it has none).
    pub probes: Option<Arc<crate::probe::Target>>,
    /// The node's meters, which measure each run while it lasts.
    pub meters: Option<Arc<crate::metrics::Meters>>,
    /// The host interfaces it asked for, and their providers.
    pub workload: crate::executor::wasm::interfaces::Workload,
}

/// `exec` probes of a member: run in its current run.
struct MemberExec<'a> {
    member: &'a dyn PreparedMember,
    pod_uid: &'a str,
    name: &'a str,
}

impl crate::probe::Exec for MemberExec<'_> {
    fn exec<'a>(&'a self, cmd: &'a [String]) -> crate::executor::BoxFuture<'a, Result<(), String>> {
        self.member.exec(self.pod_uid, self.name, cmd)
    }
    fn health(&self) -> crate::executor::BoxFuture<'_, Result<(), String>> {
        self.member.health(self.pod_uid, self.name)
    }
}

/// How a run ended, as its supervisor saw it.
enum Ended {
    /// By itself.
    Exit(Exit),
    /// The pod is stopping.
    Stop,
    /// Its startup or liveness probe failed (why).
    Unhealthy(String),
}

/// Supervises one member until its pod stops or its restart policy says it
/// is done: recovers a run an earlier agent left, starts runs, waits for
/// them, restarts per policy after a backoff (`CrashLoopBackOff`), and
/// stops the current run (with the member's grace period) when the pod
/// stops. Runtime-agnostic: everything it does to a member goes through
/// [`Prepared`] and [`Run`].
pub async fn supervise(
    mut cx: MemberCx,
    member: Arc<dyn PreparedMember>,
    status: Arc<dyn StatusSink>,
    mut stop: watch::Receiver<bool>,
) {
    let idx = cx.idx;
    let mut grace = Duration::from_secs(u64::from(
        cx.spec
            .container_options()
            .and_then(|c| c.grace_period)
            .unwrap_or(10),
    ));
    // A function drains: the requests it has get their whole timeout.
    if let Some(http) = &cx.spec.http {
        grace = grace.max(http.timeout.duration());
    }
    let mut restarts: u32 = 0;
    let mut recovered = member.recover(&cx.pod_uid, &cx.spec.name).await;
    loop {
        let began = tokio::time::Instant::now();
        let outcome = match std::mem::replace(&mut recovered, Recovered::Nothing) {
            Recovered::Exited { exit, restarts: r } => {
                restarts = r;
                Some(exit)
            }
            found => {
                let started = match found {
                    Recovered::Running { run, restarts: r } => {
                        restarts = r;
                        Ok(run)
                    }
                    _ => {
                        // A fresh run writes a fresh log; the last run's is
                        // kept aside as "previous".
                        if let Err(e) = cx.log.start_new_run() {
                            tracing::warn!(pod = %cx.pod_uid, member = %cx.spec.name, "cannot rotate log: {e}");
                        }
                        member
                            .start(RunCx {
                                pod_uid: &cx.pod_uid,
                                pod_name: &cx.pod_name,
                                member: &cx.spec,
                                env: &cx.env,
                                mounts: &cx.mounts,
                                log: &cx.log,
                                log_dir: &cx.log_dir,
                                log_cap: cx.log_cap,
                                restarts,
                                workload: &cx.workload,
                            })
                            .await
                    }
                };
                match started {
                    Err(exit) => Some(exit),
                    Ok(mut run) => {
                        let _metered = match (&cx.meters, run.meter()) {
                            (Some(meters), Some(m)) => {
                                Some(meters.register(&cx.pod_uid, &cx.spec.name, m))
                            }
                            _ => None,
                        };
                        let (since, count) = (run.started_ms(), restarts);
                        // Not ready until its readiness probe says so.
                        let probed_ready = cx.spec.readiness.as_ref().map(|_| false);
                        status.set_member(idx, &mut |m| {
                            m.state = MemberState::Running { since_ms: since };
                            m.restarts = count;
                            m.ready = probed_ready;
                        });
                        let ended = if *stop.borrow() {
                            Ended::Stop
                        } else {
                            let exec = MemberExec {
                                member: &*member,
                                pod_uid: &cx.pod_uid,
                                name: &cx.spec.name,
                            };
                            let status = &status;
                            let probes = async {
                                match &cx.probes {
                                    Some(target) => {
                                        crate::probe::watch(
                                            cx.spec.startup.as_ref(),
                                            cx.spec.liveness.as_ref(),
                                            cx.spec.readiness.as_ref(),
                                            target,
                                            &exec,
                                            &mut |v| {
                                                status.set_member(idx, &mut |m| m.ready = Some(v))
                                            },
                                        )
                                        .await
                                    }
                                    None => std::future::pending().await,
                                }
                            };
                            tokio::select! {
                                exit = run.wait() => Ended::Exit(exit),
                                _ = stop.wait_for(|s| *s) => Ended::Stop,
                                why = probes => Ended::Unhealthy(why),
                            }
                        };
                        // A stop the agent makes (not a run's own end):
                        // the member's pre_stop hook first, then the
                        // signals, all within its grace period.
                        let exec = MemberExec {
                            member: &*member,
                            pod_uid: &cx.pod_uid,
                            name: &cx.spec.name,
                        };
                        let left = match (&cx.spec.pre_stop, &cx.probes) {
                            (Some(hook), Some(target)) if !matches!(ended, Ended::Exit(_)) => {
                                pre_stop(hook, target, &exec, grace, &cx.log, cx.log_cap).await
                            }
                            _ => grace,
                        };
                        match ended {
                            Ended::Exit(exit) => {
                                run.finish().await;
                                Some(exit)
                            }
                            Ended::Stop => {
                                run.stop(left).await;
                                None
                            }
                            Ended::Unhealthy(why) => {
                                tracing::info!(pod = %cx.pod_uid, member = %cx.spec.name, "restarting: {why}");
                                run.stop(left).await;
                                Some(Exit {
                                    code: 137,
                                    reason: TerminationReason::Unhealthy,
                                    message: why,
                                })
                            }
                        }
                    }
                }
            }
        };
        let Some(exit) = outcome else {
            status.set_member(idx, &mut |m| {
                m.state = MemberState::Terminated(termination(&Exit {
                    code: 137,
                    reason: TerminationReason::Stopped,
                    message: "pod stopped".into(),
                }))
            });
            return;
        };
        if !exit.message.is_empty() {
            let log = LogSink::new(cx.log.clone(), cx.log_cap);
            let _ =
                log.write_all(format!("[flotilla] {}: {}\n", exit.reason, exit.message).as_bytes());
        }
        let term = termination(&exit);
        if !cx.spec.restart.restarts(exit.success()) {
            status.set_member(idx, &mut |m| {
                m.last_termination = Some(term.clone());
                m.state = MemberState::Terminated(term.clone());
            });
            return;
        }
        let delay = cx.backoff.next(began.elapsed());
        restarts = restarts.saturating_add(1);
        let count = restarts;
        status.set_member(idx, &mut |m| {
            m.last_termination = Some(term.clone());
            m.restarts = count;
            m.state = MemberState::Waiting {
                reason: "CrashLoopBackOff".into(),
            };
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => {
                status.set_member(idx, &mut |m| m.state = MemberState::Terminated(term.clone()));
                return;
            }
        }
    }
}

/// Runs a member's `pre_stop` hook within `grace`, noting its outcome in
/// the member's log; returns what is left of the grace period for the stop.
async fn pre_stop(
    hook: &flotilla_api::probe::Hook,
    target: &crate::probe::Target,
    exec: &dyn crate::probe::Exec,
    grace: Duration,
    log: &LogPaths,
    log_cap: u64,
) -> Duration {
    let began = tokio::time::Instant::now();
    let probe = hook.as_probe();
    let Ok(action) = probe.action() else {
        return grace;
    };
    let outcome = match crate::probe::check(&action, target, exec, grace).await {
        Ok(()) => "[flotilla] pre_stop hook done\n".to_string(),
        Err(why) => format!("[flotilla] pre_stop hook failed: {why}\n"),
    };
    let _ = LogSink::new(log.clone(), log_cap).write_all(outcome.as_bytes());
    grace.saturating_sub(began.elapsed())
}

fn termination(exit: &Exit) -> Termination {
    Termination {
        exit_code: exit.code,
        reason: exit.reason,
        message: exit.message.clone(),
        finished_ms: now_ms(),
    }
}

#[cfg(test)]
mod tests;
