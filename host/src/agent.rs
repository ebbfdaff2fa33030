//! The agent's pod reconciler: the desired pods (from the scheduler) against the
//! pods running here. Level-triggered: a `Sync` carries the whole desired set.

use crate::logs::{LogPaths, read_log};
use crate::pod::{PodEnv, PodHandle};
use flotilla_api::PodStatus;
use flotilla_api::proto::{Assignment, LogRequest, SchedulerMsg};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

/// Pods on this node, by uid.
pub struct Agent {
    env: Arc<PodEnv>,
    pods: HashMap<String, PodHandle>,
    /// Each pod's assignment as saved JSON, serialized once when assigned.
    saved: HashMap<String, Arc<[u8]>>,
    /// The thread that writes the state file (the desired pods, so a
    /// restarted agent runs them again without reaching the scheduler),
    /// off the pod-starting path.
    saver: Option<std::sync::mpsc::Sender<Vec<Arc<[u8]>>>>,
}

/// How long the state writer gathers changes before writing: a burst of
/// assignments becomes one write, not one per pod.
const SAVE_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(25);

/// Writes the state file from its own thread: only the newest contents
/// queued within [`SAVE_DEBOUNCE`] are written (atomically: a crash leaves
/// the old or the new file).
fn spawn_saver(path: PathBuf) -> std::sync::mpsc::Sender<Vec<Arc<[u8]>>> {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Arc<[u8]>>>();
    let spawned = std::thread::Builder::new()
        .name("pod-state".into())
        .spawn(move || {
            while let Ok(mut bytes) = rx.recv() {
                let until = std::time::Instant::now() + SAVE_DEBOUNCE;
                loop {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(newer) => bytes = newer,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                        // The agent is gone: write what we have and stop.
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                // A JSON array of the assignments.
                let mut out =
                    Vec::with_capacity(bytes.iter().map(|b| b.len() + 1).sum::<usize>() + 2);
                out.push(b'[');
                for (i, b) in bytes.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(b);
                }
                out.push(b']');
                let tmp = path.with_extension("tmp");
                let res = std::fs::write(&tmp, &out).and_then(|()| std::fs::rename(&tmp, &path));
                if let Err(e) = res {
                    tracing::error!("cannot save local pod state to {}: {e}", path.display());
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the pod state writer: {e}");
    }
    tx
}

impl Agent {
    pub fn new(env: Arc<PodEnv>) -> Agent {
        Agent {
            env,
            pods: HashMap::new(),
            saved: HashMap::new(),
            saver: None,
        }
    }

    /// An agent that saves its desired pods to `state_file` and starts with
    /// the ones saved there by its previous run.
    pub fn with_state(env: Arc<PodEnv>, state_file: PathBuf) -> Agent {
        let saved: Vec<Assignment> = std::fs::read(&state_file)
            .ok()
            .and_then(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| {
                        tracing::warn!("ignoring unreadable {}: {e}", state_file.display())
                    })
                    .ok()
            })
            .unwrap_or_default();
        // Logs of pods that are not coming back are dropped.
        let keep: HashSet<&str> = saved.iter().map(|a| a.uid.as_str()).collect();
        if let Ok(dirs) = std::fs::read_dir(&env.log_dir) {
            for d in dirs.flatten() {
                if !keep.contains(d.file_name().to_string_lossy().as_ref()) {
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
        // So are the volumes of pods that are not coming back (unmounted
        // first: secret volumes are tmpfs mounts).
        if let Ok(dirs) = std::fs::read_dir(&env.volumes_dir) {
            for d in dirs.flatten() {
                if !keep.contains(d.file_name().to_string_lossy().as_ref()) {
                    crate::volume::PodVolumes::remove_stale(env.volume_sys.as_ref(), &d.path());
                }
            }
        }
        let mut agent = Agent {
            env,
            pods: HashMap::new(),
            saver: Some(spawn_saver(state_file)),
            saved: HashMap::new(),
        };
        if !saved.is_empty() {
            tracing::info!(pods = saved.len(), "restoring pods from local state");
        }
        // Pods that must not outlive the node's lease wait for the scheduler.
        for a in saved {
            if a.spec.on_disconnect.is_keep() {
                agent.assign(a);
            }
        }
        agent
    }

    /// Saves the desired pods (atomically: a crash leaves the old or the new file).
    fn save(&self) {
        let Some(saver) = &self.saver else { return };
        // The writer assembles the file from the pods' saved forms.
        let _ = saver.send(self.saved.values().cloned().collect());
    }

    pub fn env(&self) -> &Arc<PodEnv> {
        &self.env
    }

    /// Applies one message from the scheduler.
    pub fn handle(&mut self, msg: SchedulerMsg) {
        let changes = matches!(
            msg,
            SchedulerMsg::Sync { .. } | SchedulerMsg::Assign(_) | SchedulerMsg::Unassign { .. }
        );
        self.apply(msg);
        if changes {
            self.save();
        }
    }

    fn apply(&mut self, msg: SchedulerMsg) {
        match msg {
            SchedulerMsg::Sync { pods, .. } => {
                let wanted: HashSet<&str> = pods.iter().map(|a| a.uid.as_str()).collect();
                let gone: Vec<String> = self
                    .pods
                    .keys()
                    .filter(|uid| !wanted.contains(uid.as_str()))
                    .cloned()
                    .collect();
                for uid in gone {
                    self.unassign(&uid);
                }
                for a in pods {
                    self.assign(a);
                }
                self.forget_unused_inputs();
            }
            SchedulerMsg::Assign(a) => self.assign(a),
            SchedulerMsg::Unassign { uid } => {
                // Only a pod that used ConfigMaps or Secrets can leave some
                // unused (the check walks every pod: 10,000 unassigned
                // pods must not make it quadratic).
                let had_inputs = self.pods.get(&uid).is_some_and(|h| {
                    !flotilla_api::config::input_keys(&h.assignment.spec, &h.assignment.namespace)
                        .is_empty()
                });
                self.unassign(&uid);
                if had_inputs {
                    self.forget_unused_inputs();
                }
            }
            SchedulerMsg::Services { services, .. } => {
                // Virtual IPs live on the bridge: the first service brings it.
                if !services.is_empty()
                    && let Err(e) = self.env.network.ensure_bridge()
                {
                    tracing::error!("pod network: {e}");
                }
                self.env.network.set_services(&services);
                self.env.proxy.update(services)
            }
            SchedulerMsg::Peers { peers, .. } => self.env.network.set_peers(&peers),
            SchedulerMsg::Input(obj) => self.env.inputs.put(*obj),
            SchedulerMsg::Welcome { .. }
            | SchedulerMsg::Refused { .. }
            | SchedulerMsg::Redirect { .. }
            | SchedulerMsg::HeartbeatAck { .. }
            | SchedulerMsg::Joined { .. }
            | SchedulerMsg::Renewed { .. } => {}
        }
    }

    fn assign(&mut self, a: Assignment) {
        if self.pods.contains_key(&a.uid) {
            return;
        }
        tracing::info!(pod = %format!("{}/{}", a.namespace, a.name), uid = %a.uid, ip = %a.pod_ip, "starting pod");
        let uid = a.uid.clone();
        if self.saver.is_some() {
            match serde_json::to_vec(&a) {
                Ok(b) => {
                    self.saved.insert(uid.clone(), b.into());
                }
                Err(e) => tracing::error!("cannot serialize pod {uid} for local state: {e}"),
            }
        }
        self.pods.insert(uid, PodHandle::start(self.env.clone(), a));
    }

    /// Drops ConfigMaps and Secrets no pod here refers to (but for the
    /// gateway's certificates).
    fn forget_unused_inputs(&self) {
        let used: HashSet<String> = self
            .pods
            .values()
            .flat_map(|h| {
                flotilla_api::config::input_keys(&h.assignment.spec, &h.assignment.namespace)
            })
            .chain(crate::net::gateway_tls::certificate_keys(&self.env.inputs))
            .collect();
        self.env.inputs.retain(&used);
    }

    fn unassign(&mut self, uid: &str) {
        let Some(handle) = self.pods.remove(uid) else {
            return;
        };
        self.saved.remove(uid);
        tracing::info!(pod = %format!("{}/{}", handle.assignment.namespace, handle.assignment.name), ip = %handle.assignment.pod_ip, "stopping pod");
        let dir = self.env.pod_log_dir(uid);
        // A pod with an address lets the scheduler hand it out again once
        // its network is gone.
        let addressed = !handle.assignment.pod_ip.is_empty();
        let news = self.env.status_tx.clone();
        let uid = uid.to_string();
        let stopped = handle.stop();
        let runtime = self.env.runtime.clone();
        tokio::spawn(async move {
            // A network that could not be removed keeps its address held
            // (the scheduler's quarantine frees it later).
            if stopped.await && addressed {
                let _ = news.send(crate::pod::PodNews::Released(uid));
            }
            let _ = tokio::fs::remove_dir_all(dir).await;
            // Compiled code no other pod uses leaves memory with the pod.
            let _ = tokio::task::spawn_blocking(move || {
                let n = runtime.release_unused();
                if n > 0 {
                    tracing::debug!(modules = n, "released compiled code no pod uses");
                }
            })
            .await;
        });
    }

    /// The node's lease ran out: pods with `on_disconnect = Stop` stop and
    /// leave the local state (they run again only if a new registration's
    /// Sync still assigns them here).
    pub fn lease_expired(&mut self) {
        let fenced: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, h)| !h.assignment.spec.on_disconnect.is_keep())
            .map(|(uid, _)| uid.clone())
            .collect();
        if fenced.is_empty() {
            return;
        }
        for uid in fenced {
            self.unassign(&uid);
        }
        self.save();
    }

    /// Current status of every pod, for a resync after reconnecting.
    pub fn statuses(&self) -> Vec<(String, PodStatus)> {
        self.pods
            .iter()
            .map(|(uid, h)| (uid.clone(), h.status.lock().expect("poisoned").clone()))
            .collect()
    }

    /// `uid → (namespace, name)` of the pods assigned here.
    pub fn pod_names(&self) -> HashMap<String, (String, String)> {
        self.pods
            .iter()
            .map(|(uid, h)| {
                (
                    uid.clone(),
                    (h.assignment.namespace.clone(), h.assignment.name.clone()),
                )
            })
            .collect()
    }

    /// Uids of the pods assigned here.
    pub fn pod_uids(&self) -> HashSet<String> {
        self.pods.keys().cloned().collect()
    }

    /// Image references the pods here run (kept by image pruning).
    pub fn image_refs(&self) -> HashSet<String> {
        self.pods
            .values()
            .flat_map(|h| h.assignment.spec.members.iter())
            .filter_map(|m| m.pull_ref())
            .filter_map(|r| crate::image::parse_ref(&r).ok().map(|r| r.whole()))
            .collect()
    }

    /// Digests of the uploaded modules the pods here run (kept in the
    /// node's module cache).
    pub fn module_digests(&self) -> HashSet<String> {
        self.pods
            .values()
            .flat_map(|h| h.assignment.spec.members.iter())
            .filter_map(|m| m.module_digest().map(str::to_string))
            .collect()
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Asks every pod to stop; await the returned futures (outside any lock).
    /// The node stops proxying services first: its pods need not wait to
    /// leave endpoints nobody here will serve.
    pub fn stop_all(&mut self) -> Vec<impl Future<Output = ()> + Send + 'static> {
        self.env.proxy.update(Vec::new());
        self.pods
            .drain()
            .map(|(_, h)| {
                let stopped = h.stop();
                async move {
                    let _ = stopped.await;
                }
            })
            .collect()
    }

    /// Resolves a log request to the files to read, or says why it cannot.
    pub fn log_paths(&self, req: &LogRequest) -> Result<LogPaths, String> {
        let pod = self
            .pods
            .get(&req.pod_uid)
            .ok_or_else(|| "the pod is not running on this node".to_string())?;
        if !pod
            .assignment
            .spec
            .members
            .iter()
            .any(|m| m.name == req.member)
        {
            let names: Vec<&str> = pod
                .assignment
                .spec
                .members
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            return Err(format!(
                "pod has no member '{}'; its members are: {}",
                req.member,
                names.join(", ")
            ));
        }
        Ok(LogPaths::new(
            &self.env.pod_log_dir(&req.pod_uid),
            &req.member,
        ))
    }
}

/// Reads the existing log for a request (the first chunk of a log stream).
pub fn initial_log(paths: &LogPaths, req: &LogRequest) -> Result<Vec<u8>, String> {
    read_log(paths, req.previous, req.tail_lines).map_err(|e| e.to_string())
}
