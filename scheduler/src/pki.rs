//! The cluster CA: generated into the data dir on first start, then used to
//! issue the scheduler's server certificate and agents' client certificates.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use sha2::Digest;
use std::path::{Path, PathBuf};

/// DNS name the scheduler's certificate carries; agents verify it whatever
/// address they dial (so NAT and IP changes do not matter).
pub const SCHEDULER_NAME: &str = "flotilla-scheduler";
const CA_NAME: &str = "Flotilla cluster CA";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("recording the certificate: {0}")]
    Record(String),
}

/// A PEM certificate and its PEM private key.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster certificate authority.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The CA's name carries a fingerprint of its key, so two clusters' CAs never
/// share a subject (a peer from another cluster then fails as UnknownIssuer).
fn ca_params(key: &KeyPair) -> CertificateParams {
    use rcgen::PublicKeyData;
    let fp: String = sha2::Sha256::digest(key.der_bytes())
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{CA_NAME} {fp}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2099, 1, 1);
    p
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    flotilla_api::fs::write_private(path, contents.as_bytes()).map_err(io_err(path))
}

impl ClusterCa {
    /// Loads the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<ClusterCa, PkiError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.pem");
        if key_path.exists() && cert_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            // The issuer is rebuilt from the same name and key: certificates it
            // signs chain to the stored CA certificate.
            return Ok(ClusterCa {
                issuer: Issuer::new(ca_params(&key), key),
                cert_pem,
            });
        }
        let key = KeyPair::generate()?;
        let cert = ca_params(&key).self_signed(&key)?;
        write_private(&key_path, &key.serialize_pem())?;
        write_private(&cert_path, &cert.pem())?;
        Ok(ClusterCa {
            issuer: Issuer::new(ca_params(&key), key),
            cert_pem: cert.pem(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Hex SHA-256 of the CA certificate (DER): what join tokens pin.
    pub fn cert_sha256(&self) -> String {
        let der = rustls_pki_types::CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map(|d| d.to_vec())
            .unwrap_or_default();
        sha2::Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Signs a node's certificate request: whatever the request asks for, the
    /// certificate names `node` (CN=node:NAME) and is valid for `ttl`.
    pub fn issue_node_from_csr(
        &self,
        node: &str,
        csr_pem: &str,
        ttl: std::time::Duration,
    ) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut p = CertificateParams::new(vec![format!("{node}.node.flotilla")])?;
        p.distinguished_name
            .push(DnType::CommonName, format!("node:{node}"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // A positive DER integer: a fixed first byte, then 8 random ones.
        let mut serial = vec![0x46u8; 9];
        getrandom::fill(&mut serial[1..]).expect("the OS provides randomness");
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::seconds(flotilla_api::proto::CERT_BACKDATE_SECS);
        p.not_after = now + ttl;
        Ok(p.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// Issues the scheduler's server certificate.
    pub fn issue_server(&self, extra_names: &[String]) -> Result<CertPair, PkiError> {
        let mut names = vec![SCHEDULER_NAME.to_string(), "localhost".to_string()];
        names.extend(extra_names.iter().cloned());
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name
            .push(DnType::CommonName, SCHEDULER_NAME);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(p)
    }

    /// Issues a user's client certificate: `CN=user:NAME, O=ROLE, OU=namespaces`,
    /// valid for `ttl`, with a random serial number (which names its
    /// revocable record: [`crate::auth::record_certificate`]).
    pub fn issue_user(
        &self,
        name: &str,
        role: flotilla_api::Role,
        namespaces: &[String],
        ttl: std::time::Duration,
    ) -> Result<CertPair, PkiError> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(DnType::CommonName, format!("user:{name}"));
        p.distinguished_name
            .push(DnType::OrganizationName, role.as_str());
        if !namespaces.is_empty() {
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, namespaces.join(","));
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // A positive DER integer: a fixed first byte, then 8 random ones.
        let mut serial = vec![0x46u8; 9];
        getrandom::fill(&mut serial[1..]).expect("the OS provides randomness");
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + ttl;
        self.sign_as_is(p)
    }

    /// Issues a client certificate for the agent of `node`.
    pub fn issue_agent(&self, node: &str) -> Result<CertPair, PkiError> {
        let mut p = CertificateParams::new(vec![format!("{node}.node.flotilla")])?;
        p.distinguished_name
            .push(DnType::CommonName, format!("node:{node}"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(p)
    }

    fn sign(&self, mut p: CertificateParams) -> Result<CertPair, PkiError> {
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2099, 1, 1);
        self.sign_as_is(p)
    }

    fn sign_as_is(&self, p: CertificateParams) -> Result<CertPair, PkiError> {
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
