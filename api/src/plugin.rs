//! Plugins: WASI components of the `flotilla:plugin` worlds
//! (`wit/plugin/plugin.wit`) the scheduler runs to admit writes and to
//! place pods. A `Plugin` is cluster-scoped and written by admins only;
//! the scheduler runs each call in a fresh instance with the limits here,
//! and a call that fails is handled by the plugin's [`FailurePolicy`].

use crate::meta::ObjectMeta;
use crate::object::{Kind, MemberSource};
use crate::probe::Millis;
use crate::quantity::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `flotilla:plugin` package version the scheduler hosts.
pub const WIT_VERSION: &str = "0.1.0";
pub const DEFAULT_MEMORY: Bytes = Bytes(16 << 20);
pub const MAX_MEMORY: Bytes = Bytes(256 << 20);
pub const DEFAULT_TIMEOUT: Millis = Millis(200);
pub const MAX_TIMEOUT: Millis = Millis(10_000);
/// Wasm instructions' fuel per call, roughly one per instruction.
pub const DEFAULT_FUEL: u64 = 200_000_000;
pub const MAX_FUEL: u64 = 100_000_000_000;
pub const MAX_CONFIG: usize = 64;

/// Where the scheduler calls a plugin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// `validate` and `mutate` on client writes (the `admission` world).
    #[default]
    Admission,
    /// `filter` and `score` in placement (the `scheduler` world).
    Scheduler,
}

impl Hook {
    /// The `flotilla:plugin` world a plugin of this hook is built for.
    pub fn world(self) -> &'static str {
        match self {
            Hook::Admission => "admission",
            Hook::Scheduler => "scheduler",
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.world())
    }
}

/// What happens to the write (or the placement) when a call fails: traps,
/// runs out of time, fuel or memory, or cannot be instantiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailurePolicy {
    /// The write is refused (the node is not a fit), naming the failure.
    #[default]
    Fail,
    /// The call is skipped, as if the plugin had admitted (or had no say).
    Ignore,
}

/// Which writes an admission plugin sees (every pod, for a scheduler
/// plugin, in the namespaces it names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSelector {
    /// Empty: every kind clients write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<Kind>,
    /// Empty: every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

impl PluginSelector {
    pub fn selects(&self, kind: Kind, namespace: &str) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&kind))
            && (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace))
    }
}

/// What an admin declares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginSpec {
    /// The component (uploaded or `oci://`; JSON `module`/`artifact`).
    #[serde(flatten)]
    pub source: MemberSource,
    pub hook: Hook,
    #[serde(default)]
    pub selector: PluginSelector,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Each call's memory (all the instance's linear memories and tables).
    #[serde(default = "default_memory")]
    pub memory: Bytes,
    /// Each call's wall-clock limit.
    #[serde(default = "default_timeout")]
    pub timeout: Millis,
    /// Each call's fuel (about one unit per wasm instruction).
    #[serde(default = "default_fuel")]
    pub fuel: u64,
    /// Given to the plugin as environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

fn default_memory() -> Bytes {
    DEFAULT_MEMORY
}

fn default_timeout() -> Millis {
    DEFAULT_TIMEOUT
}

fn default_fuel() -> u64 {
    DEFAULT_FUEL
}

impl PluginSpec {
    /// A spec with the defaults for `source` and `hook`.
    pub fn new(source: MemberSource, hook: Hook) -> PluginSpec {
        PluginSpec {
            source,
            hook,
            selector: PluginSelector::default(),
            failure_policy: FailurePolicy::default(),
            memory: DEFAULT_MEMORY,
            timeout: DEFAULT_TIMEOUT,
            fuel: DEFAULT_FUEL,
            config: BTreeMap::new(),
        }
    }

