//! The scheduler as its site's artifact cache (`--pull-through`). Nodes
//! that cannot reach a registry ask the scheduler, over their QUIC link and
//! by digest, for the manifests and blobs of the registry members of pods
//! bound to them; the scheduler pulls each from the registry the first time
//! it is asked, verifies it against its digest and keeps it in its content
//! store, so the next node (or the same node after a wipe) gets it from the
//! scheduler alone.
//!
//! What a node may have is derived from the store, never from the request:
//! the pinned digest of an artifact or container member of a pod bound to
//! it, and whatever the manifests stored under those digests list (an
//! index's platform manifests; a manifest's config and layers).

use flotilla_api::content::ContentStore;
use flotilla_api::{MemberSource, Object, PodPhase};
use oci_client::Reference;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest manifest or index the cache takes.
pub const MANIFEST_LIMIT: u64 = 4 << 20;
/// Largest single blob (config or layer) the cache takes.
pub const BLOB_LIMIT: u64 = 8 << 30;

/// What kind of object a digest names, as the manifest listing it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// A manifest or an index (fetched from `/manifests/`).
    Manifest,
    /// A config or layer blob of known size (fetched from `/blobs/`).
    Blob { size: u64 },
}

/// A digest a node may fetch through the cache, and the repository it
/// comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// `HOST/REPO` (with any tag), as the member names it.
    pub reference: String,
    pub wanted: Wanted,
}

/// The registry sources of `pods` with a pinned digest: (reference, digest).
/// With `node`, only pods bound to it that are not Lost; without, every pod
/// and Deployment template (what the cache must keep).
pub fn roots(objects: &[Arc<Object>], node: Option<&str>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for o in objects {
        let members = match (&**o, node) {
            (Object::Pod(p), Some(n)) => {
                if p.status.node.as_deref() != Some(n) || p.status.phase == PodPhase::Lost {
                    continue;
                }
                &p.spec.members
            }
            (Object::Pod(p), None) => &p.spec.members,
            (Object::Deployment(d), None) => &d.spec.template.spec.members,
            // A Plugin from a registry: pulled by the scheduler for itself.
            (Object::Plugin(p), None) => {
                if let MemberSource::Artifact { reference, digest } = &p.spec.source
                    && !digest.is_empty()
                {
                    out.push((reference.clone(), digest.clone()));
                }
                continue;
            }
            _ => continue,
        };
        for m in members {
            let (reference, digest) = match &m.source {
                MemberSource::Artifact { reference, digest } => (reference, digest),
                MemberSource::Container { image, digest, .. } => (image, digest),
                MemberSource::Module { .. } => continue,
            };
            if !digest.is_empty() {
                out.push((reference.clone(), digest.clone()));
            }
        }
    }
    out
}

/// What the manifest stored under `digest` lists: an index's manifests, or
/// a manifest's config and layers. Nothing when it is not stored or not
/// readable.
pub fn children(blobs: &ContentStore, digest: &str) -> Vec<(String, Wanted)> {
    let Ok(path) = blobs.path(digest) else {
        return Vec::new();
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.len() <= MANIFEST_LIMIT => {}
        _ => return Vec::new(),
    }
    let Ok(bytes) = std::fs::read(&path) else {
        return Vec::new();
    };
    listed(&bytes)
}

/// The digests a manifest or index document lists.
pub fn listed(bytes: &[u8]) -> Vec<(String, Wanted)> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let digest = |v: &serde_json::Value| v["digest"].as_str().map(str::to_string);
    let mut out = Vec::new();
    if let Some(manifests) = doc["manifests"].as_array() {
        out.extend(
            manifests
                .iter()
                .filter_map(digest)
                .map(|d| (d, Wanted::Manifest)),
        );
    }
    let blobs = std::iter::once(&doc["config"]).chain(
        doc["layers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default(),
    );
    for b in blobs {
        if let (Some(d), Some(size)) = (digest(b), b["size"].as_u64()) {
            out.push((d, Wanted::Blob { size }));
        }
    }
    out
}

/// Whether `digest` is reachable from `roots` (a root, a manifest an
/// indexed root lists, or a blob one of those manifests lists), and how.
pub fn grant(blobs: &ContentStore, roots: &[(String, String)], digest: &str) -> Option<Grant> {
    let grant = |reference: &str, wanted| {
        Some(Grant {
            reference: reference.to_string(),
            wanted,
        })
    };
    for (reference, root) in roots {
        if root == digest {
            return grant(reference, Wanted::Manifest);
        }
    }
    for (reference, root) in roots {
        for (child, wanted) in children(blobs, root) {
            if child == digest {
                return grant(reference, wanted);
            }
            if wanted == Wanted::Manifest
                && let Some((_, w)) = children(blobs, &child)
                    .into_iter()
                    .find(|(d, _)| d == digest)
            {
                return grant(reference, w);
            }
        }
    }
    None
}

/// Every digest reachable from `roots` through stored manifests: what the
/// blob collector keeps.
pub fn closure(blobs: &ContentStore, roots: &[(String, String)]) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut todo: Vec<String> = roots.iter().map(|(_, d)| d.clone()).collect();
    while let Some(d) = todo.pop() {
        if !out.insert(d.clone()) {
            continue;
        }
        for (child, wanted) in children(blobs, &d) {
            if wanted == Wanted::Manifest {
                todo.push(child);
            } else {
                out.insert(child);
            }
        }
    }
    out
}

