//! HTTPS on the function gateway (`--gateway-tls-addr`): the certificate
//! for a connection is chosen by the host the client names (SNI) among the
//! Secrets labelled `flotilla.dev/gateway-tls` (`tls.crt`, `tls.key`, PEM)
//! the scheduler sent this node — only from the namespace of a Function
//! whose route names that host, so one tenant's Secret never answers for
//! another tenant's host. A Secret's certificate is parsed once per
//! version; one that does not parse is logged and passed over. Requests
//! then take the same way as plain HTTP ones ([`Gateway`]).

use super::gateway::Gateway;
use crate::inputs::InputStore;
use flotilla_api::Object;
use flotilla_api::function::is_gateway_tls;
use flotilla_api::proto::ServiceView;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// A certificate with the host names it is for.
struct Loaded {
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// The certificates the gateway serves, by the host a client names.
pub struct Certificates {
    table: watch::Receiver<Arc<Vec<ServiceView>>>,
    inputs: Arc<InputStore>,
    /// Secret key → what its version held.
    loaded: Mutex<HashMap<String, Parsed>>,
}

/// A Secret's resource version and its certificate, if it parsed.
type Parsed = (u64, Option<Arc<Loaded>>);

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").finish_non_exhaustive()
    }
}

/// Whether certificate name `name` (possibly `*.example.com`) covers `host`.
fn covers(name: &str, host: &str) -> bool {
    if name == host {
        return true;
    }
    match (name.strip_prefix("*."), host.split_once('.')) {
        (Some(domain), Some((label, rest))) => !label.is_empty() && rest == domain,
        _ => false,
    }
}

/// The certificate chain and key of a gateway-tls Secret, with the DNS
/// names its leaf certificate is for.
fn load(obj: &Object) -> Result<Loaded, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Object::Secret(s) = obj else {
        return Err("not a Secret".into());
    };
    let field = |k: &str| {
        s.data
            .get(k)
            .ok_or_else(|| format!("it has no '{k}' key (PEM)"))
    };
    let chain = CertificateDer::pem_slice_iter(field("tls.crt")?.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    let leaf = chain.first().ok_or("tls.crt holds no certificate")?;
    let key = PrivateKeyDer::from_pem_slice(field("tls.key")?.as_bytes())
        .map_err(|e| format!("tls.key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("tls.key: {e}"))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| format!("tls.crt: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        return Err("tls.crt names no DNS host (subject alternative names)".into());
    }
    Ok(Loaded {
        names,
        key: Arc::new(CertifiedKey::new(chain, signer)),
    })
}

impl Certificates {
    /// Over the node's service table and the inputs the scheduler sent.
    pub fn new(
        table: watch::Receiver<Arc<Vec<ServiceView>>>,
        inputs: Arc<InputStore>,
    ) -> Certificates {
        Certificates {
            table,
            inputs,
            loaded: Mutex::default(),
        }
    }

    /// The certificate to answer a client naming `host` with, if any.
    pub fn for_host(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let namespaces: HashSet<String> = self
            .table
            .borrow()
            .iter()
            .filter(|s| s.routes.iter().any(|r| r.host.eq_ignore_ascii_case(&host)))
            .map(|s| s.namespace.clone())
            .collect();
        if namespaces.is_empty() {
            return None;
        }
        let mut secrets: Vec<(String, Arc<Object>)> = self
            .inputs
            .snapshot()
            .into_iter()
            .filter(|(_, o)| is_gateway_tls(o))
            .collect();
        secrets.sort_by(|a, b| a.0.cmp(&b.0));
        let mut loaded = self.loaded.lock().expect("poisoned");
        loaded.retain(|k, _| secrets.iter().any(|(key, _)| key == k));
        for (key, obj) in secrets {
            let version = obj.meta().resource_version;
            let cert = match loaded.get(&key) {
                Some((v, c)) if *v == version => c.clone(),
                _ => {
                    let c = match load(&obj) {
                        Ok(l) => Some(Arc::new(l)),
                        Err(why) => {
                            tracing::warn!(secret = %key, "gateway certificate not used: {why}");
                            None
                        }
                    };
                    loaded.insert(key.clone(), (version, c.clone()));
                    c
                }
            };
            if namespaces.contains(&obj.meta().namespace)
                && let Some(c) = cert
                && c.names.iter().any(|n| covers(n, &host))
            {
                return Some(c.key.clone());
            }
        }
        None
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.for_host(hello.server_name()?)
    }
}

/// The TLS settings the gateway serves with: TLS 1.2 and 1.3, HTTP/2 or
/// HTTP/1.1 by ALPN, certificates from `certs`.
pub fn server_config(certs: Arc<Certificates>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Serves the gateway over TLS on `listener` until the future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            // Out of descriptors or similar: give it a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = conn.set_nodelay(true);
        let (acceptor, gateway) = (acceptor.clone(), gateway.clone());
        tokio::spawn(async move {
            // No certificate for the name, a bad hello or a slow client:
            // the handshake fails and the connection goes.
            let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(conn)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let gateway = gateway.clone();
                async move { Ok::<_, std::convert::Infallible>(gateway.answer(req).await) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Store keys of the certificate Secrets the node holds: inputs the agent
/// keeps although no pod refers to them.
pub fn certificate_keys(inputs: &InputStore) -> impl Iterator<Item = String> {
    inputs
        .snapshot()
        .into_iter()
        .filter(|(_, o)| is_gateway_tls(o))
        .map(|(k, _)| k)
}

#[cfg(test)]
mod tests;
