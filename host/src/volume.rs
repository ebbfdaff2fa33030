//! A pod's volumes on the node: scratch directories, ConfigMap and Secret
//! keys as files, host directories. Members see them as WASI preopened
//! directories (wasm) or bind mounts (containers).
//!
//! ConfigMap and Secret volumes are written the way the kubelet does it, so
//! an update is one atomic step for a reader: every generation of files
//! goes into a fresh hidden directory (`..<n>`), the symlink `..data` is
//! swapped to it by rename, and the visible names are symlinks through
//! `..data`. Secret volumes and memory-backed scratch directories are tmpfs
//! mounts, so secret values never reach the node's disk. Mounting is behind
//! [`VolumeSys`], so the logic is unit-tested without root.

use flotilla_api::config::{InputKind, Inputs, Medium, VolumeFile, VolumeSource, volume_files};
use flotilla_api::{MemberSpec, PodSpec};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What volumes ask of the kernel.
pub trait VolumeSys: Send + Sync {
    /// Mounts a fresh tmpfs of `size` bytes at `at` (an empty directory).
    fn mount_tmpfs(&self, at: &Path, size: u64) -> io::Result<()>;
    /// Detaches what is mounted at `at`.
    fn unmount(&self, at: &Path) -> io::Result<()>;
    /// Whether something is mounted at `at`.
    fn is_mount(&self, at: &Path) -> bool;
}

/// The real kernel.
pub struct Kernel;

impl VolumeSys for Kernel {
    fn mount_tmpfs(&self, at: &Path, size: u64) -> io::Result<()> {
        use rustix::mount::{MountFlags, mount};
        let data = std::ffi::CString::new(format!("size={size},mode=0755"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        mount(
            "flotilla",
            at,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(data.as_c_str()),
        )
        .map_err(io::Error::from)
    }

    fn unmount(&self, at: &Path) -> io::Result<()> {
        rustix::mount::unmount(at, rustix::mount::UnmountFlags::DETACH).map_err(io::Error::from)
    }

    fn is_mount(&self, at: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let parent = at.parent().unwrap_or(Path::new("/"));
        match (std::fs::metadata(at), std::fs::metadata(parent)) {
            (Ok(a), Ok(p)) => a.dev() != p.dev(),
            _ => false,
        }
    }
}

/// Size of the tmpfs behind a Secret volume: secrets are capped well
/// below this by the API, and an update holds two generations.
pub const SECRET_TMPFS_BYTES: u64 = 4 << 20;
/// Size of a memory-backed scratch directory without a `size_limit`.
pub const DEFAULT_MEMORY_DIR_BYTES: u64 = 64 << 20;

/// A volume as a member sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedMount {
    /// The directory on the node.
    pub host: PathBuf,
    /// Where the member sees it.
    pub guest: String,
    pub read_only: bool,
}

struct Made {
    name: String,
    dir: PathBuf,
    source: VolumeSource,
    mounted: bool,
    /// Disk use past which the pod is evicted (disk scratch with a
    /// `size_limit`, persistent volumes' capacity).
    limit: Option<u64>,
    /// Outlives the pod (host paths, persistent volumes).
    keep: bool,
    /// For ConfigMap and Secret volumes: the files last written.
    files: Vec<VolumeFile>,
}

/// The volumes of one pod, made under `<volumes dir>/<pod uid>`
/// (persistent ones under `<persistent dir>/<volume>`).
pub struct PodVolumes {
    root: PathBuf,
    persistent: PathBuf,
    made: Vec<Made>,
    sys: Arc<dyn VolumeSys>,
}

impl PodVolumes {
    /// Makes every volume of `spec` (or none, removing what was made, and
    /// says why: a missing ConfigMap or key, a host path that is not there).
    pub fn make(
        sys: Arc<dyn VolumeSys>,
        (root, persistent): (PathBuf, PathBuf),
        spec: &PodSpec,
        inputs: &dyn Inputs,
    ) -> Result<PodVolumes, String> {
        let mut pv = PodVolumes {
            root,
            persistent,
            made: Vec::new(),
            sys,
        };
        // A restarted agent finds the directories its pods had (and
        // containers it re-adopts still use them): scratch data is kept,
        // tmpfs mounts are taken over, files are written anew.
        for v in &spec.volumes {
            if let Err(e) = pv.make_one(&v.name, &v.source, inputs) {
                pv.remove();
                return Err(format!("volume {}: {e}", v.name));
            }
        }
        Ok(pv)
    }

