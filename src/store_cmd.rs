//! `flotilla store migrate`: copies a scheduler's redb store into etcd, so
//! a site that started on the embedded store can move to a highly
//! available control plane.

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use flotilla_scheduler::server::StoreBackend;
use flotilla_scheduler::store::{EtcdStore, RedbStore, Store};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum StoreCmd {
    /// Copy every object of a stopped scheduler's store.redb into etcd
    /// (objects keep their uid and creation time; keys etcd already holds
    /// are left alone, so running it again resumes). Schedulers then start
    /// with `--store etcd://…` and the same data dir (or a copy of its
    /// pki/ and secrets.key): Secrets stay sealed with that key.
    Migrate {
        /// The data dir of the scheduler whose store is copied.
        #[arg(long, env = "FLOTILLA_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        to: crate::up::StoreArgs,
    },
}

pub fn run(cmd: &StoreCmd) -> Result<ExitCode> {
    match cmd {
        StoreCmd::Migrate { data_dir, to } => migrate(data_dir, to),
    }
}

fn migrate(data_dir: &std::path::Path, to: &crate::up::StoreArgs) -> Result<ExitCode> {
    let StoreBackend::Etcd(etcd) = to.backend()? else {
        bail!("migrate copies into etcd: give --store etcd://HOST:PORT[,…]");
    };
    let path = data_dir.join("store.redb");
    if !path.exists() {
        bail!(
            "{} does not exist; --data-dir names the scheduler's data dir",
            path.display()
        );
    }
    let sealer = Arc::new(
        flotilla_api::seal::Sealer::load_or_create(&data_dir.join("secrets.key"))
            .context("the secrets key of the data dir")?,
    );
    let from = RedbStore::open_sealed(&path, Some(sealer.clone())).with_context(|| {
        format!(
            "cannot open {} (stop the scheduler using it first)",
            path.display()
        )
    })?;
    let objects = from.list("");
    let shown = etcd.endpoints.join(",");
    let to = EtcdStore::connect(&etcd, Some(sealer))
        .with_context(|| format!("cannot use etcd at {shown}"))?;
    let total = objects.len();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (copied, skipped) = to.import(&objects, |done| {
        if tty {
            eprint!("\rcopying objects: {done}/{total}");
            let _ = std::io::stderr().flush();
        }
    })?;
    if tty {
        eprintln!();
    }
    println!(
        "copied {copied} objects from {} to etcd at {shown}{} ({skipped} already there, left alone)",
        path.display(),
        etcd.prefix,
    );
    Ok(ExitCode::SUCCESS)
}
