//! The writing half of an agent session. Frames leave in the order they
//! were queued, cluster-wide tables in parts (see
//! [`flotilla_api::proto::table_messages`]), except heartbeat
//! acknowledgements: they overtake a table between two of its parts, so a
//! node's lease never waits behind megabytes of services or pods. The
//! session's reading half never waits for a write either.
//!
//! The service and peer tables are followed by the writer itself, always
//! sending the newest one: a slow agent gets fewer tables, never a queue of
//! stale ones. Each table version is encoded once for every session.

use flotilla_api::proto::{Peer, SchedulerMsg, ServiceView, TABLE_PART_LEN, Table, encode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OnceCell, mpsc, watch};

/// Most bytes of frames a session queues for its node; a node that reads
/// slower than that falls behind is disconnected (it reconnects and gets
/// its whole state again) rather than growing the scheduler.
pub const MAX_QUEUED: usize = 64 << 20;

/// Encoded frames of one table.
pub type Frames = Arc<Vec<Vec<u8>>>;

/// The frames of the newest version of a published table, shared by every
/// session: the first writer to need them encodes them, the others wait
/// for that (the table is kept so the entry is never mistaken for another
/// version at the same address).
pub struct FrameCache<T> {
    last: Mutex<Option<CacheEntry<T>>>,
}

/// A table version and the cell its frames go in.
type CacheEntry<T> = (Arc<Vec<T>>, Arc<OnceCell<Frames>>);

impl<T> Default for FrameCache<T> {
    fn default() -> Self {
        FrameCache {
            last: Mutex::new(None),
        }
    }
}

impl<T> FrameCache<T> {
    /// The cell that holds (or will hold) `table`'s frames.
    fn cell(&self, table: &Arc<Vec<T>>) -> Arc<OnceCell<Frames>> {
        let mut last = self.last.lock().expect("poisoned");
        match &*last {
            Some((t, c)) if Arc::ptr_eq(t, table) => c.clone(),
            _ => {
                let c = Arc::new(OnceCell::new());
                *last = Some((table.clone(), c.clone()));
                c
            }
        }
    }
}

/// The caches of the two published tables.
#[derive(Default)]
pub struct TableFrames {
    pub services: FrameCache<ServiceView>,
    pub peers: FrameCache<Peer>,
}

enum Out {
    Frame(Vec<u8>),
    Table(Table),
}

/// Encodes a whole table as its frames.
fn encode_table(table: Table) -> Frames {
    let msgs = flotilla_api::proto::table_messages(table, TABLE_PART_LEN);
    Arc::new(msgs.iter().map(encode).collect())
}

/// Where a session queues what it sends.
pub struct Outbox {
    normal: mpsc::UnboundedSender<Out>,
    urgent: mpsc::UnboundedSender<Vec<u8>>,
    failed: Arc<Mutex<Option<String>>>,
    /// Bytes of frames queued and not yet written.
    queued: Arc<AtomicUsize>,
    parked: Option<(
        mpsc::UnboundedReceiver<Out>,
        mpsc::UnboundedReceiver<Vec<u8>>,
    )>,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new()
    }
}

impl Outbox {
    /// An outbox whose frames wait until [`Outbox::start`].
    pub fn new() -> Outbox {
        let (normal, normal_rx) = mpsc::unbounded_channel();
        let (urgent, urgent_rx) = mpsc::unbounded_channel();
        Outbox {
            normal,
            urgent,
            failed: Arc::default(),
            queued: Arc::default(),
            parked: Some((normal_rx, urgent_rx)),
        }
    }

    /// Queues a message; `Err` when the node has fallen [`MAX_QUEUED`]
    /// behind (or the writer ended).
    pub fn send(&self, msg: &SchedulerMsg) -> Result<(), String> {
        let frame = encode(msg);
        let queued = self.queued.fetch_add(frame.len(), Ordering::Relaxed) + frame.len();
        if queued > MAX_QUEUED {
            return Err(format!(
                "the node reads too slowly: {} MiB waiting to be sent",
                queued >> 20
            ));
        }
        self.normal.send(Out::Frame(frame)).map_err(|_| self.why())
    }

    /// Queues a whole table, encoded and sent in parts by the writer.
    pub fn table(&self, table: Table) -> Result<(), String> {
        self.normal.send(Out::Table(table)).map_err(|_| self.why())
    }

