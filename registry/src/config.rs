//! The registry config (`--registry-config FILE`, TOML): credentials per
//! registry and which registries are spoken to over plain HTTP or may be on
//! loopback. Only this file — the operator's, on the node or the scheduler
//! — decides that, never a manifest (issue 14 item 12): a reference naming
//! `127.0.0.1:2379/x` or `localhost:9100/x` is refused unless the registry
//! is listed here.
//!
//! ```toml
//! [registry."127.0.0.1:5000"]        # a loopback registry: plain HTTP
//! [registry."10.0.0.7:5000"]
//! insecure = true                    # plain HTTP off loopback
//! [registry."reg.example"]
//! username = "fleet"
//! password = "…"
//! ```

use crate::{Access, Creds};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Credentials and transport for one registry (`[registry."HOST:PORT"]`).
/// Never printed: `Debug` hides the secrets.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCreds {
    pub username: Option<String>,
    pub password: Option<String>,
    /// A bearer token used as is (instead of username/password).
    pub token: Option<String>,
    /// Talk plain HTTP. Listed loopback registries are insecure by default.
    pub insecure: Option<bool>,
}

impl fmt::Debug for RegistryCreds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCreds")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// Which registries need credentials, plain HTTP, or may be on loopback.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    #[serde(default)]
    pub registry: BTreeMap<String, RegistryCreds>,
    /// Unlisted loopback registries are reachable (over plain HTTP): set
    /// for the operator's own commands (`flotilla pull|push` name the
    /// reference themselves), never for pulls a manifest asks for.
    #[serde(skip)]
    pub trust_loopback: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("registry config {}: {message}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

/// Whether a registry host (`HOST[:PORT]`) names loopback.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    is_loopback_host(host.trim_start_matches('[').trim_end_matches(']'))
}

/// Whether a host (no port, no brackets) is `localhost` or a loopback or
/// unspecified address literal.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

impl RegistryConfig {
    /// A config that lists `registries` with no credentials (loopback ones
    /// then speak plain HTTP).
    pub fn listing<'a>(registries: impl IntoIterator<Item = &'a str>) -> RegistryConfig {
        RegistryConfig {
            registry: registries
                .into_iter()
                .map(|r| (r.to_string(), RegistryCreds::default()))
                .collect(),
            trust_loopback: false,
        }
    }

    /// Reads a TOML registry config; errors name the file, line and column.
    pub fn load(path: &Path) -> Result<RegistryConfig, ConfigError> {
        let fail = |message: String| ConfigError {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        toml::from_str(&text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("{line}:{col}: ")
                })
                .unwrap_or_default();
            fail(format!("{at}{}", e.message()))
        })
    }

    pub fn creds(&self, registry: &str) -> Option<&RegistryCreds> {
        self.registry.get(registry)
    }

    /// How `registry` may be spoken to: listed registries as configured
    /// (and allowed on loopback); unlisted ones over HTTPS and never to a
    /// loopback address, unless `trust_loopback`.
    pub fn access(&self, registry: &str) -> Access {
        let loopback = is_loopback_registry(registry);
        match self.creds(registry) {
            Some(c) => Access {
                plain_http: c.insecure.unwrap_or(loopback),
                loopback: true,
            },
            None => Access {
                plain_http: loopback && self.trust_loopback,
                loopback: self.trust_loopback,
            },
        }
    }

    /// Whether `registry` is spoken to over plain HTTP.
    pub fn insecure(&self, registry: &str) -> bool {
        self.access(registry).plain_http
    }

    /// The credentials pulls from `registry` present.
    pub fn pull_creds(&self, registry: &str) -> Creds {
        match self.creds(registry) {
            Some(RegistryCreds { token: Some(t), .. }) => Creds::Bearer(t.clone()),
            Some(RegistryCreds {
                username: Some(u),
                password,
                ..
            }) => Creds::Basic {
                username: u.clone(),
                password: password.clone().unwrap_or_default(),
            },
            _ => Creds::Anonymous,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_registries_may_be_on_loopback_or_plain_http() {
        let cfg: RegistryConfig = toml::from_str(
            "[registry.\"10.0.0.7:5000\"]\ninsecure = true\n[registry.\"127.0.0.1:5000\"]\n[registry.\"127.0.0.1:5002\"]\ninsecure = false\n[registry.\"reg.example\"]\nusername = \"fleet\"\npassword = \"hunter2\"\n[registry.\"tok.example\"]\ntoken = \"t0ken\"\n",
        )
        .unwrap();
        let access = |plain_http, loopback| Access {
            plain_http,
            loopback,
        };
        for (host, want) in [
            ("127.0.0.1:5000", access(true, true)),
            ("127.0.0.1:5002", access(false, true)),
            ("10.0.0.7:5000", access(true, true)),
            // Unlisted: HTTPS, and never to loopback.
            ("127.0.0.1:5001", access(false, false)),
            ("localhost:5000", access(false, false)),
            ("[::1]:5000", access(false, false)),
            ("10.0.0.8:5000", access(false, false)),
            ("reg.example", access(false, true)),
        ] {
            assert_eq!(cfg.access(host), want, "{host}");
        }
        let operator = RegistryConfig {
            trust_loopback: true,
            ..cfg.clone()
        };
        assert_eq!(operator.access("localhost:5000"), access(true, true));
        assert_eq!(operator.access("reg2.example"), access(false, true));
        assert_eq!(operator.access("127.0.0.1:5002"), access(false, true));

        assert!(
            matches!(cfg.pull_creds("reg.example"), Creds::Basic { username, .. } if username == "fleet")
        );
        assert_eq!(cfg.pull_creds("tok.example"), Creds::Bearer("t0ken".into()));
        assert_eq!(cfg.pull_creds("other.example"), Creds::Anonymous);
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("t0ken"),
            "{shown}"
        );
        let err = toml::from_str::<RegistryConfig>("[registry.\"x\"]\npasword = \"a\"\n");
        assert!(err.is_err(), "unknown fields are refused");
    }

    #[test]
    fn loopback_names_and_literals() {
        for r in [
            "127.0.0.1:5000",
            "127.8.9.1",
            "localhost:5000",
            "LOCALHOST.",
            "reg.localhost:80",
            "[::1]:5000",
            "0.0.0.0:5000",
            "[::]:443",
        ] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in ["10.0.0.7:5000", "registry.example", "localhost.example.com"] {
            assert!(!is_loopback_registry(r), "{r}");
        }
    }

    #[test]
    fn a_bad_config_names_its_line_and_column() {
        let dir = std::env::temp_dir().join(format!("flotilla-regcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("registries.toml");
        std::fs::write(&p, "[registry.\"a\"]\ninsecure = \"yes\"\n").unwrap();
        let e = RegistryConfig::load(&p).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("registries.toml: 2:12: "), "{e}");
    }
}
