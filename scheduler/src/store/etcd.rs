//! The etcd backend: the control plane's objects in an etcd cluster
//! (`flotilla scheduler --store etcd://h1:2379,h2:2379,h3:2379`), so that
//! state outlives any one scheduler machine.
//!
//! Keys are `<prefix><key>` (`/flotilla/pods/default/web`); values are the
//! bytes the redb backend stores (JSON, Secrets sealed). An object's
//! resource version is its key's etcd `mod_revision`, so the store-wide
//! revision is etcd's: a write expecting version v is a transaction whose
//! compare is `mod_revision == v` (a creation: `create_revision == 0`), and
//! a failed compare is a [`StoreError::Conflict`] (HTTP 409). Objects
//! written by one transaction share its revision, as etcd events do.
//!
//! Reads come from memory, as with redb: a feed task lists the prefix once
//! (paged, at one revision) and then follows an etcd watch from the next
//! revision, applying each event in order to the cache and publishing it
//! to watchers. A write returns once the feed has applied its revision, so
//! a caller reads its own writes. After a disconnect the feed watches again
//! from the revision after the last it applied, so no event is missed or
//! repeated; if etcd compacted that revision meanwhile, the feed lists
//! again and publishes the difference as events. The store compacts etcd
//! itself: every [`COMPACT_EVERY`] up to the revision it had seen at the
//! previous tick, so a watcher has at least that long to resume.

use super::{Cache, Expect, Store, StoreError, WatchEvent, WriteDurability, decode, encode, stamp};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use flotilla_api::Object;
use flotilla_api::seal::Sealer;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// Items per write transaction (etcd refuses more than 128 operations in
/// one by default; each item is a compare and a put).
const TXN_ITEMS: usize = 64;
/// Bytes per write transaction (etcd's default request limit is 1.5 MiB).
const TXN_BYTES: usize = 1 << 20;
/// Keys per page when listing.
const PAGE: i64 = 500;
/// How often the store compacts etcd's history.
pub const COMPACT_EVERY: Duration = Duration::from_secs(300);
/// How long a write waits for the feed to apply it before returning anyway
/// (the write is committed; only read-your-writes is late).
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// Time limit of one etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a transaction is tried again when its compare failed but
/// every item still matched when read back (another writer raced it).
const RACE_RETRIES: usize = 4;

/// Where the store is and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix of every object (default `/flotilla/`).
    pub prefix: String,
    /// TLS to etcd: the CA that signed the members' certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for members started with `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdConfig {
    /// Parses `etcd://h1:2379,h2:2379[/prefix]`.
    pub fn parse(url: &str) -> Result<EtcdConfig, String> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            format!("{url:?} is not an etcd address; write etcd://HOST:PORT[,HOST:PORT…][/PREFIX]")
        })?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}/", p.trim_matches('/'))),
            None => (rest, "/flotilla/".to_string()),
        };
        if prefix == "//" {
            return Err(format!(
                "{url:?}: the key prefix is empty; drop the trailing /"
            ));
        }
        let endpoints: Vec<String> = hosts.split(',').map(|h| h.trim().to_string()).collect();
        for e in &endpoints {
            let ok = e
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!(
                    "{url:?}: {e:?} is not HOST:PORT (every etcd member needs its client port, e.g. 127.0.0.1:2379)"
                ));
            }
        }
        Ok(EtcdConfig {
            endpoints,
            prefix,
            ca: None,
            cert: None,
            key: None,
        })
    }

    fn options(&self) -> Result<ConnectOptions, StoreError> {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| {
                StoreError::Backend(format!("cannot read the etcd {what} {}: {e}", p.display()))
            })
        };
        if let Some(ca) = &self.ca {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca, "CA")?));
            match (&self.cert, &self.key) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(
                        read(c, "client certificate")?,
                        read(k, "client key")?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Backend(
                        "an etcd client certificate needs both --etcd-cert and --etcd-key".into(),
                    ));
                }
            }
            o = o.with_tls(tls);
        } else if self.cert.is_some() || self.key.is_some() {
            return Err(StoreError::Backend(
                "--etcd-cert and --etcd-key need --etcd-ca (client certificates are a TLS feature)"
                    .into(),
            ));
        }
        Ok(o)
    }

    fn urls(&self) -> Vec<String> {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }
}

