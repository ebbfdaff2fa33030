//! The container executor: image → overlay root filesystem → runtime spec →
//! `flotilla shim` → runc. Containers outlive the agent: each has a
//! directory under `<data>/containers/<id>` from which a restarted agent
//! re-adopts it (same PIDs) or learns how it ended while the agent was away.

use crate::executor::container::runc::{SpecInput, build as build_spec};
use crate::executor::container::shim::{
    self, EXIT_FILE, STATE_FILE, ShimArgs, ShimExit, ShimState,
};
use crate::executor::container::sys::{ContainerSys, IdMap, Machine, Overlay, Signal};
use crate::executor::container::userns::UserRanges;
use crate::executor::wasm::runtime::Exit;
use crate::image::{ImageRecord, ImageStore, Platform, RunConfig};
use flotilla_api::{MemberSpec, TerminationReason};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::io::unix::AsyncFd;

/// Settings of the container executor.
pub struct ContainerConfig {
    /// The runc binary.
    pub runc: PathBuf,
    /// The `flotilla` binary (runs `flotilla shim`).
    pub shim_exe: PathBuf,
    /// `<data>/containers`.
    pub root: PathBuf,
    pub log_cap: u64,
    /// What a container may write to its writable layer unless its member
    /// says otherwise (`resources.disk`).
    pub scratch_limit: u64,
    /// Pods run their containers in user namespaces unless they say
    /// otherwise (`user_namespace`; the agent's `--user-namespaces`).
    pub user_namespaces: bool,
}

/// The node's default cap on a container's writable layer.
pub const DEFAULT_SCRATCH_LIMIT: u64 = 10 << 30;

/// Finds runc on PATH (and in the sbin directories PATH may lack).
pub fn find_runc() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/usr/local/sbin",
                "/usr/local/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
}

pub struct ContainerRuntime {
    cfg: ContainerConfig,
    images: Arc<ImageStore>,
    sys: Arc<dyn ContainerSys>,
    ranges: UserRanges,
}

/// An image ready to run: its record, config and unpacked filesystem.
pub struct Prepared {
    pub image: ImageRecord,
    pub run: RunConfig,
    pub rootfs: PathBuf,
}

/// What to start.
pub struct StartSpec<'a> {
    pub pod_uid: &'a str,
    pub pod_name: &'a str,
    pub member: &'a MemberSpec,
    pub log_dir: &'a Path,
    pub env: &'a flotilla_api::Labels,
    pub mounts: &'a [crate::volume::ResolvedMount],
    pub restarts: u32,
    /// The pod's network namespace file (`None`: the node's network).
    pub netns: Option<&'a Path>,
    /// Contents of the container's /etc/resolv.conf (`None`: the image's).
    pub resolv_conf: Option<&'a str>,
    /// The pod's user namespace mapping (`None`: host IDs).
    pub userns: Option<IdMap>,
}

/// How waiting for the shim works: our child, or a re-adopted process.
enum Waiter {
    Child(tokio::process::Child),
    Pidfd(AsyncFd<OwnedFd>),
    /// pidfd unavailable: poll for the exit file.
    Poll,
}

/// A container whose shim is running.
pub struct Running {
    pub id: String,
    dir: PathBuf,
    pub pid: i32,
    pub shim_pid: i32,
    pub started_ms: u64,
    pub restarts: u32,
    waiter: Waiter,
    stopping: bool,
    sys: Arc<dyn ContainerSys>,
}

/// What a restarted agent finds for a container id.
pub enum Found {
    Running(Box<Running>),
    /// It ended while the agent was away.
    Exited {
        exit: Exit,
        restarts: u32,
    },
    Nothing,
}

impl ContainerRuntime {
    pub fn new(cfg: ContainerConfig, images: Arc<ImageStore>) -> std::io::Result<Self> {
        ContainerRuntime::with_sys(cfg, images, Arc::new(Machine))
    }

    /// Like [`ContainerRuntime::new`], on the given machine (a fake in tests).
    pub fn with_sys(
        cfg: ContainerConfig,
        images: Arc<ImageStore>,
        sys: Arc<dyn ContainerSys>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(cfg.root.join(".runc"))?;
        let ranges = UserRanges::open(cfg.root.join(".userns"))?;
        Ok(ContainerRuntime {
            cfg,
            images,
            sys,
            ranges,
        })
    }

