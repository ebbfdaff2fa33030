//! Unpacks image layers (tar, optionally gzip) onto a root directory without
//! ever writing outside it.
//!
//! Every path is resolved inside the root the way a chroot would: `..` stops
//! at the root and symlinks (including ones planted by an earlier entry or
//! layer) are followed only within it, so "write through a symlink" cannot
//! escape. Absolute paths and `..` in entry names are refused outright, as
//! are device nodes, FIFOs, setuid/setgid bits (unless allowed) and archives
//! past the size and entry caps (decompression bombs). OCI whiteouts
//! (`.wh.NAME`) and opaque whiteouts (`.wh..wh..opq`) remove what lower
//! layers put there.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// Symlinks followed while resolving one path, as Linux allows.
const MAX_LINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry '{path}': {why}")]
    Refused { path: String, why: &'static str },
    #[error("layer unpacks to more than {limit} bytes (decompression bomb?)")]
    TooLarge { limit: u64 },
    #[error("layer has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("layer entry '{path}': {source}")]
    Io { path: String, source: io::Error },
    #[error("reading the layer: {0}")]
    Archive(io::Error),
}

/// Caps and permissions for unpacking.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Total bytes of file content across the layer.
    pub max_bytes: u64,
    pub max_entries: u64,
    /// Keep setuid/setgid bits instead of refusing the entry.
    pub allow_setuid: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 << 30,
            max_entries: 200_000,
            allow_setuid: false,
        }
    }
}

/// What a layer held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub whiteouts: u64,
    pub bytes: u64,
}

/// Unpacks a gzip-compressed tar layer (`gzip`) or a plain one onto `root`.
pub fn unpack(
    layer: impl Read,
    gzip: bool,
    root: &Path,
    limits: &Limits,
) -> Result<Stats, UnpackError> {
    if gzip {
        unpack_tar(flate2::read::GzDecoder::new(layer), root, limits)
    } else {
        unpack_tar(layer, root, limits)
    }
}

fn refused(path: &str, why: &'static str) -> UnpackError {
    UnpackError::Refused {
        path: path.to_string(),
        why,
    }
}

fn io_err(path: &str) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.to_string(),
        source,
    }
}

/// The entry's name as clean relative components; absolute names and `..`
/// are refused.
fn entry_components(name: &Path, shown: &str) -> Result<Vec<String>, UnpackError> {
    let mut out = Vec::new();
    for c in name.components() {
        match c {
            Component::Normal(s) => out.push(
                s.to_str()
                    .ok_or_else(|| refused(shown, "name is not UTF-8"))?
                    .to_string(),
            ),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(shown, "absolute path"));
            }
            Component::ParentDir => return Err(refused(shown, "'..' in path")),
        }
    }
    Ok(out)
}

/// Resolves `parts` under `root` as if `root` were `/`: symlinks are
/// followed within the root (absolute targets restart at the root, `..`
/// stops there). With `follow_last` false the last component is not
/// followed (the entry itself is being replaced).
fn resolve(root: &Path, parts: &[String], follow_last: bool) -> Result<PathBuf, io::Error> {
    let mut stack: Vec<String> = Vec::new();
    let mut todo: Vec<String> = parts.iter().rev().cloned().collect();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                stack.pop();
                continue;
            }
            _ => {}
        }
        let is_last = todo.is_empty();
        let mut here = root.to_path_buf();
        here.extend(&stack);
        here.push(&part);
        let meta = fs::symlink_metadata(&here);
        if let Ok(m) = &meta
            && m.file_type().is_symlink()
            && (!is_last || follow_last)
        {
            links += 1;
            if links > MAX_LINKS {
                return Err(io::Error::other("too many levels of symbolic links"));
            }
            let target = fs::read_link(&here)?;
            if target.is_absolute() {
                stack.clear();
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(s) => todo.push(s.to_string_lossy().into_owned()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
            continue;
        }
        stack.push(part);
    }
    let mut p = root.to_path_buf();
    p.extend(&stack);
    Ok(p)
}