/// How often a request that never reached etcd is tried again.
const UNSENT_RETRIES: usize = 5;

/// Whether `e` says the request never left this process: no connection
/// to the member could be made.
fn unsent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect")
        }
        _ => false,
    }
}

fn etcd(e: etcd_client::Error) -> StoreError {
    if let etcd_client::Error::GRpcStatus(s) = &e
        && matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        )
    {
        return StoreError::Unavailable(format!("etcd: {}", s.message()));
    }
    StoreError::Backend(format!("etcd: {e}"))
}

/// The cache and its feed's progress, shared with the feed task.
struct Shared {
    cache: RwLock<Cache>,
    tx: broadcast::Sender<WatchEvent>,
    /// The last revision the feed applied; writes wait on it.
    applied: Mutex<u64>,
    advanced: Condvar,
    /// Asks the feed for a progress notice (see [`Store::sync`]).
    progress: tokio::sync::Notify,
}

impl Shared {
    fn advance(&self, revision: u64) {
        let mut a = self.applied.lock().expect("poisoned");
        if revision > *a {
            *a = revision;
            self.advanced.notify_all();
        }
    }

    /// Waits until the feed has applied `revision`.
    fn wait_applied(&self, revision: u64) {
        blocking(|| {
            let a = self.applied.lock().expect("poisoned");
            let (_a, timeout) = self
                .advanced
                .wait_timeout_while(a, APPLY_WAIT, |a| *a < revision)
                .expect("poisoned");
            if timeout.timed_out() {
                tracing::warn!(
                    revision,
                    "the etcd watch has not delivered a committed write yet; reads may lag"
                );
            }
        })
    }
}

/// Runs `f`, which blocks, telling a multi-threaded tokio runtime first (so
/// its other tasks move to other workers).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// While this scheduler leads: the leader key and its creation revision
/// (the term), which every write compares, so that a deposed leader's
/// writes fail.
#[derive(Clone, Debug)]
pub(crate) struct Fence {
    pub key: String,
    pub term: i64,
}

