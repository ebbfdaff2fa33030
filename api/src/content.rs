//! A content store (the agent's images and modules, the scheduler's uploads): blobs addressed by digest under
//! `<root>/sha256/<hex>`. A blob is written to a temporary file while its
//! SHA-256 and size are checked, and renamed into place only when both match:
//! a short, long or corrupt download leaves nothing behind.

use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("'{0}' is not a sha256 digest (sha256:<64 hex digits>)")]
    BadDigest(String),
    #[error("blob {digest} is larger than the {limit}-byte limit for it")]
    TooLarge { digest: String, limit: u64 },
    #[error("blob {digest}: expected {expected} bytes, received {actual}")]
    WrongSize {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "blob {expected}: content hashes to {actual}; the download is corrupt or was tampered with"
    )]
    WrongDigest { expected: String, actual: String },
    #[error("content store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks `sha256:<hex>` and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, ContentError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| ContentError::BadDigest(digest.to_string()))
}

/// One stored blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
}

pub struct ContentStore {
    root: PathBuf,
}

impl ContentStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<ContentStore, ContentError> {
        let root = root.into();
        let dir = root.join("sha256");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let tmp = root.join("tmp");
        // Leftovers of downloads cut short by a crash.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        Ok(ContentStore { root })
    }

    /// Where the blob with `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &str) -> Result<PathBuf, ContentError> {
        Ok(self.root.join("sha256").join(digest_hex(digest)?))
    }

    /// Whether the blob is stored.
    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Starts writing a blob that must hash to `digest` and, if given, be
    /// exactly `size` bytes; at most `limit` bytes are accepted either way.
    pub fn writer(
        &self,
        digest: &str,
        size: Option<u64>,
        limit: u64,
    ) -> Result<BlobWriter, ContentError> {
        digest_hex(digest)?;
        if let Some(s) = size
            && s > limit
        {
            return Err(ContentError::TooLarge {
                digest: digest.to_string(),
                limit,
            });
        }
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(io(&self.root))?;
        Ok(BlobWriter {
            dest: self.path(digest)?,
            digest: digest.to_string(),
            size,
            limit,
            written: 0,
            hasher: Sha256::new(),
            tmp: Some(tmp),
            pending: Vec::new(),
        })
    }

    /// Stores `bytes` as the blob `digest` (verified like a download).
    pub fn put(&self, digest: &str, bytes: &[u8], limit: u64) -> Result<PathBuf, ContentError> {
        let mut w = self.writer(digest, Some(bytes.len() as u64), limit)?;
        w.write(bytes)?;
        w.commit()
    }

    /// Every stored blob.
    pub fn list(&self) -> Result<Vec<BlobInfo>, ContentError> {
        let dir = self.root.join("sha256");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            if digest_hex(&digest).is_err() {
                continue;
            }
            let size = e.metadata().map_err(io(&e.path()))?.len();
            out.push(BlobInfo { digest, size });
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Removes every blob not in `keep`; returns what was removed.
    pub fn prune(&self, keep: &HashSet<String>) -> Result<Vec<BlobInfo>, ContentError> {
        let mut removed = Vec::new();
        for b in self.list()? {
            if !keep.contains(&b.digest) {
                let p = self.path(&b.digest)?;
                std::fs::remove_file(&p).map_err(io(&p))?;
                removed.push(b);
            }
        }
        Ok(removed)
    }
}

/// A blob being written; nothing is visible in the store until `commit`
/// succeeds, and a dropped writer leaves nothing behind.
pub struct BlobWriter {
    dest: PathBuf,
    digest: String,
    size: Option<u64>,
    limit: u64,
    written: u64,
    hasher: Sha256,
    tmp: Option<tempfile::NamedTempFile>,
    /// Bytes not yet written: chunks arrive packet-sized from QUIC and
    /// record-sized from TLS, and go to the file 1 MiB at a time.
    pending: Vec<u8>,
}

/// How much a writer gathers before it writes to its file.
const WRITE_BATCH: usize = 1 << 20;

