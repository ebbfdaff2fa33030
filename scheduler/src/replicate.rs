//! Uploaded modules on every scheduler: a follower copies from the leader
//! each module the stored objects reference that it lacks, so that when it
//! becomes the leader it can serve them to agents (modules live in each
//! scheduler's content store, not in etcd). The copy goes over the
//! leader's API (`GET /v1/blobs/DIGEST/content`, admins only) with a client
//! certificate this scheduler issues itself from the shared CA, and is
//! verified like an upload (size cap, SHA-256) before it is kept.

use crate::blobs::referenced;
use crate::cluster::Cluster;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_api::manifest::MAX_MODULE_BYTES;
use http_body_util::BodyExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use std::time::Duration;

/// How often a follower looks for modules it lacks besides on changes.
pub const EVERY: Duration = Duration::from_secs(2);

/// `GET /v1/blobs/DIGEST/content`: the module's bytes (admins: the other
/// schedulers of the cluster).
pub async fn content(State(c): State<Arc<Cluster>>, Path(digest): Path<String>) -> Response {
    let path = match c.blobs.path(&digest) {
        Ok(p) => p,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match tokio::fs::File::open(&path).await {
        Ok(f) => {
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            let stream = tokio_util::io::ReaderStream::new(f);
            (
                StatusCode::OK,
                [(header::CONTENT_LENGTH, len)],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Err(_) => (StatusCode::NOT_FOUND, format!("{digest} not found")).into_response(),
    }
}

/// This scheduler's credentials toward the others.
pub struct PeerClient {
    tls: tokio_rustls::TlsConnector,
}

impl PeerClient {
    /// A client presenting `cert_pem`/`key_pem` and trusting `ca_pem`.
    pub fn new(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<PeerClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(PeerClient {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        })
    }

    /// Copies module `digest` from the scheduler at `api` (its base URL)
    /// into `cluster`'s content store, verified.
    pub async fn copy(&self, cluster: &Cluster, api: &str, digest: &str) -> Result<u64, String> {
        let uri: hyper::Uri = api
            .parse()
            .map_err(|e| format!("bad leader URL {api}: {e}"))?;
        let host = uri
            .host()
            .ok_or("leader URL has no host")?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let path = format!("/v1/blobs/{digest}/content");
        let request = hyper::Request::get(&path)
            .header(header::HOST, format!("{host}:{port}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = if uri.scheme_str() == Some("http") {
            get(tcp, request).await?
        } else {
            let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            get(tls, request).await?
        };
        if resp.status() != StatusCode::OK {
            return Err(format!("the leader answered {}", resp.status()));
        }
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut writer = cluster
            .blobs
            .writer(digest, declared, MAX_MODULE_BYTES)
            .map_err(|e| e.to_string())?;
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Some(chunk) = frame.data_ref() {
                n += chunk.len() as u64;
                writer.write(chunk).map_err(|e| e.to_string())?;
            }
        }
        tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(n)
    }
}

/// Sends `request` on a new HTTP/1.1 connection over `io`.
async fn get<T>(
    io: T,
    request: hyper::Request<http_body_util::Empty<bytes::Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    send.send_request(request).await.map_err(|e| e.to_string())
}

/// Which referenced modules this scheduler lacks.
pub fn missing(cluster: &Cluster) -> Vec<String> {
    let mut objects = cluster.store.list("pods/");
    objects.extend(cluster.store.list("deployments/"));
    objects.extend(cluster.store.list("functions/"));
    objects.extend(cluster.store.list("plugins/"));
    let mut out: Vec<String> = referenced(&objects)
        .into_iter()
        .filter(|d| cluster.blobs.path(d).is_ok_and(|p| !p.exists()))
        .collect();
    out.sort();
    out
}

/// While this scheduler follows, copies what it lacks from the leader as
/// soon as the store changes (an apply naming a new module), and every
/// [`EVERY`] (copies that failed are tried again).
pub async fn replicate_loop(cluster: Arc<Cluster>, client: PeerClient) {
    let mut tick = tokio::time::interval(EVERY);
    let mut changes = cluster
        .store
        .watch_from(cluster.store.revision())
        .map(|(_, rx)| rx)
        .ok();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = async { changes.as_mut().expect("guarded").recv().await }, if changes.is_some() => {
                if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    changes = None;
                }
            }
        }
        let Some(leader) = cluster.leadership.leader() else {
            continue;
        };
        let c = cluster.clone();
        let Ok(todo) = tokio::task::spawn_blocking(move || missing(&c)).await else {
            continue;
        };
        for digest in todo {
            match client.copy(&cluster, &leader.api, &digest).await {
                Ok(n) => {
                    tracing::info!(%digest, bytes = n, leader = %leader.api, "copied a module from the leader")
                }
                Err(e) => tracing::debug!(%digest, "cannot copy a module from the leader yet: {e}"),
            }
        }
    }
}
