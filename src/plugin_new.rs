//! `flotilla plugin new NAME`: a buildable plugin project on flotilla-sdk
//! (Cargo.toml, src/lib.rs, plugin.toml, README.md).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Where this binary was built from: its SDK, if still there.
const BUILT_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk");

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Hook {
    Admission,
    Scheduler,
}

#[derive(clap::Args)]
pub struct NewArgs {
    /// The plugin's name (a DNS label: lowercase letters, digits, '-').
    pub name: String,
    /// Which world the plugin is built for.
    #[arg(long, value_enum, default_value = "admission")]
    pub hook: Hook,
    /// The flotilla-sdk crate to build against [default: the one this
    /// binary was built with, when it is still there].
    #[arg(long)]
    pub sdk: Option<PathBuf>,
    /// Where to write the project [default: ./NAME].
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn new(args: &NewArgs) -> Result<()> {
    flotilla_api::meta::check_dns_label(&args.name)
        .map_err(|why| anyhow::anyhow!("plugin name '{}' {why}", args.name))?;
    let sdk = match &args.sdk {
        Some(p) => p.clone(),
        None if Path::new(BUILT_SDK).join("Cargo.toml").exists() => PathBuf::from(BUILT_SDK),
        None => bail!(
            "this binary's SDK ({BUILT_SDK}) is not on this machine; name a flotilla-sdk checkout with --sdk PATH"
        ),
    };
    let sdk = sdk
        .canonicalize()
        .with_context(|| format!("--sdk {}", sdk.display()))?;
    if !sdk.join("Cargo.toml").exists() {
        bail!(
            "{} holds no Cargo.toml; --sdk names the flotilla-sdk crate's directory",
            sdk.display()
        );
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() {
        bail!(
            "{} exists; choose another --dir or remove it",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let krate = args.name.replace('-', "_");
    let files = [
        ("Cargo.toml", cargo_toml(&args.name, &sdk)),
        ("src/lib.rs", lib_rs(&args.name, args.hook)),
        ("plugin.toml", manifest(&args.name, &krate, args.hook)),
        ("README.md", readme(&args.name, &krate)),
    ];
    for (path, text) in files {
        std::fs::write(dir.join(path), text).with_context(|| format!("writing {path}"))?;
    }
    println!("wrote {}: build it with", dir.display());
    println!(
        "  cd {} && cargo build --release --target wasm32-wasip2",
        dir.display()
    );
    println!("then install it (admins only) with `flotilla apply -f plugin.toml`");
    Ok(())
}

fn cargo_toml(name: &str, sdk: &Path) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# A component for wasm32-wasip2 exporting a flotilla:plugin world.
[lib]
crate-type = ["cdylib"]

[dependencies]
flotilla-sdk = {{ path = {sdk:?} }}

[profile.release]
opt-level = "s"
strip = true
panic = "abort"

# Not part of any other workspace.
[workspace]
"#,
        sdk = sdk.display().to_string()
    )
}

fn lib_rs(name: &str, hook: Hook) -> String {
    match hook {
        Hook::Admission => format!(
            r#"//! {name}: a Flotilla admission plugin. Every object its Plugin
//! selects must carry the label named by `$REQUIRED_LABEL` (its `config`;
//! default `owner`). Change `validate` (and add `mutate`) to taste.

use flotilla_sdk::{{Admission, Object}};

struct Plugin;

#[flotilla_sdk::admission]
impl Admission for Plugin {{
    fn validate(obj: &Object) -> Result<(), String> {{
        let key = std::env::var("REQUIRED_LABEL").unwrap_or_else(|_| "owner".into());
        match obj.metadata().label(&key) {{
            Some(_) => Ok(()),
            None => Err(format!(
                "{{}} \"{{}}\" has no label \"{{key}}\"",
                obj.kind_name(),
                obj.metadata().name
            )),
        }}
    }}
}}
"#
        ),
        Hook::Scheduler => format!(
            r#"//! {name}: a Flotilla scheduler plugin. It keeps pods off nodes
//! without the label `$NODE_LABEL` (its `config`; default `zone`) and
//! prefers the nodes with the most memory free. Change `filter` and
//! `score` to taste.

use flotilla_sdk::{{Node, Pod, Scheduler}};

struct Plugin;

#[flotilla_sdk::scheduler]
impl Scheduler for Plugin {{
    fn filter(_pod: &Pod, node: &Node) -> Result<(), String> {{
        let key = std::env::var("NODE_LABEL").unwrap_or_else(|_| "zone".into());
        match node.metadata.label(&key) {{
            Some(_) => Ok(()),
            None => Err(format!("node {{}} has no label {{key}}", node.metadata.name)),
        }}
    }}

    fn score(_pod: &Pod, node: &Node) -> u32 {{
        let free = node.allocatable_memory.saturating_sub(node.requested_memory);
        (free.saturating_mul(100) / node.allocatable_memory.max(1)) as u32
    }}
}}
"#
        ),
    }
}

fn manifest(name: &str, krate: &str, hook: Hook) -> String {
    let (hook, selector, config) = match hook {
        Hook::Admission => (
            "admission",
            "{ kinds = [\"Pod\", \"Deployment\"], namespaces = [\"default\"] }",
            "{ REQUIRED_LABEL = \"owner\" }",
        ),
        Hook::Scheduler => (
            "scheduler",
            "{ namespaces = [\"default\"] }",
            "{ NODE_LABEL = \"zone\" }",
        ),
    };
    format!(
        r#"kind = "Plugin"
name = "{name}"
wasm = "target/wasm32-wasip2/release/{krate}.wasm"
hook = "{hook}"
selector = {selector}
failure_policy = "Fail"
timeout = "100ms"
memory = "16Mi"
config = {config}
"#
    )
}

fn readme(name: &str, krate: &str) -> String {
    format!(
        r#"# {name}

A Flotilla plugin (see flotilla-sdk's documentation and
`wit/plugin/plugin.wit`).

    rustup target add wasm32-wasip2
    cargo build --release --target wasm32-wasip2
    flotilla apply -f plugin.toml      # admins only

`plugin.toml` names `target/wasm32-wasip2/release/{krate}.wasm`; apply
uploads it. A new build applied again replaces the plugin from the next
call on, without a restart.
"#
    )
}
