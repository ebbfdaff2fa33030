//! A small client of the scheduler's API: HTTPS verified against the cluster
//! CA from the client config, a client certificate or bearer token, and
//! failures turned into messages people can act on.

use crate::config::Context;
use anyhow::{Context as _, Result, anyhow, bail};
use flotilla_api::{Event, Kind, Object};
use flotilla_scheduler::api::{
    ApplyRequest, ApplyResponse, ErrorBody, ScaleRequest, TokenCreated, TokenRequest,
};
use flotilla_scheduler::auth::TokenInfo;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

pub struct Client {
    rt: tokio::runtime::Runtime,
    /// The cluster's API servers (several schedulers may share one etcd
    /// store), and which one requests go to: the first that answers, or the
    /// leader a follower named.
    servers: std::sync::Mutex<(Vec<Server>, usize)>,
    tls: Option<tokio_rustls::TlsConnector>,
    token: Option<String>,
    /// The kept-alive connection for requests read whole.
    idle: std::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>,
}

/// The frames of a channel as a stream (the body of a streamed upload).
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// An error response of the API, kept apart so callers can inspect the code.
#[derive(Debug)]
pub struct ApiError {
    pub code: u16,
    pub message: String,
    /// The server said when to try again (a 503 while no scheduler leads).
    pub retry_after: bool,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        match self.code {
            401 => f.write_str(" (401 Unauthorized)"),
            403 => f.write_str(" (403 Forbidden)"),
            409 => f.write_str(" (409 Conflict)"),
            429 => f.write_str(" (429 Too Many Requests)"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for ApiError {}

/// What part of a log to read.
#[derive(Clone, Copy, Default)]
pub struct LogOptions<'a> {
    pub member: Option<&'a str>,
    pub follow: bool,
    pub previous: bool,
    pub tail: Option<u64>,
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn tls_config(ctx: &Context) -> Result<rustls::ClientConfig> {
    let ca = ctx.ca.as_deref().with_context(|| {
        format!(
            "context '{}' has no ca: an https server cannot be verified without the cluster CA",
            ctx.name
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.context("bad CA certificate in the client config")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut cfg = match (&ctx.client_cert, &ctx.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .context("bad client certificate in the client config")?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                .context("bad client key in the client config")?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// One API server.
#[derive(Clone, Debug, PartialEq)]
struct Server {
    base: String,
    host: String,
    port: u16,
    https: bool,
}

impl Server {
    fn parse(url: &str) -> Result<Server> {
        let uri: hyper::Uri = url
            .parse()
            .with_context(|| format!("bad server URL '{url}'"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!(
                "server URL '{url}' must start with https:// (or http:// for a development server)"
            ),
        };
        let host = uri
            .host()
            .context("server URL has no host")?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Server {
            base: format!(
                "{}://{}",
                if https { "https" } else { "http" },
                uri.authority().map_or(host.as_str(), |a| a.as_str())
            ),
            host,
            port,
            https,
        })
    }
}

/// A follower's answer: the request goes to the leader at this URL.
#[derive(Debug)]
struct Redirected(String);

impl std::fmt::Display for Redirected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the scheduler answering does not lead; the leader is at {}",
            self.0
        )
    }
}

impl std::error::Error for Redirected {}

/// No server could be reached (connection refused or reset before the
/// request was sent): safe to try again.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// How long requests are tried again while the cluster has no leader (an
/// election after the leader failed takes a few seconds).
const NO_LEADER_PATIENCE: Duration = Duration::from_secs(20);

impl Client {
    /// A client for `ctx`; `token` overrides the context's credentials.
    /// `ctx.server` may list several servers, separated by commas, as may
    /// `ctx.servers`: requests go to the first that answers.
    pub fn new(ctx: &Context, token: Option<String>) -> Result<Client> {
        let mut servers = Vec::new();
        for url in ctx
            .server
            .split(',')
            .chain(ctx.servers.iter().map(String::as_str))
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            let s = Server::parse(url)?;
            if !servers.contains(&s) {
                servers.push(s);
            }
        }
        anyhow::ensure!(!servers.is_empty(), "the client config names no server");
        let tls = if servers.iter().any(|s| s.https) {
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config(ctx)?)))
        } else {
            None
        };
        Ok(Client {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            servers: std::sync::Mutex::new((servers, 0)),
            tls,
            token: token.or_else(|| ctx.token.clone()),
            idle: std::sync::Mutex::new(None),
        })
    }

    /// The server requests go to now.
    fn server(&self) -> Server {
        let s = self.servers.lock().expect("poisoned");
        s.0[s.1].clone()
    }

    /// Sends requests to `url`'s server from now on (a follower named it
    /// the leader); the kept connection is dropped.
    fn follow(&self, url: &str) -> Result<()> {
        let to = Server::parse(url)?;
        let mut s = self.servers.lock().expect("poisoned");
        match s.0.iter().position(|x| x.base == to.base) {
            Some(i) => s.1 = i,
            None => {
                s.0.push(to);
                s.1 = s.0.len() - 1;
            }
        }
        drop(s);
        self.idle.lock().expect("poisoned").take();
        Ok(())
    }

    /// Runs `attempt` again after a follower's redirect, and while the
    /// cluster has no leader (503 with Retry-After, for a while).
    async fn with_retries<T, F, Fut>(&self, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let began = std::time::Instant::now();
        let mut redirects = 0;
        loop {
            let e = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let patient = began.elapsed() < NO_LEADER_PATIENCE;
            if let Some(Redirected(to)) = e.downcast_ref::<Redirected>() {
                // A follower may name a leader that just died until its
                // lease expires: after a few hops, wait between them.
                redirects += 1;
                if redirects > 2 {
                    if !patient {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                self.follow(to)?;
                continue;
            }
            let several = self.servers.lock().expect("poisoned").0.len() > 1;
            let retryable = e
                .downcast_ref::<ApiError>()
                .is_some_and(|a| a.code == 503 && a.retry_after)
                || (several && e.downcast_ref::<Unreachable>().is_some());
            if retryable && patient {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            return Err(e);
        }
    }

    /// A request whose response the caller reads whole, on the kept-alive
    /// connection (one TLS handshake per command, not per request). A
    /// connection the server has closed meanwhile is replaced once.
    async fn send_async(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<hyper::body::Incoming>> {
        let body = Bytes::from(body.unwrap_or_default());
        self.with_retries(|| self.send_once(method.clone(), path, body.clone()))
            .await
    }

    async fn send_once(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Response<hyper::body::Incoming>> {
        let request = || {
            self.request(
                method.clone(),
                path,
                "application/json",
                None,
                Full::new(body.clone()),
            )
        };
        let idle = self.idle.lock().expect("poisoned").take();
        if let Some(mut send) = idle
            && tokio::time::timeout(Duration::from_secs(1), send.ready())
                .await
                .is_ok_and(|r| r.is_ok())
        {
            match send.send_request(request()?).await {
                Ok(resp) => {
                    *self.idle.lock().expect("poisoned") = Some(send);
                    return self.check(resp).await;
                }
                // Never sent (the connection was gone): safe to send again.
                Err(e) if e.is_canceled() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut send = self.connect().await?;
        let resp = send.send_request(request()?).await?;
        *self.idle.lock().expect("poisoned") = Some(send);
        self.check(resp).await
    }

    /// A request on a connection of its own (streamed uploads; responses
    /// streamed for as long as the caller likes, such as followed logs).
    async fn send_body<B>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        content_length: Option<u64>,
        body: B,
    ) -> Result<Response<hyper::body::Incoming>>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // A streamed body cannot be sent twice: find the leader first.
        self.find_leader().await;
        let mut send = self.connect().await?;
        let req = self.request(method, path, content_type, content_length, body)?;
        let resp = send.send_request(req).await?;
        self.check(resp).await
    }

    /// Moves to the leader if the server now answering follows one.
    async fn find_leader(&self) {
        if self.servers.lock().expect("poisoned").0.len() < 2 {
            return;
        }
        let Ok(resp) = self.send_async(Method::GET, "/v1/leader", None).await else {
            return;
        };
        let Ok(bytes) = resp.into_body().collect().await else {
            return;
        };
        if let Ok(l) =
            serde_json::from_slice::<flotilla_scheduler::api::LeaderInfo>(&bytes.to_bytes())
            && !l.leading
            && !l.leader_api.is_empty()
        {
            let _ = self.follow(&l.leader_api);
        }
    }

    /// [`Client::send_body`] without a body (sent again after a redirect).
    async fn send_alone(
        &self,
        method: Method,
        path: &str,
    ) -> Result<Response<hyper::body::Incoming>> {
        self.with_retries(|| async {
            let mut send = self.connect().await?;
            let req = self.request(
                method.clone(),
                path,
                "application/json",
                None,
                Full::new(Bytes::new()),
            )?;
            let resp = send.send_request(req).await?;
            self.check(resp).await
        })
        .await
    }

    fn request<B>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        content_length: Option<u64>,
        body: B,
    ) -> Result<Request<B>> {
        let server = self.server();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(
                hyper::header::HOST,
                format!("{}:{}", server.host, server.port),
            )
            .header(hyper::header::CONTENT_TYPE, content_type);
        if let Some(n) = content_length {
            req = req.header(hyper::header::CONTENT_LENGTH, n);
        }
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        Ok(req.body(body)?)
    }

    /// A new connection to the API (TLS unless the server is plain HTTP):
    /// to the current server, else to the others in turn (the first that
    /// answers becomes the current one).
    async fn connect<B>(&self) -> Result<hyper::client::conn::http1::SendRequest<B>>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (servers, at) = self.servers.lock().expect("poisoned").clone();
        let mut failures = Vec::new();
        for i in 0..servers.len() {
            let at = (at + i) % servers.len();
            let server = &servers[at];
            let tcp = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect((server.host.as_str(), server.port)),
            )
            .await;
            match tcp {
                // A server that accepts but never answers (stopped,
                // overloaded) is passed over like one that refuses.
                Ok(Ok(tcp)) => {
                    match tokio::time::timeout(Duration::from_secs(5), self.handshake(server, tcp))
                        .await
                        .unwrap_or_else(|_| {
                            Err(anyhow!("{}: no TLS handshake within 5 s", server.base))
                        }) {
                        Ok(send) => {
                            self.servers.lock().expect("poisoned").1 = at;
                            return Ok(send);
                        }
                        // A server going away mid-handshake: the next one.
                        Err(e) if servers.len() > 1 => failures.push(format!("{e:#}")),
                        Err(e) => return Err(e),
                    }
                }
                Ok(Err(e)) => failures.push(format!("{}: {e}", server.base)),
                Err(_) => failures.push(format!("{}: connection timed out", server.base)),
            }
        }
        Err(anyhow!(Unreachable(format!(
            "cannot reach the Flotilla API at {}\nhint: is `flotilla up` running? Choose the server with --server, --context or FLOTILLA_CONFIG",
            failures.join("; ")
        ))))
    }

    async fn handshake<B>(
        &self,
        server: &Server,
        tcp: tokio::net::TcpStream,
    ) -> Result<hyper::client::conn::http1::SendRequest<B>>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _ = tcp.set_nodelay(true);
        Ok(match (&self.tls, server.https) {
            (Some(connector), true) => {
                let name = ServerName::try_from(server.host.clone())
                    .context("server host is not a valid TLS name")?;
                let stream = connector.connect(name, tcp).await.map_err(|e| {
                    anyhow!(
                        "TLS with {} failed: {e}\nhint: the server's certificate must be signed by the CA in your client config; are you pointing at the right cluster?",
                        server.base
                    )
                })?;
                let (send, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                send
            }
            _ => {
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                send
            }
        })
    }

    /// The response if it is a success, else the API's error message.
    async fn check(
        &self,
        resp: Response<hyper::body::Incoming>,
    ) -> Result<Response<hyper::body::Incoming>> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        if resp.status() == StatusCode::TEMPORARY_REDIRECT
            && let Some(to) = resp
                .headers()
                .get(hyper::header::LOCATION)
                .and_then(|l| l.to_str().ok())
        {
            return Err(anyhow!(Redirected(to.to_string())));
        }
        let code = resp.status().as_u16();
        let retry_after = resp.headers().contains_key(hyper::header::RETRY_AFTER);
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or(if text.is_empty() {
                StatusCode::from_u16(code).map_or_else(|_| code.to_string(), |s| s.to_string())
            } else {
                text
            });
        Err(anyhow!(ApiError {
            code,
            message,
            retry_after
        }))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T> {
        let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
        self.rt.block_on(async {
            let resp = self.send_async(method, path, body).await?;
            let bytes = resp.into_body().collect().await?.to_bytes();
            serde_json::from_slice(&bytes)
                .context("the API sent a response this CLI does not understand")
        })
    }

    /// Sends one request to Function `name` through the API (`flotilla
    /// invoke`): `data` streams as its body. Writes the answer's body to
    /// `out` (after its status line and headers when `include`) and returns
    /// its status.
    #[allow(clippy::too_many_arguments)]
    pub fn invoke(
        &self,
        namespace: &str,
        name: &str,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        data: Option<Box<dyn std::io::Read + Send>>,
        include: bool,
        out: &mut dyn std::io::Write,
    ) -> Result<u16> {
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| anyhow!("'{method}' is not an HTTP method"))?;
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        // The root is the route without a path (`…/invoke`, `…/invoke?q`).
        let path = path
            .strip_prefix("/")
            .filter(|p| p.is_empty() || p.starts_with('?'))
            .unwrap_or(&path);
        let uri = format!(
            "/v1/functions/{}/{}/invoke{path}",
            encode(namespace),
            encode(name)
        );
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<hyper::body::Frame<Bytes>>>(4);
        let has_data = data.is_some();
        if let Some(mut data) = data {
            // The body is read on a thread of its own: a file or stdin.
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let frame = match data.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => Ok(hyper::body::Frame::data(Bytes::copy_from_slice(&buf[..n]))),
                        Err(e) => Err(e),
                    };
                    let failed = frame.is_err();
                    if tx.blocking_send(frame).is_err() || failed {
                        return;
                    }
                }
            });
        } else {
            drop(tx);
        }
        let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
        self.rt.block_on(async {
            let mut req = self.request(method, &uri, "application/octet-stream", None, body)?;
            let h = req.headers_mut();
            if !has_data {
                h.remove(hyper::header::CONTENT_TYPE);
            }
            for (k, v) in headers {
                let k = if k.eq_ignore_ascii_case("host") {
                    flotilla_scheduler::invoke::HOST_HEADER
                } else {
                    k.as_str()
                };
                let name = hyper::header::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| anyhow!("'{k}' is not a header name"))?;
                let value = hyper::header::HeaderValue::from_str(v)
                    .map_err(|_| anyhow!("the value of header {k} is not valid"))?;
                h.insert(name, value);
            }
            let mut send = self.connect().await?;
            let resp = send.send_request(req).await?;
            if !resp
                .headers()
                .contains_key(flotilla_scheduler::invoke::NODE_HEADER)
            {
                // Not the function's answer: the API's own error.
                self.check(resp).await?;
                bail!("the API answered without the function's answer");
            }
            let status = resp.status();
            if include {
                writeln!(out, "{:?} {status}", resp.version())?;
                for (k, v) in resp.headers() {
                    writeln!(out, "{k}: {}", String::from_utf8_lossy(v.as_bytes()))?;
                }
                writeln!(out)?;
            }
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| anyhow!("the answer broke off: {e}"))?;
                if let Some(data) = frame.data_ref() {
                    out.write_all(data)?;
                }
            }
            out.flush()?;
            Ok(status.as_u16())
        })
    }

    /// Whether the scheduler has module `digest` (`HEAD /v1/blobs/…`).
    fn kv_path(namespace: &str, bucket: &str, key: Option<&str>) -> String {
        let mut p = format!("/v1/kv/{}/{}", encode(namespace), encode(bucket));
        if let Some(k) = key {
            p.push('/');
            p.push_str(&encode(k));
        }
        p
    }

    /// The value of `key` in a bucket (`None`: no such key).
    pub fn kv_get(&self, namespace: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let path = Self::kv_path(namespace, bucket, Some(key));
        self.rt.block_on(async {
            match self.send_async(Method::GET, &path, None).await {
                Ok(resp) => Ok(Some(resp.into_body().collect().await?.to_bytes().to_vec())),
                Err(e) if e.downcast_ref::<ApiError>().is_some_and(|a| a.code == 404) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    pub fn kv_put(&self, namespace: &str, bucket: &str, key: &str, value: Vec<u8>) -> Result<()> {
        let path = Self::kv_path(namespace, bucket, Some(key));
        self.rt
            .block_on(self.send_async(Method::PUT, &path, Some(value)))
            .map(drop)
    }

    pub fn kv_delete(&self, namespace: &str, bucket: &str, key: &str) -> Result<()> {
        let path = Self::kv_path(namespace, bucket, Some(key));
        self.rt
            .block_on(self.send_async(Method::DELETE, &path, None))
            .map(drop)
    }

    /// Every key of a bucket (page by page), with its usage and limits.
    pub fn kv_list(
        &self,
        namespace: &str,
        bucket: &str,
    ) -> Result<flotilla_api::interfaces::BucketListing> {
        let base = Self::kv_path(namespace, bucket, None);
        let mut all: flotilla_api::interfaces::BucketListing =
            self.call(Method::GET, &base, None)?;
        while let Some(c) = all.cursor {
            let page: flotilla_api::interfaces::BucketListing =
                self.call(Method::GET, &format!("{base}?cursor={c}"), None)?;
            all.keys.extend(page.keys);
            all.cursor = page.cursor;
        }
        Ok(all)
    }

    pub fn has_blob(&self, digest: &str) -> Result<bool> {
        let path = format!("/v1/blobs/{digest}");
        self.rt.block_on(async {
            match self.send_async(Method::HEAD, &path, None).await {
                Ok(_) => Ok(true),
                Err(e) if e.downcast_ref::<ApiError>().is_some_and(|a| a.code == 404) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// Streams the module at `file` to the scheduler as `digest`, calling
    /// `progress(sent, total)` as it goes. The scheduler verifies it while
    /// it streams in and keeps nothing unless all of it matches.
    pub fn upload_blob(
        &self,
        digest: &str,
        file: &std::path::Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        use std::io::Read;
        let mut f =
            std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
        let total = f.metadata()?.len();
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<hyper::body::Frame<Bytes>>>(4);
        let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
        let path = format!("/v1/blobs/{digest}");
        self.rt.block_on(async {
            let send = self.send_body(Method::PUT, &path, "application/wasm", Some(total), body);
            let feed = async {
                let mut sent = 0u64;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            break;
                        }
                    };
                    if tx
                        .send(Ok(hyper::body::Frame::data(Bytes::copy_from_slice(
                            &buf[..n],
                        ))))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent += n as u64;
                    progress(sent, total);
                }
                drop(tx);
            };
            let (resp, ()) = tokio::join!(send, feed);
            resp.map(|_| ())
        })
    }

    /// Streams a one-shot pod's member output to `out` until the pod is
    /// done; returns the finished pod. Each status read after the first
    /// waits on the server for the pod's next change (`newer_than`), so the
    /// end is seen as soon as it is stored; output comes from a follow
    /// stream (a connection of its own) once the member has started, and
    /// whatever it had not yet delivered is read once more at the end.
    pub fn follow_until_done(
        &self,
        namespace: &str,
        pod: &str,
        member: &str,
        out: &mut dyn std::io::Write,
    ) -> Result<flotilla_api::Pod> {
        let log_path = |follow: bool| {
            format!(
                "/v1/pods/{}/{}/logs?follow={follow}&previous=false&member={}",
                encode(namespace),
                encode(pod),
                encode(member)
            )
        };
        let pod_path = Self::object_path(Kind::Pod, namespace, pod);
        let read_pod = |version: Option<u64>| {
            let path = match version {
                Some(v) => format!("{pod_path}?newer_than={v}&wait_ms=10000"),
                None => pod_path.clone(),
            };
            async move {
                let resp = self.send_async(Method::GET, &path, None).await?;
                let bytes = resp.into_body().collect().await?.to_bytes();
                match serde_json::from_slice(&bytes)
                    .context("the API sent a response this CLI does not understand")?
                {
                    Object::Pod(p) => Ok(p),
                    _ => bail!("{pod} is not a pod"),
                }
            }
        };
        self.rt.block_on(async {
            let mut printed = 0usize;
            let mut stream: Option<hyper::body::Incoming> = None;
            let mut p = read_pod(None).await?;
            while !crate::run::finished(&p) {
                let started =
                    p.status.members.first().is_some_and(|m| {
                        !matches!(m.state, flotilla_api::MemberState::Waiting { .. })
                    });
                if stream.is_none() && started {
                    stream = self
                        .send_alone(Method::GET, &log_path(true))
                        .await
                        .ok()
                        .map(|r| r.into_body());
                }
                let next = read_pod(Some(p.metadata.resource_version));
                tokio::pin!(next);
                p = loop {
                    let Some(body) = stream.as_mut() else {
                        break next.await?;
                    };
                    tokio::select! {
                        p = &mut next => break p?,
                        f = body.frame() => match f {
                            Some(Ok(frame)) => {
                                if let Some(d) = frame.data_ref() {
                                    out.write_all(d)?;
                                    out.flush()?;
                                    printed += d.len();
                                }
                            }
                            _ => stream = None,
                        },
                    }
                };
            }
            drop(stream);
            if let Ok(resp) = self.send_async(Method::GET, &log_path(false), None).await {
                let all = resp.into_body().collect().await?.to_bytes();
                if all.len() > printed {
                    out.write_all(&all[printed..])?;
                    out.flush()?;
                }
            }
            Ok(p)
        })
    }

    pub fn apply(&self, objects: Vec<Object>) -> Result<ApplyResponse> {
        let body = serde_json::to_value(ApplyRequest {
            objects,
            create_only: false,
        })?;
        self.call(Method::POST, "/v1/apply", Some(body))
    }

    /// A new key for Secrets at rest.
    pub fn rotate_secret_key(&self) -> Result<flotilla_scheduler::api::RotateResponse> {
        self.call(Method::POST, "/v1/secrets-key/rotate", None)
    }

    /// Creates objects, refusing (409) any that already exist.
    pub fn create(&self, objects: Vec<Object>) -> Result<ApplyResponse> {
        let body = serde_json::to_value(ApplyRequest {
            objects,
            create_only: true,
        })?;
        self.call(Method::POST, "/v1/apply", Some(body))
    }

    pub fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        selector: Option<&str>,
    ) -> Result<Vec<Object>> {
        let mut q = Vec::new();
        if let Some(ns) = namespace {
            q.push(format!("namespace={}", encode(ns)));
        }
        if let Some(s) = selector {
            q.push(format!("selector={}", encode(s)));
        }
        let path = format!(
            "/v1/{}{}{}",
            kind.plural(),
            if q.is_empty() { "" } else { "?" },
            q.join("&")
        );
        self.call(Method::GET, &path, None)
    }

    fn object_path(kind: Kind, namespace: &str, name: &str) -> String {
        if kind.namespaced() {
            format!(
                "/v1/{}/{}/{}",
                kind.plural(),
                encode(namespace),
                encode(name)
            )
        } else {
            format!("/v1/{}/{}", kind.plural(), encode(name))
        }
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Object> {
        self.call(Method::GET, &Self::object_path(kind, namespace, name), None)
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<Object> {
        self.call(
            Method::DELETE,
            &Self::object_path(kind, namespace, name),
            None,
        )
    }

    pub fn scale(&self, namespace: &str, name: &str, replicas: u32) -> Result<Object> {
        let body = serde_json::to_value(ScaleRequest { replicas })?;
        let path = format!(
            "/v1/deployments/{}/{}/scale",
            encode(namespace),
            encode(name)
        );
        self.call(Method::POST, &path, Some(body))
    }

    pub fn rollout(
        &self,
        namespace: &str,
        name: &str,
        req: &flotilla_scheduler::api::RolloutRequest,
    ) -> Result<Object> {
        let path = format!(
            "/v1/deployments/{}/{}/rollout",
            encode(namespace),
            encode(name)
        );
        self.call(Method::POST, &path, Some(serde_json::to_value(req)?))
    }

    /// Who leads, as the server answering knows it (no redirect: every
    /// scheduler answers this itself).
    pub fn leader(&self) -> Result<flotilla_scheduler::api::LeaderInfo> {
        self.call(Method::GET, "/v1/leader", None)
    }

    pub fn top_nodes(&self) -> Result<Vec<flotilla_scheduler::api::NodeTop>> {
        self.call(Method::GET, "/v1/metrics/nodes", None)
    }

    pub fn top_pods(
        &self,
        namespace: Option<&str>,
    ) -> Result<Vec<flotilla_scheduler::api::PodTop>> {
        let path = match namespace {
            Some(ns) => format!("/v1/metrics/pods?namespace={}", encode(ns)),
            None => "/v1/metrics/pods".to_string(),
        };
        self.call(Method::GET, &path, None)
    }

    pub fn events(
        &self,
        namespace: Option<&str>,
        kind: Option<Kind>,
        name: Option<&str>,
    ) -> Result<Vec<Event>> {
        let mut q = Vec::new();
        if let Some(ns) = namespace {
            q.push(format!("namespace={}", encode(ns)));
        }
        if let Some(k) = kind {
            q.push(format!("kind={}", k.plural()));
        }
        if let Some(n) = name {
            q.push(format!("name={}", encode(n)));
        }
        let path = format!(
            "/v1/events{}{}",
            if q.is_empty() { "" } else { "?" },
            q.join("&")
        );
        self.call(Method::GET, &path, None)
    }

    /// Cordons (`true`) or uncordons a node.
    pub fn cordon(&self, node: &str, on: bool) -> Result<Object> {
        let verb = if on { "cordon" } else { "uncordon" };
        self.call(
            Method::POST,
            &format!("/v1/nodes/{}/{verb}", encode(node)),
            None,
        )
    }

    pub fn create_token(&self, req: &TokenRequest) -> Result<TokenCreated> {
        self.call(Method::POST, "/v1/tokens", Some(serde_json::to_value(req)?))
    }

    pub fn create_certificate(
        &self,
        req: &flotilla_scheduler::api::CertificateRequest,
    ) -> Result<flotilla_scheduler::api::CertificateIssued> {
        self.call(
            Method::POST,
            "/v1/certificates",
            Some(serde_json::to_value(req)?),
        )
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>> {
        self.call(Method::GET, "/v1/tokens", None)
    }

    pub fn revoke_token(&self, id: &str) -> Result<TokenInfo> {
        self.call(Method::DELETE, &format!("/v1/tokens/{}", encode(id)), None)
    }

    /// Streams a member's log into `out` until the server ends it.
    pub fn logs(
        &self,
        namespace: &str,
        pod: &str,
        opts: &LogOptions<'_>,
        out: &mut dyn std::io::Write,
    ) -> Result<()> {
        let mut q = vec![
            format!("follow={}", opts.follow),
            format!("previous={}", opts.previous),
        ];
        if let Some(m) = opts.member {
            q.push(format!("member={}", encode(m)));
        }
        if let Some(t) = opts.tail {
            q.push(format!("tail={t}"));
        }
        let path = format!(
            "/v1/pods/{}/{}/logs?{}",
            encode(namespace),
            encode(pod),
            q.join("&")
        );
        self.rt.block_on(async {
            let mut body = self.send_alone(Method::GET, &path).await?.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| anyhow!("log stream broke: {e}"))?;
                if let Some(data) = frame.data_ref() {
                    out.write_all(data)?;
                    out.flush()?;
                }
            }
            Ok(())
        })
    }
}
