//! Uploaded modules: the scheduler's content store of wasm blobs
//! (`<data>/blobs`). Clients upload with `PUT /v1/blobs/DIGEST` (checked
//! while streaming: wasm magic, size cap, digest; nothing half-written
//! stays); agents fetch the modules of their own pods over their QUIC link;
//! blobs no pod or Deployment references are collected after a grace period.

use crate::api::ApiError;
use crate::cluster::Cluster;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_api::content::{ContentError, ContentStore};
use flotilla_api::manifest::{MAX_MODULE_BYTES, is_wasm};
use flotilla_api::proto::{BLOB_FOUND, BLOB_REFUSED, FrameReader, NodeRequest, encode};
use flotilla_api::{MemberSource, Object, PodPhase};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What an upload or a `HEAD` says about a stored blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
}

/// Checks that a member's module was uploaded with the size it declares.
pub fn check_uploaded(blobs: &ContentStore, digest: &str, size: u64) -> Result<(), String> {
    let path = blobs.path(digest).map_err(|e| e.to_string())?;
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == size => Ok(()),
        Ok(m) => Err(format!(
            "module {digest} is {} bytes here, not the {size} the spec declares",
            m.len()
        )),
        Err(_) => Err(format!(
            "module {digest} was not uploaded; `flotilla apply` uploads the files a manifest names, other clients PUT /v1/blobs/{digest} first"
        )),
    }
}

/// Checks that an uploaded module is a component exporting the interface
/// a `health` probe calls (`wit/health.wit`), with its function.
/// A module is read and parsed once: blobs never change under their
/// digest, so the verdict is kept (for the last [`VERDICTS_KEPT`] modules
/// asked about; a read error is not kept).
pub fn check_health_export(blobs: &ContentStore, digest: &str) -> Result<(), String> {
    check_module(blobs, digest, "health", exports_health)
}

/// `Ok` when the uploaded module `digest` is a component a Function can
/// serve: it exports `wasi:http/incoming-handler@0.2`. Verdicts are kept
/// as [`check_health_export`]'s are.
pub fn check_http_export(blobs: &ContentStore, digest: &str) -> Result<(), String> {
    check_module(blobs, digest, "http", exports_http)
}

