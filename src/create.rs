//! `flotilla create configmap|secret NAME --from-file PATH… --from-literal
//! K=V…`: a ConfigMap or Secret made from files and literals on this
//! machine, refused if one of that name exists.

use anyhow::{Context, Result, bail};
use flotilla_api::config::{ConfigMap, check_data, encode_binary};
use flotilla_api::{Object, ObjectMeta, Secret};
use std::collections::BTreeMap;
use std::path::Path;

/// Largest file taken by `--from-file` (the API caps whole objects at
/// 256 KiB encoded; this catches a wrong path early).
const MAX_FILE: u64 = 256 << 10;

#[derive(clap::Args)]
pub struct FromArgs {
    pub name: String,
    /// A file (its name is the key), KEY=FILE, or a directory (each regular
    /// file in it). Repeatable.
    #[arg(long = "from-file")]
    pub files: Vec<String>,
    /// KEY=VALUE. Repeatable.
    #[arg(long = "from-literal")]
    pub literals: Vec<String>,
    /// A label, KEY=VALUE (e.g. flotilla.dev/gateway-tls=true for a
    /// certificate the function gateways serve). Repeatable.
    #[arg(short = 'l', long = "label")]
    pub labels: Vec<String>,
}

/// Text values and binary ones (files that are not UTF-8).
type Data = (BTreeMap<String, String>, BTreeMap<String, String>);

fn put(data: &mut Data, key: String, bytes: Vec<u8>, from: &str) -> Result<()> {
    if data.0.contains_key(&key) || data.1.contains_key(&key) {
        bail!("key '{key}' is given twice ({from})");
    }
    match String::from_utf8(bytes) {
        Ok(text) => data.0.insert(key, text),
        Err(e) => data.1.insert(key, encode_binary(e.as_bytes())),
    };
    Ok(())
}

fn read_file(data: &mut Data, key: String, path: &Path) -> Result<()> {
    let md = std::fs::metadata(path).with_context(|| format!("--from-file {}", path.display()))?;
    if md.len() > MAX_FILE {
        bail!(
            "--from-file {}: {} bytes is more than the {MAX_FILE}-byte limit of a ConfigMap or Secret",
            path.display(),
            md.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("--from-file {}", path.display()))?;
    put(data, key, bytes, &path.display().to_string())
}

fn file_key(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| {
            format!(
                "--from-file {}: no file name to use as key; write KEY=PATH",
                path.display()
            )
        })
}

/// The data `args` name.
pub fn data(args: &FromArgs) -> Result<Data> {
    let mut data: Data = Default::default();
    for f in &args.files {
        let (key, path) = match f.split_once('=') {
            Some((k, p)) => (Some(k.to_string()), Path::new(p)),
            None => (None, Path::new(f.as_str())),
        };
        if path.is_dir() {
            if key.is_some() {
                bail!("--from-file {f}: a directory takes no KEY=");
            }
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("--from-file {f}"))?
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                read_file(&mut data, file_key(&e.path())?, &e.path())?;
            }
        } else {
            let key = match key {
                Some(k) => k,
                None => file_key(path)?,
            };
            read_file(&mut data, key, path)?;
        }
    }
    for l in &args.literals {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--from-literal {l}: write KEY=VALUE");
        };
        put(
            &mut data,
            k.to_string(),
            v.as_bytes().to_vec(),
            "--from-literal",
        )?;
    }
    check_data(&data.0, &data.1).map_err(anyhow::Error::msg)?;
    Ok(data)
}

/// The object `flotilla create KIND` makes.
pub fn object(secret: bool, namespace: &str, args: &FromArgs) -> Result<Object> {
    let (data, binary_data) = data(args)?;
    let mut metadata = ObjectMeta {
        name: args.name.clone(),
        namespace: namespace.to_string(),
        ..ObjectMeta::default()
    };
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label {l}: expected KEY=VALUE"))?;
        metadata.labels.insert(k.to_string(), v.to_string());
    }
    Ok(if secret {
        Object::Secret(Secret {
            metadata,
            data,
            binary_data,
        })
    } else {
        Object::ConfigMap(ConfigMap {
            metadata,
            data,
            binary_data,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_directories_and_literals_become_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.conf"), "a=1\n").unwrap();
        std::fs::write(dir.path().join("logo.bin"), [0xffu8, 0, 1]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let one = dir.path().join("app.conf").display().to_string();
        let args = FromArgs {
            name: "app".into(),
            files: vec![dir.path().display().to_string(), format!("renamed={one}")],
            literals: vec!["mode=fast".into()],
            labels: vec!["tier=web".into()],
        };
        let (text, binary) = data(&args).unwrap();
        let o = object(true, "shop", &args).unwrap();
        assert_eq!(o.meta().labels["tier"], "web");
        let unlabelled = FromArgs {
            labels: vec!["tier".into()],
            ..FromArgs {
                name: "x".into(),
                files: vec![],
                literals: vec![],
                labels: vec![],
            }
        };
        assert!(object(true, "shop", &unlabelled).is_err());
        assert_eq!(text["app.conf"], "a=1\n");
        assert_eq!(text["renamed"], "a=1\n");
        assert_eq!(text["mode"], "fast");
        assert_eq!(binary["logo.bin"], encode_binary(&[0xff, 0, 1]));
        assert_eq!(text.len() + binary.len(), 4, "the subdirectory is skipped");
        let twice = FromArgs {
            literals: vec!["mode=a".into(), "mode=b".into()],
            ..FromArgs {
                name: "x".into(),
                files: vec![],
                literals: vec![],
                labels: vec![],
            }
        };
        assert!(data(&twice).unwrap_err().to_string().contains("twice"));
        let bad = FromArgs {
            name: "x".into(),
            files: vec![],
            literals: vec!["a/b=1".into()],
            labels: vec![],
        };
        assert!(data(&bad).is_err());
    }
}
