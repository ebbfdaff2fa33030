//! rustls/quinn configuration of the scheduler's QUIC endpoint: TLS 1.3, the
//! cluster CA as the only trust root, client certificates required.

use crate::pki::CertPair;
use flotilla_api::proto::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("QUIC crypto: {0}")]
    Quic(String),
}

/// Largest UDP payload the endpoints send or take: an Ethernet frame's
/// (path MTU discovery stops at 1452 anyway). It sizes quinn's receive
/// buffer (segment size × GRO segments), which at the 64 KiB default took
/// 3 MiB per endpoint once traffic had touched it.
pub const MAX_UDP_PAYLOAD: u16 = 1472;

/// A QUIC endpoint on `addr` (a server if `server` is given) with the
/// receive buffer sized by [`MAX_UDP_PAYLOAD`].
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let mut cfg = quinn::EndpointConfig::default();
    cfg.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("1472 is a valid payload size");
    quinn::Endpoint::new(cfg, server, socket, Arc::new(quinn::TokioRuntime))
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))
}

pub fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

/// QUIC transport settings shared by both ends: small windows suit small nodes.
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // No QUIC keep-alives: agents heartbeat every 0.5 s by default and the
    // replies keep the path alive; pings on top doubled the packets per node.
    t.keep_alive_interval(None);
    t.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .expect("valid idle timeout"),
    ));
    t.max_concurrent_bidi_streams(64u32.into());
    t.max_concurrent_uni_streams(16u32.into());
    Arc::new(t)
}

/// TLS 1.3 server config presenting `chain`: client certificates are optional
/// at the TLS level but, when presented, must chain to the cluster CA.
/// (New nodes join without one; API callers may use bearer tokens instead.)
fn tls_server(
    ca_pem: &str,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key_pem: &str,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key(key_pem)?)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// The agent endpoint's QUIC config. The chain includes the CA so that a
/// joining agent can check it against its token's pin; sessions require a
/// node certificate for anything but joining.
pub fn server_config(ca_pem: &str, server: &CertPair) -> Result<quinn::ServerConfig, TlsError> {
    let mut chain = certs(&server.cert_pem)?;
    chain.extend(certs(ca_pem)?);
    let cfg = tls_server(ca_pem, chain, &server.key_pem, ALPN)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(transport());
    Ok(sc)
}

/// rustls config of the HTTPS API.
pub fn api_server_config(
    ca_pem: &str,
    server: &CertPair,
) -> Result<rustls::ServerConfig, TlsError> {
    tls_server(
        ca_pem,
        certs(&server.cert_pem)?,
        &server.key_pem,
        b"http/1.1",
    )
}