/// `verdict` of the module's bytes, read and parsed once per digest.
fn check_module(
    blobs: &ContentStore,
    digest: &str,
    what: &'static str,
    verdict: fn(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    type Verdicts =
        std::sync::Mutex<std::collections::HashMap<(&'static str, String), Result<(), String>>>;
    static VERDICTS: std::sync::OnceLock<Verdicts> = std::sync::OnceLock::new();
    let kept = VERDICTS.get_or_init(Default::default);
    let key = (what, digest.to_string());
    if let Some(v) = kept.lock().expect("poisoned").get(&key) {
        return v.clone();
    }
    let path = blobs.path(digest).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(&path).map_err(|e| format!("module {digest}: {e}"))?;
    let v = verdict(&bytes).map_err(|why| format!("module {digest} {why}"));
    let mut kept = kept.lock().expect("poisoned");
    if kept.len() >= VERDICTS_KEPT {
        kept.clear();
    }
    kept.insert(key, v.clone());
    v
}

/// How many modules' health-export verdicts are kept.
const VERDICTS_KEPT: usize = 1024;

/// `Ok` when `bytes` is a component whose top-level exports include
/// [`HEALTH_INTERFACE`]; else what it is instead (phrased to follow the
/// module's name).
pub fn exports_health(bytes: &[u8]) -> Result<(), String> {
    use flotilla_api::probe::HEALTH_INTERFACE;
    let hint =
        format!("export {HEALTH_INTERFACE} (see wit/health.wit), or use an http or tcp probe");
    let names = component_exports(bytes).map_err(|why| match why.as_str() {
        CORE_MODULE => format!(
            "{why}: a health probe calls a component's export; build a component that should {hint}"
        ),
        _ => why,
    })?;
    if names.iter().any(|n| n == HEALTH_INTERFACE) {
        return Ok(());
    }
    Err(format!(
        "does not export {HEALTH_INTERFACE}, which a health probe calls; the component should {hint}"
    ))
}

/// What [`component_exports`] says of a core module.
const CORE_MODULE: &str = "is a core module, not a component";

/// The outer component's export names, or why `bytes` is not a component.
fn component_exports(bytes: &[u8]) -> Result<Vec<String>, String> {
    use wasmparser::{Encoding, Parser, Payload};
    // Depth 1 is the outer component; nested modules and components have
    // exports of their own that do not count.
    let mut depth = 0usize;
    let mut names = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| format!("is not valid wasm: {e}"))?;
        match payload {
            Payload::Version { encoding, .. } => {
                depth += 1;
                if depth == 1 && encoding == Encoding::Module {
                    return Err(CORE_MODULE.into());
                }
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentExportSection(exports) if depth == 1 => {
                for export in exports {
                    let export = export.map_err(|e| format!("is not valid wasm: {e}"))?;
                    names.push(export.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(names)
}

/// `Ok` when `bytes` is a component exporting `wasi:http/incoming-handler`
/// (WASI 0.2, the `wasi:http/proxy` world).
pub fn exports_http(bytes: &[u8]) -> Result<(), String> {
    let hint = "build it for the wasi:http/proxy world (e.g. cargo build --target wasm32-wasip2 with wit-bindgen or wstd, componentize-py -w wasi:http/proxy, jco componentize)";
    let names = component_exports(bytes)
        .map_err(|why| format!("{why}: a function is a component; {hint}"))?;
    if names
        .iter()
        .any(|n| n.starts_with("wasi:http/incoming-handler@0.2"))
    {
        return Ok(());
    }
    Err(format!(
        "does not export wasi:http/incoming-handler@0.2, which a function serves requests through; {hint}"
    ))
}

fn bad_digest(e: ContentError) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: e.to_string(),
    }
}

/// `HEAD /v1/blobs/DIGEST`: 200 with the size as `content-length`, or 404.
pub async fn exists(State(c): State<Arc<Cluster>>, Path(digest): Path<String>) -> Response {
    let path = match c.blobs.path(&digest) {
        Ok(p) => p,
        Err(e) => return bad_digest(e).into_response(),
    };
    match std::fs::metadata(&path) {
        Ok(m) => (StatusCode::OK, [(header::CONTENT_LENGTH, m.len())]).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `PUT /v1/blobs/DIGEST`: stores a wasm module. The body is checked while
/// it streams in: it must start like wasm, stay under the module size cap,
/// match `content-length` if sent, and hash to DIGEST; otherwise nothing is
/// stored. 201 when stored, 200 when it already was.
pub async fn upload(
    State(c): State<Arc<Cluster>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<BlobInfo>), ApiError> {
    let path = c.blobs.path(&digest).map_err(bad_digest)?;
    if let Ok(m) = std::fs::metadata(&path) {
        return Ok((
            StatusCode::OK,
            Json(BlobInfo {
                digest,
                size: m.len(),
            }),
        ));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let refuse = |status, message: String| ApiError { status, message };
    if let Some(n) = declared
        && n > MAX_MODULE_BYTES
    {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("module is {n} bytes, more than the {MAX_MODULE_BYTES}-byte limit"),
        ));
    }
    let mut writer = c
        .blobs
        .writer(&digest, declared, MAX_MODULE_BYTES)
        .map_err(bad_digest)?;
    let mut head: Vec<u8> = Vec::with_capacity(8);
    let mut stream = body.into_data_stream();
    let store_error = |e: ContentError| match e {
        ContentError::TooLarge { .. } => refuse(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        ContentError::Io { .. } => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        _ => refuse(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("upload cut short: {e}; nothing was stored"),
            )
        })?;
        if head.len() < 8 {
            let take = (8 - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            if head.len() == 8 && !is_wasm(&head) {
                return Err(not_wasm());
            }
        }
        writer.write(&chunk).map_err(store_error)?;
    }
    if !is_wasm(&head) {
        return Err(not_wasm());
    }
    let stored = tokio::task::spawn_blocking(move || writer.commit())
        .await
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(store_error)?;
    let size = std::fs::metadata(&stored).map_or(0, |m| m.len());
    tracing::info!(%digest, size, "module uploaded");
    Ok((StatusCode::CREATED, Json(BlobInfo { digest, size })))
}

fn not_wasm() -> ApiError {
    ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        message: "not a wasm module or component (bad magic number); upload the compiled .wasm file, not source or text format".into(),
    }
}

/// Digests of the uploaded modules the stored pods, Deployments,
/// Functions and Plugins name.
pub fn referenced(objects: &[Arc<Object>]) -> HashSet<String> {
    let mut out = HashSet::new();
    for o in objects {
        let direct = match &**o {
            Object::Plugin(p) => Some(&p.spec.source),
            Object::Function(f) => Some(&f.spec.source),
            _ => None,
        };
        if let Some(MemberSource::Module { digest, .. }) = direct {
            out.insert(digest.clone());
        }
        if let Object::Function(f) = &**o
            && let Some(MemberSource::Module { digest, .. }) =
                f.spec.canary.as_ref().map(|c| &c.source)
        {
            out.insert(digest.clone());
        }
        let members = match &**o {
            Object::Pod(p) => &p.spec.members,
            Object::Deployment(d) => &d.spec.template.spec.members,
            _ => continue,
        };
        for m in members {
            if let MemberSource::Module { digest, .. } = &m.source {
                out.insert(digest.clone());
            }
        }
    }
    out
}

/// Which stored blobs to collect: those nothing references that are older
/// than `grace` (so an upload is not collected before its apply arrives).
pub fn collectable(
    stored: &[(String, Duration)],
    referenced: &HashSet<String>,
    grace: Duration,
) -> Vec<String> {
    stored
        .iter()
        .filter(|(d, age)| !referenced.contains(d) && *age >= grace)
        .map(|(d, _)| d.clone())
        .collect()
}

/// Collects unreferenced blobs every `every`, after `grace`.
pub async fn collect_loop(cluster: Arc<Cluster>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let c = cluster.clone();
        let _ = tokio::task::spawn_blocking(move || collect_once(&c)).await;
    }
}

/// One collection pass; returns the digests removed.
pub fn collect_once(cluster: &Cluster) -> Vec<String> {
    let mut objects = cluster.store.list("pods/");
    objects.extend(cluster.store.list("deployments/"));
    objects.extend(cluster.store.list("functions/"));
    objects.extend(cluster.store.list("plugins/"));
    let mut refs = referenced(&objects);
    // What the site cache pulled for registry members still named.
    refs.extend(crate::mirror::closure(
        &cluster.blobs,
        &crate::mirror::roots(&objects, None),
    ));
    let now = SystemTime::now();
    let stored: Vec<(String, Duration)> = cluster
        .blobs
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|b| {
            let p = cluster.blobs.path(&b.digest).ok()?;
            let modified = std::fs::metadata(p).and_then(|m| m.modified()).ok()?;
            Some((b.digest, now.duration_since(modified).unwrap_or_default()))
        })
        .collect();
    let mut removed = Vec::new();
    for d in collectable(&stored, &refs, cluster.cfg.blob_grace) {
        if let Ok(p) = cluster.blobs.path(&d)
            && std::fs::remove_file(p).is_ok()
        {
            tracing::info!(digest = %d, "collected an unreferenced module");
            removed.push(d);
        }
    }
    removed
}

/// Whether `node` may fetch `digest`: a pod bound to it (and not Lost)
/// runs that module.
pub fn node_may_fetch(cluster: &Cluster, node: &str, digest: &str) -> bool {
    cluster.store.list("pods/").iter().any(|o| {
        let Object::Pod(p) = &**o else { return false };
        p.status.node.as_deref() == Some(node)
            && p.status.phase != PodPhase::Lost
            && p.spec
                .members
                .iter()
                .any(|m| m.module_digest() == Some(digest))
    })
}

/// Where the blob `node` asks for is, once it may have it: a module of a
/// pod bound to it, or (with the site cache) a registry object such a pod
/// names, pulled into the cache first if need be.
async fn authorize(
    cluster: &Cluster,
    node: &str,
    digest: &str,
) -> Result<std::path::PathBuf, String> {
    let path = cluster.blobs.path(digest).map_err(|e| e.to_string())?;
    if node_may_fetch(cluster, node, digest) {
        return Ok(path);
    }
    if let Some(mirror) = &cluster.mirror {
        let roots = crate::mirror::roots(&cluster.store.list("pods/"), Some(node));
        if let Some(grant) = crate::mirror::grant(&cluster.blobs, &roots, digest) {
            mirror.ensure(&cluster.blobs, &grant, digest).await?;
            return Ok(path);
        }
    }
    tracing::warn!(%node, %digest, "refused a blob fetch: no pod bound to the node uses it");
    Err(format!(
        "module {digest} belongs to no pod bound to node {node}"
    ))
}

/// Serves module fetches and members' key-value operations on the streams
/// an agent opens besides its control stream, until the connection ends.
pub async fn serve_node(cluster: Arc<Cluster>, conn: quinn::Connection, node: String) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (c, n) = (cluster.clone(), node.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_one(&c, &n, send, recv).await {
                tracing::debug!(node = %n, "module fetch: {e}");
            }
        });
    }
}

