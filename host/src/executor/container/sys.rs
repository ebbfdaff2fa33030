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

/// A user namespace's ID mapping: IDs `0..size` inside are host IDs
/// `host..host + size` (the same for users and groups).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMap {
    pub host: u32,
    pub size: u32,
}

/// The overlay layers of a container's root filesystem.
pub struct Overlay<'a> {
    /// The image's unpacked filesystem (read-only, shared).
    pub lower: &'a Path,
    /// The container's own writable layer and overlayfs' work directory.
    pub upper: &'a Path,
    pub work: &'a Path,
    /// For a container in a user namespace: the lower layer is first
    /// mounted id-mapped (host root's files become the namespace root's) at
    /// this path, and the overlay is made over that mount.
    pub idmapped: Option<(IdMap, &'a Path)>,
}

pub trait ContainerSys: Send + Sync {
    /// Mounts `layers` as an overlay at `target`.
    fn mount_overlay(&self, target: &Path, layers: &Overlay<'_>) -> io::Result<()>;
    /// Lazily unmounts `target` (nothing mounted is fine).
    fn unmount(&self, target: &Path);
    /// `runc delete --force ID` (a container runc may still know).
    fn runc_delete(&self, runc: &Path, runc_root: &Path, id: &str);
    /// `runc exec ID CMD…` started (output discarded; killed when dropped).
    fn runc_exec(
        &self,
        runc: &Path,
        runc_root: &Path,
        id: &str,
        cmd: &[String],
    ) -> io::Result<tokio::process::Child>;
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

/// Mounts the overlay of `layers` at `target` with `lower` as its lower
/// layer.
fn mount_overlay_over(target: &Path, lower: &Path, layers: &Overlay<'_>) -> io::Result<()> {
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
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

impl ContainerSys for Machine {
    fn mount_overlay(&self, target: &Path, layers: &Overlay<'_>) -> io::Result<()> {
        let lower = match layers.idmapped {
            Some((map, at)) => {
                idmapped::bind(layers.lower, at, map)?;
                at
            }
            None => layers.lower,
        };
        let mounted = mount_overlay_over(target, lower, layers);
        if let Some((_, at)) = layers.idmapped {
            // The overlay holds a private clone of its layers: the id-mapped
            // mount is not needed at its path any more.
            let _ = rustix::mount::unmount(at, rustix::mount::UnmountFlags::DETACH);
            let _ = std::fs::remove_dir(at);
        }
        mounted
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

    fn runc_exec(
        &self,
        runc: &Path,
        runc_root: &Path,
        id: &str,
        cmd: &[String],
    ) -> io::Result<tokio::process::Child> {
        tokio::process::Command::new(runc)
            .arg("--root")
            .arg(runc_root)
            .args(["exec", id])
            .args(cmd)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
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
/// Id-mapped mounts for containers in user namespaces: the kernel shows a
/// file owned by host ID N as owned by `map.host + N` through the mount,
/// so an image unpacked once, owned by host root, is the namespace root's
/// without a copy or a chown (Linux 5.12; overlayfs over such a layer 5.19).
mod idmapped {
    use super::IdMap;
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::path::Path;

    /// `MOUNT_ATTR_IDMAP` of `mount_setattr(2)`.
    const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

    /// `struct mount_attr` of `mount_setattr(2)`.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }

    /// A user namespace with `map`, held open by a descriptor: a child
    /// process unshares one and waits while its mapping is written and its
    /// namespace opened, then exits.
    fn userns(map: IdMap) -> io::Result<OwnedFd> {
        let flags = rustix::pipe::PipeFlags::CLOEXEC;
        let (ready_r, ready_w) = rustix::pipe::pipe_with(flags)?;
        let (go_r, go_w) = rustix::pipe::pipe_with(flags)?;
        let (ready_w_fd, go_r_fd, go_w_fd) =
            (ready_w.as_raw_fd(), go_r.as_raw_fd(), go_w.as_raw_fd());
        // SAFETY: after fork the child runs only async-signal-safe calls
        // (close, unshare, write, read, _exit) on descriptors it owns a
        // copy of, and never returns into Rust code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; the buffers are locals of this frame.
            unsafe {
                libc::close(go_w_fd);
                let ok: u8 = u8::from(libc::unshare(libc::CLONE_NEWUSER) == 0);
                libc::write(ready_w_fd, (&raw const ok).cast(), 1);
                let mut b = 0u8;
                libc::read(go_r_fd, (&raw mut b).cast(), 1);
                libc::_exit(0);
            }
        }
        drop((ready_w, go_r));
        let opened = (|| {
            let mut b = [0u8; 1];
            let n = rustix::io::read(&ready_r, &mut b)?;
            if n != 1 || b[0] != 1 {
                return Err(io::Error::other(
                    "cannot make a user namespace (unshare(CLONE_NEWUSER) failed)",
                ));
            }
            let line = format!("0 {} {}\n", map.host, map.size);
            std::fs::write(format!("/proc/{pid}/uid_map"), &line)?;
            std::fs::write(format!("/proc/{pid}/gid_map"), &line)?;
            Ok(OwnedFd::from(std::fs::File::open(format!(
                "/proc/{pid}/ns/user"
            ))?))
        })();
        let _ = rustix::io::write(&go_w, &[1]);
        drop(go_w);
        let mut status = 0;
        // SAFETY: waits for the child forked above, which is exiting.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        opened
    }

    /// Mounts `src` at `dst` (made if missing) through `map`.
    pub fn bind(src: &Path, dst: &Path, map: IdMap) -> io::Result<()> {
        use rustix::mount::{MoveMountFlags, OpenTreeFlags};
        let ns = userns(map)?;
        let tree = rustix::mount::open_tree(
            rustix::fs::CWD,
            src,
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )?;
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: ns.as_raw_fd() as u64,
        };
        // SAFETY: mount_setattr(2) on a descriptor we own, an empty C
        // string, and a struct of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                &raw const attr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("an id-mapped mount of the image (needs Linux 5.12 or later): {e}"),
            ));
        }
        std::fs::create_dir_all(dst)?;
        rustix::mount::move_mount(
            &tree,
            "",
            rustix::fs::CWD,
            dst,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )?;
        Ok(())
    }
}

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

        fn runc_exec(
            &self,
            _runc: &Path,
            _runc_root: &Path,
            id: &str,
            cmd: &[String],
        ) -> io::Result<tokio::process::Child> {
            self.record(format!("runc exec {id} {}", cmd.join(" ")));
            tokio::process::Command::new("true").spawn()
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
