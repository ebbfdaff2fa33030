//! What the container executor asks of the machine, as one small trait:
//! the overlay root filesystem, the shim process, runc clean-up, and
//! processes (is the shim still ours, wait on it, signal the container).
//! [`Machine`] is the real thing; [`fake::FakeMachine`] stands in for it so
//! [`crate::executor::container::runtime`] is unit-tested without root,
//! runc or mounts.

use crate::executor::container::shim::ShimArgs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

pub use rustix::process::Signal;

/// The overlay layers of a container's root filesystem.
pub struct Overlay<'a> {
    /// The image's unpacked filesystem (read-only, shared).
    pub lower: &'a Path,
    /// The container's own writable layer and overlayfs' work directory.
    pub upper: &'a Path,
    pub work: &'a Path,
}

pub trait ContainerSys: Send + Sync {
    /// Mounts `layers` as an overlay at `target`.
    fn mount_overlay(&self, target: &Path, layers: &Overlay<'_>) -> io::Result<()>;
    /// Lazily unmounts `target` (nothing mounted is fine).
    fn unmount(&self, target: &Path);
    /// `runc delete --force ID` (a container runc may still know).
    fn runc_delete(&self, runc: &Path, runc_root: &Path, id: &str);
    /// Starts the shim: its handshake line on a piped stdout, its stderr
    /// into `log`, in a process group of its own.
    fn spawn_shim(
        &self,
        exe: &Path,
        args: &ShimArgs,
        log: std::fs::File,
    ) -> io::Result<tokio::process::Child>;
    /// Whether process `pid` is the shim of container `id` (PIDs are reused).
    fn is_shim(&self, pid: i32, id: &str) -> bool;
    /// Whether process `pid` exists.
    fn alive(&self, pid: i32) -> bool;
    /// A pidfd to wait on process `pid`, where the kernel has them.
    fn pidfd(&self, pid: i32) -> Option<OwnedFd>;
    /// Sends `sig` to process `pid`.
    fn signal(&self, pid: i32, sig: Signal);
}

/// This machine: mount(2), processes, runc.
pub struct Machine;

impl ContainerSys for Machine {
    fn mount_overlay(&self, target: &Path, layers: &Overlay<'_>) -> io::Result<()> {
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            layers.lower.display(),
            layers.upper.display(),
            layers.work.display()
        );
        // `volatile`: the upper layer is scratch space thrown away after the
        // run, so it is never synced — its unmount does not wait for the
        // whole disk's writeback. Kernels before 5.10 lack it: mount without.
        let cstr = |s: String| std::ffi::CString::new(s).map_err(io::Error::other);
        let (volatile, plain) = (cstr(format!("{data},volatile"))?, cstr(data)?);
        let mount = |opts: &std::ffi::CStr| {
            rustix::mount::mount(
                "overlay",
                target,
                "overlay",
                rustix::mount::MountFlags::empty(),
                opts,
            )
        };
        mount(&volatile)
            .or_else(|_| mount(&plain))
            .map_err(io::Error::from)
    }

    fn unmount(&self, target: &Path) {
        let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
    }