async fn serve_one(
    cluster: &Arc<Cluster>,
    node: &str,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), String> {
    let mut reader = FrameReader::new(recv);
    let req: NodeRequest = tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .map_err(|_| "no request within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let req = match req {
        NodeRequest::Blob(b) => b,
        NodeRequest::Kv(kv) => {
            let reply = crate::kv::serve(cluster, node, kv).await;
            send.write_all(&encode(&reply))
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let refuse = |why: String| {
        let mut out = vec![BLOB_REFUSED];
        out.extend_from_slice(why.as_bytes());
        out
    };
    let path = match authorize(cluster, node, &req.digest).await {
        Ok(p) => p,
        Err(why) => {
            send.write_all(&refuse(why))
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            let why = format!("module {} is not on the scheduler: {e}", req.digest);
            send.write_all(&refuse(why))
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let size = file.metadata().await.map_err(|e| e.to_string())?.len();
    let mut head = vec![BLOB_FOUND];
    head.extend_from_slice(&size.to_be_bytes());
    send.write_all(&head).await.map_err(|e| e.to_string())?;
    // Read in 1 MiB chunks on a blocking thread and hand them to quinn as
    // they are (an async file read per 8 KiB made 20 MB take 200 ms).
    let mut file = file.into_std().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let read = file.read(&mut buf);
            let chunk = read.map(|n| {
                buf.truncate(n);
                bytes::Bytes::from(buf)
            });
            let end = !matches!(&chunk, Ok(b) if !b.is_empty());
            if tx.blocking_send(chunk).is_err() || end {
                return;
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if chunk.is_empty() {
            break;
        }
        send.write_chunk(chunk).await.map_err(|e| e.to_string())?;
    }
    let _ = send.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `health` probe is refused at apply for a module that cannot
    /// answer it: a core module, a component without the export, bytes
    /// that are not wasm. Only the top-level exports count.
    #[test]
    fn only_components_exporting_the_health_interface_pass() {
        let read = |p: &str| std::fs::read(p).unwrap();
        exports_health(&read(flotilla_samples::HEALTH_P2)).unwrap();
        let e = exports_health(&read(flotilla_samples::TCP_P2)).unwrap_err();
        assert!(
            e.starts_with(
                "does not export flotilla:health/check@0.1.0, which a health probe calls"
            ),
            "{e}"
        );
        // The p1 build has the function as a core export: still no.
        let e = exports_health(&read(flotilla_samples::HEALTH_P1)).unwrap_err();
        assert!(e.starts_with("is a core module, not a component"), "{e}");
        let e = exports_health(b"\0asm\x0d\0\x01\0garbage").unwrap_err();
        assert!(e.starts_with("is not valid wasm"), "{e}");
    }

    #[test]
    fn collects_only_unreferenced_blobs_past_the_grace_period() {
        let grace = Duration::from_secs(600);
        let stored = vec![
            ("sha256:a".to_string(), Duration::from_secs(3600)),
            ("sha256:b".to_string(), Duration::from_secs(3600)),
            ("sha256:c".to_string(), Duration::from_secs(10)),
        ];
        let refs: HashSet<String> = ["sha256:b".to_string()].into();
        assert_eq!(collectable(&stored, &refs, grace), ["sha256:a"]);
        assert!(
            collectable(
                &stored,
                &stored.iter().map(|s| s.0.clone()).collect(),
                grace
            )
            .is_empty()
        );
    }
}