    /// The host ID ranges of pods in user namespaces.
    pub fn user_ranges(&self) -> &UserRanges {
        &self.ranges
    }

    /// Whether pods that do not say run their containers in user
    /// namespaces.
    pub fn user_namespaces_by_default(&self) -> bool {
        self.cfg.user_namespaces
    }

    pub fn images(&self) -> &Arc<ImageStore> {
        &self.images
    }

    /// The container id of a pod member.
    pub fn id(pod_uid: &str, member: &str) -> String {
        format!("{pod_uid}-{member}")
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.root.join(id)
    }

    /// The writable layer of container `id` (the overlay's upper directory).
    pub fn upper_dir(&self, id: &str) -> PathBuf {
        self.dir(id).join("upper")
    }

    /// The node's default cap on a writable layer.
    pub fn scratch_limit(&self) -> u64 {
        self.cfg.scratch_limit
    }

    /// Pulls (if not stored) and unpacks the member's image.
    pub async fn prepare(&self, reference: &str) -> Result<Arc<Prepared>, String> {
        let image = self
            .images
            .ensure(reference, &Platform::host(), &mut |_| {})
            .await
            .map_err(|e| e.to_string())?;
        let images = self.images.clone();
        let rec = image.clone();
        let (run, rootfs) = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::image::ImageError>((images.run_config(&rec)?, images.rootfs(&rec)?))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(Arc::new(Prepared { image, run, rootfs }))
    }

