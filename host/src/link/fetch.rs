//! Uploaded modules on the node: fetched from the scheduler over the agent's
//! QUIC link (a stream of their own beside the control stream), verified by
//! digest and size while they stream in, and cached in `<data>/modules` so a
//! restarted node runs its pods again without the scheduler. The scheduler
//! serves a node only the modules of pods bound to it.

use flotilla_api::content::ContentStore;
use flotilla_api::manifest::MAX_MODULE_BYTES;
use flotilla_api::proto::{BLOB_FOUND, BlobRequest, encode};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;

/// Why a module could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the scheduler refused module {digest}: {reason}")]
    Refused { digest: String, reason: String },
    #[error("module {digest}: {source}")]
    Store {
        digest: String,
        source: flotilla_api::content::ContentError,
    },
}

/// Where modules come from: the local cache, else the scheduler.
pub struct ModuleFetcher {
    store: ContentStore,
    link: watch::Sender<Option<quinn::Connection>>,
}

/// A fetch attempt's outcome: done, refused for good, or to be retried on
/// the next connection (the link dropped mid-way).
enum Attempt {
    Done(PathBuf),
    Fatal(FetchError),
    Retry(String),
}

impl ModuleFetcher {
    pub fn new(store: ContentStore) -> ModuleFetcher {
        ModuleFetcher {
            store,
            link: watch::Sender::new(None),
        }
    }

    /// The link to fetch over (set at every registration).
    pub fn attach(&self, conn: quinn::Connection) {
        self.link.send_replace(Some(conn));
    }

    /// The node's current link, as it changes (key-value operations use
    /// it too).
    pub fn link(&self) -> watch::Receiver<Option<quinn::Connection>> {
        self.link.subscribe()
    }

    /// Digests of the cached modules.
    pub fn cached(&self) -> Vec<String> {
        self.store
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|b| b.digest)
            .collect()
    }

    /// Removes cached modules not in `keep`.
    pub fn prune(&self, keep: &std::collections::HashSet<String>) {
        if let Err(e) = self.store.prune(keep) {
            tracing::warn!("module cache: {e}");
        }
    }

    /// Whether module `digest` is cached here.
    pub fn has(&self, digest: &str, size: u64) -> bool {
        self.store
            .path(digest)
            .is_ok_and(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == size))
    }

    /// The cached file of module `digest`, fetched first if needed. Waits
    /// for a link while there is none (an offline node with a pod whose
    /// module it never had waits for the scheduler rather than failing).
    pub async fn get(&self, digest: &str, size: u64) -> Result<PathBuf, FetchError> {
        let store_err = |source| FetchError::Store {
            digest: digest.to_string(),
            source,
        };
        let path = self.store.path(digest).map_err(store_err)?;
        if self.has(digest, size) {
            return Ok(path);
        }
        self.fetch_into(&self.store, digest, Some(size), MAX_MODULE_BYTES)
            .await
    }

    /// Fetches blob `digest` from the scheduler into `store`, retrying on
    /// every new link until it is had or refused.
    async fn fetch_into(
        &self,
        store: &ContentStore,
        digest: &str,
        size: Option<u64>,
        limit: u64,
    ) -> Result<PathBuf, FetchError> {
        let mut link = self.link.subscribe();
        loop {
            let Some(conn) = live_link(&mut link).await else {
                // The fetcher is gone: the agent is stopping.
                return Err(FetchError::Refused {
                    digest: digest.into(),
                    reason: "the agent is stopping".into(),
                });
            };
            match self.attempt(&conn, store, digest, size, limit).await {
                Attempt::Done(p) => return Ok(p),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(why) => {
                    tracing::warn!(%digest, "fetch from the scheduler interrupted ({why}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Fetches `digest` into `store` over `conn`: exactly `size` bytes when
    /// known, at most `limit`.
    async fn attempt(
        &self,
        conn: &quinn::Connection,
        store: &ContentStore,
        digest: &str,
        size: Option<u64>,
        limit: u64,
    ) -> Attempt {
        let retry = |e: &dyn std::fmt::Display| Attempt::Retry(e.to_string());
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return retry(&e),
        };
        let req = encode(&BlobRequest {
            digest: digest.to_string(),
        });
        if let Err(e) = send.write_all(&req).await {
            return retry(&e);
        }
        let _ = send.finish();
        let mut status = [0u8; 1];
        if let Err(e) = recv.read_exact(&mut status).await {
            return retry(&e);
        }
        if status[0] != BLOB_FOUND {
            let reason = recv
                .read_to_end(4096)
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            return Attempt::Fatal(FetchError::Refused {
                digest: digest.into(),
                reason,
            });
        }
        let mut len = [0u8; 8];
        if let Err(e) = recv.read_exact(&mut len).await {
            return retry(&e);
        }
        let served = u64::from_be_bytes(len);
        let fatal = |source| {
            Attempt::Fatal(FetchError::Store {
                digest: digest.to_string(),
                source,
            })
        };
        if let Some(size) = size
            && served != size
        {
            return fatal(flotilla_api::content::ContentError::WrongSize {
                digest: digest.into(),
                expected: size,
                actual: served,
            });
        }
        let mut w = match store.writer(digest, Some(served), limit) {
            Ok(w) => w,
            Err(e) => return fatal(e),
        };
        loop {
            match recv.read_chunk(256 << 10, true).await {
                Ok(Some(chunk)) => {
                    if let Err(e) = w.write(&chunk.bytes) {
                        return fatal(e);
                    }
                }
                Ok(None) => break,
                Err(e) => return retry(&e),
            }
        }
        match tokio::task::spawn_blocking(move || w.commit()).await {
            Ok(Ok(p)) => {
                tracing::info!(%digest, size = served, "fetched from the scheduler");
                Attempt::Done(p)
            }
            Ok(Err(e)) => fatal(e),
            Err(e) => retry(&e),
        }
    }
}

/// The node's link once it is up (`None`: its sender is gone, the agent is
/// stopping). Module fetches and key-value operations both wait here.
pub async fn live_link(
    link: &mut watch::Receiver<Option<quinn::Connection>>,
) -> Option<quinn::Connection> {
    link.wait_for(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
        .await
        .ok()
        .and_then(|c| c.clone())
}

/// Images through the scheduler's site cache (`--pull-via-scheduler`): the
/// same streams and checks as modules, into the image store.
impl crate::image::Mirror for ModuleFetcher {
    fn fetch<'a>(
        &'a self,
        store: &'a ContentStore,
        digest: &'a str,
        size: Option<u64>,
        limit: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            if store.has(digest) {
                return Ok(());
            }
            self.fetch_into(store, digest, size, limit)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}
