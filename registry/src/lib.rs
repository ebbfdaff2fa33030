//! The OCI distribution client Flotilla pulls with (agents, the scheduler's
//! reference resolver and site cache), written for registries it does not
//! trust (issue 14 item 12):
//!
//! - **Every read is capped while it streams**: manifests at the caller's
//!   limit, token answers at 64 KiB, error answers at 16 KiB — a declared
//!   length over the cap is refused before the body is read, and an
//!   undeclared one stops at the cap.
//! - **Tokens come only from a safe realm**: a `Bearer` challenge's realm
//!   must be HTTPS or on the registry's own host; anything else (a plain
//!   `http://` URL elsewhere: a blind request into the node's network) is
//!   refused without a request. Redirects (blob storage) are followed only to
//!   HTTPS or the registry's own host, at most five.
//! - **Nothing a registry says reaches a status but its status code and
//!   the distribution spec's error codes** (`MANIFEST_UNKNOWN`, `DENIED`…):
//!   never a body, so a manifest naming some other HTTP service on the node
//!   cannot read it back through a pod's status.
//! - Manifests are checked against the digest they were asked by.
//!
//! - **Loopback only when configured**: a registry on loopback (a literal
//!   address, `localhost`, or a name that resolves only to loopback) and any
//!   realm or redirect there is refused unless the caller's [`Access`] allows
//!   it, so a manifest cannot point the node at its own local services.
//!
//! Whether a registry is spoken to at all, over plain HTTP and on loopback,
//! is the operator's configuration ([`config::RegistryConfig`], giving the
//! [`Access`] to [`Client::new`]), never the reference's.

pub mod config;

use base64::Engine as _;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Largest token answer read.
pub const TOKEN_LIMIT: u64 = 64 << 10;
/// Largest error answer read (for its error codes only).
pub const ERROR_LIMIT: u64 = 16 << 10;
/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;

/// How a registry may be reached, from the operator's configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// The registry, its realms and redirects may be on loopback.
    pub loopback: bool,
}

/// What a pull presents to a registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Creds {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// A token used as it is (no token exchange).
    Bearer(String),
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Creds::Anonymous => "Anonymous",
            Creds::Basic { .. } => "Basic(<hidden>)",
            Creds::Bearer(_) => "Bearer(<hidden>)",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("registry {registry} has no {what}{}", codes_text(.codes))]
    NotFound {
        registry: String,
        what: String,
        codes: Vec<String>,
    },
    #[error(
        "registry {registry} refused access (HTTP {code}{}); check the credentials under [registry.\"{registry}\"] in the registry config",
        codes_text(.codes)
    )]
    Denied {
        registry: String,
        code: u16,
        codes: Vec<String>,
    },
    #[error(
        "registry {registry} asked for a token from {realm}, which is neither HTTPS nor the registry's own host; refused"
    )]
    Realm { registry: String, realm: String },
    #[error("registry {registry} sent a {what} over the {limit}-byte limit")]
    TooLarge {
        registry: String,
        what: &'static str,
        limit: u64,
    },
    #[error("registry {registry} answered HTTP {code}{}", codes_text(.codes))]
    Status {
        registry: String,
        code: u16,
        codes: Vec<String>,
    },
    #[error(
        "registry {registry} is on loopback; a manifest cannot name a registry on the node itself unless the node's registry config lists it ([registry.\"{registry}\"] in --registry-config)"
    )]
    Loopback { registry: String },
    #[error("registry {registry}: {why}")]
    Protocol { registry: String, why: String },
    #[error("cannot reach registry {registry}: {why}")]
    Net { registry: String, why: String },
    #[error(
        "registry {registry} sent content that does not match its digest (expected {expected}, got {actual})"
    )]
    Digest {
        registry: String,
        expected: String,
        actual: String,
    },
}

fn codes_text(codes: &[String]) -> String {
    if codes.is_empty() {
        String::new()
    } else {
        format!(": {}", codes.join(", "))
    }
}

impl Error {
    /// Whether the registry said the thing does not exist (as opposed to
    /// not being reachable or not letting us in).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}

/// A manifest as fetched: its bytes, their digest, its media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub digest: String,
    pub media_type: Option<String>,
}

/// A blob being downloaded; the caller streams it into a writer that checks
/// size and digest.
pub struct Blob {
    resp: reqwest::Response,
    registry: String,
}

impl Blob {
    /// The length the registry declared, if any.
    pub fn declared_len(&self) -> Option<u64> {
        self.resp.content_length()
    }

    /// The next piece, `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        self.resp
            .chunk()
            .await
            .map(|c| c.map(|b| b.to_vec()))
            .map_err(|e| net(&self.registry, &e))
    }
}

/// A client for one registry (`host[:port]` as references name it).
pub struct Client {
    registry: String,
    /// The registry's host, without port: what realms and redirects may
    /// stay on without HTTPS.
    host: String,
    access: Access,
    base: Url,
    http: reqwest::Client,
    creds: Creds,
    /// Bearer tokens by scope.
    tokens: Mutex<HashMap<String, String>>,
}

