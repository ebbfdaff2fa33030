//! Registry references resolved at apply, before placement: the manifest's
//! digest is pinned in the stored spec (what runs is what was resolved,
//! whatever the tag does later) and its media type says which runtime the
//! member needs — a wasm artifact named by `image =` runs in wasmtime, so it
//! may land on a node without runc.
//!
//! Best effort by design: a reference the registry says does not exist is
//! refused at apply, but a registry the scheduler cannot reach, or one that
//! wants credentials only nodes hold, leaves the reference unresolved and
//! the node resolves it when it pulls (as before).

use flotilla_api::{MemberSource, MemberSpec};
use flotilla_registry::config::RegistryConfig;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Manifest media types the scheduler asks registries for (resolving at
/// apply, and the site cache).
pub const ACCEPTED: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// A registry client as the scheduler uses them: reached and authenticated
/// as the scheduler's registry config says (`--registry-config`; plain HTTP
/// and loopback only for registries it lists), with these timeouts.
pub fn registry_client(
    registries: &RegistryConfig,
    registry: &str,
    connect: Duration,
    read: Duration,
) -> Result<flotilla_registry::Client, flotilla_registry::Error> {
    flotilla_registry::Client::new(
        registry,
        registries.access(registry),
        registries.pull_creds(registry),
        connect,
        read,
    )
}

/// What a reference points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The manifest (or index) digest.
    pub digest: String,
    /// A wasm artifact (config `application/vnd.wasm.config.*`, or a single
    /// `application/wasm` layer) rather than a container image.
    pub wasm: bool,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ResolveError {
    /// The registry answered that it has no such manifest: refused at apply.
    #[error("{reference}: the registry has no such image or artifact ({why})")]
    NotFound { reference: String, why: String },
    /// Not decided here (unreachable, credentials, timeout): the node will
    /// resolve it.
    #[error("{reference}: {why}")]
    Deferred { reference: String, why: String },
}

/// Whether the kind of manifest media/config types say wasm.
pub fn is_wasm_manifest(manifest: &serde_json::Value) -> bool {
    let config = manifest["config"]["mediaType"].as_str().unwrap_or_default();
    if config.starts_with("application/vnd.wasm.config.") {
        return true;
    }
    let layers = manifest["layers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    matches!(layers, [l] if l["mediaType"] == "application/wasm")
}

/// Resolves references against their registries, as the scheduler's
/// registry config allows.
pub struct Resolver {
    timeout: Duration,
    registries: Arc<RegistryConfig>,
}

impl Resolver {
    pub fn new(registries: Arc<RegistryConfig>) -> Resolver {
        Resolver {
            timeout: Duration::from_secs(5),
            registries,
        }
    }

    pub async fn resolve(&self, reference: &str) -> Result<Resolved, ResolveError> {
        let deferred = |why: String| ResolveError::Deferred {
            reference: reference.to_string(),
            why,
        };
        let r: oci_client::Reference = reference
            .parse()
            .map_err(|e| deferred(format!("unparsable reference: {e}")))?;
        let registry = r.resolve_registry().to_string();
        let client = registry_client(&self.registries, &registry, self.timeout, self.timeout)
            .map_err(|e| deferred(e.to_string()))?;
        let pulled = tokio::time::timeout(
            self.timeout,
            client.manifest(
                r.repository(),
                r.digest().or(r.tag()).unwrap_or("latest"),
                ACCEPTED,
                4 << 20,
            ),
        )
        .await
        .map_err(|_| {
            deferred(format!(
                "registry {registry} did not answer within {:?}",
                self.timeout
            ))
        })?;
        let (bytes, digest) = match pulled {
            Ok(m) => (m.bytes, m.digest),
            Err(e) if e.is_not_found() => {
                return Err(ResolveError::NotFound {
                    reference: reference.to_string(),
                    why: e.to_string(),
                });
            }
            Err(e) => return Err(deferred(e.to_string())),
        };
        let manifest: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| deferred(format!("unreadable manifest: {e}")))?;
        Ok(Resolved {
            wasm: is_wasm_manifest(&manifest),
            digest,
        })
    }

    /// Resolves every unresolved registry source of `members` in place:
    /// pins digests and turns `image =` wasm artifacts into artifacts.
    /// `NotFound` is returned for the caller to refuse; deferred ones are
    /// left as they are. Lookups are shared through `seen`.
    pub async fn resolve_members(
        &self,
        members: &mut [MemberSpec],
        seen: &mut HashMap<String, Result<Resolved, ResolveError>>,
    ) -> Result<(), ResolveError> {
        for m in members {
            let reference = match &m.source {
                MemberSource::Artifact { reference, digest } if digest.is_empty() => reference,
                MemberSource::Container { image, digest, .. } if digest.is_empty() => image,
                _ => continue,
            };
            // A reference that names a digest is pinned already.
            if reference.contains('@') {
                continue;
            }
            let reference = reference.clone();
            let outcome = match seen.get(&reference) {
                Some(o) => o.clone(),
                None => {
                    let o = self.resolve(&reference).await;
                    if let Err(e @ ResolveError::Deferred { .. }) = &o {
                        tracing::info!("not resolved at apply, the node will: {e}");
                    }
                    seen.insert(reference, o.clone());
                    o
                }
            };
            let resolved = match outcome {
                Ok(r) => r,
                Err(ResolveError::Deferred { .. }) => continue,
                Err(e) => return Err(e),
            };
            m.source = match std::mem::take(&mut m.source) {
                MemberSource::Container { image, options, .. }
                    if resolved.wasm && options.is_default() =>
                {
                    MemberSource::Artifact {
                        reference: image,
                        digest: resolved.digest,
                    }
                }
                MemberSource::Container { image, options, .. } => MemberSource::Container {
                    image,
                    digest: resolved.digest,
                    options,
                },
                MemberSource::Artifact { reference, .. } => MemberSource::Artifact {
                    reference,
                    digest: resolved.digest,
                },
                other => other,
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasm_artifacts_are_told_from_images_by_media_types() {
        let artifact = serde_json::json!({"config": {"mediaType": "application/vnd.wasm.config.v0+json"},
            "layers": [{"mediaType": "application/wasm"}]});
        let bare_layer = serde_json::json!({"config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": [{"mediaType": "application/wasm"}]});
        let image = serde_json::json!({"config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}]});
        let index = serde_json::json!({"manifests": []});
        assert!(is_wasm_manifest(&artifact));
        assert!(is_wasm_manifest(&bare_layer));
        assert!(!is_wasm_manifest(&image));
        assert!(!is_wasm_manifest(&index));
    }
}