/// The store on etcd. See the module documentation.
pub struct EtcdStore {
    client: Client,
    /// Set while this scheduler leads (see [`Fence`]).
    fence: Arc<Mutex<Option<Fence>>>,
    /// The last term a write found over (the election steps down).
    fence_lost: Arc<watch::Sender<i64>>,
    prefix: String,
    shared: Arc<Shared>,
    sealer: Option<Arc<Sealer>>,
    /// Pauses the feed (tests: a scheduler cut off from etcd's watch).
    paused: watch::Sender<bool>,
    /// Drives the client and the feed; the store's calls block on it.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl EtcdStore {
    /// Connects, loads every object under the prefix and starts following
    /// changes. Secrets are sealed with `sealer` (as in redb).
    pub fn connect(cfg: &EtcdConfig, sealer: Option<Arc<Sealer>>) -> Result<EtcdStore, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("etcd runtime: {e}")))?;
        let (urls, options) = (cfg.urls(), cfg.options()?);
        let shown = cfg.endpoints.join(",");
        let client = run(
            &rt,
            async move { Client::connect(urls, Some(options)).await },
        )
        .map_err(|e| StoreError::Backend(format!("cannot connect to etcd at {shown}: {e}")))?;
        let prefix = cfg.prefix.clone();
        let (objects, revision) = {
            let (c, p, s) = (client.clone(), prefix.clone(), sealer.clone());
            run(&rt, async move { load(c, &p, s.as_deref()).await })?
        };
        let (tx, _) = broadcast::channel(1 << 16);
        let shared = Arc::new(Shared {
            cache: RwLock::new(Cache::new(objects, revision)),
            tx,
            applied: Mutex::new(revision),
            advanced: Condvar::new(),
            progress: tokio::sync::Notify::new(),
        });
        let (paused, paused_rx) = watch::channel(false);
        rt.spawn(feed(
            client.clone(),
            prefix.clone(),
            shared.clone(),
            sealer.clone(),
            paused_rx,
        ));
        rt.spawn(compactor(client.clone(), shared.clone()));
        Ok(EtcdStore {
            client,
            fence: Arc::default(),
            fence_lost: Arc::new(watch::Sender::new(0)),
            prefix,
            shared,
            sealer,
            paused,
            rt: Some(rt),
        })
    }

    fn run<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        run(self.rt.as_ref().expect("runtime lives until drop"), f)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs `txn`, again (up to [`UNSENT_RETRIES`] times) when the request
    /// never reached a member because the one the client picked is down —
    /// the client moves to another endpoint, and nothing can have been
    /// applied, so trying again is safe.
    fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        let mut tries = 0;
        loop {
            let (mut c, t) = (self.client.clone(), txn.clone());
            match self.run(async move { c.txn(t).await }) {
                Err(e) if unsent(&e) && tries < UNSENT_RETRIES => {
                    tries += 1;
                    blocking(|| std::thread::sleep(Duration::from_millis(100 * tries as u64)));
                }
                r => return r.map_err(etcd),
            }
        }
    }

    fn fence(&self) -> Option<Fence> {
        self.fence.lock().expect("poisoned").clone()
    }

    /// Adds the fence (if this scheduler leads or led) to a transaction:
    /// its compare, and a read of the leader key last in the else branch
    /// (see [`EtcdStore::fenced`]). Returns the fence written under.
    fn fence_into(&self, compares: &mut Vec<Compare>, gets: &mut Vec<TxnOp>) -> Option<Fence> {
        let fence = self.fence();
        if let Some(f) = &fence {
            compares.push(Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.term,
            ));
            gets.push(TxnOp::get(f.key.clone(), None));
        }
        fence
    }

    /// `Some(term)` if `resp`, a failed transaction written under `fence`,
    /// failed because the leader key is no longer this term's (its read is
    /// the else branch's last); the election is told.
    fn fenced(&self, fence: &Option<Fence>, resp: &etcd_client::TxnResponse) -> Option<u64> {
        let f = fence.as_ref()?;
        if resp.succeeded() {
            return None;
        }
        let now = match resp.op_responses().last() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.create_revision()),
            _ => None,
        };
        if now == Some(f.term) {
            return None;
        }
        // Tell the election only about the term it is in (not a write that
        // set out under an older one).
        if self.fence().is_some_and(|c| c.term == f.term) {
            self.fence_lost.send_replace(f.term);
        }
        Some(f.term as u64)
    }

    /// The object at `key` as etcd holds it now, at its version.
    fn fetch(&self, key: &str) -> Result<Option<Object>, StoreError> {
        let (mut c, full) = (self.client.clone(), self.full(key));
        let resp = self
            .run(async move { c.get(full, None).await })
            .map_err(etcd)?;
        resp.kvs()
            .first()
            .map(|kv| object_of(self.sealer.as_deref(), key, kv))
            .transpose()
    }

    /// The stored object a write expecting version `v` of `key` would
    /// replace (its identity is kept): the cached one if it is at `v`,
    /// else etcd's.
    fn current_at(&self, key: &str, v: u64) -> Result<Option<Arc<Object>>, StoreError> {
        if let Some(o) = self.get(key)
            && o.meta().resource_version == v
        {
            return Ok(Some(o));
        }
        Ok(self.fetch(key)?.map(Arc::new))
    }

    /// One transaction of items with distinct keys; each result goes to its
    /// slot in `out`.
    fn write_chunk(
        &self,
        mut items: Vec<(usize, Object, Expect)>,
        out: &mut [Option<Result<Arc<Object>, StoreError>>],
    ) {
        for _ in 0..=RACE_RETRIES {
            let mut staged = Vec::with_capacity(items.len());
            let (mut compares, mut puts, mut gets) = (Vec::new(), Vec::new(), Vec::new());
            for (slot, obj, expect) in &items {
                let key = obj.key();
                let current = match expect {
                    Expect::Absent => Ok(None),
                    Expect::Version(v) => self.current_at(&key, *v),
                };
                let mut written = obj.clone();
                let bytes = current.and_then(|cur| {
                    stamp(&mut written, cur.as_deref());
                    written.meta_mut().resource_version = 0;
                    encode(self.sealer.as_deref(), &key, &written)
                });
                let bytes = match bytes {
                    Ok(b) => b,
                    Err(e) => {
                        out[*slot] = Some(Err(e));
                        continue;
                    }
                };
                let full = self.full(&key);
                compares.push(match expect {
                    Expect::Absent => Compare::create_revision(full.clone(), CompareOp::Equal, 0),
                    Expect::Version(v) => {
                        Compare::mod_revision(full.clone(), CompareOp::Equal, *v as i64)
                    }
                });
                puts.push(TxnOp::put(full.clone(), bytes, None));
                gets.push(TxnOp::get(full, None));
                staged.push((*slot, written, *expect, key));
            }
            if staged.is_empty() {
                return;
            }
            let fence = self.fence_into(&mut compares, &mut gets);
            let txn = Txn::new().when(compares).and_then(puts).or_else(gets);
            let resp = match self.txn(txn) {
                Ok(r) => r,
                Err(e) => {
                    for (slot, ..) in staged {
                        out[slot] = Some(Err(StoreError::Backend(e.to_string())));
                    }
                    return;
                }
            };
            let revision = resp.header().map_or(0, |h| h.revision()) as u64;
            if resp.succeeded() {
                self.shared.wait_applied(revision);
                for (slot, mut obj, ..) in staged {
                    obj.meta_mut().resource_version = revision;
                    out[slot] = Some(Ok(Arc::new(obj)));
                }
                return;
            }
            if let Some(term) = self.fenced(&fence, &resp) {
                for (slot, ..) in staged {
                    out[slot] = Some(Err(StoreError::Fenced(term)));
                }
                return;
            }
            // Which compares failed: read back in the else branch.
            let mut again = Vec::new();
            for ((slot, obj, expect, key), op) in staged.into_iter().zip(resp.op_responses()) {
                let now = match op {
                    TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision() as u64),
                    _ => None,
                };
                let err = match (expect, now) {
                    (Expect::Absent, Some(_)) => Some(StoreError::AlreadyExists(key)),
                    (Expect::Version(_), None) => Some(StoreError::NotFound(key)),
                    (Expect::Version(v), Some(actual)) if actual != v => {
                        Some(StoreError::Conflict {
                            key,
                            expected: v,
                            actual,
                        })
                    }
                    _ => None,
                };
                match err {
                    Some(e) => out[slot] = Some(Err(e)),
                    None => {
                        let original = items
                            .iter()
                            .find(|(s, ..)| *s == slot)
                            .map(|(_, o, _)| o.clone())
                            .unwrap_or(obj);
                        again.push((slot, original, expect));
                    }
                }
            }
            items = again;
            if items.is_empty() {
                return;
            }
        }
        for (slot, obj, _) in items {
            out[slot] = Some(Err(StoreError::Backend(format!(
                "{} kept changing under concurrent writers; try again",
                obj.key()
            ))));
        }
    }

    /// Copies `objects` in as they are (identity, creation time and
    /// generation kept; new resource versions), skipping keys that exist;
    /// `progress` hears the count after each transaction. Returns (copied,
    /// skipped). For `flotilla store migrate`.
    pub fn import(
        &self,
        objects: &[Arc<Object>],
        mut progress: impl FnMut(usize),
    ) -> Result<(usize, usize), StoreError> {
        let (mut copied, mut skipped, mut done) = (0, 0, 0);
        for chunk in objects.chunks(TXN_ITEMS) {
            // One transaction per object would be slow; one per chunk must
            // not fail as a whole because a key exists, so existing keys
            // are found first.
            let mut puts = Vec::new();
            let mut compares = Vec::new();
            for obj in chunk {
                let key = obj.key();
                let full = self.full(&key);
                if self.get(&key).is_some() {
                    skipped += 1;
                    continue;
                }
                let mut plain = (**obj).clone();
                plain.meta_mut().resource_version = 0;
                compares.push(Compare::create_revision(full.clone(), CompareOp::Equal, 0));
                puts.push(TxnOp::put(
                    full,
                    encode(self.sealer.as_deref(), &key, &plain)?,
                    None,
                ));
            }
            if !puts.is_empty() {
                let n = puts.len();
                let resp = self.txn(Txn::new().when(compares).and_then(puts))?;
                if !resp.succeeded() {
                    return Err(StoreError::Backend(
                        "another writer created some of the keys being copied; run the migration again (copied keys are skipped)".into(),
                    ));
                }
                self.shared
                    .wait_applied(resp.header().map_or(0, |h| h.revision()) as u64);
                copied += n;
            }
            done += chunk.len();
            progress(done);
        }
        Ok((copied, skipped))
    }

    /// Compacts etcd's history up to `revision` (tests; the store also
    /// does it on its own every [`COMPACT_EVERY`]).
    pub fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        self.run(async move { c.compact(revision as i64, None).await })
            .map(drop)
            .map_err(etcd)
    }

    /// Stops (`true`) or resumes the feed, as a lost watch would.
    #[doc(hidden)]
    pub fn pause_feed(&self, paused: bool) {
        let _ = self.paused.send(paused);
    }
}

