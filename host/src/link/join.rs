//! Joining a cluster: the agent proves it holds a join token, gets a client
//! certificate bound to its node name, and keeps it fresh.
//!
//! The token `FLT1.<ca-sha256>.<id>.<secret>` pins the cluster CA: before
//! sending anything, the agent checks that the scheduler's certificate chains
//! to a CA whose SHA-256 is the pinned one (like kubeadm's discovery hash).

use flotilla_api::proto::{ALPN, AgentMsg, FrameReader, PROTOCOL_VERSION, SchedulerMsg, encode};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("malformed join token: {0} (expected FLT1.<ca-sha256>.<id>.<secret>)")]
    BadToken(&'static str),
    #[error("cannot reach the scheduler at {addr}: {why}")]
    Connect { addr: SocketAddr, why: String },
    #[error(
        "the scheduler at {0} is not the cluster the token names: its CA does not match the token's pin"
    )]
    WrongCluster(SocketAddr),
    #[error("the scheduler refused to admit this node: {0}")]
    Refused(String),
    #[error("join protocol: {0}")]
    Protocol(String),
    #[error(
        "the scheduler at {at} does not lead (the leader is at {leader:?}); join through the leader"
    )]
    NotLeader { at: SocketAddr, leader: String },
    #[error("certificate: {0}")]
    Cert(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A parsed join token. (Debug is not derived: the secret must not be logged.)
#[derive(Clone)]
pub struct JoinToken {
    pub ca_sha256: String,
    /// `<id>.<secret>`, what the scheduler checks.
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_sha256", &self.ca_sha256)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl JoinToken {
    pub fn parse(s: &str) -> Result<JoinToken, JoinError> {
        let mut parts = s.trim().splitn(3, '.');
        if parts.next() != Some("FLT1") {
            return Err(JoinError::BadToken("it does not start with FLT1"));
        }
        let hash = parts.next().ok_or(JoinError::BadToken("no CA hash"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(JoinError::BadToken("the CA hash is not 64 hex digits"));
        }
        let secret = parts.next().ok_or(JoinError::BadToken("no secret"))?;
        if !secret.contains('.') {
            return Err(JoinError::BadToken("the secret has no id"));
        }
        Ok(JoinToken {
            ca_sha256: hash.to_ascii_lowercase(),
            secret: secret.to_string(),
        })
    }
}

/// Accepts the server only if its chain ends in the pinned CA and the leaf
/// verifies against that CA. Remembers the CA it saw.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    seen: Mutex<Option<CertificateDer<'static>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex(&Sha256::digest(c.as_ref())) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General("the server's CA does not match the join token's pin".into())
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let ok = inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)?;
        *self.seen.lock().expect("poisoned") = Some(ca.clone().into_owned());
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The files an agent keeps after joining.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Credentials {
    fn paths(dir: &Path) -> [PathBuf; 3] {
        [
            dir.join("ca.pem"),
            dir.join("node.pem"),
            dir.join("node.key"),
        ]
    }

    /// Credentials saved by an earlier join, if any.
    pub fn load(dir: &Path) -> Option<Credentials> {
        let [ca, cert, key] = Self::paths(dir);
        Some(Credentials {
            ca_pem: std::fs::read_to_string(ca).ok()?,
            cert_pem: std::fs::read_to_string(cert).ok()?,
            key_pem: std::fs::read_to_string(key).ok()?,
        })
    }

    /// Saves atomically, private files readable by the owner only.
    pub fn save(&self, dir: &Path) -> Result<(), JoinError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JoinError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let [ca, cert, key] = Self::paths(dir);
        for (path, text) in [
            (ca, &self.ca_pem),
            (cert, &self.cert_pem),
            (key, &self.key_pem),
        ] {
            flotilla_api::fs::write_private(&path, text.as_bytes()).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Seconds of validity left on the node certificate (negative: expired).
    pub fn remaining(&self) -> Option<(i64, i64)> {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
        let v = cert.validity();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs() as i64;
        let total = v.not_after.timestamp()
            - v.not_before.timestamp()
            - flotilla_api::proto::CERT_BACKDATE_SECS;
        Some((v.not_after.timestamp() - now, total))
    }
}

/// A new key and a certificate request for `node`.
pub fn key_and_csr(node: &str) -> Result<(String, String), JoinError> {
    let key = KeyPair::generate().map_err(|e| JoinError::Cert(e.to_string()))?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| JoinError::Cert(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("node:{node}"));
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| JoinError::Cert(e.to_string()))?;
    Ok((key.serialize_pem(), csr))
}

/// Joins the cluster at `server` as `node` and returns the new credentials.
pub async fn join(
    server: SocketAddr,
    node: &str,
    token: &JoinToken,
) -> Result<Credentials, JoinError> {
    // A follower (several schedulers on one store) names the leader:
    // join there instead, once.
    match join_at(server, node, token).await {
        Err(JoinError::NotLeader { leader, .. }) if leader.parse::<SocketAddr>().is_ok() => {
            join_at(leader.parse().expect("checked"), node, token).await
        }
        r => r,
    }
}

async fn join_at(
    server: SocketAddr,
    node: &str,
    token: &JoinToken,
) -> Result<Credentials, JoinError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        pin: token.ca_sha256.clone(),
        seen: Mutex::new(None),
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| JoinError::Cert(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| JoinError::Cert(e.to_string()))?;
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("valid");
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| JoinError::Connect {
        addr: server,
        why: e.to_string(),
    })?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connecting = endpoint
        .connect(server, crate::link::SCHEDULER_NAME)
        .map_err(|e| JoinError::Connect {
            addr: server,
            why: e.to_string(),
        })?;
    let conn = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Err(_) => {
            return Err(JoinError::Connect {
                addr: server,
                why: "timed out".into(),
            });
        }
        Ok(Err(e)) if e.to_string().contains("pin") => return Err(JoinError::WrongCluster(server)),
        Ok(Err(e)) => {
            return Err(JoinError::Connect {
                addr: server,
                why: e.to_string(),
            });
        }
        Ok(Ok(c)) => c,
    };
    let (key_pem, csr_pem) = key_and_csr(node)?;
    let (mut tx, rx) = conn
        .open_bi()
        .await
        .map_err(|e| JoinError::Protocol(e.to_string()))?;
    let msg = AgentMsg::Join {
        version: PROTOCOL_VERSION,
        node_name: node.to_string(),
        token: token.secret.clone(),
        csr_pem,
    };
    tx.write_all(&encode(&msg))
        .await
        .map_err(|e| JoinError::Protocol(e.to_string()))?;
    let mut reader = FrameReader::new(rx);
    let reply = tokio::time::timeout(Duration::from_secs(10), reader.next::<SchedulerMsg>())
        .await
        .map_err(|_| JoinError::Protocol("no reply within 10 s".into()))?
        .map_err(|e| JoinError::Protocol(e.to_string()))?;
    conn.close(0u32.into(), b"joined");
    // The close is sent in the background; waiting here for the connection
    // to drain (three probe timeouts) tripled the join time.
    tokio::spawn(async move { endpoint.wait_idle().await });
    let ca_der = verifier
        .seen
        .lock()
        .expect("poisoned")
        .clone()
        .ok_or(JoinError::WrongCluster(server))?;
    match reply {
        SchedulerMsg::Joined { cert_pem, .. } => Ok(Credentials {
            ca_pem: pem_of(&ca_der),
            cert_pem,
            key_pem,
        }),
        SchedulerMsg::Refused { reason } => Err(JoinError::Refused(reason)),
        SchedulerMsg::Redirect { to } => Err(JoinError::NotLeader {
            at: server,
            leader: to,
        }),
        other => Err(JoinError::Protocol(format!("unexpected reply {other:?}"))),
    }
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = der.as_ref();
    let mut b64 = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("ascii"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_or_say_why_not() {
        let hash = "ab".repeat(32);
        let t = JoinToken::parse(&format!("FLT1.{hash}.0a1b.s3cr3t")).unwrap();
        assert_eq!(t.secret, "0a1b.s3cr3t");
        assert!(
            JoinToken::parse("flt_abc_def")
                .unwrap_err()
                .to_string()
                .contains("FLT1")
        );
        assert!(
            JoinToken::parse("FLT1.abc.x.y")
                .unwrap_err()
                .to_string()
                .contains("64 hex")
        );
        assert!(JoinToken::parse(&format!("FLT1.{hash}.nodot")).is_err());
    }

    #[test]
    fn pem_encoding_round_trips() {
        for len in [1usize, 2, 3, 4, 100, 1000] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let pem = pem_of(&CertificateDer::from(der.clone()));
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), &der[..]);
        }
    }
}