    /// The checks the CLI and the API share.
    pub fn validate(&self) -> Result<(), String> {
        match &self.source {
            MemberSource::Container { .. } => {
                return Err(
                    "a plugin is a wasm component (wasm = \"./plugin.wasm\" or \"oci://…\"), not a container image"
                        .into(),
                );
            }
            MemberSource::Module { digest, size } => {
                if digest.is_empty() || *size == 0 {
                    return Err("a plugin needs its component: wasm = \"./plugin.wasm\"".into());
                }
            }
            MemberSource::Artifact { .. } => {}
        }
        if self.memory.0 < (1 << 20) || self.memory.0 > MAX_MEMORY.0 {
            return Err(format!(
                "memory = {} must be between 1Mi and {}",
                self.memory, MAX_MEMORY
            ));
        }
        if self.timeout.0 == 0 || self.timeout.0 > MAX_TIMEOUT.0 {
            return Err(format!(
                "timeout = {} must be more than 0 and at most 10s",
                self.timeout
            ));
        }
        if self.fuel == 0 || self.fuel > MAX_FUEL {
            return Err(format!(
                "fuel = {} must be between 1 and {MAX_FUEL}",
                self.fuel
            ));
        }
        for k in &self.selector.kinds {
            if matches!(k, Kind::Node | Kind::Token | Kind::Event | Kind::Plugin) {
                return Err(format!(
                    "selector kind {k} is not written through apply; plugins admit {}",
                    "Pod, Deployment, Job, Function, Service, ConfigMap, Secret, Volume, Quota and Autoscaler"
                ));
            }
        }
        if self.hook == Hook::Scheduler && self.selector.kinds.iter().any(|k| *k != Kind::Pod) {
            return Err(
                "a scheduler plugin places pods; its selector names namespaces, not kinds".into(),
            );
        }
        for ns in &self.selector.namespaces {
            crate::meta::check_dns_label(ns)
                .map_err(|why| format!("selector namespace '{ns}' {why}"))?;
        }
        if self.config.len() > MAX_CONFIG {
            return Err(format!("at most {MAX_CONFIG} config entries"));
        }
        for (k, v) in &self.config {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(format!(
                    "config key '{k}' must be a non-empty variable name without '=' or NUL"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plugin {
    pub metadata: ObjectMeta,
    pub spec: PluginSpec,
}

impl Default for PluginSpec {
    fn default() -> Self {
        PluginSpec::new(MemberSource::default(), Hook::Admission)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PluginSpec {
        PluginSpec::new(
            MemberSource::Module {
                digest: format!("sha256:{}", "a".repeat(64)),
                size: 10,
            },
            Hook::Admission,
        )
    }

    #[test]
    fn selectors_match_kinds_and_namespaces_and_empty_means_all() {
        let all = PluginSelector::default();
        assert!(all.selects(Kind::Pod, "prod"));
        let some = PluginSelector {
            kinds: vec![Kind::Pod, Kind::Deployment],
            namespaces: vec!["prod".into()],
        };
        assert!(some.selects(Kind::Deployment, "prod"));
        assert!(!some.selects(Kind::Deployment, "dev"));
        assert!(!some.selects(Kind::Service, "prod"));
    }

    #[test]
    fn specs_out_of_bounds_are_refused_naming_the_field() {
        assert_eq!(spec().validate(), Ok(()));
        let mut s = spec();
        s.memory = Bytes(1 << 40);
        assert!(s.validate().unwrap_err().contains("memory"));
        let mut s = spec();
        s.timeout = Millis(0);
        assert!(s.validate().unwrap_err().contains("timeout"));
        let mut s = spec();
        s.fuel = 0;
        assert!(s.validate().unwrap_err().contains("fuel"));
        let mut s = spec();
        s.selector.kinds = vec![Kind::Node];
        assert!(s.validate().unwrap_err().contains("Node"));
        let mut s = spec();
        s.selector.namespaces = vec!["Not A Label".into()];
        assert!(s.validate().unwrap_err().contains("namespace"));
        let mut s = spec();
        s.source = MemberSource::Container {
            image: "r/x:1".into(),
            digest: String::new(),
            options: Default::default(),
        };
        assert!(s.validate().unwrap_err().contains("container"));
        let mut s = spec();
        s.hook = Hook::Scheduler;
        s.selector.kinds = vec![Kind::Service];
        assert!(s.validate().unwrap_err().contains("places pods"));
    }
}