fn run<F>(rt: &tokio::runtime::Runtime, f: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    blocking(|| rx.recv()).expect("the etcd runtime outlives the store's calls")
}

/// The object a key-value holds, at its version.
fn object_of(sealer: Option<&Sealer>, key: &str, kv: &KeyValue) -> Result<Object, StoreError> {
    let (mut obj, _) = decode(sealer, key, kv.value())?;
    obj.meta_mut().resource_version = kv.mod_revision() as u64;
    Ok(obj)
}

/// The first key after every key starting with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every object under `prefix` at one revision, paged.
async fn load(
    mut client: Client,
    prefix: &str,
    sealer: Option<&Sealer>,
) -> Result<(BTreeMap<String, Arc<Object>>, u64), StoreError> {
    let end = range_end(prefix);
    let mut objects = BTreeMap::new();
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0i64;
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = client.get(from.clone(), Some(opts)).await.map_err(etcd)?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            let full = kv.key_str().map_err(etcd)?;
            let key = &full[prefix.len()..];
            objects.insert(key.to_string(), Arc::new(object_of(sealer, key, kv)?));
        }
        match (resp.more(), resp.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((objects, revision as u64)),
        }
    }
}

/// Why [`follow`] stopped without an error.
enum Stopped {
    /// The next revision was compacted: list again.
    Compacted,
    /// Paused by [`EtcdStore::pause_feed`].
    Paused,
}

