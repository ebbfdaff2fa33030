//! `flotilla pull | push | images | prune`: the node's image store, used
//! directly (like `crictl` on a Kubernetes node), and `flotilla shim`.

use anyhow::{Context, Result};
use clap::Args;
use flotilla_host::image::{ImageStore, Platform, Progress, RegistryConfig};
use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args)]
pub struct StoreArgs {
    /// The agent's data dir whose image store to use
    /// [default: the `flotilla up` one, ~/.flotilla/agent].
    #[arg(long, env = "FLOTILLA_AGENT_DIR")]
    pub agent_dir: Option<PathBuf>,
    /// Registry credentials and plain-HTTP registries (TOML, see README);
    /// registries on loopback need no entry here: the reference is yours.
    #[arg(long, env = "FLOTILLA_REGISTRY_CONFIG")]
    pub registry_config: Option<PathBuf>,
}

impl StoreArgs {
    fn agent_dir(&self) -> PathBuf {
        self.agent_dir.clone().unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".flotilla/agent")
        })
    }

    fn open(&self) -> Result<ImageStore> {
        let registries = RegistryConfig {
            trust_loopback: true,
            ..load_registries(self.registry_config.as_deref())?
        };
        let dir = self.agent_dir().join("images");
        ImageStore::open(&dir, registries)
            .with_context(|| format!("opening the image store in {}", dir.display()))
    }
}

/// Reads the registry config, if one is given.
pub fn load_registries(path: Option<&std::path::Path>) -> Result<RegistryConfig> {
    match path {
        Some(p) => Ok(RegistryConfig::load(p)?),
        None => Ok(RegistryConfig::default()),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn mib(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// Progress on stderr: a redrawn line per blob on a terminal, one line per
/// finished blob otherwise.
struct Bars {
    tty: bool,
    sizes: HashMap<String, u64>,
    drawn: HashSet<String>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            tty: std::io::stderr().is_terminal(),
            sizes: HashMap::new(),
            drawn: HashSet::new(),
        }
    }

    fn on(&mut self, p: Progress) {
        let mut err = std::io::stderr();
        match p {
            Progress::Resolved {
                digest,
                layers,
                total_bytes,
            } => {
                let _ = writeln!(
                    err,
                    "manifest {}: {layers} layer(s), {}",
                    short(&digest),
                    mib(total_bytes)
                );
            }
            Progress::Cached { digest, size } => {
                let _ = writeln!(err, "{}  {:>10}  already stored", short(&digest), mib(size));
            }
            Progress::Blob { digest, done, size } => {
                self.sizes.insert(digest.clone(), size);
                let width = 24usize;
                let filled = if size == 0 {
                    width
                } else {
                    (done as usize * width / size as usize).min(width)
                };
                let line = format!(
                    "{}  [{}{}] {:>10} / {}",
                    short(&digest),
                    "#".repeat(filled),
                    "-".repeat(width - filled),
                    mib(done),
                    mib(size)
                );
                if self.tty {
                    let _ = write!(err, "\r{line}");
                    if done >= size {
                        let _ = writeln!(err);
                    }
                } else if done >= size && self.drawn.insert(digest) {
                    let _ = writeln!(err, "{line}");
                }
                let _ = err.flush();
            }
        }
    }
}

pub fn pull(store: &StoreArgs, reference: &str, platform: Option<&str>) -> Result<ExitCode> {
    let s = store.open()?;
    let platform = match platform {
        Some(p) => Platform::parse(p).map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    let began = Instant::now();
    let mut bars = Bars::new();
    let rec = runtime()?.block_on(s.pull(reference, &platform, &mut |p| bars.on(p)))?;
    eprintln!(
        "pulled {} ({:?}, {}) in {:.2?}",
        rec.reference,
        rec.kind,
        mib(rec.size()),
        began.elapsed()
    );
    println!("{}", rec.digest);
    Ok(ExitCode::SUCCESS)
}

pub fn push(store: &StoreArgs, file: &std::path::Path, reference: &str) -> Result<ExitCode> {
    let s = store.open()?;
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    eprintln!("pushing {} ({}) to {reference}", file.display(), mib(size));
    let mut bars = Bars::new();
    let digest = runtime()?.block_on(s.push_wasm(file, reference, &mut |p| bars.on(p)))?;
    eprintln!("pushed {reference}");
    println!("{digest}");
    Ok(ExitCode::SUCCESS)
}

pub fn list(store: &StoreArgs, json: bool) -> Result<ExitCode> {
    let s = store.open()?;
    let images = s.list()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = flotilla_api::time::now_ms();
    let mut t = crate::table::Table::new(&["REFERENCE", "KIND", "DIGEST", "SIZE", "PULLED"]);
    for i in &images {
        t.row(vec![
            i.reference.clone(),
            format!("{:?}", i.kind).to_lowercase(),
            short(&i.digest).to_string(),
            mib(i.size()),
            flotilla_api::time::age(i.pulled_ms, now),
        ]);
    }
    if t.is_empty() {
        eprintln!(
            "no images in {}",
            store.agent_dir().join("images").display()
        );
    } else {
        print!("{}", t.render());
    }
    Ok(ExitCode::SUCCESS)
}

/// Images the agent's saved pods use (kept by prune).
fn in_use(agent_dir: &std::path::Path) -> Result<HashSet<String>> {
    let path = agent_dir.join("pods.json");
    let saved: Vec<flotilla_api::proto::Assignment> = match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?
        }
        Err(_) => Vec::new(),
    };
    Ok(saved
        .iter()
        .flat_map(|a| a.spec.members.iter())
        .filter_map(|m| m.pull_ref())
        .filter_map(|r| flotilla_host::image::parse_ref(&r).ok().map(|r| r.whole()))
        .collect())
}

pub fn prune(store: &StoreArgs) -> Result<ExitCode> {
    let s = store.open()?;
    let keep = in_use(&store.agent_dir())?;
    let before = s.usage()?;
    let p = s.prune(&keep)?;
    for i in &p.images {
        eprintln!("removed {i}");
    }
    println!(
        "removed {} image(s), {} blob(s), freed {} ({} kept in use by pods, {} stored)",
        p.images.len(),
        p.blobs,
        mib(p.bytes),
        keep.len(),
        mib(before - p.bytes)
    );
    Ok(ExitCode::SUCCESS)
}
