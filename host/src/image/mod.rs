//! Images: pulls from OCI registries (through `oci-client`) into the agent's
//! content store, pushes wasm artifacts, and turns stored images into what
//! the executors run — a `.wasm` file or an unpacked root filesystem.
//!
//! Every blob is size- and digest-checked while it streams into the store
//! ([`ContentStore`]); manifests and configs are size-capped, layer count and
//! total size are capped, and layers unpack through [`crate::image::unpack`]. The
//! image index (`images.json`) is replaced atomically and guarded by a file
//! lock, so the agent and the `flotilla images`/`prune` commands can share a
//! store.

pub mod unpack;

use self::unpack::UnpackError;
use crate::content::{ContentError, ContentStore, digest_hex};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Config media type of a wasm artifact (CNCF wasm OCI artifact layout).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Layer media type of a wasm artifact.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Older config/layer types some tools still write; accepted on pull.
const WASM_CONFIG_V1: &str = "application/vnd.wasm.config.v1+json";
const WASM_LAYER_V1: &str = "application/vnd.wasm.content.layer.v1+wasm";

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("'{reference}' is not a valid image reference: {why}")]
    BadReference { reference: String, why: String },
    #[error("{reference}: {message}")]
    Registry { reference: String, message: String },
    #[error("{reference}: {what} is {size} bytes, above the {limit}-byte limit")]
    TooLarge {
        reference: String,
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("{reference}: {message}")]
    Invalid { reference: String, message: String },
    #[error("{reference}: no image for platform {wanted} in its index (it has: {available})")]
    NoPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("{0}")]
    Content(#[from] ContentError),
    #[error("unpacking layer {layer}: {source}")]
    Unpack { layer: String, source: UnpackError },
    #[error("image store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("image '{0}' is not in the local store; pull it first")]
    NotPresent(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub use flotilla_registry::config::{ConfigError, RegistryConfig, RegistryCreds};

/// The credentials pushes to `registry` present (oci-client's form).
fn push_auth(cfg: &RegistryConfig, registry: &str) -> RegistryAuth {
    match cfg.creds(registry) {
        Some(RegistryCreds { token: Some(t), .. }) => RegistryAuth::Bearer(t.clone()),
        Some(RegistryCreds {
            username: Some(u),
            password,
            ..
        }) => RegistryAuth::Basic(u.clone(), password.clone().unwrap_or_default()),
        _ => RegistryAuth::Anonymous,
    }
}

/// The os/architecture/variant an image index entry is chosen by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine, in Go's GOOS/GOARCH names.
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: variant.map(str::to_string),
        }
    }

    /// Parses `os/arch[/variant]`, e.g. `linux/arm64/v8`.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(format!(
                "'{s}' is not a platform; write os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8"
            )),
        }
    }

    /// Picks this platform's entry of an index. A wanted variant must match
    /// when the entry names one; an entry without a variant fits any.
    fn pick<'a>(&self, entries: &'a [ImageIndexEntry]) -> Option<&'a ImageIndexEntry> {
        let fits = |e: &&ImageIndexEntry| {
            e.platform.as_ref().is_some_and(|p| {
                p.os.to_string() == self.os
                    && p.architecture.to_string() == self.arch
                    && match (&self.variant, &p.variant) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    }
            })
        };
        // An exact variant match beats an entry that leaves it open.
        entries.iter().filter(fits).max_by_key(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.variant.is_some() && p.variant == self.variant)
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Caps on what a pull may bring in.
#[derive(Clone, Debug)]
pub struct Limits {
    pub manifest_bytes: u64,
    pub config_bytes: u64,
    pub layers: usize,
    /// Compressed size of all layers together.
    pub image_bytes: u64,
    /// Unpacked size of all layers together.
    pub unpacked_bytes: u64,
    /// Largest `.wasm` taken out of a container image layer.
    pub wasm_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            manifest_bytes: 4 << 20,
            config_bytes: 1 << 20,
            layers: 128,
            image_bytes: 8 << 30,
            unpacked_bytes: 16 << 30,
            wasm_bytes: 256 << 20,
        }
    }
}

/// What an image holds, as far as running it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageKind {
    /// A wasm artifact: one `application/wasm` layer.
    Wasm,
    /// A container image: tar layers and an image config.
    Container,
}

/// A stored descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

impl From<&OciDescriptor> for Blob {
    fn from(d: &OciDescriptor) -> Blob {
        Blob {
            digest: d.digest.clone(),
            size: d.size.max(0) as u64,
            media_type: d.media_type.clone(),
        }
    }
}