impl BlobWriter {
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), ContentError> {
        self.written += chunk.len() as u64;
        let cap = self.size.unwrap_or(self.limit).min(self.limit);
        if self.written > cap {
            self.tmp = None;
            return Err(match self.size {
                Some(expected) if expected <= self.limit => ContentError::WrongSize {
                    digest: self.digest.clone(),
                    expected,
                    actual: self.written,
                },
                _ => ContentError::TooLarge {
                    digest: self.digest.clone(),
                    limit: self.limit,
                },
            });
        }
        self.hasher.update(chunk);
        if self.pending.len() + chunk.len() > WRITE_BATCH {
            self.flush()?;
        }
        if chunk.len() >= WRITE_BATCH {
            let tmp = self.tmp.as_mut().expect("writer used after an error");
            return tmp.write_all(chunk).map_err(io(&self.dest));
        }
        self.pending.extend_from_slice(chunk);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ContentError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let tmp = self.tmp.as_mut().expect("writer used after an error");
        tmp.write_all(&self.pending).map_err(io(&self.dest))?;
        self.pending.clear();
        Ok(())
    }

    /// Checks size and digest, then moves the blob into place.
    pub fn commit(mut self) -> Result<PathBuf, ContentError> {
        if let Some(expected) = self.size
            && expected != self.written
        {
            return Err(ContentError::WrongSize {
                digest: self.digest.clone(),
                expected,
                actual: self.written,
            });
        }
        let actual = format!("sha256:{:x}", self.hasher.clone().finalize());
        if actual != self.digest {
            return Err(ContentError::WrongDigest {
                expected: self.digest.clone(),
                actual,
            });
        }
        self.flush()?;
        let tmp = self.tmp.take().expect("writer used after an error");
        tmp.as_file().sync_all().map_err(io(&self.dest))?;
        tmp.persist(&self.dest).map_err(|e| ContentError::Io {
            path: self.dest.clone(),
            source: e.error,
        })?;
        Ok(self.dest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(b: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(b))
    }

    fn leftovers(root: &Path) -> usize {
        std::fs::read_dir(root.join("tmp")).unwrap().count()
    }

    #[test]
    fn a_verified_blob_is_stored_once_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let data = b"\0asm\x01\0\0\0";
        let d = digest_of(data);
        let p = cs.put(&d, data, 1 << 20).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), data);
        assert!(cs.has(&d));
        // The same content again is the same file.
        assert_eq!(cs.put(&d, data, 1 << 20).unwrap(), p);
        assert_eq!(
            cs.list().unwrap(),
            [BlobInfo {
                digest: d.clone(),
                size: 8
            }]
        );
    }

    #[test]
    fn corrupt_short_long_and_oversized_blobs_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let data = b"hello blob";
        let d = digest_of(data);
        // Corrupt: same length, other bytes.
        let e = cs.put(&d, b"hellO blob", 1 << 20).unwrap_err();
        assert!(matches!(e, ContentError::WrongDigest { .. }), "{e}");
        assert!(e.to_string().contains("corrupt"));
        // Short: fewer bytes than the descriptor said.
        let mut w = cs.writer(&d, Some(20), 1 << 20).unwrap();
        w.write(data).unwrap();
        let e = w.commit().unwrap_err();
        assert!(
            matches!(
                e,
                ContentError::WrongSize {
                    expected: 20,
                    actual: 10,
                    ..
                }
            ),
            "{e}"
        );
        // Long: refused as soon as it passes the declared size.
        let mut w = cs.writer(&d, Some(4), 1 << 20).unwrap();
        let e = w.write(data).unwrap_err();
        assert!(
            matches!(e, ContentError::WrongSize { expected: 4, .. }),
            "{e}"
        );
        // Oversized: a declared size past the cap is refused before any byte,
        // an undeclared one once the cap is passed.
        assert!(matches!(
            cs.writer(&d, Some(1 << 30), 1 << 20),
            Err(ContentError::TooLarge { .. })
        ));
        let mut w = cs.writer(&d, None, 4).unwrap();
        assert!(matches!(w.write(data), Err(ContentError::TooLarge { .. })));
        drop(w);
        assert!(!cs.has(&d));
        assert!(cs.list().unwrap().is_empty());
        assert_eq!(leftovers(dir.path()), 0);
    }

    #[test]
    fn digests_are_checked_before_they_name_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        for bad in [
            "sha256:../../etc/passwd",
            "md5:abc",
            "sha256:ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789",
            "sha256:",
        ] {
            assert!(
                matches!(cs.path(bad), Err(ContentError::BadDigest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn prune_keeps_what_is_referenced() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let (a, b) = (b"first".as_slice(), b"second".as_slice());
        cs.put(&digest_of(a), a, 100).unwrap();
        cs.put(&digest_of(b), b, 100).unwrap();
        let keep: HashSet<String> = [digest_of(a)].into();
        let removed = cs.prune(&keep).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].digest, digest_of(b));
        assert!(cs.has(&digest_of(a)) && !cs.has(&digest_of(b)));
    }
}