/// Keeps the cache following etcd for as long as the store lives.
async fn feed(
    client: Client,
    prefix: String,
    shared: Arc<Shared>,
    sealer: Option<Arc<Sealer>>,
    mut paused: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        let from = shared.cache.read().expect("poisoned").revision + 1;
        let outcome = follow(
            client.clone(),
            &prefix,
            from,
            &shared,
            sealer.as_deref(),
            &mut paused,
        )
        .await;
        match outcome {
            Ok(Stopped::Paused) => {}
            Ok(Stopped::Compacted) => {
                tracing::warn!(
                    from,
                    "etcd compacted past the store's watch; listing every object again"
                );
                if let Err(e) = relist(client.clone(), &prefix, &shared, sealer.as_deref()).await {
                    tracing::warn!("etcd list failed: {e}; trying again");
                    tokio::time::sleep(backoff).await;
                }
            }
            Err(e) => {
                tracing::warn!("etcd watch lost: {e}; resuming from revision {from}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        }
        backoff = Duration::from_millis(100);
    }
}

/// Watches from `from`, applying what arrives, until the watch ends.
async fn follow(
    mut client: Client,
    prefix: &str,
    from: u64,
    shared: &Shared,
    sealer: Option<&Sealer>,
    paused: &mut watch::Receiver<bool>,
) -> Result<Stopped, String> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from as i64)
        .with_prev_key()
        .with_progress_notify();
    let mut stream = client
        .watch(prefix, Some(opts))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m.map_err(|e| e.to_string())?,
            _ = shared.progress.notified() => {
                stream.request_progress().await.map_err(|e| e.to_string())?;
                continue;
            }
            _ = paused.changed() => {
                if *paused.borrow() {
                    return Ok(Stopped::Paused);
                }
                continue;
            }
        };
        let Some(resp) = msg else {
            return Err("the watch stream ended".into());
        };
        if resp.compact_revision() > 0 {
            return Ok(Stopped::Compacted);
        }
        if resp.canceled() {
            return Err(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            ));
        }
        let mut c = shared.cache.write().expect("poisoned");
        let mut last = c.revision;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Some(key) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(prefix))
                .map(str::to_string)
            else {
                continue;
            };
            let revision = kv.mod_revision() as u64;
            last = last.max(revision);
            match ev.event_type() {
                EventType::Put => match object_of(sealer, &key, kv) {
                    Ok(obj) => {
                        let obj = Arc::new(obj);
                        c.objects.insert(key, obj.clone());
                        c.revision = revision;
                        c.publish(
                            &shared.tx,
                            WatchEvent {
                                revision,
                                deleted: false,
                                object: obj,
                            },
                        );
                    }
                    Err(e) => tracing::error!("skipping an object etcd holds: {e}"),
                },
                EventType::Delete => {
                    let held = c.objects.remove(&key);
                    let before = ev
                        .prev_kv()
                        .and_then(|p| object_of(sealer, &key, p).ok().map(Arc::new))
                        .or(held);
                    c.revision = revision;
                    if let Some(object) = before {
                        c.publish(
                            &shared.tx,
                            WatchEvent {
                                revision,
                                deleted: true,
                                object,
                            },
                        );
                    }
                }
            }
        }
        // A progress notice (no events) says everything up to its header's
        // revision was sent.
        if resp.events().is_empty()
            && let Some(h) = resp.header()
        {
            last = last.max(h.revision() as u64);
        }
        c.revision = c.revision.max(last);
        drop(c);
        shared.advance(last);
    }
}