    /// Removes the volumes of a pod this agent no longer has (left by an
    /// earlier agent process): unmounts, then deletes.
    pub fn remove_stale(sys: &dyn VolumeSys, root: &Path) {
        if let Ok(entries) = std::fs::read_dir(root) {
            for e in entries.flatten() {
                if sys.is_mount(&e.path()) {
                    let _ = sys.unmount(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(root);
    }

    fn make_one(
        &mut self,
        name: &str,
        source: &VolumeSource,
        inputs: &dyn Inputs,
    ) -> Result<(), String> {
        let dir = self.root.join(name);
        let mut made = Made {
            name: name.to_string(),
            dir: dir.clone(),
            source: source.clone(),
            mounted: false,
            files: Vec::new(),
            limit: None,
            keep: false,
        };
        if let VolumeSource::HostPath(h) = source {
            if !Path::new(&h.path).is_dir() {
                return Err(format!(
                    "host path {} is not a directory on this node",
                    h.path
                ));
            }
            made.dir = PathBuf::from(&h.path);
            made.keep = true;
            self.made.push(made);
            return Ok(());
        }
        if let VolumeSource::Persistent(r) = source {
            let Some(flotilla_api::Object::Volume(v)) = inputs.input(InputKind::Volume, &r.name)
            else {
                return Err(format!("volume \"{}\" not found", r.name));
            };
            made.dir = self.persistent.join(&r.name);
            made.keep = true;
            made.limit = Some(v.spec.capacity.0);
            std::fs::create_dir_all(&made.dir)
                .map_err(|e| format!("{}: {e}", made.dir.display()))?;
            set_mode(&made.dir, 0o777).map_err(|e| e.to_string())?;
            self.made.push(made);
            return Ok(());
        }
        if let VolumeSource::EmptyDir(e) = source
            && e.medium == Medium::Disk
        {
            made.limit = e.size_limit.as_ref().map(|b| b.0);
        }
        let files = match source {
            VolumeSource::Config(o) => Some(volume_files(
                InputKind::Config,
                o,
                inputs.input(InputKind::Config, &o.name),
            )?),
            VolumeSource::Secret(o) => Some(volume_files(
                InputKind::Secret,
                o,
                inputs.input(InputKind::Secret, &o.name),
            )?),
            _ => None,
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmpfs = match source {
            VolumeSource::Secret(_) => Some(SECRET_TMPFS_BYTES),
            VolumeSource::EmptyDir(e) if e.medium == Medium::Memory => Some(
                e.size_limit
                    .as_ref()
                    .map_or(DEFAULT_MEMORY_DIR_BYTES, |b| b.0),
            ),
            _ => None,
        };
        if let Some(size) = tmpfs {
            if self.sys.is_mount(&dir) {
                made.mounted = true;
            } else {
                self.sys
                    .mount_tmpfs(&dir, size)
                    .map_err(|e| format!("cannot mount a tmpfs at {}: {e}", dir.display()))?;
                made.mounted = true;
            }
        }
        // The record goes in first, so a failure below still unmounts it.
        self.made.push(made);
        if matches!(source, VolumeSource::EmptyDir(_)) {
            // Shared by members that may run as any user (as Kubernetes
            // makes its emptyDir volumes).
            set_mode(&dir, 0o777).map_err(|e| e.to_string())?;
        }
        if let Some(files) = files {
            write_generation(&dir, &files).map_err(|e| format!("writing files: {e}"))?;
            self.made.last_mut().expect("just pushed").files = files;
        }
        Ok(())
    }

    /// Rewrites the ConfigMap and Secret volumes whose files changed;
    /// returns the names of those it rewrote. A volume whose object or key
    /// went away keeps its last files (as the kubelet does).
    pub fn refresh(&mut self, inputs: &dyn Inputs) -> Vec<String> {
        let mut changed = Vec::new();
        for m in &mut self.made {
            let files = match &m.source {
                VolumeSource::Config(o) => volume_files(
                    InputKind::Config,
                    o,
                    inputs.input(InputKind::Config, &o.name),
                ),
                VolumeSource::Secret(o) => volume_files(
                    InputKind::Secret,
                    o,
                    inputs.input(InputKind::Secret, &o.name),
                ),
                _ => continue,
            };
            let Ok(files) = files else { continue };
            if files == m.files {
                continue;
            }
            match write_generation(&m.dir, &files) {
                Ok(()) => {
                    m.files = files;
                    changed.push(m.name.clone());
                }
                Err(e) => tracing::warn!(volume = %m.name, "cannot update volume: {e}"),
            }
        }
        changed
    }

    /// The volumes `member` mounts, with the directories behind them.
    pub fn mounts(&self, member: &MemberSpec, spec: &PodSpec) -> Vec<ResolvedMount> {
        member
            .mounts
            .iter()
            .filter_map(|mt| {
                let made = self.made.iter().find(|m| m.name == mt.volume)?;
                let vol = spec.volumes.iter().find(|v| v.name == mt.volume)?;
                Some(ResolvedMount {
                    host: made.dir.clone(),
                    guest: mt.path.clone(),
                    read_only: mt.read_only || vol.always_read_only(),
                })
            })
            .collect()
    }

    /// The first disk-backed scratch directory holding more than its
    /// `size_limit`, as a message (memory-backed ones are capped by their
    /// tmpfs: writers get ENOSPC instead).
    pub fn over_limit(&self) -> Option<String> {
        self.made.iter().find_map(|m| {
            let limit = m.limit?;
            let used = disk_usage(&m.dir);
            let (what, limit_name) = match &m.source {
                VolumeSource::Persistent(r) => (format!("volume \"{}\"", r.name), "capacity"),
                _ => (format!("empty_dir \"{}\"", m.name), "size_limit"),
            };
            (used > limit).then(|| {
                format!(
                    "{what} holds {}, over its {limit_name} of {}",
                    flotilla_api::quantity::Bytes(used).human(),
                    flotilla_api::quantity::Bytes(limit).human()
                )
            })
        })
    }

    /// Whether any volume has a limit [`Self::over_limit`] checks.
    pub fn has_disk_limits(&self) -> bool {
        self.made.iter().any(|m| m.limit.is_some())
    }

    /// Removes every volume made for the pod (host paths and persistent
    /// volumes are left alone).
    pub fn remove(&mut self) {
        for m in self.made.drain(..) {
            if m.keep {
                continue;
            }
            if m.mounted
                && let Err(e) = self.sys.unmount(&m.dir)
            {
                tracing::warn!(dir = %m.dir.display(), "cannot unmount volume: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Bytes of disk a directory tree takes (allocated blocks; symlinks are
/// not followed, other filesystems mounted inside are not entered).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            total += md.blocks() * 512;
            if md.is_dir() && md.dev() == root.dev() {
                stack.push(e.path());
            }
        }
    }
    total
}

fn set_mode(p: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

/// Writes `files` as a new generation of `dir` and makes it the visible
/// one in one rename; names no longer present disappear, older
/// generations are removed.
pub fn write_generation(dir: &Path, files: &[VolumeFile]) -> io::Result<()> {
    use std::os::unix::fs::symlink;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let gen_name = format!("..{stamp}");
    let generation = dir.join(&gen_name);
    std::fs::create_dir(&generation)?;
    set_mode(&generation, 0o755)?;
    let mut top = std::collections::BTreeSet::new();
    for f in files {
        let path = generation.join(&f.path);
        if let Some(parent) = path.parent()
            && parent != generation
        {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, &f.bytes)?;
        set_mode(&path, f.mode)?;
        if let Some(first) = f.path.split('/').next() {
            top.insert(first.to_string());
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&gen_name, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    // Visible names: one symlink per top-level name, through `..data`.
    for name in &top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), &link)?;
        }
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") {
            if name != gen_name && name != "..data" {
                let _ = std::fs::remove_dir_all(e.path());
            }
        } else if !top.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// A [`VolumeSys`] that mounts nothing and records what it was asked (the
/// directories stay plain directories).
pub mod fake {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct FakeMounts {
        pub mounted: Mutex<Vec<(PathBuf, u64)>>,
        pub unmounted: Mutex<Vec<PathBuf>>,
    }

    impl VolumeSys for FakeMounts {
        fn is_mount(&self, at: &Path) -> bool {
            let mounted = self
                .mounted
                .lock()
                .expect("poisoned")
                .iter()
                .filter(|(p, _)| p == at)
                .count();
            let unmounted = self
                .unmounted
                .lock()
                .expect("poisoned")
                .iter()
                .filter(|p| *p == at)
                .count();
            mounted > unmounted
        }

        fn mount_tmpfs(&self, at: &Path, size: u64) -> io::Result<()> {
            self.mounted
                .lock()
                .expect("poisoned")
                .push((at.to_path_buf(), size));
            Ok(())
        }

        fn unmount(&self, at: &Path) -> io::Result<()> {
            self.unmounted
                .lock()
                .expect("poisoned")
                .push(at.to_path_buf());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
