//! Secrets sealed at rest: every Secret the store writes to disk is
//! encrypted with AES-256-GCM under a key kept in the data directory (mode
//! 0600), bound to its store key (as associated data, so one sealed value
//! cannot be moved under another name). The in-memory copy stays plain;
//! only the bytes on disk are sealed.
//!
//! Envelope: `FLTSEAL1` · key id (4 bytes, big endian) · nonce (12) ·
//! ciphertext and tag. Rotation makes a new current key and keeps the old
//! ones for reading until everything is sealed again.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// What a sealed value starts with.
pub const MAGIC: &[u8; 8] = b"FLTSEAL1";
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = MAGIC.len() + 4 + NONCE_LEN;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("secret key file {path}: {why}")]
    KeyFile { path: PathBuf, why: String },
    #[error("sealed with key {0}, which this scheduler does not have")]
    UnknownKey(u32),
    #[error("sealed value is damaged or was moved (authentication failed)")]
    Damaged,
    #[error("sealed value is truncated")]
    Truncated,
    #[error("no randomness: {0}")]
    Random(String),
}

#[derive(Clone, Serialize, Deserialize)]
struct KeyFile {
    current: u32,
    /// Key id → 32 bytes, hex.
    keys: BTreeMap<u32, String>,
}

struct Keys {
    current: u32,
    keys: BTreeMap<u32, Aes256Gcm>,
    file: KeyFile,
}

/// The keys secrets are sealed with.
pub struct Sealer {
    path: PathBuf,
    keys: RwLock<Keys>,
}

fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| SealError::Random(e.to_string()))?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Keys {
    fn from_file(file: KeyFile, path: &Path) -> Result<Keys, SealError> {
        let bad = |why: String| SealError::KeyFile {
            path: path.to_path_buf(),
            why,
        };
        let mut keys = BTreeMap::new();
        for (id, h) in &file.keys {
            let k = unhex(h).ok_or_else(|| bad(format!("key {id} is not 32 bytes of hex")))?;
            keys.insert(*id, Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&k)));
        }
        if !keys.contains_key(&file.current) {
            return Err(bad(format!("the current key {} is missing", file.current)));
        }
        Ok(Keys {
            current: file.current,
            keys,
            file,
        })
    }
}

impl Sealer {
    /// Loads the key file, or creates it with one new key.
    pub fn load_or_create(path: &Path) -> Result<Sealer, SealError> {
        let bad = |why: String| SealError::KeyFile {
            path: path.to_path_buf(),
            why,
        };
        let file = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice::<KeyFile>(&b).map_err(|e| bad(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let file = KeyFile {
                    current: 1,
                    keys: [(1, hex(&random::<32>()?))].into(),
                };
                write_key_file(path, &file)?;
                file
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        Ok(Sealer {
            path: path.to_path_buf(),
            keys: RwLock::new(Keys::from_file(file, path)?),
        })
    }

    /// The id of the key new values are sealed with.
    pub fn current(&self) -> u32 {
        self.keys.read().expect("poisoned").current
    }

    /// Seals `plain`, bound to `name` (the store key).
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let keys = self.keys.read().expect("poisoned");
        let cipher = &keys.keys[&keys.current];
        let nonce = random::<NONCE_LEN>()?;
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SealError::Damaged)?;
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&keys.current.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Whether `bytes` are a sealed value.
    pub fn is_sealed(bytes: &[u8]) -> bool {
        bytes.starts_with(MAGIC)
    }

    /// The key id a sealed value was sealed with.
    pub fn key_of(bytes: &[u8]) -> Option<u32> {
        let id = bytes.get(MAGIC.len()..MAGIC.len() + 4)?;
        Some(u32::from_be_bytes(id.try_into().ok()?))
    }

    /// Opens a value sealed under `name`.
    pub fn open(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>, SealError> {
        if bytes.len() < HEADER_LEN || !Self::is_sealed(bytes) {
            return Err(SealError::Truncated);
        }
        let id = Self::key_of(bytes).ok_or(SealError::Truncated)?;
        let keys = self.keys.read().expect("poisoned");
        let cipher = keys.keys.get(&id).ok_or(SealError::UnknownKey(id))?;
        let nonce = &bytes[MAGIC.len() + 4..HEADER_LEN];
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: &bytes[HEADER_LEN..],
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SealError::Damaged)
    }

    /// Makes a new current key (the old ones still open what they sealed);
    /// returns its id.
    pub fn rotate(&self) -> Result<u32, SealError> {
        let mut keys = self.keys.write().expect("poisoned");
        let mut file = keys.file.clone();
        let id = file.keys.keys().max().copied().unwrap_or(0) + 1;
        file.keys.insert(id, hex(&random::<32>()?));
        file.current = id;
        write_key_file(&self.path, &file)?;
        *keys = Keys::from_file(file, &self.path)?;
        Ok(id)
    }

    /// Drops every key but the current one (once nothing is sealed with
    /// them any more).
    pub fn forget_old(&self) -> Result<(), SealError> {
        let mut keys = self.keys.write().expect("poisoned");
        let mut file = keys.file.clone();
        let current = file.current;
        file.keys.retain(|id, _| *id == current);
        write_key_file(&self.path, &file)?;
        *keys = Keys::from_file(file, &self.path)?;
        Ok(())
    }
}

fn write_key_file(path: &Path, file: &KeyFile) -> Result<(), SealError> {
    let bytes = serde_json::to_vec_pretty(file).expect("key file serializes");
    crate::fs::write_private(path, &bytes).map_err(|e| SealError::KeyFile {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_under_their_name_and_survive_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let s = Sealer::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = s.seal("secrets/default/db", b"hunter2").unwrap();
        assert!(Sealer::is_sealed(&sealed));
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(s.open("secrets/default/db", &sealed).unwrap(), b"hunter2");
        assert!(matches!(
            s.open("secrets/default/other", &sealed),
            Err(SealError::Damaged)
        ));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            s.open("secrets/default/db", &flipped),
            Err(SealError::Damaged)
        ));
        // Rotation: old values still open; new ones use the new key.
        assert_eq!(s.rotate().unwrap(), 2);
        assert_eq!(s.open("secrets/default/db", &sealed).unwrap(), b"hunter2");
        let resealed = s.seal("secrets/default/db", b"hunter2").unwrap();
        assert_eq!(Sealer::key_of(&resealed), Some(2));
        // A restarted scheduler reads the same keys.
        let again = Sealer::load_or_create(&path).unwrap();
        assert_eq!(again.current(), 2);
        assert_eq!(
            again.open("secrets/default/db", &sealed).unwrap(),
            b"hunter2"
        );
        again.forget_old().unwrap();
        assert!(matches!(
            again.open("secrets/default/db", &sealed),
            Err(SealError::UnknownKey(1))
        ));
        assert_eq!(
            again.open("secrets/default/db", &resealed).unwrap(),
            b"hunter2"
        );
    }
}