    /// Queues a message that overtakes a table being sent.
    pub fn urgent(&self, msg: &SchedulerMsg) -> Result<(), String> {
        self.urgent.send(encode(msg)).map_err(|_| self.why())
    }

    fn why(&self) -> String {
        self.failed
            .lock()
            .expect("poisoned")
            .clone()
            .unwrap_or_else(|| "the session's writer ended".into())
    }

    /// Starts writing to `tx`: first what was queued so far, then the
    /// tables of `services` and `peers` (current, then every change)
    /// among whatever is queued later.
    pub fn start(
        &mut self,
        tx: quinn::SendStream,
        services: watch::Receiver<Arc<Vec<ServiceView>>>,
        peers: watch::Receiver<Arc<Vec<Peer>>>,
        cache: Arc<TableFrames>,
    ) -> tokio::task::JoinHandle<()> {
        let (normal, urgent) = self.parked.take().expect("an outbox starts once");
        let failed = self.failed.clone();
        let mut w = Writer {
            tx,
            normal,
            urgent,
            services,
            peers,
            cache,
            queued: self.queued.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = w.run().await {
                *failed.lock().expect("poisoned") = Some(e);
            }
        })
    }
}

struct Writer {
    tx: quinn::SendStream,
    normal: mpsc::UnboundedReceiver<Out>,
    urgent: mpsc::UnboundedReceiver<Vec<u8>>,
    services: watch::Receiver<Arc<Vec<ServiceView>>>,
    peers: watch::Receiver<Arc<Vec<Peer>>>,
    cache: Arc<TableFrames>,
    queued: Arc<AtomicUsize>,
}

impl Writer {
    async fn run(&mut self) -> Result<(), String> {
        self.services.mark_changed();
        self.peers.mark_changed();
        loop {
            tokio::select! {
                biased;
                f = self.urgent.recv() => match f {
                    Some(f) => self.write(&f).await?,
                    None => return Ok(()),
                },
                out = self.normal.recv() => match out {
                    Some(Out::Frame(f)) => {
                        self.write(&f).await?;
                        self.queued.fetch_sub(f.len(), Ordering::Relaxed);
                    }
                    Some(Out::Table(t)) => {
                        let frames = self.encode(Arc::new(OnceCell::new()), move || t).await?;
                        self.write_parts(&frames).await?;
                    }
                    None => return Ok(()),
                },
                r = self.services.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    let t = self.services.borrow_and_update().clone();
                    let cell = self.cache.services.cell(&t);
                    let frames = self.encode(cell, move || Table::Services(t.to_vec())).await?;
                    self.write_parts(&frames).await?;
                }
                r = self.peers.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    let t = self.peers.borrow_and_update().clone();
                    let cell = self.cache.peers.cell(&t);
                    let frames = self.encode(cell, move || Table::Peers(t.to_vec())).await?;
                    self.write_parts(&frames).await?;
                }
            }
        }
    }

    async fn write(&mut self, frame: &[u8]) -> Result<(), String> {
        self.tx
            .write_all(frame)
            .await
            .map_err(|e| format!("send: {e}"))
    }

    /// Writes a table's parts, letting urgent frames through between them.
    async fn write_parts(&mut self, frames: &[Vec<u8>]) -> Result<(), String> {
        for f in frames {
            self.write(f).await?;
            while let Ok(u) = self.urgent.try_recv() {
                self.write(&u).await?;
            }
        }
        Ok(())
    }

    /// The frames of a table: encoded off the async workers by the first
    /// session that needs them (the others wait for that one), writing
    /// urgent frames meanwhile.
    async fn encode(
        &mut self,
        cell: Arc<OnceCell<Frames>>,
        table: impl FnOnce() -> Table + Send + 'static,
    ) -> Result<Frames, String> {
        let job = async move {
            cell.get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || encode_table(table()))
                    .await
                    .map_err(|e| format!("encoding a table: {e}"))
            })
            .await
            .cloned()
        };
        tokio::pin!(job);
        loop {
            tokio::select! {
                biased;
                done = &mut job => return done,
                Some(u) = self.urgent.recv() => self.write(&u).await?,
            }
        }
    }
}
