//! Metadata every stored object carries.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Label key/value pairs; ordered so that printing and comparing are stable.
pub type Labels = BTreeMap<String, String>;

/// Identity, versioning and ownership of a stored object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Unique for the lifetime of the cluster; a re-created object gets a new one.
    #[serde(default)]
    pub uid: String,
    /// Incremented on every change of the spec (not of the status).
    #[serde(default)]
    pub generation: u64,
    /// Store revision of the last write; a write must name it (optimistic concurrency).
    #[serde(default)]
    pub resource_version: u64,
    #[serde(default)]
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerRef>,
}

/// The controller object that owns this one (a Deployment owns its pods).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRef {
    pub kind: String,
    pub name: String,
    pub uid: String,
}

/// The namespace used when a manifest names none.
pub const DEFAULT_NAMESPACE: &str = "default";

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// Checks a name or namespace: a DNS label (lowercase letters, digits, '-', ≤ 63 chars,
/// starting and ending with a letter or digit). Returns the problem, if any.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!(
            "is {} characters long; at most 63 are allowed",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "contains '{c}'; use lowercase letters, digits and '-'"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// Label keys under this prefix belong to Flotilla: the scheduler sets
/// them on nodes (never taken from what a node reports) and controllers on
/// the objects they make.
pub const RESERVED_PREFIX: &str = "flotilla.dev/";
/// A node's name, as its certificate proves it (set by the scheduler).
pub const HOSTNAME_LABEL: &str = "flotilla.dev/hostname";
/// A node's CPU architecture (set by the scheduler from its report).
pub const ARCH_LABEL: &str = "flotilla.dev/arch";

/// The labels a node may choose for itself: valid, and none reserved.
pub fn check_node_labels(labels: &crate::Labels) -> Result<(), String> {
    for (k, v) in labels {
        if k.starts_with(RESERVED_PREFIX) {
            return Err(format!(
                "label {k} is reserved: the scheduler sets {RESERVED_PREFIX}* labels on nodes itself"
            ));
        }
        check_label(k, false).map_err(|e| format!("label key '{k}' {e}"))?;
        check_label(v, true).map_err(|e| format!("label {k}'s value '{v}' {e}"))?;
    }
    Ok(())
}

/// Checks a label key or value: ASCII letters, digits, '-', '_', '.', '/', ≤ 63 chars.
pub fn check_label(s: &str, allow_empty: bool) -> Result<(), String> {
    if s.is_empty() && !allow_empty {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!(
            "is {} characters long; at most 63 are allowed",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
    {
        return Err(format!(
            "contains '{c}'; use letters, digits, '-', '_', '.' and '/'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(check_dns_label("web-1").is_ok());
        assert!(check_dns_label("Web").unwrap_err().contains("'W'"));
        assert!(check_dns_label("-a").is_err());
        assert!(check_dns_label("").is_err());
        assert!(check_dns_label(&"a".repeat(64)).is_err());
    }

    #[test]
    fn nodes_cannot_choose_reserved_labels() {
        let ok: crate::Labels = [("zone".to_string(), "a".to_string())].into();
        assert!(check_node_labels(&ok).is_ok());
        let host: crate::Labels = [(HOSTNAME_LABEL.to_string(), "other".to_string())].into();
        assert!(
            check_node_labels(&host)
                .unwrap_err()
                .contains("is reserved")
        );
        let bad: crate::Labels = [("a b".to_string(), "x".to_string())].into();
        assert!(check_node_labels(&bad).unwrap_err().contains("'a b'"));
    }

    #[test]
    fn labels() {
        assert!(check_label("app.kubernetes.io/name", false).is_ok());
        assert!(check_label("", true).is_ok());
        assert!(check_label("a b", true).is_err());
    }
}