/// A pulled image, as recorded in the local index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference it was pulled by, normalized (`host/repo:tag`).
    pub reference: String,
    /// Digest of the (platform) manifest.
    pub digest: String,
    /// Digest of the index it was chosen from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    pub kind: ImageKind,
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub pulled_ms: u64,
}

impl ImageRecord {
    /// Compressed size of config and layers.
    pub fn size(&self) -> u64 {
        self.config.size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }

    /// Every blob the image needs, manifest included.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.digest.as_str())
            .chain(self.index_digest.as_deref())
            .chain(std::iter::once(self.config.digest.as_str()))
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }
}

/// Progress of a pull, for progress bars.
#[derive(Clone, Debug)]
pub enum Progress {
    /// The manifest is known: these blobs will be fetched (or found stored).
    Resolved {
        digest: String,
        layers: usize,
        total_bytes: u64,
    },
    /// Bytes of one blob arrived (`done` of `size`).
    Blob {
        digest: String,
        done: u64,
        size: u64,
    },
    /// The blob was already stored.
    Cached { digest: String, size: u64 },
}

/// What the image's config says about running it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: String,
    pub user: String,
}

/// The agent's (or the CLI's) local image store.
pub struct ImageStore {
    root: PathBuf,
    content: ContentStore,
    registries: RegistryConfig,
    pub limits: Limits,
    clients: Mutex<HashMap<String, Arc<Client>>>,
    pullers: Mutex<HashMap<String, Arc<flotilla_registry::Client>>>,
    /// Where images come from instead of their registries, if set.
    mirror: std::sync::OnceLock<Arc<dyn Mirror>>,
}

/// Somewhere other than the registry to get an image's manifests and blobs
/// from, by digest: the scheduler's site cache, for nodes that cannot reach
/// registries.
pub trait Mirror: Send + Sync {
    /// Puts blob `digest` into `store`, verified: exactly `size` bytes when
    /// known, at most `limit`.
    fn fetch<'a>(
        &'a self,
        store: &'a ContentStore,
        digest: &'a str,
        size: Option<u64>,
        limit: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// Where one pull gets its bytes.
enum Source<'a> {
    Registry(Arc<flotilla_registry::Client>),
    Mirror(&'a dyn Mirror),
}

/// What a prune removed.
#[derive(Debug, Default)]
pub struct Pruned {
    pub images: Vec<String>,
    pub blobs: usize,
    pub bytes: u64,
}

impl ImageStore {
    pub fn open(root: impl Into<PathBuf>, registries: RegistryConfig) -> Result<Self, ImageError> {
        let root = root.into();
        std::fs::create_dir_all(root.join("rootfs")).map_err(io(&root))?;
        let content = ContentStore::open(root.join("blobs"))?;
        Ok(ImageStore {
            root,
            content,
            registries,
            limits: Limits::default(),
            clients: Mutex::new(HashMap::new()),
            pullers: Mutex::new(HashMap::new()),
            mirror: std::sync::OnceLock::new(),
        })
    }

    /// Pulls from now on come from `mirror`, not from registries (set once).
    pub fn pull_via(&self, mirror: Arc<dyn Mirror>) {
        let _ = self.mirror.set(mirror);
    }

    /// The source of a pull of `r`: the mirror if there is one, else its registry.
    fn source(&self, r: &Reference) -> Result<Source<'_>, ImageError> {
        Ok(match self.mirror.get() {
            Some(m) => Source::Mirror(&**m),
            None => Source::Registry(self.puller(r.resolve_registry())?),
        })
    }

    /// The raw manifest `r` names and its digest; `size` when an index
    /// gave it.
    async fn manifest(
        &self,
        src: &Source<'_>,
        r: &Reference,
        size: Option<u64>,
        shown: &str,
    ) -> Result<(Vec<u8>, String), ImageError> {
        match src {
            Source::Registry(client) => {
                let reference = r.digest().or(r.tag()).unwrap_or("latest");
                client
                    .manifest(
                        r.repository(),
                        reference,
                        MANIFEST_TYPES,
                        self.limits.manifest_bytes,
                    )
                    .await
                    .map(|m| (m.bytes, m.digest))
                    .map_err(|e| ImageError::Registry {
                        reference: shown.to_string(),
                        message: e.to_string(),
                    })
            }
            Source::Mirror(m) => {
                let digest = r.digest().ok_or_else(|| ImageError::Registry {
                    reference: shown.to_string(),
                    message: "pulling through the scheduler needs a digest, and this reference has none (the scheduler pins references it can resolve at apply: can it reach the registry?)".into(),
                })?;
                let limit = self.limits.manifest_bytes;
                m.fetch(&self.content, digest, size, limit)
                    .await
                    .map_err(|message| ImageError::Registry {
                        reference: shown.to_string(),
                        message: format!("through the scheduler: {message}"),
                    })?;
                let path = self.content.path(digest)?;
                let bytes = std::fs::read(&path).map_err(io(&path))?;
                Ok((bytes, digest.to_string()))
            }
        }
    }

    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    /// The pull client for `registry` (one per registry, reused).
    fn puller(&self, registry: &str) -> Result<Arc<flotilla_registry::Client>, ImageError> {
        let mut pullers = self.pullers.lock().expect("poisoned");
        if let Some(c) = pullers.get(registry) {
            return Ok(c.clone());
        }
        let c = flotilla_registry::Client::new(
            registry,
            self.registries.access(registry),
            self.registries.pull_creds(registry),
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(60),
        )
        .map(Arc::new)
        .map_err(|e| ImageError::Registry {
            reference: registry.to_string(),
            message: e.to_string(),
        })?;
        pullers.insert(registry.to_string(), c.clone());
        Ok(c)
    }