    /// Starts a new run of a container member.
    pub async fn start(&self, p: &Prepared, s: &StartSpec<'_>) -> Result<Running, Exit> {
        let id = Self::id(s.pod_uid, &s.member.name);
        let dir = self.dir(&id);
        let fail = |m: String| Exit {
            code: -1,
            reason: TerminationReason::StartError,
            message: m,
        };
        // Leftovers of an earlier run of this member.
        self.remove(&id).await;
        let cgroup = format!("/flotilla/{id}");
        let resolv = dir.join("resolv.conf");
        let spec = build_spec(&SpecInput {
            member: s.member,
            image: &p.run,
            rootfs: &p.rootfs,
            env: s.env,
            mounts: s.mounts,
            hostname: s.pod_name,
            cgroup: &cgroup,
            netns: s.netns,
            resolv_conf: s.resolv_conf.map(|_| resolv.as_path()),
            userns: s.userns,
        })
        .map_err(|e| fail(e.to_string()))?;
        // Directories, the overlay mount and config.json: blocking work.
        let (d, lower) = (dir.clone(), p.rootfs.clone());
        let resolv_text = s.resolv_conf.map(str::to_string);
        let sys = self.sys.clone();
        let userns = s.userns;
        let made = tokio::task::spawn_blocking(move || {
            if let Some(text) = resolv_text {
                std::fs::create_dir_all(&d)
                    .and_then(|()| std::fs::write(d.join("resolv.conf"), text))
                    .map_err(|e| format!("writing resolv.conf: {e}"))?;
            }
            make_bundle(&*sys, &d, &lower, &spec, userns)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(e) = made {
            self.remove(&id).await;
            return Err(fail(e));
        }
        let args = ShimArgs {
            id: id.clone(),
            dir: dir.clone(),
            runc: self.cfg.runc.clone(),
            runc_root: self.cfg.root.join(".runc"),
            log_dir: s.log_dir.to_path_buf(),
            member: s.member.name.clone(),
            log_cap: self.cfg.log_cap,
            restarts: s.restarts,
            cgroup,
        };
        let shim_log = std::fs::File::create(dir.join("shim.log"))
            .map_err(|e| fail(format!("shim log: {e}")))?;
        let mut child = self
            .sys
            .spawn_shim(&self.cfg.shim_exe, &args, shim_log)
            .map_err(|e| fail(format!("cannot start {}: {e}", self.cfg.shim_exe.display())))?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::io::BufReader::new(stdout).read_line(&mut line),
        )
        .await;
        let handshake = match read {
            Ok(_) => shim::parse_handshake(&line),
            Err(_) => Err("the shim did not start the container within 60 s".into()),
        };
        match handshake {
            Ok(pid) => {
                let state: Option<ShimState> = shim::read_json(&dir, STATE_FILE);
                Ok(Running {
                    id,
                    dir,
                    pid,
                    shim_pid: child.id().map_or(0, |p| p as i32),
                    started_ms: state.map_or_else(flotilla_api::time::now_ms, |s| s.started_ms),
                    restarts: s.restarts,
                    waiter: Waiter::Child(child),
                    stopping: false,
                    sys: self.sys.clone(),
                })
            }
            Err(message) => {
                let _ = child.wait().await;
                self.remove(&id).await;
                Err(fail(message))
            }
        }
    }

    /// Runs `cmd` in container `id` (`runc exec`): `Ok` when it exits 0.
    pub async fn exec(&self, id: &str, cmd: &[String]) -> Result<(), String> {
        let mut child = self
            .sys
            .runc_exec(&self.cfg.runc, &self.cfg.root.join(".runc"), id, cmd)
            .map_err(|e| format!("cannot run runc exec: {e}"))?;
        let status = child.wait().await.map_err(|e| e.to_string())?;
        match status.code() {
            Some(0) => Ok(()),
            Some(c) => Err(format!("{} exited with {c}", cmd[0])),
            None => Err(format!("{} was killed", cmd[0])),
        }
    }

    /// What is left of a container after an agent restart.
    pub fn find(&self, pod_uid: &str, member: &str) -> Found {
        self.find_id(&Self::id(pod_uid, member))
    }

    fn find_id(&self, id: &str) -> Found {
        let id = id.to_string();
        let dir = self.dir(&id);
        let Some(state) = shim::read_json::<ShimState>(&dir, STATE_FILE) else {
            return Found::Nothing;
        };
        if let Some(e) = shim::read_json::<ShimExit>(&dir, EXIT_FILE) {
            return Found::Exited {
                exit: exit_of(&e, false),
                restarts: state.restarts,
            };
        }
        if state.shim_pid <= 0 {
            return Found::Nothing;
        }
        // The shim must still be that shim (PIDs are reused).
        if !self.sys.is_shim(state.shim_pid, &id) {
            // Gone without an exit file (e.g. the machine rebooted).
            return Found::Exited {
                exit: Exit {
                    code: -1,
                    reason: TerminationReason::Error,
                    message: "the container's shim disappeared".into(),
                },
                restarts: state.restarts,
            };
        }
        let waiter = match self.sys.pidfd(state.shim_pid).and_then(|fd| {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open and
            // names the same pidfd until the AsyncFd is dropped.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
        }) {
            Some(fd) => Waiter::Pidfd(fd),
            None => Waiter::Poll,
        };
        Found::Running(Box::new(Running {
            id,
            dir,
            pid: state.pid,
            shim_pid: state.shim_pid,
            started_ms: state.started_ms,
            restarts: state.restarts,
            waiter,
            stopping: false,
            sys: self.sys.clone(),
        }))
    }

    /// Unmounts and deletes a container's directory (its log stays).
    pub async fn remove(&self, id: &str) {
        let dir = self.dir(id);
        if !dir.exists() {
            return;
        }
        let rootfs = dir.join("bundle/rootfs");
        let runc = self.cfg.runc.clone();
        let runc_root = self.cfg.root.join(".runc");
        let id = id.to_string();
        let sys = self.sys.clone();
        // Unmounting an overlay syncs the filesystem under it, which can take
        // seconds on a busy disk: never on the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            sys.unmount(&rootfs);
            // An id-mapped view of the image left mounted (the mount is
            // undone right after the overlay's, so only after a crash in
            // between): detached first, so the removal below can never
            // reach the image through it.
            let lower = dir.join("lower");
            if lower.exists() {
                sys.unmount(&lower);
            }
            // A container whose shim is gone may still be known to runc.
            if runc_root.join(&id).exists() {
                sys.runc_delete(&runc, &runc_root, &id);
            }
            let _ = std::fs::remove_dir_all(&dir);
        })
        .await;
    }

    /// Stops and removes containers of pods not in `keep` (left by pods
    /// deleted while the agent was down).
    pub async fn reap_orphans(&self, keep: &std::collections::HashSet<String>) {
        for id in self.ids() {
            let owner = keep.iter().any(|uid| {
                id.len() > uid.len()
                    && id.starts_with(uid.as_str())
                    && id.as_bytes()[uid.len()] == b'-'
            });
            if owner {
                continue;
            }
            if let Found::Running(mut r) = self.find_id(&id) {
                tracing::info!(container = %id, "stopping a container no pod here owns");
                r.stop(Duration::from_secs(2)).await;
            }
            self.remove(&id).await;
        }
        self.ranges.retain(keep);
    }

    /// Container ids with a directory here.
    pub fn ids(&self) -> Vec<String> {
        std::fs::read_dir(&self.cfg.root)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Creates the bundle: `rootfs` as an overlay of the image's unpacked
/// filesystem (read-only, shared) and a fresh upper layer, and `config.json`.
fn make_bundle(
    sys: &dyn ContainerSys,
    dir: &Path,
    lower: &Path,
    spec: &oci_spec::runtime::Spec,
    userns: Option<IdMap>,
) -> Result<(), String> {
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let idmapped_lower = dir.join("lower");
    if let Some(map) = userns {
        // The root directory of the container is the upper layer's: the
        // namespace's root owns it, as host root owns the image's.
        std::os::unix::fs::chown(&upper, Some(map.host), Some(map.host))
            .map_err(|e| format!("{}: {e}", upper.display()))?;
    }
    let layers = Overlay {
        lower,
        upper: &upper,
        work: &work,
        idmapped: userns.map(|m| (m, idmapped_lower.as_path())),
    };
    sys.mount_overlay(&rootfs, &layers)
        .map_err(|e| format!("cannot mount the container's root filesystem: {e}"))?;
    spec.save(bundle.join("config.json"))
        .map_err(|e| format!("writing config.json: {e}"))
}

fn exit_of(e: &ShimExit, stopped: bool) -> Exit {
    if !e.start_error.is_empty() {
        return Exit {
            code: -1,
            reason: TerminationReason::StartError,
            message: e.start_error.clone(),
        };
    }
    let (reason, message) = if e.oom_killed && e.code != 0 && !stopped {
        (
            TerminationReason::OOMKilled,
            "killed by the kernel: the container reached its memory limit".to_string(),
        )
    } else if stopped {
        (TerminationReason::Stopped, "pod stopped".into())
    } else if e.code == 0 && e.oom_killed {
        (
            TerminationReason::Completed,
            "a process in the container was killed at the memory limit".into(),
        )
    } else if e.code == 0 {
        (TerminationReason::Completed, String::new())
    } else if let Some(s) = e.signal {
        (TerminationReason::Error, format!("killed by signal {s}"))
    } else {
        (
            TerminationReason::Error,
            format!("exited with code {}", e.code),
        )
    };
    Exit {
        code: e.code,
        reason,
        message,
    }
}

impl Running {
    /// Waits until the container has ended and returns how.
    pub async fn wait(&mut self) -> Exit {
        match &mut self.waiter {
            Waiter::Child(c) => {
                let _ = c.wait().await;
            }
            Waiter::Pidfd(fd) => {
                let _ = fd.readable().await.map(|mut g| g.retain_ready());
            }
            Waiter::Poll => loop {
                if self.dir.join(EXIT_FILE).exists() {
                    break;
                }
                if !self.sys.alive(self.shim_pid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            },
        }
        match shim::read_json::<ShimExit>(&self.dir, EXIT_FILE) {
            Some(e) => exit_of(&e, self.stopping),
            None => Exit {
                code: -1,
                reason: TerminationReason::Error,
                message: "the container's shim exited without recording an exit".into(),
            },
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit.
    pub async fn stop(&mut self, grace: Duration) -> Exit {
        self.stopping = true;
        self.signal(Signal::TERM);
        if let Ok(exit) = tokio::time::timeout(grace, self.wait_ref()).await {
            return exit;
        }
        self.signal(Signal::KILL);
        self.wait().await
    }

    async fn wait_ref(&mut self) -> Exit {
        self.wait().await
    }

    /// Signals the container's init, while its shim has not reaped it.
    fn signal(&self, sig: Signal) {
        if self.dir.join(EXIT_FILE).exists() {
            return;
        }
        self.sys.signal(self.pid, sig);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests;