/// Lists every object again and publishes what changed since the cache's
/// view, as events at the list's revision.
async fn relist(
    client: Client,
    prefix: &str,
    shared: &Shared,
    sealer: Option<&Sealer>,
) -> Result<(), StoreError> {
    let (objects, revision) = load(client, prefix, sealer).await?;
    let mut c = shared.cache.write().expect("poisoned");
    let gone: Vec<String> = c
        .objects
        .keys()
        .filter(|k| !objects.contains_key(*k))
        .cloned()
        .collect();
    let mut events = Vec::new();
    for key in gone {
        if let Some(object) = c.objects.remove(&key) {
            events.push(WatchEvent {
                revision,
                deleted: true,
                object,
            });
        }
    }
    for (key, obj) in objects {
        let changed = c
            .objects
            .get(&key)
            .is_none_or(|held| held.meta().resource_version != obj.meta().resource_version);
        if changed {
            c.objects.insert(key, obj.clone());
            events.push(WatchEvent {
                revision,
                deleted: false,
                object: obj,
            });
        }
    }
    c.revision = c.revision.max(revision);
    // Watchers behind this point cannot be served from history any more.
    c.forget_before(revision);
    for ev in events {
        c.publish(&shared.tx, ev);
    }
    drop(c);
    shared.advance(revision);
    Ok(())
}