/// Pulls from registries into the scheduler's content store, one pull per
/// digest at a time.
pub struct Mirror {
    registries: Arc<flotilla_registry::config::RegistryConfig>,
    clients: Mutex<HashMap<String, Arc<flotilla_registry::Client>>>,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Mirror {
    pub fn new(registries: Arc<flotilla_registry::config::RegistryConfig>) -> Mirror {
        Mirror {
            registries,
            clients: Mutex::default(),
            inflight: Mutex::default(),
        }
    }

    /// A registry client (as the scheduler's registry config says), kept
    /// per registry so tokens are reused.
    fn client(&self, registry: &str) -> Result<Arc<flotilla_registry::Client>, String> {
        let mut clients = self.clients.lock().expect("poisoned");
        if let Some(c) = clients.get(registry) {
            return Ok(c.clone());
        }
        let c = Arc::new(
            crate::resolve::registry_client(
                &self.registries,
                registry,
                Duration::from_secs(10),
                Duration::from_secs(60),
            )
            .map_err(|e| e.to_string())?,
        );
        clients.insert(registry.to_string(), c.clone());
        Ok(c)
    }

    /// Makes sure `digest` is in `blobs`, pulling it from the registry
    /// `grant` names if it is not. Concurrent requests for one digest pull
    /// it once.
    pub async fn ensure(
        &self,
        blobs: &ContentStore,
        grant: &Grant,
        digest: &str,
    ) -> Result<(), String> {
        if blobs.has(digest) {
            return Ok(());
        }
        let gate = self
            .inflight
            .lock()
            .expect("poisoned")
            .entry(digest.to_string())
            .or_default()
            .clone();
        let result = {
            let _turn = gate.lock().await;
            if blobs.has(digest) {
                Ok(())
            } else {
                self.pull(blobs, grant, digest).await
            }
        };
        let mut inflight = self.inflight.lock().expect("poisoned");
        if inflight
            .get(digest)
            .is_some_and(|g| Arc::ptr_eq(g, &gate) && Arc::strong_count(g) == 2)
        {
            inflight.remove(digest);
        }
        result
    }

    async fn pull(&self, blobs: &ContentStore, grant: &Grant, digest: &str) -> Result<(), String> {
        let base: Reference = grant
            .reference
            .parse()
            .map_err(|e| format!("{}: {e}", grant.reference))?;
        let r = base.clone_with_digest(digest.to_string());
        let registry = r.resolve_registry().to_string();
        let client = self.client(&registry)?;
        let failed = |e: flotilla_registry::Error| format!("{e} (pulling {digest} for the nodes)");
        match grant.wanted {
            Wanted::Manifest => {
                let m = client
                    .manifest(
                        r.repository(),
                        digest,
                        crate::resolve::ACCEPTED,
                        MANIFEST_LIMIT,
                    )
                    .await
                    .map_err(failed)?;
                blobs
                    .put(digest, &m.bytes, MANIFEST_LIMIT)
                    .map_err(|e| e.to_string())?;
            }
            Wanted::Blob { size } => {
                let mut w = blobs
                    .writer(digest, Some(size), BLOB_LIMIT)
                    .map_err(|e| e.to_string())?;
                let mut blob = client.blob(r.repository(), digest).await.map_err(failed)?;
                while let Some(chunk) = blob.chunk().await.map_err(failed)? {
                    w.write(&chunk).map_err(|e| e.to_string())?;
                }
                tokio::task::spawn_blocking(move || w.commit())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            }
        }
        tracing::info!(%digest, reference = %grant.reference, "pulled into the site cache");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ContentStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = ContentStore::open(dir.path()).unwrap();
        (dir, s)
    }

    fn put(s: &ContentStore, doc: &serde_json::Value) -> String {
        let bytes = serde_json::to_vec(doc).unwrap();
        let d = flotilla_api::manifest::digest_of(&bytes);
        s.put(&d, &bytes, MANIFEST_LIMIT).unwrap();
        d
    }

    const CONFIG: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const LAYER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const OTHER: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    #[test]
    fn nodes_get_what_their_pinned_roots_list_and_nothing_else() {
        let (_d, s) = store();
        let manifest = put(
            &s,
            &serde_json::json!({
                "schemaVersion": 2,
                "config": {"mediaType": "c", "digest": CONFIG, "size": 10},
                "layers": [{"mediaType": "l", "digest": LAYER, "size": 20}],
            }),
        );
        let index = put(
            &s,
            &serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{"mediaType": "m", "digest": manifest, "size": 1}],
            }),
        );
        let roots = vec![("127.0.0.1:5000/app:1".to_string(), index.clone())];
        let g = |d: &str| grant(&s, &roots, d).map(|g| g.wanted);
        assert_eq!(g(&index), Some(Wanted::Manifest));
        assert_eq!(g(&manifest), Some(Wanted::Manifest));
        assert_eq!(g(CONFIG), Some(Wanted::Blob { size: 10 }));
        assert_eq!(g(LAYER), Some(Wanted::Blob { size: 20 }));
        assert_eq!(g(OTHER), None);
        assert_eq!(
            grant(&s, &roots, LAYER).unwrap().reference,
            "127.0.0.1:5000/app:1"
        );
        // No roots (no pod bound to the node): nothing at all.
        assert_eq!(grant(&s, &[], &index), None);
        let kept = closure(&s, &roots);
        let want: HashSet<String> = [index, manifest, CONFIG.into(), LAYER.into()].into();
        assert_eq!(kept, want);
    }

    #[test]
    fn a_stored_blob_that_is_not_a_manifest_lists_nothing() {
        let (_d, s) = store();
        let bytes = b"\0asm\x01\0\0\0";
        let d = flotilla_api::manifest::digest_of(bytes);
        s.put(&d, bytes, MANIFEST_LIMIT).unwrap();
        assert!(children(&s, &d).is_empty());
        assert!(children(&s, OTHER).is_empty());
    }
}
