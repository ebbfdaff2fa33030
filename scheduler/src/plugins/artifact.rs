//! Plugins from a registry (`wasm = "oci://HOST/REPO:TAG"`): the scheduler
//! runs a plugin itself, so it needs the component at apply (to check its
//! world) and at every call. At apply the reference is pinned to its
//! manifest digest and the manifest and its one wasm layer are pulled into
//! the scheduler's content store, verified by digest, through the same
//! puller as the site cache (`crate::mirror`); the collector keeps them
//! while the Plugin names them. A registry that does not answer refuses
//! the apply (the scheduler cannot defer a plugin to a node).

use crate::cluster::Cluster;
use crate::mirror::{Grant, Mirror, Wanted};
use flotilla_api::MemberSource;
use flotilla_api::content::ContentStore;
use flotilla_api::plugin::Plugin;

/// Media types of a wasm artifact's layer.
const WASM_LAYERS: [&str; 2] = [
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
];

/// The wasm layer `(digest, size)` of the manifest stored under
/// `manifest`, or why there is none.
pub fn layer_of(blobs: &ContentStore, manifest: &str) -> Result<(String, u64), String> {
    let path = blobs.path(manifest).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(&path).map_err(|e| {
        format!("manifest {manifest} is not on the scheduler ({e}); apply the plugin again")
    })?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("manifest {manifest} is not JSON: {e}"))?;
    let layers = doc["layers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let wasm: Vec<&serde_json::Value> = layers
        .iter()
        .filter(|l| WASM_LAYERS.contains(&l["mediaType"].as_str().unwrap_or_default()))
        .collect();
    match wasm.as_slice() {
        [l] => {
            let digest = l["digest"].as_str().unwrap_or_default().to_string();
            let size = l["size"].as_u64().unwrap_or(0);
            flotilla_api::content::digest_hex(&digest)
                .map_err(|e| format!("manifest {manifest}: layer {e}"))?;
            if size > flotilla_api::manifest::MAX_MODULE_BYTES {
                return Err(format!(
                    "the plugin's wasm layer is {size} bytes, more than the {}-byte limit",
                    flotilla_api::manifest::MAX_MODULE_BYTES
                ));
            }
            Ok((digest, size))
        }
        _ => Err(format!(
            "manifest {manifest} is not a wasm artifact (it needs exactly one layer of type application/wasm; push the component with `flotilla push plugin.wasm HOST/REPO:TAG`)"
        )),
    }
}

/// Pins a Plugin's registry reference and pulls its artifact into the
/// content store (nothing for an uploaded component).
pub async fn fetch(
    cluster: &Cluster,
    resolver: &crate::resolve::Resolver,
    plugin: &mut Plugin,
) -> Result<(), String> {
    let MemberSource::Artifact { reference, digest } = &mut plugin.spec.source else {
        return Ok(());
    };
    if digest.is_empty() {
        let resolved = resolver.resolve(reference).await.map_err(|e| {
            format!("a plugin's component is pulled by the scheduler at apply: {e}")
        })?;
        if !resolved.wasm {
            return Err(format!(
                "{reference} is a container image, not a wasm artifact; push the component with `flotilla push plugin.wasm {reference}`"
            ));
        }
        *digest = resolved.digest;
    }
    let own;
    let mirror = match &cluster.mirror {
        Some(m) => m,
        None => {
            own = Mirror::new(cluster.cfg.registries.clone());
            &own
        }
    };
    let grant = |wanted| Grant {
        reference: reference.clone(),
        wanted,
    };
    mirror
        .ensure(&cluster.blobs, &grant(Wanted::Manifest), digest)
        .await?;
    let (layer, size) = layer_of(&cluster.blobs, digest)?;
    mirror
        .ensure(&cluster.blobs, &grant(Wanted::Blob { size }), &layer)
        .await
}

/// The bytes of a Plugin's component, and the digest it is kept under
/// (the module's, or the artifact manifest's).
pub fn component(blobs: &ContentStore, source: &MemberSource) -> Result<(String, Vec<u8>), String> {
    let (key, blob) = match source {
        MemberSource::Module { digest, .. } => (digest.clone(), digest.clone()),
        MemberSource::Artifact { digest, reference } => {
            if digest.is_empty() {
                return Err(format!(
                    "{reference} was not pulled by the scheduler; apply the plugin with `flotilla apply`, which pins and pulls it"
                ));
            }
            (digest.clone(), layer_of(blobs, digest)?.0)
        }
        MemberSource::Container { .. } => {
            return Err("a plugin is a wasm component, not a container image".into());
        }
    };
    let path = blobs.path(&blob).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(&path).map_err(|e| format!("module {blob}: {e}"))?;
    Ok((key, bytes))
}

/// The digest a Plugin's compiled component is kept under.
pub fn key_of(source: &MemberSource) -> Option<&str> {
    match source {
        MemberSource::Module { digest, .. } => Some(digest),
        MemberSource::Artifact { digest, .. } if !digest.is_empty() => Some(digest),
        _ => None,
    }
}