/// Compacts etcd every [`COMPACT_EVERY`] to the revision seen one period
/// earlier. Several schedulers may all do it; a revision already compacted
/// is not an error worth more than a debug line.
async fn compactor(mut client: Client, shared: Arc<Shared>) {
    let mut seen = 0u64;
    loop {
        tokio::time::sleep(COMPACT_EVERY).await;
        if seen > 0
            && let Err(e) = client.compact(seen as i64, None).await
        {
            tracing::debug!("etcd compaction to {seen}: {e}");
        }
        seen = *shared.applied.lock().expect("poisoned");
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Option<Arc<Object>> {
        self.shared
            .cache
            .read()
            .expect("poisoned")
            .objects
            .get(key)
            .cloned()
    }

    fn list(&self, prefix: &str) -> Vec<Arc<Object>> {
        self.shared.cache.read().expect("poisoned").range(prefix)
    }

    /// Items go in transactions of at most [`TXN_ITEMS`] (and
    /// [`TXN_BYTES`]), in order; a key met twice starts a new one, so a
    /// later item sees the earlier one written. Unlike redb, a batch larger
    /// than one transaction is not atomic as a whole.
    fn put_many(
        &self,
        items: Vec<(Object, Expect)>,
        _durability: WriteDurability,
    ) -> Vec<Result<Arc<Object>, StoreError>> {
        let mut out: Vec<Option<Result<Arc<Object>, StoreError>>> =
            (0..items.len()).map(|_| None).collect();
        let mut chunk = Vec::new();
        let (mut keys, mut bytes) = (HashSet::new(), 0usize);
        for (slot, (obj, expect)) in items.into_iter().enumerate() {
            let key = obj.key();
            // A rough size: what the JSON will be, near enough.
            let size = serde_json::to_vec(&obj).map_or(0, |v| v.len());
            if chunk.len() == TXN_ITEMS
                || keys.contains(&key)
                || (bytes + size > TXN_BYTES && !chunk.is_empty())
            {
                self.write_chunk(std::mem::take(&mut chunk), &mut out);
                keys.clear();
                bytes = 0;
            }
            keys.insert(key);
            bytes += size;
            chunk.push((slot, obj, expect));
        }
        if !chunk.is_empty() {
            self.write_chunk(chunk, &mut out);
        }
        out.into_iter()
            .map(|r| r.expect("every item has a result"))
            .collect()
    }

    fn delete(&self, key: &str, expect: Option<u64>) -> Result<Arc<Object>, StoreError> {
        let full = self.full(key);
        let compare = match expect {
            Some(v) => Compare::mod_revision(full.clone(), CompareOp::Equal, v as i64),
            None => Compare::create_revision(full.clone(), CompareOp::Greater, 0),
        };
        let (mut compares, mut gets) = (vec![compare], vec![TxnOp::get(full.clone(), None)]);
        let fence = self.fence_into(&mut compares, &mut gets);
        let txn = Txn::new()
            .when(compares)
            .and_then(vec![TxnOp::delete(
                full,
                Some(etcd_client::DeleteOptions::new().with_prev_key()),
            )])
            .or_else(gets);
        let resp = self.txn(txn)?;
        if let Some(term) = self.fenced(&fence, &resp) {
            return Err(StoreError::Fenced(term));
        }
        let revision = resp.header().map_or(0, |h| h.revision()) as u64;
        let answer = resp.op_responses().into_iter().next();
        if resp.succeeded() {
            let prev = match answer {
                Some(TxnOpResponse::Delete(d)) => d.prev_kvs().first().cloned(),
                _ => None,
            };
            let prev = prev.ok_or_else(|| StoreError::NotFound(key.to_string()))?;
            let obj = object_of(self.sealer.as_deref(), key, &prev)?;
            self.shared.wait_applied(revision);
            return Ok(Arc::new(obj));
        }
        let now = match answer {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.mod_revision() as u64),
            _ => None,
        };
        Err(match (now, expect) {
            (None, _) => StoreError::NotFound(key.to_string()),
            (Some(actual), Some(expected)) => StoreError::Conflict {
                key: key.to_string(),
                expected,
                actual,
            },
            (Some(_), None) => {
                StoreError::Backend(format!("{key} could not be deleted; try again"))
            }
        })
    }

    fn revision(&self) -> u64 {
        self.shared.cache.read().expect("poisoned").revision
    }

    fn snapshot(&self, prefix: &str) -> (u64, Vec<Arc<Object>>) {
        let c = self.shared.cache.read().expect("poisoned");
        (c.revision, c.range(prefix))
    }

    fn watch_from(
        &self,
        revision: u64,
    ) -> Result<(Vec<WatchEvent>, broadcast::Receiver<WatchEvent>), StoreError> {
        self.shared
            .cache
            .read()
            .expect("poisoned")
            .watch_from(&self.shared.tx, revision)
    }

    /// Every write is durable in etcd (a quorum's WAL) when it returns.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Asks etcd for its current revision (a linearizable read of one key
    /// of the prefix) and waits until the feed has applied it.
    fn sync(&self) -> Result<(), StoreError> {
        let (mut c, key) = (self.client.clone(), self.prefix.clone());
        let resp = self
            .run(async move {
                c.get(key, Some(GetOptions::new().with_prefix().with_count_only()))
                    .await
            })
            .map_err(etcd)?;
        let revision = resp.header().map_or(0, |h| h.revision()) as u64;
        if *self.shared.applied.lock().expect("poisoned") < revision {
            // The revision may be of a write outside the prefix, which the
            // watch never shows: a progress notice covers it.
            self.shared.progress.notify_one();
            self.shared.wait_applied(revision);
        }
        Ok(())
    }

    fn reseal(&self) -> Result<usize, StoreError> {
        if self.sealer.is_none() {
            return Ok(0);
        }
        let secrets: Vec<(Object, Expect)> = self
            .list("secrets/")
            .into_iter()
            .map(|o| {
                let v = o.meta().resource_version;
                ((*o).clone(), Expect::Version(v))
            })
            .collect();
        let n = secrets.len();
        for r in self.put_many(secrets, WriteDurability::Sync) {
            r?;
        }
        Ok(n)
    }
}

pub mod elect;
pub mod local;
#[cfg(test)]
mod tests;
