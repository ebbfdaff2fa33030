//! Reading manifests from files, directories and stdin.

use anyhow::{Context, Result, bail};
use flotilla_api::Object;
use flotilla_api::manifest::{Parsed, Source, parse_with_files};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Every resource in `paths` (files, directories of `*.toml`, or `-` for stdin).
pub fn load(paths: &[String]) -> Result<Vec<Object>> {
    load_with_files(paths).map(|p| p.objects)
}

/// [`load`], with the module files the resources name (to upload).
pub fn load_with_files(paths: &[String]) -> Result<Parsed> {
    let mut objects: Vec<Object> = Vec::new();
    let mut modules = std::collections::BTreeMap::new();
    let mut problems = Vec::new();
    for p in paths {
        if p == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading manifests from stdin")?;
            let cwd = std::env::current_dir()?;
            match parse_with_files(&Source {
                name: "<stdin>",
                text: &text,
                base_dir: &cwd,
            }) {
                Ok(p) => {
                    objects.extend(p.objects);
                    modules.extend(p.files);
                }
                Err(e) => problems.push(e.to_string()),
            }
            continue;
        }
        let path = Path::new(p);
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading directory {p}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                .collect();
            v.sort();
            if v.is_empty() {
                bail!("{p} holds no .toml manifests");
            }
            v
        } else {
            vec![path.to_path_buf()]
        };
        for f in files {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            let base = f.parent().map(Path::to_path_buf).unwrap_or_default();
            let base = if base.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                base
            };
            let name = f.display().to_string();
            match parse_with_files(&Source {
                name: &name,
                text: &text,
                base_dir: &base,
            }) {
                Ok(p) => {
                    objects.extend(p.objects);
                    modules.extend(p.files);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(Parsed {
        objects,
        files: modules,
    })
}

/// Uploads the module files the scheduler does not have yet (a `HEAD`
/// asks first), with progress on stderr: a redrawn bar on a terminal, one
/// line per finished upload otherwise.
pub fn upload(
    c: &crate::client::Client,
    files: &std::collections::BTreeMap<String, PathBuf>,
) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    for (digest, path) in files {
        if c.has_blob(digest)? {
            continue;
        }
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut err = std::io::stderr();
        let mut last = 0u64;
        c.upload_blob(digest, path, &mut |sent, total| {
            if tty && (sent == total || sent - last >= 4 << 20) {
                last = sent;
                let width = 24u64;
                let filled = (sent * width).checked_div(total).unwrap_or(width);
                let _ = write!(
                    err,
                    "\ruploading {name} [{}{}] {:.1} / {:.1} MiB",
                    "#".repeat(filled as usize),
                    "-".repeat((width - filled) as usize),
                    sent as f64 / 1048576.0,
                    total as f64 / 1048576.0
                );
                let _ = err.flush();
            }
        })
        .with_context(|| format!("uploading {}", path.display()))?;
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        if tty {
            let _ = writeln!(err);
        }
        let _ = writeln!(
            err,
            "uploaded {name} ({:.1} MiB) as {}",
            size as f64 / 1048576.0,
            &digest[..digest.len().min(19)]
        );
    }
    Ok(())
}