/// Removes whatever is at `path` (not following a symlink there).
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn unpack_tar(layer: impl Read, root: &Path, limits: &Limits) -> Result<Stats, UnpackError> {
    let mut archive = tar::Archive::new(layer);
    let mut stats = Stats::default();
    let mut entries_seen = 0u64;
    // Paths this layer created and every directory above them: an opaque
    // whiteout hides only lower layers (one set lookup per child, not a
    // scan of everything created).
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut opaque_dirs: Vec<PathBuf> = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Archive)? {
        let mut entry = entry.map_err(UnpackError::Archive)?;
        entries_seen += 1;
        if entries_seen > limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let name = entry.path().map_err(UnpackError::Archive)?.into_owned();
        let shown = name.to_string_lossy().into_owned();
        let parts = entry_components(&name, &shown)?;
        let Some(last) = parts.last().cloned() else {
            continue; // the root itself
        };
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(UnpackError::Archive)?;
        if mode & 0o6000 != 0 && !limits.allow_setuid {
            return Err(refused(&shown, "setuid/setgid bit (not allowed here)"));
        }
        let parent = resolve(root, &parts[..parts.len() - 1], true).map_err(io_err(&shown))?;
        if last == OPAQUE {
            stats.whiteouts += 1;
            opaque_dirs.push(parent);
            continue;
        }
        if let Some(hidden) = last.strip_prefix(WHITEOUT) {
            stats.whiteouts += 1;
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(refused(&shown, "malformed whiteout"));
            }
            remove_any(&parent.join(hidden)).map_err(io_err(&shown))?;
            continue;
        }
        fs::create_dir_all(&parent).map_err(io_err(&shown))?;
        let target = parent.join(&last);
        let perm = fs::Permissions::from_mode(mode & 0o7777);
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&target).map_err(io_err(&shown))?;
                        fs::create_dir(&target).map_err(io_err(&shown))?;
                    }
                    Err(_) => fs::create_dir(&target).map_err(io_err(&shown))?,
                }
                fs::set_permissions(&target, perm).map_err(io_err(&shown))?;
                stats.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = header.size().map_err(UnpackError::Archive)?;
                if stats.bytes + size > limits.max_bytes {
                    return Err(UnpackError::TooLarge {
                        limit: limits.max_bytes,
                    });
                }
                remove_any(&target).map_err(io_err(&shown))?;
                // O_CREAT | O_EXCL never follows a symlink at the last
                // component: nothing may have appeared there since.
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_err(&shown))?;
                // Never trust the header's size alone: count what is copied.
                let copied =
                    io::copy(&mut (&mut entry).take(size), &mut f).map_err(io_err(&shown))?;
                stats.bytes += copied;
                f.set_permissions(perm).map_err(io_err(&shown))?;
                stats.files += 1;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| refused(&shown, "symlink without a target"))?;
                remove_any(&target).map_err(io_err(&shown))?;
                // The target is stored as written; it is only ever followed
                // through `resolve`, which keeps it inside the root.
                std::os::unix::fs::symlink(&link, &target).map_err(io_err(&shown))?;
                stats.links += 1;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| refused(&shown, "hardlink without a target"))?
                    .into_owned();
                let link_shown = link.to_string_lossy().into_owned();
                let lparts = entry_components(&link, &link_shown)?;
                let source = resolve(root, &lparts, false).map_err(io_err(&shown))?;
                let m = fs::symlink_metadata(&source).map_err(io_err(&shown))?;
                if !m.is_file() {
                    return Err(refused(&shown, "hardlink to something not a regular file"));
                }
                remove_any(&target).map_err(io_err(&shown))?;
                fs::hard_link(&source, &target).map_err(io_err(&shown))?;
                stats.links += 1;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refused(&shown, "device node"));
            }
            tar::EntryType::Fifo => return Err(refused(&shown, "FIFO")),
            // PAX/GNU metadata entries are consumed by the tar reader.
            _ => continue,
        }
        let mut at = Some(target.as_path());
        while let Some(p) = at.filter(|p| p.starts_with(root) && *p != root) {
            if !created.insert(p.to_path_buf()) {
                break; // its ancestors are in already
            }
            at = p.parent();
        }
    }
    for dir in opaque_dirs {
        let Ok(children) = fs::read_dir(&dir) else {
            continue;
        };
        for c in children.flatten() {
            let p = c.path();
            if !created.contains(&p) {
                remove_any(&p).map_err(io_err(&p.to_string_lossy()))?;
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar layer built entry by entry, names written raw so that hostile
    /// ones (absolute, `..`) can be made.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Layer {
            Layer(tar::Builder::new(Vec::new()))
        }

        fn entry(
            mut self,
            kind: tar::EntryType,
            name: &str,
            link: &str,
            mode: u32,
            data: &[u8],
        ) -> Layer {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if !link.is_empty() {
                let l = &mut h.as_old_mut().linkname;
                l[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn file(self, name: &str, data: &[u8]) -> Layer {
            self.entry(tar::EntryType::Regular, name, "", 0o644, data)
        }

        fn dir(self, name: &str) -> Layer {
            self.entry(tar::EntryType::Directory, name, "", 0o755, b"")
        }

        fn symlink(self, name: &str, to: &str) -> Layer {
            self.entry(tar::EntryType::Symlink, name, to, 0o777, b"")
        }

        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn unpack_into(root: &Path, layer: Vec<u8>) -> Result<Stats, UnpackError> {
        unpack(&layer[..], false, root, &Limits::default())
    }

    /// A root inside a sandbox dir, with an "outside" file next to it that
    /// an escape would overwrite.
    fn sandbox() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        fs::write(dir.path().join("outside"), "intact").unwrap();
        (dir, root)
    }

    fn outside_intact(dir: &tempfile::TempDir) {
        assert_eq!(
            fs::read_to_string(dir.path().join("outside")).unwrap(),
            "intact"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "nothing new beside the root: {names:?}");
    }

    #[test]
    fn an_ordinary_layer_unpacks_with_modes_and_links() {
        let (_d, root) = sandbox();
        let layer = Layer::new()
            .dir("bin")
            .entry(tar::EntryType::Regular, "bin/busybox", "", 0o755, b"ELF...")
            .symlink("bin/sh", "busybox")
            .entry(tar::EntryType::Link, "bin/ls", "bin/busybox", 0o755, b"")
            .file("./etc/hostname", b"box\n")
            .bytes();
        let st = unpack_into(&root, layer).unwrap();
        assert_eq!((st.files, st.dirs, st.links), (2, 1, 2));
        assert_eq!(fs::read(root.join("bin/ls")).unwrap(), b"ELF...");
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        let mode = fs::metadata(root.join("bin/busybox"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn absolute_and_dotdot_names_are_refused() {
        for name in ["/etc/passwd", "../outside", "a/../../outside"] {
            let (d, root) = sandbox();
            let e = unpack_into(&root, Layer::new().file(name, b"pwned").bytes()).unwrap_err();
            assert!(matches!(e, UnpackError::Refused { .. }), "{name}: {e}");
            outside_intact(&d);
        }
    }

    #[test]
    fn symlinks_cannot_carry_writes_out_of_the_root() {
        // A symlink pointing outside, then a file written through it, in
        // one layer and across two layers; absolute and relative targets.
        for target in ["/", "..", "../..", "/../.."] {
            let (d, root) = sandbox();
            unpack_into(&root, Layer::new().symlink("escape", target).bytes()).unwrap();
            unpack_into(&root, Layer::new().file("escape/outside", b"pwned").bytes()).unwrap();
            outside_intact(&d);
            // The write landed inside the root instead.
            assert_eq!(fs::read(root.join("outside")).unwrap(), b"pwned");
        }
        let (d, root) = sandbox();
        let layer = Layer::new()
            .symlink("etc", "../../")
            .file("etc/outside", b"pwned")
            .bytes();
        unpack_into(&root, layer).unwrap();
        outside_intact(&d);
        // A symlink as the last component is replaced, not written through.
        let (d, root) = sandbox();
        let outside = d.path().join("outside");
        std::os::unix::fs::symlink(&outside, root.join("f")).unwrap();
        unpack_into(&root, Layer::new().file("f", b"pwned").bytes()).unwrap();
        outside_intact(&d);
        assert!(
            !fs::symlink_metadata(root.join("f"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn hardlinks_must_stay_inside_and_point_at_files() {
        let (d, root) = sandbox();
        let e = unpack_into(
            &root,
            Layer::new()
                .entry(tar::EntryType::Link, "h", "../outside", 0o644, b"")
                .bytes(),
        )
        .unwrap_err();
        assert!(matches!(e, UnpackError::Refused { .. }), "{e}");
        // Through a symlink that points out: resolved inside, where no such file is.
        let (d2, root2) = sandbox();
        let e = unpack_into(
            &root2,
            Layer::new()
                .symlink("up", "/..")
                .entry(tar::EntryType::Link, "h", "up/outside", 0o644, b"")
                .bytes(),
        )
        .unwrap_err();
        assert!(matches!(e, UnpackError::Io { .. }), "{e}");
        // To a symlink: refused (it would link whatever the symlink names).
        let (d3, root3) = sandbox();
        let e = unpack_into(
            &root3,
            Layer::new()
                .symlink("s", "/etc/shadow")
                .entry(tar::EntryType::Link, "h", "s", 0o644, b"")
                .bytes(),
        )
        .unwrap_err();
        assert!(matches!(e, UnpackError::Refused { .. }), "{e}");
        for d in [d, d2, d3] {
            outside_intact(&d);
        }
    }

    #[test]
    fn devices_fifos_and_setuid_are_refused_unless_allowed() {
        let (_d, root) = sandbox();
        for (kind, name) in [
            (tar::EntryType::Char, "dev/mem"),
            (tar::EntryType::Block, "dev/sda"),
            (tar::EntryType::Fifo, "pipe"),
        ] {
            let e = unpack_into(
                &root,
                Layer::new().entry(kind, name, "", 0o600, b"").bytes(),
            )
            .unwrap_err();
            assert!(matches!(e, UnpackError::Refused { .. }), "{name}: {e}");
        }
        let suid = Layer::new()
            .entry(tar::EntryType::Regular, "bin/su", "", 0o4755, b"x")
            .bytes();
        let e = unpack_into(&root, suid.clone()).unwrap_err();
        assert!(e.to_string().contains("setuid"), "{e}");
        let allow = Limits {
            allow_setuid: true,
            ..Limits::default()
        };
        unpack(&suid[..], false, &root, &allow).unwrap();
        let mode = fs::metadata(root.join("bin/su"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o4000, 0o4000);
    }

    #[test]
    fn decompression_bombs_and_entry_floods_stop_at_the_caps() {
        use std::io::Write;
        let (_d, root) = sandbox();
        // 64 MiB of zeros gzip to about 64 KiB.
        let big = vec![0u8; 64 << 20];
        let tar = Layer::new().file("zeros", &big).bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        assert!(gz.len() < 1 << 20);
        let small = Limits {
            max_bytes: 16 << 20,
            ..Limits::default()
        };
        let e = unpack(&gz[..], true, &root, &small).unwrap_err();
        assert!(matches!(e, UnpackError::TooLarge { .. }), "{e}");
        assert!(!root.join("zeros").exists(), "refused before writing");
        let mut many = Layer::new();
        for i in 0..50 {
            many = many.file(&format!("f{i}"), b"");
        }
        let few = Limits {
            max_entries: 10,
            ..Limits::default()
        };
        let e = unpack(&many.bytes()[..], false, &root, &few).unwrap_err();
        assert!(
            matches!(e, UnpackError::TooManyEntries { limit: 10 }),
            "{e}"
        );
    }

    #[test]
    fn whiteouts_remove_and_opaque_whiteouts_hide_lower_layers() {
        let (_d, root) = sandbox();
        let lower = Layer::new()
            .dir("etc")
            .file("etc/a", b"1")
            .file("etc/b", b"2")
            .dir("var")
            .file("var/old", b"3")
            .file("var/keep", b"4")
            .bytes();
        unpack_into(&root, lower).unwrap();
        let upper = Layer::new()
            .file("etc/.wh.a", b"")
            .file("var/new", b"5")
            .dir("var/sub")
            .dir("var/sub/deep")
            .file("var/sub/deep/f", b"6")
            .file("var/.wh..wh..opq", b"")
            .bytes();
        let st = unpack_into(&root, upper).unwrap();
        assert_eq!(st.whiteouts, 2);
        assert!(!root.join("etc/a").exists());
        assert!(root.join("etc/b").exists());
        assert!(!root.join("etc/.wh.a").exists());
        // Opaque: lower-layer contents gone, this layer's entry kept.
        let mut var: Vec<_> = fs::read_dir(root.join("var"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        var.sort();
        assert_eq!(var, ["new", "sub"]);
        assert!(
            root.join("var/sub/deep/f").exists(),
            "this layer's nested file is kept"
        );
        // A whiteout cannot name its way out either.
        let e = unpack_into(&root, Layer::new().file(".wh...", b"").bytes()).unwrap_err();
        assert!(matches!(e, UnpackError::Refused { .. }), "{e}");
    }
}