    fn runc_delete(&self, runc: &Path, runc_root: &Path, id: &str) {
        let _ = std::process::Command::new(runc)
            .arg("--root")
            .arg(runc_root)
            .args(["delete", "--force", id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn spawn_shim(
        &self,
        exe: &Path,
        args: &ShimArgs,
        log: std::fs::File,
    ) -> io::Result<tokio::process::Child> {
        tokio::process::Command::new(exe)
            .args(args.to_args())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            // Its own process group: signals meant for the agent's group
            // (Ctrl-C in a terminal) do not reach running containers.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
    }

    fn is_shim(&self, pid: i32, id: &str) -> bool {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains(id)
    }

    fn alive(&self, pid: i32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    fn pidfd(&self, pid: i32) -> Option<OwnedFd> {
        let pid = rustix::process::Pid::from_raw(pid)?;
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).ok()
    }

    fn signal(&self, pid: i32, sig: Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }
}

/// A stand-in machine. Its "shim" is a `sh` child that prints the handshake
/// the scenario asks for; the state and exit files are written as the real
/// shim would; mounts, runc and signals are recorded, and a signal the
/// scenario says ends the container ends that child (by its PID).
#[cfg(test)]
pub mod fake {
    use super::*;
    use crate::executor::container::shim::{self, EXIT_FILE, STATE_FILE, ShimExit, ShimState};
    use std::collections::HashSet;
    use std::sync::Mutex;

    /// The container's init as the fake shim reports it.
    pub const INIT_PID: i32 = 4242;

    /// What the container does.
    #[derive(Clone, Debug)]
    pub enum Scenario {
        /// Runs and exits with this code by itself.
        Exits(i32),
        /// Runs until signalled; ends on SIGTERM when `obeys_term`, else
        /// only on SIGKILL.
        Runs { obeys_term: bool },
        /// The shim answers this line instead of `ok PID` (a runc failure),
        /// after runc has registered the container.
        Handshake(String),
    }

    pub struct FakeMachine {
        pub calls: Mutex<Vec<String>>,
        pub scenario: Mutex<Scenario>,
        pub mount_fails: Mutex<bool>,
        /// PIDs that are live shims of containers (for re-adoption).
        pub shims: Mutex<HashSet<i32>>,
        /// The running container: its directory and the fake shim's PID.
        current: Mutex<Option<(std::path::PathBuf, u32)>>,
    }

    impl FakeMachine {
        pub fn new(scenario: Scenario) -> FakeMachine {
            FakeMachine {
                calls: Mutex::default(),
                scenario: Mutex::new(scenario),
                mount_fails: Mutex::new(false),
                shims: Mutex::default(),
                current: Mutex::default(),
            }
        }

        pub fn take_calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }

        fn record(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }

        /// Ends the running container with `code` as the shim would: the
        /// exit file, then (`kill`) the shim process goes.
        fn end(&self, code: i32, signal: Option<i32>, kill: bool) {
            if let Some((dir, pid)) = self.current.lock().unwrap().take() {
                let exit = ShimExit {
                    code,
                    signal,
                    oom_killed: false,
                    start_error: String::new(),
                    finished_ms: 1,
                };
                shim::write_json(&dir, EXIT_FILE, &exit).unwrap();
                if kill {
                    // SAFETY: kill(2) on our own child, which the runtime
                    // reaps only after this (it waits for this very end).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
    }

    fn tail(p: &Path, parts: usize) -> String {
        let c: Vec<_> = p.components().collect();
        c[c.len().saturating_sub(parts)..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    }

    impl ContainerSys for FakeMachine {
        fn mount_overlay(&self, target: &Path, layers: &Overlay<'_>) -> io::Result<()> {
            self.record(format!(
                "mount {} lower={} upper={}",
                tail(target, 3),
                tail(layers.lower, 1),
                tail(layers.upper, 2)
            ));
            if *self.mount_fails.lock().unwrap() {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        }

        fn unmount(&self, target: &Path) {
            self.record(format!("unmount {}", tail(target, 3)));
        }

        fn runc_delete(&self, _runc: &Path, runc_root: &Path, id: &str) {
            self.record(format!("runc delete {id}"));
            let _ = std::fs::remove_dir_all(runc_root.join(id));
        }

        fn spawn_shim(
            &self,
            _exe: &Path,
            args: &ShimArgs,
            _log: std::fs::File,
        ) -> io::Result<tokio::process::Child> {
            self.record(format!("shim {}", args.id));
            let scenario = self.scenario.lock().unwrap().clone();
            let line = match &scenario {
                Scenario::Handshake(l) => {
                    std::fs::create_dir_all(args.runc_root.join(&args.id))?;
                    l.clone()
                }
                _ => format!("ok {INIT_PID}"),
            };
            // A container that runs keeps its shim until signalled; the
            // others' shims go after the handshake.
            let script = match scenario {
                Scenario::Runs { .. } => format!("echo '{line}'; exec sleep 600"),
                _ => format!("echo '{line}'"),
            };
            let child = tokio::process::Command::new("sh")
                .args(["-c", &script])
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let pid = child.id().unwrap();
            let state = ShimState {
                shim_pid: pid as i32,
                pid: INIT_PID,
                started_ms: 1,
                restarts: args.restarts,
            };
            shim::write_json(&args.dir, STATE_FILE, &state)?;
            *self.current.lock().unwrap() = Some((args.dir.clone(), pid));
            if let Scenario::Exits(code) = scenario {
                self.end(code, None, false);
            }
            Ok(child)
        }

        fn is_shim(&self, pid: i32, _id: &str) -> bool {
            self.shims.lock().unwrap().contains(&pid)
        }

        fn alive(&self, pid: i32) -> bool {
            self.shims.lock().unwrap().contains(&pid)
        }

        fn pidfd(&self, _pid: i32) -> Option<OwnedFd> {
            None
        }

        fn signal(&self, pid: i32, sig: Signal) {
            self.record(format!("signal {pid} {sig:?}"));
            let obeys_term = matches!(
                *self.scenario.lock().unwrap(),
                Scenario::Runs { obeys_term: true }
            );
            if sig == Signal::KILL || (sig == Signal::TERM && obeys_term) {
                let n = if sig == Signal::KILL { 9 } else { 15 };
                self.end(128 + n, Some(n), true);
            }
        }
    }
}
