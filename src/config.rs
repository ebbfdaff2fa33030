//! The client config file (like a kubeconfig): named contexts, each with a
//! server, the cluster CA, credentials and a default namespace.

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub current_context: String,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub name: String,
    /// The API server's URL; several schedulers' URLs may be given,
    /// separated by commas.
    pub server: String,
    /// More API servers of the same cluster, tried in turn when the one
    /// before cannot be reached (several schedulers on one etcd store).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// PEM of the cluster CA that must have signed the server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Where the CLI looks when neither --config nor FLOTILLA_CONFIG is given.
pub fn default_path() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".flotilla")
        .join("config.toml")
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<ClientConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read client config {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let (line, col) = e
                .span()
                .map_or((1, 1), |s| flotilla_api::manifest::line_col(&text, s.start));
            anyhow::anyhow!("{}:{line}:{col}: {}", path.display(), e.message())
        })
    }

    /// Writes the file readable by its owner only (it holds credentials).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = toml::to_string(self)?;
        flotilla_api::fs::write_private(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn context(&self, name: Option<&str>) -> Result<&Context> {
        let want = name.unwrap_or(&self.current_context);
        match self.contexts.iter().find(|c| c.name == want) {
            Some(c) => Ok(c),
            None => {
                let names: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
                bail!(
                    "no context named '{want}' in the config; it has: {}",
                    names.join(", ")
                )
            }
        }
    }

    /// Adds or replaces a context by name.
    pub fn upsert(&mut self, ctx: Context) {
        match self.contexts.iter_mut().find(|c| c.name == ctx.name) {
            Some(c) => *c = ctx,
            None => self.contexts.push(ctx),
        }
    }

    /// A copy safe to print: keys and tokens replaced, certificates summarized.
    pub fn redacted(&self) -> ClientConfig {
        let mut c = self.clone();
        for ctx in &mut c.contexts {
            let summarize =
                |pem: &Option<String>| pem.as_ref().map(|p| format!("<PEM, {} bytes>", p.len()));
            ctx.ca = summarize(&ctx.ca);
            ctx.client_cert = summarize(&ctx.client_cert);
            ctx.client_key = ctx.client_key.as_ref().map(|_| "REDACTED".into());
            ctx.token = ctx.token.as_ref().map(|_| "REDACTED".into());
        }
        c
    }
}