/// The host part of `host[:port]` (IPv6 literals in brackets).
fn host_of(registry: &str) -> String {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    registry.split(':').next().unwrap_or_default().to_string()
}

fn net(registry: &str, e: &reqwest::Error) -> Error {
    let mut why = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        why.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    Error::Net {
        registry: registry.to_string(),
        why,
    }
}

/// Whether `url` may be requested for `host`'s registry: HTTPS or on the
/// registry's own host, and on loopback only when `access` allows it.
fn safe_target(url: &Url, host: &str, access: Access) -> bool {
    let target = url
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'));
    if !access.loopback && target.is_none_or(config::is_loopback_host) {
        return false;
    }
    url.scheme() == "https" || (url.scheme() == "http" && target == Some(host))
}

/// Name resolution that drops loopback and unspecified addresses: names a
/// registry, realm or redirect uses may not lead to the node itself unless
/// the registry config allows it.
struct NoLoopback;

impl reqwest::dns::Resolve for NoLoopback {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<std::net::SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !(a.ip().is_loopback() || a.ip().is_unspecified()))
                .collect();
            if kept.is_empty() && !all.is_empty() {
                return Err(format!("{host} resolves only to loopback addresses; refused").into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// Reads a body, refusing more than `limit` bytes (before reading, when the
/// length is declared).
async fn read_capped(
    mut resp: reqwest::Response,
    limit: u64,
    registry: &str,
    what: &'static str,
) -> Result<Vec<u8>, Error> {
    let too_large = || Error::TooLarge {
        registry: registry.to_string(),
        what,
        limit,
    };
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| net(registry, &e))? {
        if (out.len() + c.len()) as u64 > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

/// The distribution spec's error codes in an error answer (upper-case
/// identifiers only; messages and anything else are dropped).
async fn error_codes(resp: reqwest::Response, registry: &str) -> Vec<String> {
    let Ok(body) = read_capped(resp, ERROR_LIMIT, registry, "error").await else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Vec::new();
    };
    v["errors"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["code"].as_str())
        .filter(|c| {
            !c.is_empty() && c.len() <= 40 && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        })
        .take(4)
        .map(str::to_string)
        .collect()
}

/// A `WWW-Authenticate` challenge: the scheme and its parameters.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: HashMap<String, String>,
}

fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

fn sha256_digest(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl Client {
    /// A client for `registry` reached as `access` (the caller's
    /// configuration) says, with these timeouts. A registry on loopback is
    /// refused here unless `access.loopback`.
    pub fn new(
        registry: &str,
        access: Access,
        creds: Creds,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Client, Error> {
        // reqwest is built without a crypto provider of its own: it uses the
        // process default, ring, as the QUIC link does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        if !access.loopback && config::is_loopback_registry(registry) {
            return Err(Error::Loopback {
                registry: registry.to_string(),
            });
        }
        let scheme = if access.plain_http { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{registry}/")).map_err(|e| Error::Protocol {
            registry: registry.to_string(),
            why: format!("not a registry address: {e}"),
        })?;
        let host = host_of(registry);
        let redirect_host = host.clone();
        let policy = reqwest::redirect::Policy::custom(move |a| {
            if a.previous().len() >= MAX_REDIRECTS {
                a.error("too many redirects")
            } else if safe_target(a.url(), &redirect_host, access) {
                a.follow()
            } else {
                a.error("redirected to plain HTTP on another host, or to loopback; refused")
            }
        });
        let mut http = reqwest::Client::builder().redirect(policy);
        if !access.loopback {
            http = http.dns_resolver(NoLoopback);
        }
        let http = http
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .build()
            .map_err(|e| net(registry, &e))?;
        Ok(Client {
            registry: registry.to_string(),
            host,
            access,
            base,
            http,
            creds,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    fn url(&self, path: &str) -> Result<Url, Error> {
        self.base.join(path).map_err(|e| Error::Protocol {
            registry: self.registry.clone(),
            why: format!("bad path {path}: {e}"),
        })
    }

    /// The `Authorization` value to send first for `scope`.
    fn known_auth(&self, scope: &str) -> Option<String> {
        match &self.creds {
            Creds::Bearer(t) => Some(format!("Bearer {t}")),
            _ => self
                .tokens
                .lock()
                .expect("poisoned")
                .get(scope)
                .map(|t| format!("Bearer {t}")),
        }
    }

    fn basic(&self) -> Option<String> {
        match &self.creds {
            Creds::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            _ => None,
        }
    }

    /// Answers a 401's challenge: basic credentials, or a token fetched from
    /// a safe realm.
    async fn answer(&self, challenge: Option<&str>, scope: &str) -> Result<String, Error> {
        let denied = || Error::Denied {
            registry: self.registry.clone(),
            code: 401,
            codes: Vec::new(),
        };
        let c = challenge.and_then(parse_challenge).ok_or_else(denied)?;
        match c.scheme.as_str() {
            "basic" => self.basic().ok_or_else(denied),
            "bearer" => {
                if matches!(self.creds, Creds::Bearer(_)) {
                    // The configured token was refused: nothing else to try.
                    return Err(denied());
                }
                let realm = c.params.get("realm").cloned().unwrap_or_default();
                let mut url = Url::parse(&realm).map_err(|_| Error::Realm {
                    registry: self.registry.clone(),
                    realm: realm.clone(),
                })?;
                if !safe_target(&url, &self.host, self.access) {
                    return Err(Error::Realm {
                        registry: self.registry.clone(),
                        realm,
                    });
                }
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = c.params.get("service") {
                        q.append_pair("service", s);
                    }
                    q.append_pair("scope", scope);
                }
                let mut req = self.http.get(url);
                if let Some(b) = self.basic() {
                    req = req.header(AUTHORIZATION, b);
                }
                let resp = req.send().await.map_err(|e| net(&self.registry, &e))?;
                if !resp.status().is_success() {
                    let code = resp.status().as_u16();
                    return Err(Error::Denied {
                        registry: self.registry.clone(),
                        code,
                        codes: error_codes(resp, &self.registry).await,
                    });
                }
                let body = read_capped(resp, TOKEN_LIMIT, &self.registry, "token").await?;
                let v: serde_json::Value =
                    serde_json::from_slice(&body).map_err(|_| Error::Protocol {
                        registry: self.registry.clone(),
                        why: "the token service's answer is not JSON".into(),
                    })?;
                let token = v["token"]
                    .as_str()
                    .or_else(|| v["access_token"].as_str())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| Error::Protocol {
                        registry: self.registry.clone(),
                        why: "the token service's answer has no token".into(),
                    })?
                    .to_string();
                self.tokens
                    .lock()
                    .expect("poisoned")
                    .insert(scope.to_string(), token.clone());
                Ok(format!("Bearer {token}"))
            }
            _ => Err(denied()),
        }
    }

    /// A GET with authentication: the known credentials first, then one
    /// answer to the registry's challenge.
    async fn get(
        &self,
        url: Url,
        accept: Option<&str>,
        scope: &str,
    ) -> Result<reqwest::Response, Error> {
        let mut auth = self.known_auth(scope);
        for attempt in 0..2 {
            let mut req = self.http.get(url.clone());
            if let Some(a) = accept
                && let Ok(v) = HeaderValue::from_str(a)
            {
                req = req.header(ACCEPT, v);
            }
            if let Some(a) = &auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = req.send().await.map_err(|e| net(&self.registry, &e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            auth = Some(self.answer(challenge.as_deref(), scope).await?);
        }
        unreachable!("the loop returns on its second pass")
    }

    /// Turns an unsuccessful answer into an error naming only its status
    /// and error codes.
    async fn failure(&self, resp: reqwest::Response, what: String) -> Error {
        let code = resp.status().as_u16();
        let codes = error_codes(resp, &self.registry).await;
        let registry = self.registry.clone();
        match code {
            404 => Error::NotFound {
                registry,
                what,
                codes,
            },
            401 | 403 => Error::Denied {
                registry,
                code,
                codes,
            },
            _ if codes
                .iter()
                .any(|c| c == "MANIFEST_UNKNOWN" || c == "NAME_UNKNOWN" || c == "BLOB_UNKNOWN") =>
            {
                Error::NotFound {
                    registry,
                    what,
                    codes,
                }
            }
            _ => Error::Status {
                registry,
                code,
                codes,
            },
        }
    }

    /// The manifest `reference` (a tag or a digest) of `repository`, at
    /// most `limit` bytes, in one of the `accept` media types; checked
    /// against the digest when it was asked by one.
    pub async fn manifest(
        &self,
        repository: &str,
        reference: &str,
        accept: &[&str],
        limit: u64,
    ) -> Result<Manifest, Error> {
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"))?;
        let scope = format!("repository:{repository}:pull");
        let resp = self.get(url, Some(&accept.join(", ")), &scope).await?;
        if !resp.status().is_success() {
            return Err(self
                .failure(resp, format!("manifest {repository}:{reference}"))
                .await);
        }
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or_default().trim().to_string());
        let bytes = read_capped(resp, limit, &self.registry, "manifest").await?;
        let digest = sha256_digest(&bytes);
        if reference.contains(':') && reference != digest {
            return Err(Error::Digest {
                registry: self.registry.clone(),
                expected: reference.to_string(),
                actual: digest,
            });
        }
        Ok(Manifest {
            bytes,
            digest,
            media_type,
        })
    }

    /// Starts downloading blob `digest` of `repository`.
    pub async fn blob(&self, repository: &str, digest: &str) -> Result<Blob, Error> {
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"))?;
        let scope = format!("repository:{repository}:pull");
        let resp = self.get(url, None, &scope).await?;
        if !resp.status().is_success() {
            return Err(self.failure(resp, format!("blob {digest}")).await);
        }
        Ok(Blob {
            resp,
            registry: self.registry.clone(),
        })
    }
}

#[cfg(test)]
mod tests;