    /// The push client for `registry` (oci-client).
    fn client(&self, registry: &str) -> Arc<Client> {
        // reqwest is built without a crypto provider of its own: it uses
        // the process default, ring, as the QUIC link does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut clients = self.clients.lock().expect("poisoned");
        clients
            .entry(registry.to_string())
            .or_insert_with(|| {
                let protocol = if self.registries.insecure(registry) {
                    ClientProtocol::Http
                } else {
                    ClientProtocol::Https
                };
                Arc::new(Client::new(ClientConfig {
                    protocol,
                    // Platforms are chosen here, not by the client.
                    platform_resolver: None,
                    connect_timeout: Some(std::time::Duration::from_secs(10)),
                    read_timeout: Some(std::time::Duration::from_secs(60)),
                    ..ClientConfig::default()
                }))
            })
            .clone()
    }

    /// The registry a reference names, its client and the credentials for it.
    fn endpoint(&self, r: &Reference) -> (String, Arc<Client>, RegistryAuth) {
        let registry = r.resolve_registry().to_string();
        let client = self.client(&registry);
        let auth = push_auth(&self.registries, &registry);
        (registry, client, auth)
    }

    /// Takes one of the store's locks (shared with other processes using the
    /// store): `index` guards `images.json`, `rootfs` the unpacking, so a long
    /// unpack never holds up recording a pull.
    fn lock(&self, which: &str) -> Result<std::fs::File, ImageError> {
        let p = self.root.join(format!("{which}.lock"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io(&p))?;
        f.lock().map_err(io(&p))?;
        Ok(f)
    }

    fn read_index(&self) -> Result<BTreeMap<String, ImageRecord>, ImageError> {
        let p = self.root.join("images.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ImageError::Io {
                path: p,
                source: std::io::Error::other(e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(ImageError::Io { path: p, source: e }),
        }
    }

    fn write_index(&self, index: &BTreeMap<String, ImageRecord>) -> Result<(), ImageError> {
        let p = self.root.join("images.json");
        let tmp = self.root.join("images.json.tmp");
        let bytes = serde_json::to_vec_pretty(index).map_err(|e| ImageError::Io {
            path: p.clone(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))
    }

    /// Every recorded image, by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        Ok(self.read_index()?.into_values().collect())
    }

    /// The stored image for `reference`, if it and all its blobs are here.
    pub fn local(&self, reference: &str) -> Result<Option<ImageRecord>, ImageError> {
        let r = parse_ref(reference)?;
        let index = self.read_index()?;
        let rec = index.get(&r.whole()).or_else(|| {
            // By digest: any record with that manifest digest will do.
            r.digest()
                .and_then(|d| index.values().find(|rec| rec.digest == d))
        });
        Ok(rec
            .filter(|rec| rec.blobs().all(|b| self.content.has(b)))
            .cloned())
    }

    /// Returns the stored image, pulling it only when it is not stored
    /// (the agent's policy: a node keeps running what it has when the
    /// registry is out of reach).
    pub async fn ensure(
        &self,
        reference: &str,
        platform: &Platform,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<ImageRecord, ImageError> {
        if let Some(rec) = self.local(reference)? {
            return Ok(rec);
        }
        self.pull(reference, platform, progress).await
    }

    /// Pulls `reference` for `platform` from its registry.
    pub async fn pull(
        &self,
        reference: &str,
        platform: &Platform,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<ImageRecord, ImageError> {
        let r = parse_ref(reference)?;
        let shown = r.whole();
        let src = self.source(&r)?;
        let (bytes, digest) = self.manifest(&src, &r, None, &shown).await?;
        self.check_size(
            &shown,
            "the manifest",
            bytes.len() as u64,
            self.limits.manifest_bytes,
        )?;
        let parsed: OciManifest =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
                reference: shown.clone(),
                message: format!("unreadable manifest: {e}"),
            })?;
        let (manifest, digest, bytes, index) = match parsed {
            OciManifest::Image(m) => (m, digest, bytes, None),
            OciManifest::ImageIndex(idx) => {
                let entry =
                    platform
                        .pick(&idx.manifests)
                        .ok_or_else(|| ImageError::NoPlatform {
                            reference: shown.clone(),
                            wanted: platform.to_string(),
                            available: available(&idx.manifests),
                        })?;
                self.check_size(
                    &shown,
                    "the platform manifest",
                    entry.size.max(0) as u64,
                    self.limits.manifest_bytes,
                )?;
                let child = r.clone_with_digest(entry.digest.clone());
                let (cbytes, cdigest) = self
                    .manifest(&src, &child, Some(entry.size.max(0) as u64), &shown)
                    .await?;
                if cbytes.len() as u64 != entry.size.max(0) as u64 || cdigest != entry.digest {
                    return Err(ImageError::Invalid {
                        reference: shown.clone(),
                        message: format!(
                            "platform manifest {} does not match its index entry (size {} vs {})",
                            entry.digest,
                            cbytes.len(),
                            entry.size
                        ),
                    });
                }
                match serde_json::from_slice::<OciManifest>(&cbytes) {
                    Ok(OciManifest::Image(m)) => {
                        self.content
                            .put(&digest, &bytes, self.limits.manifest_bytes)?;
                        (m, cdigest, cbytes, Some(digest))
                    }
                    _ => {
                        return Err(ImageError::Invalid {
                            reference: shown.clone(),
                            message: format!("{} is not an image manifest", entry.digest),
                        });
                    }
                }
            }
        };
        let kind = check_manifest(&shown, &manifest, &self.limits)?;
        let total: u64 = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum();
        progress(Progress::Resolved {
            digest: digest.clone(),
            layers: manifest.layers.len(),
            total_bytes: total + manifest.config.size.max(0) as u64,
        });
        self.fetch(
            &src,
            &r,
            &manifest.config,
            self.limits.config_bytes,
            progress,
        )
        .await
        .map_err(|e| with_ref(&shown, e))?;
        for l in &manifest.layers {
            self.fetch(&src, &r, l, self.limits.image_bytes, progress)
                .await
                .map_err(|e| with_ref(&shown, e))?;
        }
        self.content
            .put(&digest, &bytes, self.limits.manifest_bytes)?;
        let rec = ImageRecord {
            reference: shown.clone(),
            digest,
            index_digest: index,
            kind,
            config: Blob::from(&manifest.config),
            layers: manifest.layers.iter().map(Blob::from).collect(),
            pulled_ms: flotilla_api::time::now_ms(),
        };
        let _lock = self.lock("index")?;
        let mut idx = self.read_index()?;
        idx.insert(shown, rec.clone());
        self.write_index(&idx)?;
        Ok(rec)
    }

    fn check_size(
        &self,
        reference: &str,
        what: &'static str,
        size: u64,
        limit: u64,
    ) -> Result<(), ImageError> {
        if size > limit {
            return Err(ImageError::TooLarge {
                reference: reference.to_string(),
                what,
                size,
                limit,
            });
        }
        Ok(())
    }

    /// Streams one blob into the content store unless it is already there.
    async fn fetch(
        &self,
        src: &Source<'_>,
        r: &Reference,
        desc: &OciDescriptor,
        limit: u64,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<(), ImageError> {
        let size = desc.size.max(0) as u64;
        if self.content.has(&desc.digest) {
            progress(Progress::Cached {
                digest: desc.digest.clone(),
                size,
            });
            return Ok(());
        }
        let client = match src {
            Source::Registry(client) => client,
            Source::Mirror(m) => {
                m.fetch(&self.content, &desc.digest, Some(size), limit)
                    .await
                    .map_err(|message| ImageError::Registry {
                        reference: String::new(),
                        message: format!("blob {} through the scheduler: {message}", desc.digest),
                    })?;
                progress(Progress::Blob {
                    digest: desc.digest.clone(),
                    done: size,
                    size,
                });
                return Ok(());
            }
        };
        let mut w = self.content.writer(&desc.digest, Some(size), limit)?;
        let failed = |e: flotilla_registry::Error| ImageError::Registry {
            reference: String::new(),
            message: format!("blob {}: {e}", desc.digest),
        };
        let mut blob = client
            .blob(r.repository(), &desc.digest)
            .await
            .map_err(failed)?;
        let mut done = 0u64;
        let mut last_report = 0u64;
        while let Some(chunk) = blob.chunk().await.map_err(failed)? {
            w.write(&chunk)?;
            done += chunk.len() as u64;
            if done - last_report >= 256 << 10 || done == size {
                last_report = done;
                progress(Progress::Blob {
                    digest: desc.digest.clone(),
                    done,
                    size,
                });
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Publishes a wasm module or component as a wasm OCI artifact; returns
    /// the manifest digest.
    pub async fn push_wasm(
        &self,
        file: &Path,
        reference: &str,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<String, ImageError> {
        let r = parse_ref(reference)?;
        let shown = r.whole();
        let bytes = std::fs::read(file).map_err(io(file))?;
        let os = match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => "wasip1",
            Some([0, b'a', b's', b'm', _, _, 1, 0]) => "wasip2",
            _ => {
                return Err(ImageError::Invalid {
                    reference: shown,
                    message: format!(
                        "{} is not a wasm module or component (bad magic number)",
                        file.display()
                    ),
                });
            }
        };
        let layer_digest = crate::executor::wasm::runtime::digest_of(&bytes);
        let config = serde_json::json!({
            "created": flotilla_api::time::rfc3339(flotilla_api::time::now_ms()),
            "architecture": "wasm",
            "os": os,
            "layerDigests": [layer_digest],
        });
        let layer = oci_client::client::ImageLayer::new(bytes, WASM_LAYER_MEDIA_TYPE.into(), None);
        let config = oci_client::client::Config::new(
            serde_json::to_vec(&config).expect("json"),
            WASM_CONFIG_MEDIA_TYPE.into(),
            None,
        );
        let manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
        let (registry, client, auth) = self.endpoint(&r);
        let reg_err = |e| ImageError::Registry {
            reference: shown.clone(),
            message: explain(&registry, e),
        };
        client.store_auth_if_needed(&registry, &auth).await;
        // The module goes up in 1 MiB chunks, counted as the registry takes them.
        let size = layer.data.len() as u64;
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let chunks: Vec<bytes::Bytes> = (0..layer.data.len())
            .step_by(1 << 20)
            .map(|i| layer.data.slice(i..(i + (1 << 20)).min(layer.data.len())))
            .collect();
        let counter = sent.clone();
        let stream = futures_util::stream::iter(chunks).map(move |c| {
            counter.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(c)
        });
        let upload = client.push_blob_stream(&r, stream, &layer_digest, Some(size));
        tokio::pin!(upload);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        loop {
            tokio::select! {
                done = &mut upload => {
                    done.map_err(reg_err)?;
                    break;
                }
                _ = tick.tick() => progress(Progress::Blob {
                    digest: layer_digest.clone(),
                    done: sent.load(std::sync::atomic::Ordering::Relaxed),
                    size,
                }),
            }
        }
        progress(Progress::Blob {
            digest: layer_digest.clone(),
            done: size,
            size,
        });
        client
            .push_blob(&r, config.data.clone(), &manifest.config.digest)
            .await
            .map_err(reg_err)?;
        client
            .push_manifest(&r, &manifest.into())
            .await
            .map_err(reg_err)?;
        self.pushed_digest(&client, &r, &auth).await
    }

    /// The digest the registry now gives the pushed reference.
    async fn pushed_digest(
        &self,
        client: &Client,
        r: &Reference,
        auth: &RegistryAuth,
    ) -> Result<String, ImageError> {
        client
            .fetch_manifest_digest(r, auth)
            .await
            .map_err(|e| ImageError::Registry {
                reference: r.whole(),
                message: explain(r.resolve_registry(), e),
            })
    }

    /// Publishes an image made of `layers` (media type, bytes) and a config;
    /// returns the manifest digest. (`flotilla push` publishes wasm; this is
    /// for images built by tools and tests.)
    pub async fn push_layers(
        &self,
        reference: &str,
        config: (&str, Vec<u8>),
        layers: Vec<(String, Vec<u8>)>,
    ) -> Result<String, ImageError> {
        let r = parse_ref(reference)?;
        let layers: Vec<oci_client::client::ImageLayer> = layers
            .into_iter()
            .map(|(mt, b)| oci_client::client::ImageLayer::new(b, mt, None))
            .collect();
        let config = oci_client::client::Config::new(config.1, config.0.to_string(), None);
        let manifest = OciImageManifest::build(&layers, &config, None);
        let (registry, client, auth) = self.endpoint(&r);
        client
            .push(&r, &layers, config, &auth, Some(manifest.clone()))
            .await
            .map_err(|e| ImageError::Registry {
                reference: r.whole(),
                message: explain(&registry, e),
            })?;
        self.pushed_digest(&client, &r, &auth).await
    }

    /// The image's run settings from its config blob.
    pub fn run_config(&self, rec: &ImageRecord) -> Result<RunConfig, ImageError> {
        #[derive(Deserialize, Default)]
        #[serde(rename_all = "PascalCase", default)]
        struct Inner {
            entrypoint: Option<Vec<String>>,
            cmd: Option<Vec<String>>,
            env: Option<Vec<String>>,
            working_dir: Option<String>,
            user: Option<String>,
        }
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Outer {
            config: Option<Inner>,
        }
        let p = self.content.path(&rec.config.digest)?;
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        let outer: Outer = serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
            reference: rec.reference.clone(),
            message: format!("unreadable image config: {e}"),
        })?;
        let c = outer.config.unwrap_or_default();
        Ok(RunConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            workdir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        })
    }

    /// The `.wasm` to run for an image: the artifact's wasm layer, or the only
    /// `.wasm` file in a single-layer container image (taken out once and
    /// stored by its own digest). Returns the file and its digest.
    pub fn wasm(&self, rec: &ImageRecord) -> Result<(PathBuf, String), ImageError> {
        if let Some(l) = rec
            .layers
            .iter()
            .find(|l| l.media_type == WASM_LAYER_MEDIA_TYPE || l.media_type == WASM_LAYER_V1)
        {
            return Ok((self.content.path(&l.digest)?, l.digest.clone()));
        }
        let [layer] = rec.layers.as_slice() else {
            return Err(ImageError::Invalid {
                reference: rec.reference.clone(),
                message: format!(
                    "has {} layers; only a wasm artifact or a single-layer image holding one .wasm file runs as wasm",
                    rec.layers.len()
                ),
            });
        };
        let path = self.content.path(&layer.digest)?;
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        let reader: Box<dyn Read> = if layer.media_type.ends_with("gzip") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut archive = tar::Archive::new(reader);
        let mut found: Option<Vec<u8>> = None;
        let mut names = Vec::new();
        let bad = |e: std::io::Error| ImageError::Invalid {
            reference: rec.reference.clone(),
            message: format!("reading layer {}: {e}", layer.digest),
        };
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
            if !entry.header().entry_type().is_file() || !name.ends_with(".wasm") {
                continue;
            }
            names.push(name);
            if entry.size() > self.limits.wasm_bytes {
                return Err(ImageError::TooLarge {
                    reference: rec.reference.clone(),
                    what: "the .wasm file",
                    size: entry.size(),
                    limit: self.limits.wasm_bytes,
                });
            }
            let mut buf = Vec::with_capacity(entry.size() as usize);
            entry
                .by_ref()
                .take(self.limits.wasm_bytes)
                .read_to_end(&mut buf)
                .map_err(bad)?;
            found = Some(buf);
        }
        match (found, names.len()) {
            (Some(bytes), 1) => {
                let digest = crate::executor::wasm::runtime::digest_of(&bytes);
                let p = self.content.put(&digest, &bytes, self.limits.wasm_bytes)?;
                Ok((p, digest))
            }
            (_, 0) => Err(ImageError::Invalid {
                reference: rec.reference.clone(),
                message: "holds no .wasm file; run it as a container with image = \"...\"".into(),
            }),
            (_, _) => Err(ImageError::Invalid {
                reference: rec.reference.clone(),
                message: format!(
                    "holds several .wasm files ({}); publish one per image",
                    names.join(", ")
                ),
            }),
        }
    }

    /// The image's root filesystem, unpacked once per manifest digest
    /// (layers in order, whiteouts applied) and shared read-only by its
    /// containers.
    pub fn rootfs(&self, rec: &ImageRecord) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(&rec.digest)?;
        let dir = self.root.join("rootfs").join(hex);
        if dir.join("ready").is_file() {
            return Ok(dir.join("fs"));
        }
        let _lock = self.lock("rootfs")?;
        if dir.join("ready").is_file() {
            return Ok(dir.join("fs"));
        }
        let tmp = self.root.join("rootfs").join(format!("{hex}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        let fs = tmp.join("fs");
        std::fs::create_dir_all(&fs).map_err(io(&fs))?;
        let mut budget = self.limits.unpacked_bytes;
        for l in &rec.layers {
            let gzip = match l.media_type.as_str() {
                "application/vnd.oci.image.layer.v1.tar"
                | "application/vnd.docker.image.rootfs.diff.tar" => false,
                "application/vnd.oci.image.layer.v1.tar+gzip"
                | "application/vnd.docker.image.rootfs.diff.tar.gzip" => true,
                other => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(ImageError::Invalid {
                        reference: rec.reference.clone(),
                        message: format!("layer {} has unsupported media type {other}", l.digest),
                    });
                }
            };
            let p = self.content.path(&l.digest)?;
            let f = std::fs::File::open(&p).map_err(io(&p))?;
            let limits = unpack::Limits {
                max_bytes: budget,
                ..unpack::Limits::default()
            };
            match unpack::unpack(std::io::BufReader::new(f), gzip, &fs, &limits) {
                Ok(stats) => budget = budget.saturating_sub(stats.bytes),
                Err(source) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(ImageError::Unpack {
                        layer: l.digest.clone(),
                        source,
                    });
                }
            }
        }
        std::fs::write(tmp.join("ready"), rec.reference.as_bytes()).map_err(io(&tmp))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        Ok(dir.join("fs"))
    }

    /// Total bytes of stored blobs.
    pub fn usage(&self) -> Result<u64, ImageError> {
        Ok(self.content.list()?.iter().map(|b| b.size).sum())
    }

    /// Forgets images whose reference or digest is not in `in_use`, then
    /// removes blobs and unpacked filesystems no remaining image needs.
    pub fn prune(&self, in_use: &HashSet<String>) -> Result<Pruned, ImageError> {
        let _rootfs = self.lock("rootfs")?;
        let _index = self.lock("index")?;
        let mut index = self.read_index()?;
        let mut out = Pruned::default();
        // Images in use by reference keep the records of the same manifest
        // under other names (a tag and its digest form).
        let digests: HashSet<String> = index
            .iter()
            .filter(|(reference, _)| in_use.contains(*reference))
            .map(|(_, rec)| rec.digest.clone())
            .collect();
        index.retain(|reference, rec| {
            let keep = in_use.contains(reference)
                || in_use.contains(&rec.digest)
                || digests.contains(&rec.digest)
                || rec
                    .index_digest
                    .as_ref()
                    .is_some_and(|d| in_use.contains(d));
            if !keep {
                out.images.push(reference.clone());
            }
            keep
        });
        self.write_index(&index)?;
        let keep: HashSet<String> = index
            .values()
            .flat_map(|r| r.blobs().map(str::to_string).collect::<Vec<_>>())
            .chain(
                // `.wasm` files taken out of container images, by their own digest.
                index
                    .values()
                    .filter_map(|r| self.extracted_wasm(r))
                    .collect::<Vec<_>>(),
            )
            .collect();
        for b in self.content.prune(&keep)? {
            out.blobs += 1;
            out.bytes += b.size;
        }
        let manifests: HashSet<&str> = index
            .values()
            .filter_map(|r| digest_hex(&r.digest).ok())
            .collect();
        let rootfs = self.root.join("rootfs");
        if let Ok(dirs) = std::fs::read_dir(&rootfs) {
            for d in dirs.flatten() {
                let name = d.file_name().to_string_lossy().into_owned();
                if !manifests.contains(name.as_str()) {
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
        Ok(out)
    }

    /// The digest of the `.wasm` taken out of a single-layer container
    /// image, when it was.
    fn extracted_wasm(&self, rec: &ImageRecord) -> Option<String> {
        if rec.kind != ImageKind::Container || rec.layers.len() != 1 {
            return None;
        }
        self.wasm(rec).ok().map(|(_, d)| d)
    }
}

/// Every `interval`, prunes images `in_use` does not name once the stored
/// blobs exceed `threshold` bytes (the agent's automatic image GC).
pub async fn gc_loop(
    images: Arc<ImageStore>,
    threshold: u64,
    interval: std::time::Duration,
    in_use: impl Fn() -> HashSet<String> + Send + 'static,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let images = images.clone();
        let keep = in_use();
        let res = tokio::task::spawn_blocking(move || {
            if images.usage()? <= threshold {
                return Ok(None);
            }
            images.prune(&keep).map(Some)
        })
        .await;
        match res {
            Ok(Ok(Some(p))) if !p.images.is_empty() || p.blobs > 0 => tracing::info!(
                images = p.images.len(),
                bytes = p.bytes,
                "stored images above {threshold} bytes: pruned unused ones"
            ),
            Ok(Err(e)) => tracing::warn!("image garbage collection: {e}"),
            _ => {}
        }
    }
}

fn with_ref(reference: &str, e: ImageError) -> ImageError {
    match e {
        ImageError::Registry {
            reference: r,
            message,
        } if r.is_empty() => ImageError::Registry {
            reference: reference.to_string(),
            message,
        },
        other => other,
    }
}

/// Parses an image reference; `oci://` in front is allowed.
pub fn parse_ref(reference: &str) -> Result<Reference, ImageError> {
    let s = reference.strip_prefix("oci://").unwrap_or(reference);
    s.parse::<Reference>()
        .map_err(|e| ImageError::BadReference {
            reference: reference.to_string(),
            why: format!("{e}; write HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]"),
        })
}

fn available(entries: &[ImageIndexEntry]) -> String {
    let v: Vec<String> = entries
        .iter()
        .filter_map(|e| e.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    if v.is_empty() {
        "no platforms".into()
    } else {
        v.join(", ")
    }
}

/// Checks the layer count and sizes, and tells wasm artifacts from
/// container images.
fn check_manifest(
    reference: &str,
    m: &OciImageManifest,
    limits: &Limits,
) -> Result<ImageKind, ImageError> {
    if m.config.size < 0 || m.layers.iter().any(|l| l.size < 0) {
        return Err(ImageError::Invalid {
            reference: reference.into(),
            message: "manifest gives a negative size".into(),
        });
    }
    if m.config.size as u64 > limits.config_bytes {
        return Err(ImageError::TooLarge {
            reference: reference.into(),
            what: "the image config",
            size: m.config.size as u64,
            limit: limits.config_bytes,
        });
    }
    if m.layers.len() > limits.layers {
        return Err(ImageError::TooLarge {
            reference: reference.into(),
            what: "the layer count",
            size: m.layers.len() as u64,
            limit: limits.layers as u64,
        });
    }
    let total: u64 = m.layers.iter().map(|l| l.size as u64).sum();
    if total > limits.image_bytes {
        return Err(ImageError::TooLarge {
            reference: reference.into(),
            what: "the image (all layers)",
            size: total,
            limit: limits.image_bytes,
        });
    }
    for d in std::iter::once(&m.config).chain(&m.layers) {
        digest_hex(&d.digest)?;
    }
    let wasm_config =
        m.config.media_type == WASM_CONFIG_MEDIA_TYPE || m.config.media_type == WASM_CONFIG_V1;
    let wasm_layer =
        |l: &OciDescriptor| l.media_type == WASM_LAYER_MEDIA_TYPE || l.media_type == WASM_LAYER_V1;
    Ok(
        if wasm_config || (m.layers.len() == 1 && wasm_layer(&m.layers[0])) {
            ImageKind::Wasm
        } else {
            ImageKind::Container
        },
    )
}

/// A registry error in words a user can act on (credentials never appear).
fn explain(registry: &str, e: oci_client::errors::OciDistributionError) -> String {
    use oci_client::errors::OciDistributionError as E;
    match e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => format!(
            "registry {registry} refused the credentials (or asked for some); set them under [registry.\"{registry}\"] in the registry config"
        ),
        E::ImageManifestNotFoundError(m) => format!("not found: {m}"),
        E::RegistryError { envelope, .. } => {
            let errs: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect();
            let text = errs.join("; ");
            if text.contains("Unauthorized") || text.contains("Denied") {
                format!(
                    "registry {registry} refused access ({text}); check the credentials under [registry.\"{registry}\"]"
                )
            } else {
                format!("registry {registry}: {text}")
            }
        }
        E::ServerError { code, message, .. } => {
            format!("registry {registry} answered HTTP {code}: {message}")
        }
        E::RequestError(re) => {
            let mut s = format!("cannot reach registry {registry}: {re}");
            let mut src = std::error::Error::source(&re);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
        E::DigestError(d) => format!("content does not match its digest: {d}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_present_the_configured_credentials() {
        let cfg: RegistryConfig = toml::from_str(
            "[registry.\"reg.example\"]\nusername = \"fleet\"\npassword = \"hunter2\"\n[registry.\"tok.example\"]\ntoken = \"t0ken\"\n",
        )
        .unwrap();
        assert!(
            matches!(push_auth(&cfg, "reg.example"), RegistryAuth::Basic(u, p) if u == "fleet" && p == "hunter2")
        );
        assert!(matches!(push_auth(&cfg, "tok.example"), RegistryAuth::Bearer(t) if t == "t0ken"));
        assert!(matches!(
            push_auth(&cfg, "other.example"),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn platforms_parse_and_print() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(
            (p.os.as_str(), p.arch.as_str(), p.variant.as_deref()),
            ("linux", "arm64", Some("v8"))
        );
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(Platform::parse("linux/amd64").unwrap().variant, None);
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d"] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }
}
