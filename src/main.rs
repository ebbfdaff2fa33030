//! The `flotilla` command: CLI wiring only; the work happens in the crates.

mod client;
mod config;
mod create;
mod images;
mod kv;
mod manifests;
mod plugin_new;
mod rollout;
mod run;
mod store_cmd;
mod table;
mod up;
mod view;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use client::Client;
use flotilla_api::{Kind, Object};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "A lightweight orchestrator for WebAssembly workloads and OCI containers"
)]
struct Cli {
    /// Client config file [default: ~/.flotilla/config.toml].
    #[arg(long, global = true, env = "FLOTILLA_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Context of the config to use instead of its current one.
    #[arg(long, global = true)]
    context: Option<String>,
    /// API server URL (overrides the context's); several schedulers' URLs
    /// separated by commas are tried in turn.
    #[arg(long, global = true, env = "FLOTILLA_SERVER")]
    server: Option<String>,
    /// Bearer token (overrides the context's credentials).
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Namespace to act in [default: the context's, else "default"].
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Wide,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an all-in-one cluster (scheduler + local agent) in the foreground.
    Up(up::UpArgs),
    /// Run a scheduler alone; agents join it with `flotilla host`.
    Scheduler(up::UpArgs),
    /// Run an agent that joins a scheduler (`--join ADDR --token FLT1…`).
    Host(up::HostArgs),
    /// Run many simulated agents (real QUIC links, no workloads) for scale tests.
    Simulate(up::SimulateArgs),
    /// Create a ConfigMap or Secret from files and literals (refused if it
    /// exists): `create configmap app --from-file app.conf --from-literal mode=fast`.
    Create {
        #[command(subcommand)]
        what: CreateCmd,
    },
    /// Create or update resources from manifests.
    Apply {
        /// A manifest file, a directory of them, or - for stdin. Repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Run a module (uploaded from this machine) or an image as a one-shot
    /// pod: stream its output, exit with its exit code, remove the pod.
    Run {
        /// The .wasm module or component to run (omit with --image).
        file: Option<String>,
        /// A container image, or oci://REF for a wasm artifact, instead of a file.
        #[arg(long)]
        image: Option<String>,
        /// Environment variables, NAME=VALUE. Repeatable.
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// The pod's name (default: run-MEMBER-RANDOM).
        #[arg(long)]
        name: Option<String>,
        /// Keep the pod after it finishes.
        #[arg(long)]
        keep: bool,
        /// Arguments for the program (after --).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// List resources.
    Get {
        /// pods, deployments, nodes (or po, deploy, no).
        kind: String,
        name: Option<String>,
        /// Label selector, e.g. app=web,tier!=db
        #[arg(short = 'l', long)]
        selector: Option<String>,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show a resource in detail, with its recent events.
    Describe { kind: String, name: String },
    /// Send one HTTP request to a Function through the API (no route or
    /// node address needed) and print its answer; exits 1 on a 4xx or 5xx.
    Invoke {
        /// The Function's name.
        name: String,
        /// Path and query the function sees.
        #[arg(long, default_value = "/")]
        path: String,
        /// The request body: text, @FILE, or - for stdin (makes the
        /// default method POST).
        #[arg(short = 'd', long)]
        data: Option<String>,
        /// A header, `K: V`. Repeatable; `Host: …` sets the host the
        /// function sees.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The method [default: GET, or POST with --data].
        #[arg(short = 'X', long)]
        method: Option<String>,
        /// Print the status line and headers before the body.
        #[arg(short = 'i', long)]
        include: bool,
    },
    /// Print a pod member's log, or every instance's of a function
    /// (`function/NAME`, each line of a request tagged `[req ID]`).
    Logs {
        /// POD, or function/NAME.
        pod: String,
        /// Only the lines of one function request (its
        /// x-flotilla-request-id).
        #[arg(long)]
        request: Option<String>,
        /// Only wasi:logging lines at this level or above (trace, debug,
        /// info, warn, error, critical); other output is left out.
        #[arg(long)]
        level: Option<String>,
        /// Member (needed when the pod has several).
        #[arg(short = 'c', long)]
        member: Option<String>,
        #[arg(short, long)]
        follow: bool,
        /// The log of the member's previous run.
        #[arg(short, long)]
        previous: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<u64>,
    },
    /// Delete resources by name or by manifest.
    Delete {
        kind: Option<String>,
        names: Vec<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
    },
    /// Set a Deployment's replica count.
    Scale {
        /// `deployment/NAME`, or `deployment NAME`, or just `NAME`.
        target: String,
        name: Option<String>,
        #[arg(long)]
        replicas: u32,
    },
    /// Rollouts of a Deployment: status, history, undo, pause, resume, restart.
    Rollout {
        #[command(subcommand)]
        cmd: rollout::RolloutCmd,
    },
    /// What nodes and pods use now (CPU in millicores, memory), as agents
    /// last reported it.
    Top {
        #[command(subcommand)]
        what: TopCmd,
    },
    /// Which scheduler leads (several may share one etcd store), as the
    /// server contacted knows it.
    Leader {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Recent events.
    Events {
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// User certificates: `user create NAME --role R --out FILE` writes a client
    /// config holding a new certificate signed by the cluster CA.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Secrets at rest: `secrets rotate-key` seals every Secret with a new key.
    Secrets {
        #[command(subcommand)]
        cmd: SecretsCmd,
    },
    /// Plugins: `plugin new NAME` writes a project on flotilla-sdk.
    Plugin {
        #[command(subcommand)]
        cmd: PluginCmd,
    },
    /// Key-value buckets members use through wasi:keyvalue (-n: namespace).
    Kv {
        #[command(subcommand)]
        cmd: kv::KvCmd,
    },
    /// API tokens: create, list, revoke.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Show or switch client config contexts.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Stop placing new pods on a node.
    Cordon { node: String },
    /// Allow placing pods on a node again.
    Uncordon { node: String },
    /// Cordon a node and move its Deployment pods elsewhere.
    Drain {
        node: String,
        /// Also delete bare pods (not owned by a Deployment); they are not re-created.
        #[arg(long)]
        force: bool,
    },
    /// Nodes with their capacity and what is allocated.
    Nodes {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Pull an image or wasm artifact into this node's image store.
    Pull {
        /// HOST[:PORT]/REPO:TAG or …@sha256:DIGEST
        reference: String,
        /// os/arch[/variant] to take from a multi-platform index [default: this machine's].
        #[arg(long)]
        platform: Option<String>,
        #[command(flatten)]
        store: images::StoreArgs,
    },
    /// Publish a .wasm module or component as an OCI wasm artifact.
    Push {
        file: std::path::PathBuf,
        /// HOST[:PORT]/REPO:TAG
        reference: String,
        #[command(flatten)]
        store: images::StoreArgs,
    },
    /// List the images in this node's image store.
    Images {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        store: images::StoreArgs,
    },
    /// Remove stored images no pod on this node uses, and their blobs.
    Prune {
        #[command(flatten)]
        store: images::StoreArgs,
    },
    /// The scheduler's object store: `store migrate` copies a stopped
    /// scheduler's redb store into etcd.
    Store {
        #[command(subcommand)]
        cmd: store_cmd::StoreCmd,
    },
}

#[derive(Subcommand)]
enum SecretsCmd {
    /// Make a new key for Secrets at rest, seal every Secret with it and
    /// forget the old one (admin).
    RotateKey,
}

#[derive(Subcommand)]
enum CreateCmd {
    /// A ConfigMap: settings pods read as variables or files.
    #[command(alias = "config", alias = "cm")]
    Configmap(create::FromArgs),
    /// A Secret: like a ConfigMap, hidden from viewers and kept off nodes' disks.
    Secret(create::FromArgs),
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Write a buildable plugin project (Cargo.toml, src/lib.rs,
    /// plugin.toml, README.md) for the admission or scheduler world.
    New(plugin_new::NewArgs),
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a bearer token; it is printed once and stored only as a hash.
    Create {
        /// admin, edit or view (API tokens).
        #[arg(long, required_unless_present = "join")]
        role: Option<String>,
        /// A join token for `flotilla host --join` instead of an API token.
        #[arg(long)]
        join: bool,
        /// Lifetime, e.g. 30m, 12h, 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// How many nodes a join token may admit (default: any number until it expires).
        #[arg(long, requires = "join")]
        uses: Option<u32>,
    },
    /// List tokens and the user certificates issued (ids, roles, expiry;
    /// never secrets).
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Revoke a token, or a user's client certificate by its serial (the
    /// id `token list` shows); it stops working at once, even on a
    /// connection already open.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Issue a client certificate (-n limits it to a namespace) into a new config file.
    Create {
        name: String,
        /// admin, edit or view.
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. 30d.
        #[arg(long, default_value = "30d")]
        ttl: String,
        /// Where to write the client config (created with mode 0600).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum TopCmd {
    /// Each node's CPU and memory in use, against what it offers.
    Nodes {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Each pod's CPU and memory (the sum of its members').
    Pods {
        /// One row per member.
        #[arg(long)]
        containers: bool,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// Millicores as `top` shows them (`-`: not measured yet).
fn cpu_cell(m: Option<u64>) -> String {
    m.map_or_else(|| "-".into(), |m| format!("{m}m"))
}

fn mem_cell(b: u64) -> String {
    format!("{}Mi", (b + (1 << 19)) >> 20)
}

fn top(c: &Client, ns: &str, what: TopCmd) -> Result<ExitCode> {
    match what {
        TopCmd::Nodes { output } => {
            let nodes = c.top_nodes()?;
            if output == Output::Json {
                print_json(&nodes)?;
                return Ok(ExitCode::SUCCESS);
            }
            if nodes.is_empty() {
                eprintln!(
                    "No figures yet: agents report every --metrics-interval (15 s by default)."
                );
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = table::Table::new(&["NAME", "CPU", "CPU%", "MEMORY", "MEMORY%"]);
            let pct = |used: u64, of: u64| {
                (used * 100)
                    .checked_div(of)
                    .map_or_else(|| "-".to_string(), |p| format!("{p}%"))
            };
            for n in nodes {
                t.row(vec![
                    n.name,
                    cpu_cell(n.cpu_millis),
                    n.cpu_millis
                        .map_or_else(|| "-".into(), |m| pct(m, n.allocatable_cpu_millis)),
                    mem_cell(n.memory_bytes),
                    pct(n.memory_bytes, n.allocatable_memory_bytes),
                ]);
            }
            print!("{}", t.render());
        }
        TopCmd::Pods {
            containers,
            all_namespaces,
            output,
        } => {
            let pods = c.top_pods((!all_namespaces).then_some(ns))?;
            if output == Output::Json {
                print_json(&pods)?;
                return Ok(ExitCode::SUCCESS);
            }
            if pods.is_empty() {
                eprintln!(
                    "No figures yet for pods in {}.",
                    if all_namespaces { "any namespace" } else { ns }
                );
                return Ok(ExitCode::SUCCESS);
            }
            let mut head = Vec::new();
            if all_namespaces {
                head.push("NAMESPACE");
            }
            head.push("NAME");
            if containers {
                head.push("MEMBER");
            }
            head.extend(["CPU", "MEMORY"]);
            let mut t = table::Table::new(&head);
            for p in pods {
                let mut lead = Vec::new();
                if all_namespaces {
                    lead.push(p.namespace.clone());
                }
                lead.push(p.name.clone());
                if containers {
                    for m in &p.members {
                        let mut row = lead.clone();
                        row.extend([
                            m.name.clone(),
                            cpu_cell(m.cpu_millis),
                            mem_cell(m.memory_bytes),
                        ]);
                        t.row(row);
                    }
                } else {
                    lead.extend([cpu_cell(p.cpu_millis), mem_cell(p.memory_bytes)]);
                    t.row(lead);
                }
            }
            print!("{}", t.render());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the config with credentials redacted.
    View,
    /// Make a context the current one.
    UseContext { name: String },
    /// List contexts.
    GetContexts,
}

fn parse_ttl(s: &str) -> Result<u64> {
    let (num, mult) = match s.strip_suffix('d') {
        Some(n) => (n, 86_400),
        None => match s.strip_suffix('h') {
            Some(n) => (n, 3_600),
            None => match s.strip_suffix('m') {
                Some(n) => (n, 60),
                None => (s.strip_suffix('s').unwrap_or(s), 1),
            },
        },
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad ttl '{s}': use a number with s, m, h or d (e.g. 12h)"))?;
    Ok(n * mult)
}

fn config_path(cli: &Cli) -> (std::path::PathBuf, bool) {
    match &cli.config {
        Some(p) => (p.clone(), true),
        None => (config::default_path(), false),
    }
}

/// The context to talk to, after flags and environment overrides.
fn context(cli: &Cli) -> Result<config::Context> {
    let (path, explicit) = config_path(cli);
    let mut ctx = if path.exists() {
        config::ClientConfig::load(&path)?
            .context(cli.context.as_deref())?
            .clone()
    } else if explicit {
        bail!("client config {} does not exist", path.display());
    } else {
        config::Context {
            name: "default".into(),
            server: "https://127.0.0.1:7370".into(),
            ..Default::default()
        }
    };
    if let Some(s) = &cli.server {
        // One or several (comma-separated) instead of the context's.
        ctx.server = s.clone();
        ctx.servers.clear();
    }
    if let Some(ns) = &cli.namespace {
        ctx.namespace = Some(ns.clone());
    }
    if ctx.ca.is_none() && ctx.server.starts_with("https://") {
        bail!(
            "no client config found at {} (it holds the cluster CA and credentials)\nhint: `flotilla up` writes one into its data dir; pass it with --config or FLOTILLA_CONFIG",
            path.display()
        );
    }
    Ok(ctx)
}

fn kind(s: &str) -> Result<Kind> {
    Kind::from_user(s).with_context(|| {
        format!("unknown resource type '{s}'; use pods, deployments, nodes or events")
    })
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn main() -> ExitCode {
    flotilla_host::executor::wasm::runtime::tune_allocator();
    // `flotilla shim …` is started by the agent for each container; it skips
    // the CLI's parsing and runs the shim directly.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("shim") {
        return match flotilla_host::executor::container::shim::ShimArgs::parse(&argv[2..]) {
            Ok(a) => ExitCode::from(flotilla_host::executor::container::shim::run(a) as u8),
            Err(e) => {
                eprintln!("error: flotilla shim: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.cmd {
        Cmd::Up(_) | Cmd::Scheduler(_) | Cmd::Host(_) | Cmd::Simulate(_) => {
            return match cli.cmd {
                Cmd::Up(args) => up::run(args),
                Cmd::Scheduler(args) => up::scheduler(args),
                Cmd::Host(args) => up::host(args),
                Cmd::Simulate(args) => up::simulate(args),
                _ => unreachable!("matched above"),
            };
        }
        Cmd::Config { cmd } => return config_cmd(&cli, cmd),
        Cmd::Plugin {
            cmd: PluginCmd::New(args),
        } => return plugin_new::new(args).map(|()| ExitCode::SUCCESS),
        Cmd::Pull {
            reference,
            platform,
            store,
        } => return images::pull(store, reference, platform.as_deref()),
        Cmd::Push {
            file,
            reference,
            store,
        } => return images::push(store, file, reference),
        Cmd::Images { output, store } => return images::list(store, *output == Output::Json),
        Cmd::Prune { store } => return images::prune(store),
        Cmd::Store { cmd } => return store_cmd::run(cmd),
        _ => {}
    }
    let ctx = context(&cli)?;
    let c = Client::new(&ctx, cli.token.clone())?;
    let ns_owned = ctx.namespace.clone().unwrap_or_else(|| "default".into());
    let ns = ns_owned.as_str();
    match cli.cmd {
        Cmd::Up(_)
        | Cmd::Scheduler(_)
        | Cmd::Host(_)
        | Cmd::Simulate(_)
        | Cmd::Config { .. }
        | Cmd::Plugin { .. }
        | Cmd::Pull { .. }
        | Cmd::Push { .. }
        | Cmd::Images { .. }
        | Cmd::Prune { .. }
        | Cmd::Store { .. } => {
            unreachable!("handled above")
        }
        Cmd::Token { cmd } => return token_cmd(&c, cmd, cli.namespace.as_deref()),
        Cmd::User { cmd } => {
            let UserCmd::Create {
                name,
                role,
                ttl,
                out,
            } = cmd;
            let role = flotilla_api::Role::parse(&role)
                .with_context(|| format!("unknown role '{role}'; use admin, edit or view"))?;
            let namespaces: Vec<String> = cli.namespace.clone().into_iter().collect();
            if out.exists() {
                bail!("{} exists; choose another --out", out.display());
            }
            let issued = c.create_certificate(&flotilla_scheduler::api::CertificateRequest {
                name: name.clone(),
                role,
                namespaces: namespaces.clone(),
                ttl_secs: parse_ttl(&ttl)?,
            })?;
            let cfg = config::ClientConfig {
                current_context: name.clone(),
                contexts: vec![config::Context {
                    name: name.clone(),
                    server: ctx.server.clone(),
                    servers: ctx.servers.clone(),
                    namespace: namespaces.first().cloned(),
                    ca: Some(issued.ca_pem),
                    client_cert: Some(issued.cert_pem),
                    client_key: Some(issued.key_pem),
                    token: None,
                }],
            };
            cfg.save(&out)?;
            println!(
                "wrote a client config for {name} (role {role}) to {}; certificate {} (revoke with `flotilla token revoke {}`)",
                out.display(),
                issued.serial,
                issued.serial
            );
        }
        Cmd::Run {
            file,
            image,
            env,
            name,
            keep,
            args,
        } => {
            return run::run(
                &c,
                ns,
                run::RunArgs {
                    file,
                    image,
                    env,
                    name,
                    keep,
                    args,
                },
            );
        }
        Cmd::Secrets {
            cmd: SecretsCmd::RotateKey,
        } => {
            let r = c.rotate_secret_key()?;
            println!(
                "secrets are sealed with key {} now ({} sealed again)",
                r.key, r.secrets
            );
        }
        Cmd::Create { what } => {
            let (secret, args) = match &what {
                CreateCmd::Configmap(a) => (false, a),
                CreateCmd::Secret(a) => (true, a),
            };
            let obj = create::object(secret, ns, args)?;
            let res = c.create(vec![obj])?;
            for r in res.results {
                let what = format!("{}/{}", r.kind.to_string().to_lowercase(), r.name);
                match r.error {
                    Some(e) => bail!("{what}: {e}"),
                    None => println!("{what} {}", r.action),
                }
            }
        }
        Cmd::Apply { files } => {
            let parsed = manifests::load_with_files(&files)?;
            manifests::upload(&c, &parsed.files)?;
            let res = c.apply(parsed.objects)?;
            let mut failed = false;
            for r in res.results {
                let what = format!("{}/{}", r.kind.to_string().to_lowercase(), r.name);
                match r.error {
                    Some(e) => {
                        failed = true;
                        eprintln!("error: {what}: {e}");
                    }
                    None => println!("{what} {}", r.action),
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Get {
            kind: k,
            name,
            selector,
            all_namespaces,
            output,
        } => {
            let k = kind(&k)?;
            if k == Kind::Event {
                return events(&c, ns, all_namespaces, output);
            }
            let objs: Vec<Object> = match &name {
                Some(n) => vec![c.get(k, ns, n)?],
                None => c.list(k, (!all_namespaces).then_some(ns), selector.as_deref())?,
            };
            if output == Output::Json {
                if name.is_some() {
                    print_json(&objs[0])?;
                } else {
                    print_json(&objs)?;
                }
            } else if objs.is_empty() {
                if all_namespaces || !k.namespaced() {
                    eprintln!("No {} found.", k.plural());
                } else {
                    eprintln!("No {} found in namespace {ns}.", k.plural());
                }
            } else {
                print!(
                    "{}",
                    view::table(&objs, all_namespaces, output == Output::Wide)
                );
            }
        }
        Cmd::Describe { kind: k, name } => {
            let k = kind(&k)?;
            let obj = c.get(k, ns, &name)?;
            let events = c.events(k.namespaced().then_some(ns), Some(k), Some(&name))?;
            let related = match &obj {
                Object::Job(j) => c
                    .list(Kind::Pod, Some(ns), None)?
                    .into_iter()
                    .filter(|p| p.meta().owner.as_ref().is_some_and(|o| o.uid == j.metadata.uid))
                    .collect(),
                Object::Deployment(d) => c
                    .list(Kind::Pod, Some(ns), None)?
                    .into_iter()
                    .filter(|p| p.meta().owner.as_ref().is_some_and(|o| o.uid == d.metadata.uid))
                    .collect(),
                Object::Function(f) => c
                    .list(Kind::Pod, Some(ns), None)?
                    .into_iter()
                    .filter(|p| p.meta().labels.get(flotilla_api::function::FUNCTION_LABEL) == Some(&f.metadata.name))
                    .collect(),
                Object::Node(n) => c
                    .list(Kind::Pod, None, None)?
                    .into_iter()
                    .filter(|p| matches!(p, Object::Pod(p) if p.status.node.as_deref() == Some(&n.metadata.name)))
                    .collect(),
                Object::Volume(v) => c
                    .list(Kind::Pod, Some(ns), None)?
                    .into_iter()
                    .filter(|p| matches!(p, Object::Pod(p) if !p.status.phase.is_terminal()
                        && flotilla_scheduler::kinds::volume::persistent_names(&p.spec).any(|n| n == v.metadata.name)))
                    .collect(),
                Object::Quota(_) => {
                    let mut all = Vec::new();
                    for k in Kind::ALL.into_iter().filter(|k| k.namespaced() && !matches!(k, Kind::Event | Kind::Quota)) {
                        all.extend(c.list(k, Some(ns), None)?);
                    }
                    all
                }
                Object::Pod(_)
                | Object::Plugin(_)
                | Object::Autoscaler(_)
                | Object::Secret(_)
                | Object::ConfigMap(_)
                | Object::Token(_)
                | Object::Service(_) => {
                    Vec::new()
                }
            };
            print!("{}", view::describe(&obj, &events, &related));
        }
        Cmd::Invoke {
            name,
            path,
            data,
            headers,
            method,
            include,
        } => {
            let headers = headers
                .iter()
                .map(|h| {
                    let (k, v) = h
                        .split_once(':')
                        .ok_or_else(|| anyhow::anyhow!("header '{h}' is not K: V"))?;
                    Ok((k.trim().to_string(), v.trim().to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            let body: Option<Box<dyn std::io::Read + Send>> = match data.as_deref() {
                None => None,
                Some("-") => Some(Box::new(std::io::stdin())),
                Some(d) => match d.strip_prefix('@') {
                    Some(file) => {
                        Some(Box::new(std::fs::File::open(file).map_err(|e| {
                            anyhow::anyhow!("cannot read {file} for --data: {e}")
                        })?))
                    }
                    None => Some(Box::new(std::io::Cursor::new(d.as_bytes().to_vec()))),
                },
            };
            let method =
                method.unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.to_string());
            let status = c.invoke(
                ns,
                &name,
                &method,
                &path,
                &headers,
                body,
                include,
                &mut std::io::stdout(),
            )?;
            if status >= 400 {
                eprintln!("error: function {name} answered {status}");
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Logs {
            pod,
            request,
            level,
            member,
            follow,
            previous,
            tail,
        } => {
            let stdout = std::io::stdout();
            let mut out: Box<dyn std::io::Write> = match request {
                Some(id) => Box::new(view::LineFilter::request(stdout, &id)),
                None => Box::new(stdout),
            };
            if let Some(l) = level {
                out = Box::new(view::LineFilter::levels(out, &l)?);
            }
            let opts = client::LogOptions {
                member: member.as_deref(),
                follow,
                previous,
                tail,
            };
            let function = pod
                .strip_prefix("function/")
                .or_else(|| pod.strip_prefix("functions/"))
                .or_else(|| pod.strip_prefix("fn/"));
            let pods = match function {
                None => vec![pod],
                Some(name) => {
                    let mut pods: Vec<String> = c
                        .list(
                            Kind::Pod,
                            Some(ns),
                            Some(&format!(
                                "{}={name}",
                                flotilla_api::function::FUNCTION_LABEL
                            )),
                        )?
                        .iter()
                        .map(|p| p.meta().name.clone())
                        .collect();
                    pods.sort();
                    if pods.is_empty() {
                        bail!("function {name} has no instance now (at zero, or not found)");
                    }
                    if follow && pods.len() > 1 {
                        bail!(
                            "function {name} has {} instances; follow one: flotilla logs -f {}",
                            pods.len(),
                            pods.join(" | ")
                        );
                    }
                    pods
                }
            };
            for p in &pods {
                c.logs(ns, p, &opts, &mut out)?;
            }
            out.flush()?;
        }
        Cmd::Delete {
            kind: k,
            names,
            files,
        } => {
            let mut targets: Vec<(Kind, String, String)> = Vec::new();
            if !files.is_empty() {
                for o in manifests::load(&files)? {
                    targets.push((o.kind(), o.meta().namespace.clone(), o.meta().name.clone()));
                }
            }
            if let Some(k) = k {
                let (k, names) = match k.split_once('/') {
                    Some((k, n)) => (
                        kind(k)?,
                        std::iter::once(n.to_string()).chain(names).collect(),
                    ),
                    None => (kind(&k)?, names),
                };
                if names.is_empty() {
                    bail!("name the {} to delete", k.plural());
                }
                targets.extend(names.into_iter().map(|n| (k, ns.to_string(), n)));
            }
            if targets.is_empty() {
                bail!("nothing to delete: give KIND NAME or -f FILE");
            }
            let mut failed = false;
            for (k, tns, n) in targets {
                match c.delete(k, &tns, &n) {
                    Ok(_) => println!("{}/{n} deleted", k.to_string().to_lowercase()),
                    Err(e) => {
                        failed = true;
                        eprintln!("error: {e:#}");
                    }
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Rollout { cmd } => return rollout::run(&c, ns, cmd),
        Cmd::Top { what } => return top(&c, ns, what),
        Cmd::Leader { output } => {
            let l = c.leader()?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else if l.leading {
                println!("this scheduler leads (term {})", l.term);
            } else if l.leader_api.is_empty() {
                println!("no scheduler leads right now (an election is under way)");
            } else {
                println!("the leader is {} (agents: {})", l.leader_api, l.leader_quic);
            }
        }
        Cmd::Kv { cmd } => return kv::run(&c, ns, cmd),
        Cmd::Scale {
            target,
            name,
            replicas,
        } => {
            let name = rollout::deployment_name(&target, name.as_deref(), "").map_err(|_| {
                anyhow::anyhow!(
                    "only deployments can be scaled: flotilla scale deployment/NAME --replicas N"
                )
            })?;
            c.scale(ns, &name, replicas)?;
            println!("deployment/{name} scaled to {replicas}");
        }
        Cmd::Cordon { node } => {
            c.cordon(&node, true)?;
            println!("node/{node} cordoned");
        }
        Cmd::Uncordon { node } => {
            c.cordon(&node, false)?;
            println!("node/{node} uncordoned");
        }
        Cmd::Drain { node, force } => {
            c.get(Kind::Node, "", &node)?;
            let on_node: Vec<flotilla_api::Pod> = c
                .list(Kind::Pod, None, None)?
                .into_iter()
                .filter_map(|o| match o {
                    Object::Pod(p)
                        if p.status.node.as_deref() == Some(node.as_str())
                            && !p.status.phase.is_terminal() =>
                    {
                        Some(p)
                    }
                    _ => None,
                })
                .collect();
            let bare: Vec<String> = on_node
                .iter()
                .filter(|p| p.metadata.owner.is_none())
                .map(|p| format!("{}/{}", p.metadata.namespace, p.metadata.name))
                .collect();
            if !bare.is_empty() && !force {
                bail!(
                    "node {node} runs pods no Deployment would re-create: {}\nhint: delete them yourself, or pass --force to delete them",
                    bare.join(", ")
                );
            }
            c.cordon(&node, true)?;
            println!("node/{node} cordoned");
            for p in on_node {
                c.delete(Kind::Pod, &p.metadata.namespace, &p.metadata.name)?;
                println!("pod/{} evicted", p.metadata.name);
            }
            println!("node/{node} drained");
        }
        Cmd::Events {
            all_namespaces,
            output,
        } => return events(&c, ns, all_namespaces, output),
        Cmd::Nodes { output } => {
            let nodes = c.list(Kind::Node, None, None)?;
            if output == Output::Json {
                return print_json(&nodes).map(|()| ExitCode::SUCCESS);
            }
            // Callers limited to some namespaces cannot see every pod; they get
            // the nodes without allocation figures.
            let alloc = c.list(Kind::Pod, None, None).ok().map(|objs| {
                let pods: Vec<flotilla_api::Pod> = objs
                    .into_iter()
                    .filter_map(|o| match o {
                        Object::Pod(p) => Some(p),
                        _ => None,
                    })
                    .collect();
                flotilla_scheduler::controllers::allocated(&pods)
            });
            let mut t = table::Table::new(&[
                "NAME",
                "STATUS",
                "CPU (REQ/ALLOC)",
                "MEMORY (REQ/ALLOC)",
                "PODS",
                "VERSION",
                "AGE",
            ]);
            let now = flotilla_api::time::now_ms();
            for o in &nodes {
                let Object::Node(n) = o else { continue };
                let known = alloc
                    .as_ref()
                    .map(|a| a.get(&n.metadata.name).copied().unwrap_or_default());
                let cap_mem = flotilla_api::quantity::Bytes(n.status.allocatable.memory).human();
                let (cpu, mem, count) = match known {
                    Some((used, count)) => (
                        format!("{}m/{}m", used.cpu, n.status.allocatable.cpu),
                        format!(
                            "{}/{cap_mem}",
                            flotilla_api::quantity::Bytes(used.memory).human()
                        ),
                        count.to_string(),
                    ),
                    None => (
                        format!("?/{}m", n.status.allocatable.cpu),
                        format!("?/{cap_mem}"),
                        "?".into(),
                    ),
                };
                t.row(vec![
                    n.metadata.name.clone(),
                    view::node_state(n),
                    cpu,
                    mem,
                    count,
                    n.status.version.clone(),
                    flotilla_api::time::age(n.metadata.created_ms, now),
                ]);
            }
            if t.is_empty() {
                eprintln!("No nodes have joined.");
            } else {
                print!("{}", t.render());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn events(c: &Client, ns: &str, all: bool, output: Output) -> Result<ExitCode> {
    let evs = c.events((!all).then_some(ns), None, None)?;
    if output == Output::Json {
        print_json(&evs)?;
    } else if evs.is_empty() {
        eprintln!("No events.");
    } else {
        print!("{}", view::events_table(&evs));
    }
    Ok(ExitCode::SUCCESS)
}

/// `token create -n NS` limits the token to that namespace (without -n: all).
fn token_cmd(c: &Client, cmd: TokenCmd, namespace: Option<&str>) -> Result<ExitCode> {
    let namespaces: Vec<String> = namespace.map(str::to_string).into_iter().collect();
    match cmd {
        TokenCmd::Create {
            role,
            join,
            ttl,
            uses,
        } => {
            let role = match (join, role) {
                (true, _) => flotilla_api::Role::Join,
                (false, Some(r)) => flotilla_api::Role::parse(&r)
                    .filter(|r| *r != flotilla_api::Role::Join)
                    .with_context(|| {
                        format!("unknown role '{r}'; use admin, edit or view (or --join)")
                    })?,
                (false, None) => bail!("give --role admin|edit|view, or --join"),
            };
            let created = c.create_token(&flotilla_scheduler::api::TokenRequest {
                role,
                join,
                namespaces,
                ttl_secs: parse_ttl(&ttl)?,
                uses,
            })?;
            eprintln!(
                "token {} (role {}) expires in {}; it is shown only now:",
                created.info.id,
                created.info.role,
                flotilla_api::time::human_duration(std::time::Duration::from_millis(
                    created
                        .info
                        .expires_ms
                        .saturating_sub(flotilla_api::time::now_ms())
                ))
            );
            println!("{}", created.token);
        }
        TokenCmd::List { output } => {
            let tokens = c.tokens()?;
            if output == Output::Json {
                print_json(&tokens)?;
            } else {
                let now = flotilla_api::time::now_ms();
                let mut t = table::Table::new(&[
                    "ID",
                    "FOR",
                    "ROLE",
                    "NAMESPACES",
                    "EXPIRES",
                    "STATUS",
                    "CREATED BY",
                ]);
                for tok in tokens {
                    let status = if tok.revoked {
                        "revoked"
                    } else if tok.expires_ms <= now {
                        "expired"
                    } else {
                        "active"
                    };
                    let left = flotilla_api::time::human_duration(
                        std::time::Duration::from_millis(tok.expires_ms.saturating_sub(now)),
                    );
                    t.row(vec![
                        tok.id,
                        match &tok.certificate_for {
                            Some(user) => format!("certificate of {user}"),
                            None => "token".into(),
                        },
                        tok.role.to_string(),
                        if tok.namespaces.is_empty() {
                            "*".into()
                        } else {
                            tok.namespaces.join(",")
                        },
                        if status == "active" {
                            format!("in {left}")
                        } else {
                            "-".into()
                        },
                        status.into(),
                        tok.created_by,
                    ]);
                }
                print!("{}", t.render());
            }
        }
        TokenCmd::Revoke { id } => {
            let info = c.revoke_token(&id)?;
            match info.certificate_for {
                Some(user) => println!("certificate {id} of {user} revoked"),
                None => println!("token {id} revoked"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn config_cmd(cli: &Cli, cmd: &ConfigCmd) -> Result<ExitCode> {
    let (path, _) = config_path(cli);
    let mut cfg = config::ClientConfig::load(&path)?;
    match cmd {
        ConfigCmd::View => print!("{}", toml::to_string(&cfg.redacted())?),
        ConfigCmd::GetContexts => {
            let mut t = table::Table::new(&["CURRENT", "NAME", "SERVER", "NAMESPACE"]);
            for c in &cfg.contexts {
                t.row(vec![
                    if c.name == cfg.current_context {
                        "*".into()
                    } else {
                        String::new()
                    },
                    c.name.clone(),
                    c.server.clone(),
                    c.namespace.clone().unwrap_or_else(|| "default".into()),
                ]);
            }
            print!("{}", t.render());
        }
        ConfigCmd::UseContext { name } => {
            cfg.context(Some(name))?;
            cfg.current_context = name.clone();
            cfg.save(&path)?;
            println!("switched to context {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
