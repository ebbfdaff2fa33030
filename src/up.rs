//! `flotilla up`: the scheduler and one local agent in one process, joined
//! over QUIC on loopback like any other agent.

use crate::client::Client;
use crate::manifests;
use anyhow::{Context, Result};
use clap::Args;
use flotilla_api::{Kind, Object, PodPhase};
use flotilla_host::link::LinkConfig;
use flotilla_host::node::{AgentConfig, start as start_agent};
use flotilla_scheduler::server::{SchedulerConfig, start as start_scheduler};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct UpArgs {
    /// Where the store, certificates, compiled modules and logs live.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// API listen address (loopback only in this version).
    #[arg(long, default_value = "127.0.0.1:7370")]
    api: SocketAddr,
    /// QUIC listen address for agents.
    #[arg(long, default_value = "127.0.0.1:7371")]
    quic: SocketAddr,
    /// Name of the local node.
    #[arg(long, default_value = "local")]
    node: String,
    /// Manifests to apply once the cluster is up (file, directory; repeatable).
    #[arg(short = 'f', long = "filename")]
    files: Vec<String>,
    /// Most wasm members the local agent runs at once.
    #[arg(long, default_value_t = 4096)]
    max_instances: u32,
    /// Seconds without heartbeat before a node is NotReady.
    #[arg(long, default_value_t = 3)]
    node_timeout: u64,
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".flotilla")
}

pub fn run(args: UpArgs) -> Result<ExitCode> {
    if !args.api.ip().is_loopback() {
        anyhow::bail!(
            "the API has no authentication yet, so it listens on loopback only; use --api 127.0.0.1:PORT"
        );
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("flotilla")
        .build()?;
    rt.block_on(up(args))
}

async fn up(args: UpArgs) -> Result<ExitCode> {
    let began = Instant::now();
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let sched = start_scheduler(SchedulerConfig {
        data_dir: data_dir.clone(),
        api_addr: args.api,
        quic_addr: args.quic,
        node_timeout: Duration::from_secs(args.node_timeout),
        heartbeat: Duration::from_millis(500),
    })
    .await?;
    let cert = sched.issue_agent_cert(&args.node)?;
    let agent = start_agent(AgentConfig {
        data_dir: data_dir.join("agent"),
        node_name: args.node.clone(),
        labels: [("flotilla.dev/hostname".to_string(), args.node.clone())].into(),
        capacity: None,
        server: sched.quic_addr,
        ca_pem: sched.ca_pem().to_string(),
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
        link: LinkConfig::default(),
        max_instances: args.max_instances,
    })
    .await?;
    let url = format!("http://{}", sched.api_addr);
    std::fs::write(data_dir.join("api.addr"), &url).context("writing api.addr")?;
    eprintln!(
        "flotilla is up in {} ms — API {url}, agents on quic://{}, data in {}",
        began.elapsed().as_millis(),
        sched.quic_addr,
        data_dir.display()
    );

    if !args.files.is_empty() {
        let files = args.files.clone();
        let url2 = url.clone();
        let applied = tokio::task::spawn_blocking(move || apply_and_wait(&url2, &files)).await?;
        if let Err(e) = applied {
            eprintln!("error: {e:#}");
        }
    }
    let try_next = format!(
        "\nTry next (in another terminal):\n  export FLOTILLA_SERVER={url}\n  flotilla get pods -o wide\n  flotilla logs <pod>            # e.g. a counter-… pod, add -f to follow\n  flotilla describe pod <pod>\n  flotilla scale deployment counter --replicas 3\n  flotilla apply -f samples/manifests/crasher.toml && flotilla get pods\n  flotilla nodes; flotilla events\nPress Ctrl-C to stop (state is kept in {}).\n",
        data_dir.display()
    );
    eprint!("{try_next}");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping…");
    agent.shutdown().await;
    sched.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Applies manifests and waits (up to 30 s) until their pods run, with progress.
fn apply_and_wait(url: &str, files: &[String]) -> Result<()> {
    let c = Client::new(url);
    let objects = manifests::load(files)?;
    let res = c.apply(objects.clone())?;
    for r in &res.results {
        match &r.error {
            Some(e) => eprintln!(
                "error: {}/{}: {e}",
                r.kind.to_string().to_lowercase(),
                r.name
            ),
            None => eprintln!(
                "{}/{} {}",
                r.kind.to_string().to_lowercase(),
                r.name,
                r.action
            ),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    loop {
        let mut waiting = Vec::new();
        for o in &objects {
            let m = o.meta();
            match c.get(o.kind(), &m.namespace, &m.name) {
                Ok(Object::Pod(p))
                    if matches!(p.status.phase, PodPhase::Running | PodPhase::Succeeded) => {}
                Ok(Object::Deployment(d)) if d.status.ready >= d.spec.replicas => {}
                Ok(_) => waiting.push(format!(
                    "{}/{}",
                    o.kind().to_string().to_lowercase(),
                    m.name
                )),
                Err(_) => {}
            }
        }
        let line = if waiting.is_empty() {
            "all sample workloads are running".to_string()
        } else {
            format!("waiting for {}", waiting.join(", "))
        };
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("still waiting after 30 s; see `flotilla describe` for reasons");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pods = c.list(Kind::Pod, None, None)?;
    if !pods.is_empty() {
        eprint!("\n{}", crate::view::table(&pods, true, true));
    }
    Ok(())
}
