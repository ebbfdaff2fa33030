//! Reading manifests from files, directories and stdin.

use anyhow::{Context, Result, bail};
use flotilla_api::Object;
use flotilla_api::manifest::{Source, parse};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Every resource in `paths` (files, directories of `*.toml`, or `-` for stdin).
pub fn load(paths: &[String]) -> Result<Vec<Object>> {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for p in paths {
        if p == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading manifests from stdin")?;
            let cwd = std::env::current_dir()?;
            match parse(&Source {
                name: "<stdin>",
                text: &text,
                base_dir: &cwd,
            }) {
                Ok(o) => objects.extend(o),
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
            match parse(&Source {
                name: &name,
                text: &text,
                base_dir: &base,
            }) {
                Ok(o) => objects.extend(o),
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(objects)
}
