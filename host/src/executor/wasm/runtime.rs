//! The wasm executor: one wasmtime `Engine` per agent with the pooling
//! allocator, compiled artifacts cached on disk by content digest, one
//! `InstancePre` per module, and a fresh `Store` per run with memory limits,
//! CPU-time accounting through epoch interruption, and logs.

use super::interfaces::{Workload, WorkloadView};
use crate::logs::LogSink;
pub use flotilla_api::manifest::digest_of;
use flotilla_api::{Labels, TerminationReason};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{
    CallHook, Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder,
    UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Settings of the wasm executor.
#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// Directory for compiled artifacts (`<digest>.<kind>.cwasm`); owned by the agent.
    pub cache_dir: PathBuf,
    /// Upper bound on concurrently running members (pool size).
    pub max_instances: u32,
    /// Largest linear memory any member may have, whatever its spec says.
    pub max_memory: u64,
    /// Epoch tick: the granularity of CPU accounting and of preemption.
    pub tick: Duration,
}

impl WasmConfig {
    pub fn new(cache_dir: PathBuf) -> WasmConfig {
        WasmConfig {
            cache_dir,
            max_instances: 4096,
            max_memory: 512 << 20,
            tick: Duration::from_millis(10),
        }
    }
}

/// Why a module could not be made ready to run.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot read module {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "module {path} has digest {actual}, but {expected} was applied; re-apply the manifest after rebuilding"
    )]
    DigestMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("not a valid wasm module or component: {0}")]
    Compile(String),
    #[error("cannot link: {0}")]
    Link(String),
    #[error("engine setup failed: {0}")]
    Engine(String),
}

/// A module or component that is compiled and linked, ready to instantiate.
pub enum Prepared {
    Module(InstancePre<Host>),
    /// A component, with what it exports: `wasi:cli/run` (it runs as a
    /// member) and/or `wasi:http/incoming-handler` (it is served one
    /// instance per request).
    Component {
        pre: wasmtime::component::InstancePre<Host>,
        command: Option<CommandPre<Host>>,
        proxy: Option<ProxyPre<Host>>,
        /// Its imports of interfaces a member must ask for
        /// (`wasi:config`, `wasi:keyvalue`, `wasi:logging`).
        gated: Vec<String>,
    },
}

/// How one run of a member ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub reason: TerminationReason,
    pub message: String,
}

impl Exit {
    pub fn new(code: i32, reason: TerminationReason, message: impl Into<String>) -> Exit {
        Exit {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn success(&self) -> bool {
        self.code == 0 && self.reason == TerminationReason::Completed
    }
}

/// Per-run parameters.
pub struct RunSpec<'a> {
    pub argv0: &'a str,
    pub args: &'a [String],
    pub env: &'a Labels,
    /// Directories the guest sees (WASI preopens, as `wasmtime --dir
    /// HOST::GUEST`; read-only ones with read permissions only).
    pub preopens: &'a [crate::volume::ResolvedMount],
    /// File operations run on the calling thread (members on a pod's own
    /// thread) instead of going through the blocking pool each time.
    pub blocking_io: bool,
    pub memory_limit: Option<u64>,
    pub cpu_time: Option<Duration>,
    /// The member's share of a core in millicores (its `cpu`): over it,
    /// the guest is held back (0: no limit).
    pub cpu_millis: u64,
    pub log: LogSink,
    /// The member may use WASI sockets (TCP and UDP; its pod has a network
    /// namespace and the member runs on the pod's thread inside it).
    pub network: bool,
    /// Where the size of its linear memories is kept for metrics.
    pub usage: Option<Arc<crate::metrics::Usage>>,
    /// Hosts `wasi:http/outgoing-handler` may reach (none by default).
    pub outgoing: super::http::Outgoing,
    /// The host interfaces the member asked for, and their providers.
    pub workload: &'a Workload,
}

/// Most core instances, tables and linear memories one member may make (a
/// component is several core instances): enough for what toolchains emit,
/// and a bound on how much of the shared pool one tenant can take.
pub const MEMBER_INSTANCES: usize = 64;
pub const MEMBER_TABLES: usize = 64;
pub const MEMBER_MEMORIES: usize = 16;

/// A member's limits: its memory limit counts all its linear memories
/// together (a component may have many), and it remembers whether it
/// refused a growth (for OOMKilled).
pub struct MemLimiter {
    inner: StoreLimits,
    /// Bytes of all the member's linear memories.
    total: usize,
    limit: usize,
    hit: bool,
    usage: Option<Arc<crate::metrics::Usage>>,
}

impl MemLimiter {
    pub fn new(limit: usize) -> MemLimiter {
        MemLimiter {
            inner: StoreLimitsBuilder::new()
                .memory_size(limit)
                .instances(MEMBER_INSTANCES)
                .tables(MEMBER_TABLES)
                .memories(MEMBER_MEMORIES)
                .trap_on_grow_failure(true)
                .build(),
            total: 0,
            limit,
            hit: false,
            usage: None,
        }
    }
}

impl ResourceLimiter for MemLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total.saturating_sub(current) + desired;
        let r = match self.inner.memory_growing(current, desired, maximum) {
            Ok(true) if total > self.limit => Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes reached (all linear memories together)",
                self.limit
            ))),
            other => other,
        };
        match r {
            Ok(true) => {
                self.total = total;
                if let Some(u) = &self.usage {
                    u.memory_bytes
                        .store(total as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ => self.hit = true,
        }
        r
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

enum Wasi {
    P1(WasiP1Ctx),
    P2 { ctx: WasiCtx, table: ResourceTable },
}

/// Store data of one running member.
pub struct Host {
    limiter: MemLimiter,
    wasi: Wasi,
    /// `wasi:http` state (used by components served per request).
    http: WasiHttpCtx,
    /// Where `wasi:http/outgoing-handler` may go.
    outgoing: super::http::Outgoing,
    /// What `wasi:config`, `wasi:keyvalue` and `wasi:logging` give it.
    workload: Workload,
    /// Its log (`wasi:logging` writes there too).
    log: LogSink,
    ticks: u64,
    tick_budget: Option<u64>,
    quota: Option<CpuQuota>,
}

/// A member may bank its share of this much time while it uses less (as
/// the kernel's CFS quota period does for containers): 100 ms for a whole
/// core, 0.2 ms for 2 millicores.
const CPU_PERIOD: Duration = Duration::from_millis(100);

/// Where a guest (re)started running: its thread and that thread's CPU
/// time then.
type Mark = Arc<Mutex<Option<(std::thread::ThreadId, u64)>>>;

/// Starts the meter on this thread.
fn mark_start(mark: &Mark) {
    *mark.lock().expect("poisoned") =
        Some((std::thread::current().id(), crate::metrics::thread_cpu_ns()));
}

/// Holds a member to its share of a core. What the guest's wasm uses is
/// measured in its thread's CPU time, from where it starts running (a call
/// into wasm, a return from a host call, a resume after a yield) to where
/// it stops (a call to the host, a return, an epoch tick) — so neither
/// time spent waiting in host calls nor time the OS gave other threads
/// counts; a stretch that changed threads (an async host call moved the
/// task) is not counted. That use spends a token bucket that fills at
/// `millis`/1000 of real time, up to that share of [`CPU_PERIOD`]; at an
/// epoch tick a guest in debt sleeps until it is out.
struct CpuQuota {
    millis: u64,
    mark: Mark,
    /// Banked CPU time in nanoseconds (negative: owed).
    tokens: i128,
    refilled: Instant,
}

impl CpuQuota {
    fn new(millis: u64, now: Instant) -> CpuQuota {
        CpuQuota {
            millis,
            mark: Arc::default(),
            tokens: Self::burst(millis),
            refilled: now,
        }
    }

    /// What may be banked, in nanoseconds.
    fn burst(millis: u64) -> i128 {
        CPU_PERIOD.as_nanos() as i128 * i128::from(millis) / 1000
    }

    /// Stops the meter: what ran on this thread since the mark is spent.
    fn stop(&mut self) {
        let mark = self.mark.lock().expect("poisoned").take();
        if let Some((thread, at)) = mark
            && thread == std::thread::current().id()
        {
            self.spend(crate::metrics::thread_cpu_ns().saturating_sub(at));
        }
    }

    fn spend(&mut self, ns: u64) {
        self.tokens -= i128::from(ns);
    }

    /// Refills the bucket for the time since the last look; returns how
    /// long the guest must wait to be out of debt, if it is in debt.
    fn settle(&mut self, now: Instant) -> Option<Duration> {
        let since = now.saturating_duration_since(self.refilled).as_nanos() as i128;
        self.refilled = now;
        self.tokens =
            (self.tokens + since * self.millis as i128 / 1000).min(Self::burst(self.millis));
        (self.tokens < 0).then(|| {
            Duration::from_nanos((-self.tokens * 1000 / self.millis.max(1) as i128) as u64)
        })
    }
}

impl Host {
    fn workload(&mut self) -> WorkloadView<'_> {
        match &mut self.wasi {
            Wasi::P2 { table, .. } => WorkloadView {
                workload: &self.workload,
                table,
                log: &self.log,
            },
            // Only components are linked with these interfaces.
            Wasi::P1(_) => unreachable!("a core module called a component interface"),
        }
    }

    fn p1(&mut self) -> &mut WasiP1Ctx {
        match &mut self.wasi {
            Wasi::P1(c) => c,
            Wasi::P2 { .. } => panic!("a preview-1 module ran in a component store"),
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        match &mut self.wasi {
            Wasi::P2 { table, .. } => WasiHttpCtxView {
                ctx: &mut self.http,
                table,
                hooks: &mut self.outgoing,
            },
            Wasi::P1(_) => panic!("wasi:http used from a preview-1 store"),
        }
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        match &mut self.wasi {
            Wasi::P2 { ctx, table } => WasiCtxView { ctx, table },
            Wasi::P1(_) => panic!("a component ran in a preview-1 store"),
        }
    }
}

/// Raised from the epoch callback when a member used up its CPU time.
#[derive(Debug)]
struct CpuTimeExceeded;

impl std::fmt::Display for CpuTimeExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CPU time limit exceeded")
    }
}

impl std::error::Error for CpuTimeExceeded {}

/// The agent's wasm executor.
pub struct WasmRuntime {
    engine: Engine,
    modules: Linker<Host>,
    components: wasmtime::component::Linker<Host>,
    cfg: WasmConfig,
    /// One cell per module digest: concurrent pods of one module compile it once.
    prepared: Mutex<HashMap<String, Arc<OnceCell<Arc<Prepared>>>>>,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// Address space reserved per linear memory: 4 GiB, so any 32-bit index
/// lands inside the slot or its guard and Cranelift emits no bounds checks
/// (explicit checks made a large component's first compile 1.4× slower and
/// its code slower to run). Reserved, not committed: a slot costs no memory
/// until a member touches it. The guard covers static offsets up to 32 MiB
/// (wasmtime's default).
const SLOT_RESERVATION: u64 = 4 << 30;
const SLOT_GUARD: u64 = 32 << 20;

/// The engine settings every agent uses: the pooling allocator sized by
/// `cfg`, 4 GiB slots, epoch interruption, stack limits. (Public so
/// benchmarks can give a bare-wasmtime reference the very same engine.)
pub fn engine_config(cfg: &WasmConfig) -> Config {
    let mut config = compact_engine_config(cfg);
    config
        .memory_reservation(SLOT_RESERVATION.max(cfg.max_memory))
        .memory_guard_size(SLOT_GUARD);
    config
}

/// Like [`engine_config`] with slots only as large as the memory limit:
/// for machines that refuse to reserve the address space 4 GiB slots take
/// (a strict overcommit policy or an address-space limit).
pub fn compact_engine_config(cfg: &WasmConfig) -> Config {
    let n = cfg.max_instances;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(4))
        .total_memories(n.saturating_mul(2))
        .total_tables(n.saturating_mul(4))
        .total_stacks(n)
        .max_memories_per_module(MEMBER_MEMORIES as u32)
        .max_tables_per_module(MEMBER_TABLES as u32)
        .max_memory_size(cfg.max_memory as usize);
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .memory_reservation(cfg.max_memory)
        .memory_guard_size(64 << 10)
        .async_stack_size(1 << 20)
        // Pooled stacks are wiped (decommitted) when a member ends: no
        // tenant's stack data reaches the next guest, and the pages of
        // ended members leave memory.
        .async_stack_zeroing(true)
        .max_wasm_stack(512 << 10)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

impl WasmRuntime {
    pub fn new(cfg: WasmConfig) -> Result<WasmRuntime, PrepareError> {
        let engine_err = |e: wasmtime::Error| PrepareError::Engine(format!("{e:#}"));
        std::fs::create_dir_all(&cfg.cache_dir).map_err(|e| PrepareError::Read {
            path: cfg.cache_dir.display().to_string(),
            source: e,
        })?;
        let engine = match Engine::new(&engine_config(&cfg)) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(
                    "cannot reserve 4 GiB per wasm memory slot ({e:#}); using {} MiB slots with explicit bounds checks",
                    cfg.max_memory >> 20
                );
                Engine::new(&compact_engine_config(&cfg)).map_err(engine_err)?
            }
        };

        let mut modules = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut modules, Host::p1).map_err(engine_err)?;
        let mut components = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut components).map_err(engine_err)?;
        sockets::add_to_linker(&mut components).map_err(engine_err)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut components)
            .map_err(engine_err)?;
        super::interfaces::add_to_linker(&mut components, Host::workload).map_err(engine_err)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            let tick = cfg.tick;
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| PrepareError::Engine(e.to_string()))?;
        }
        Ok(WasmRuntime {
            engine,
            modules,
            components,
            cfg,
            prepared: Mutex::new(HashMap::new()),
            ticker_stop,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles (or loads from the cache) and links the module at `path`.
    /// `expected_digest`, when not empty, must match the file's bytes.
    pub async fn prepare(
        self: &Arc<Self>,
        path: &Path,
        expected_digest: &str,
    ) -> Result<Arc<Prepared>, PrepareError> {
        let bytes = read_module(path).await?;
        let digest = digest_of(&bytes);
        if !expected_digest.is_empty() && digest != expected_digest {
            return Err(PrepareError::DigestMismatch {
                path: path.display().to_string(),
                expected: expected_digest.to_string(),
                actual: digest,
            });
        }
        self.prepare_bytes(bytes, digest).await
    }

    /// Like [`WasmRuntime::prepare`] for a blob of a content store, which
    /// was verified against `digest` as it was written (and synced before
    /// it was renamed into place): not hashed again.
    pub async fn prepare_verified(
        self: &Arc<Self>,
        path: &Path,
        digest: &str,
    ) -> Result<Arc<Prepared>, PrepareError> {
        if digest.is_empty() {
            return self.prepare(path, "").await;
        }
        // Held compiled in memory: no file is looked at.
        let held = self
            .prepared
            .lock()
            .expect("poisoned")
            .get(digest)
            .and_then(|c| c.get().cloned());
        if let Some(p) = held {
            return Ok(p);
        }
        let compiled = ["module", "component"]
            .iter()
            .any(|k| self.cache_path(digest, k).exists());
        if compiled {
            // Compiled before: the artifact is all that is read (unless it
            // turns out stale, then the module is compiled again).
            if let Ok(p) = self.prepare_bytes(Vec::new(), digest.to_string()).await {
                return Ok(p);
            }
        }
        let bytes = read_module(path).await?;
        self.prepare_bytes(bytes, digest.to_string()).await
    }

    async fn prepare_bytes(
        self: &Arc<Self>,
        bytes: Vec<u8>,
        digest: String,
    ) -> Result<Arc<Prepared>, PrepareError> {
        let cell = self
            .prepared
            .lock()
            .expect("poisoned")
            .entry(digest.clone())
            .or_default()
            .clone();
        // A failure leaves the cell empty, so a later pod tries again.
        cell.get_or_try_init(|| async {
            let this = self.clone();
            let prepared = tokio::task::spawn_blocking(move || {
                let prepared = this.compile_and_link(&bytes, &digest);
                // A compilation's peak does not stay resident.
                drop(bytes);
                trim_heap();
                prepared
            })
            .await
            .map_err(|e| PrepareError::Compile(e.to_string()))??;
            Ok(Arc::new(prepared))
        })
        .await
        .cloned()
    }

    /// Drops compiled code that no pod holds any more (it stays cached on
    /// disk, so a later pod loads it again in milliseconds) and gives the
    /// heap's free pages back to the OS; returns how many were dropped.
    pub fn release_unused(&self) -> usize {
        let mut cells = self.prepared.lock().expect("poisoned");
        let before = cells.len();
        // A cell someone else holds is being prepared or is in use.
        cells.retain(|_, c| {
            Arc::strong_count(c) > 1 || c.get().is_some_and(|p| Arc::strong_count(p) > 1)
        });
        let dropped = before - cells.len();
        drop(cells);
        trim_heap_soon();
        dropped
    }

    /// Number of distinct modules held compiled in memory.
    pub fn prepared_count(&self) -> usize {
        let cells = self.prepared.lock().expect("poisoned");
        cells.values().filter(|c| c.initialized()).count()
    }

    fn cache_path(&self, digest: &str, kind: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.cfg.cache_dir.join(format!("{hex}.{kind}.cwasm"))
    }

    /// The compiled module or component for `digest`: the cached artifact
    /// if there is one, else `bytes` compiled straight into an artifact
    /// that is written to the cache and mapped from there (code and memory
    /// images stay file-backed: they leave memory with the last pod using
    /// them, and no second copy is made to serialize).
    fn compile_and_link(&self, bytes: &[u8], digest: &str) -> Result<Prepared, PrepareError> {
        let link = |e: wasmtime::Error| PrepareError::Link(format!("{e:#}"));
        let compile = |e: wasmtime::Error| PrepareError::Compile(format!("{e:#}"));
        let component_cache = self.cache_path(digest, "component");
        let is_component = if bytes.is_empty() {
            component_cache.exists()
        } else {
            bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0]
        };
        let kind = if is_component { "component" } else { "module" };
        let cached = self.cache_path(digest, kind);
        let precompiled = || -> Result<Vec<u8>, PrepareError> {
            if bytes.is_empty() {
                return Err(PrepareError::Compile(
                    "the compiled artifact went missing from the cache".into(),
                ));
            }
            let art = if is_component {
                self.engine.precompile_component(bytes)
            } else {
                self.engine.precompile_module(bytes)
            };
            art.map_err(compile)
        };
        if is_component {
            // SAFETY (both): the cache directory is written only by this
            // agent, with artifacts it compiled itself (atomically renamed
            // into place); an in-memory artifact is one it just made.
            let component = match self.load_cached(&cached, |p| unsafe {
                Component::deserialize_file(&self.engine, p)
            }) {
                Some(c) => c,
                None => {
                    let art = precompiled()?;
                    match store_artifact(&cached, &art) {
                        true => unsafe { Component::deserialize_file(&self.engine, &cached) },
                        false => unsafe { Component::deserialize(&self.engine, &art) },
                    }
                    .map_err(compile)?
                }
            };
            let gated = super::interfaces::gated_imports(&component, &self.engine);
            let pre = self.components.instantiate_pre(&component).map_err(link)?;
            let command = CommandPre::new(pre.clone()).ok();
            let proxy = ProxyPre::new(pre.clone()).ok();
            if command.is_none() && proxy.is_none() {
                return Err(PrepareError::Link(
                    "the component exports neither wasi:cli/run (a command) nor wasi:http/incoming-handler (a function)".into(),
                ));
            }
            Ok(Prepared::Component {
                pre,
                command,
                proxy,
                gated,
            })
        } else {
            let module = match self.load_cached(&cached, |p| unsafe {
                Module::deserialize_file(&self.engine, p)
            }) {
                Some(m) => m,
                None => {
                    let art = precompiled()?;
                    match store_artifact(&cached, &art) {
                        true => unsafe { Module::deserialize_file(&self.engine, &cached) },
                        false => unsafe { Module::deserialize(&self.engine, &art) },
                    }
                    .map_err(compile)?
                }
            };
            if module.get_export("_start").is_none() {
                return Err(PrepareError::Link(
                    "module has no _start export; only WASI commands can run as members".into(),
                ));
            }
            Ok(Prepared::Module(
                self.modules.instantiate_pre(&module).map_err(link)?,
            ))
        }
    }

    fn load_cached<T>(
        &self,
        path: &Path,
        load: impl FnOnce(&Path) -> wasmtime::Result<T>,
    ) -> Option<T> {
        if !path.exists() {
            return None;
        }
        match load(path) {
            Ok(t) => Some(t),
            Err(e) => {
                // Stale (other wasmtime version) or damaged: drop it and recompile.
                tracing::warn!(path = %path.display(), "discarding cached artifact: {e:#}");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// Creates the store and instantiates: everything up to the guest's first instruction.
    /// A component importing a host interface its member did not ask for
    /// is refused here, once per run (a function's server checks once,
    /// when it is made: `HttpFunction::with_workload`).
    pub async fn start(&self, prepared: &Prepared, spec: RunSpec<'_>) -> Result<Started, Exit> {
        spec.workload
            .check(prepared.gated())
            .map_err(|why| Exit::new(-1, TerminationReason::StartError, why))?;
        let mut store = self.store(prepared, spec)?;
        let entry = match prepared {
            Prepared::Module(pre) => {
                let instance = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| classify(e, store.data()))?;
                let start = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .map_err(|e| Exit::new(-1, TerminationReason::StartError, format!("{e:#}")))?;
                Entry::Module(start)
            }
            Prepared::Component { command, .. } => {
                let Some(pre) = command else {
                    return Err(Exit::new(
                        -1,
                        TerminationReason::StartError,
                        "the component does not export wasi:cli/run, so it cannot run as a member; a wasi:http component is deployed as a Function",
                    ));
                };
                let cmd = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| classify(e, store.data()))?;
                Entry::Component(cmd)
            }
        };
        Ok(Started { store, entry })
    }

    /// One `health` probe check: a fresh instance of the component, in a
    /// store made as a run's is (`spec`: the member's environment, volumes,
    /// network and limits), whose `flotilla:health/check.check` is called;
    /// its `main` is not run. `Ok`: healthy; `Err`: why not. Dropping the
    /// future stops the check at the guest's next epoch tick.
    pub async fn check_health(&self, prepared: &Prepared, spec: RunSpec<'_>) -> Result<(), String> {
        use flotilla_api::probe::{HEALTH_FUNCTION, HEALTH_INTERFACE};
        let func = prepared.health_export()?;
        let Prepared::Component { pre, .. } = prepared else {
            unreachable!("only components have the export");
        };
        let mut store = self.store(prepared, spec).map_err(|e| e.message)?;
        let instance = pre.instantiate_async(&mut store).await.map_err(|e| {
            format!(
                "instantiating for the check: {}",
                classify(e, store.data()).message
            )
        })?;
        let check = instance
            .get_typed_func::<(), (Result<(), String>,)>(&mut store, &func)
            .map_err(|e| {
                format!("{HEALTH_INTERFACE}.{HEALTH_FUNCTION} has the wrong type (want func() -> result<_, string>): {e:#}")
            })?;
        match check.call_async(&mut store, ()).await {
            Ok((verdict,)) => verdict,
            Err(e) => Err(format!(
                "the check failed: {}",
                classify(e, store.data()).message
            )),
        }
    }

    /// A store for one instance of `prepared` (a function's request).
    pub(super) fn store_for(
        &self,
        prepared: &Prepared,
        spec: RunSpec<'_>,
    ) -> Result<Store<Host>, Exit> {
        self.store(prepared, spec)
    }

    /// A store for one instance of `prepared`, set up as `spec` says.
    fn store(&self, prepared: &Prepared, spec: RunSpec<'_>) -> Result<Store<Host>, Exit> {
        let mut builder = WasiCtxBuilder::new();
        let mut argv = Vec::with_capacity(spec.args.len() + 1);
        argv.push(spec.argv0);
        argv.extend(spec.args.iter().map(String::as_str));
        builder
            .args(&argv)
            .stdout(spec.log.clone())
            .stderr(spec.log.clone());
        for (k, v) in spec.env {
            builder.env(k, v);
        }
        builder.allow_blocking_current_thread(spec.blocking_io);
        for p in spec.preopens {
            let perms = if p.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            builder
                .preopened_dir(&p.host, &p.guest, perms)
                .map_err(|e| {
                    Exit::new(
                        -1,
                        TerminationReason::StartError,
                        format!("volume at {}: {e:#}", p.guest),
                    )
                })?;
        }
        if spec.network {
            // The namespace is the boundary: anything inside it is allowed.
            builder.inherit_network().allow_tcp(true).allow_udp(true);
        }
        let memory = spec
            .memory_limit
            .unwrap_or(self.cfg.max_memory)
            .min(self.cfg.max_memory);
        let mut limiter = MemLimiter::new(memory as usize);
        limiter.usage = spec.usage.clone();
        let tick_ms = self.cfg.tick.as_millis().max(1) as u64;
        let wasi = match prepared {
            Prepared::Module(_) => Wasi::P1(builder.build_p1()),
            Prepared::Component { .. } => Wasi::P2 {
                ctx: builder.build(),
                table: ResourceTable::new(),
            },
        };
        let host = Host {
            limiter,
            wasi,
            http: WasiHttpCtx::new(),
            outgoing: spec.outgoing.clone(),
            workload: spec.workload.clone(),
            log: spec.log.clone(),
            ticks: 0,
            tick_budget: spec
                .cpu_time
                .map(|d| (d.as_millis() as u64).div_ceil(tick_ms)),
            quota: (spec.cpu_millis > 0).then(|| CpuQuota::new(spec.cpu_millis, Instant::now())),
        };
        let metered = host.quota.is_some();
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limiter);
        if metered {
            store.call_hook(|mut cx, hook| {
                if let Some(q) = cx.data_mut().quota.as_mut() {
                    match hook {
                        CallHook::CallingWasm | CallHook::ReturningFromHost => mark_start(&q.mark),
                        CallHook::CallingHost | CallHook::ReturningFromWasm => q.stop(),
                    }
                }
                Ok(())
            });
        }
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut cx| {
            let host = cx.data_mut();
            host.ticks += 1;
            if host.tick_budget.is_some_and(|b| host.ticks > b) {
                return Err(wasmtime::Error::new(CpuTimeExceeded));
            }
            // Metered: what ran until this tick is spent; over its share of
            // a core, the guest is held back until out of debt. The meter
            // starts again where the guest resumes.
            if let Some(q) = host.quota.as_mut() {
                q.stop();
                let wait = q.settle(Instant::now());
                let mark = q.mark.clone();
                return Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(async move {
                        match wait {
                            Some(w) => tokio::time::sleep(w).await,
                            None => tokio::task::yield_now().await,
                        }
                        mark_start(&mark);
                    }),
                ));
            }
            // Yield every tick so that other members on this thread make progress
            // and a stop request is noticed even while a guest spins.
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(store)
    }
}

impl Prepared {
    /// Its imports of interfaces a member must ask for.
    pub fn gated(&self) -> impl Iterator<Item = &str> {
        let gated: &[String] = match self {
            Prepared::Component { gated, .. } => gated,
            Prepared::Module(_) => &[],
        };
        gated.iter().map(String::as_str)
    }

    /// Where the component's `flotilla:health/check.check` is, or why it
    /// has none.
    pub fn health_export(&self) -> Result<wasmtime::component::ComponentExportIndex, String> {
        use flotilla_api::probe::{HEALTH_FUNCTION, HEALTH_INTERFACE};
        let Prepared::Component { pre, .. } = self else {
            return Err(format!(
                "a core module cannot export {HEALTH_INTERFACE}; only a component can be health-probed (see wit/health.wit)"
            ));
        };
        let component = pre.component();
        component
            .get_export_index(None, HEALTH_INTERFACE)
            .and_then(|i| component.get_export_index(Some(&i), HEALTH_FUNCTION))
            .ok_or_else(|| {
                format!(
                    "the component does not export {HEALTH_INTERFACE} with a {HEALTH_FUNCTION} function (see wit/health.wit)"
                )
            })
    }
}

/// Tunes the C allocator for a long-running agent: two arenas instead of
/// one per core-multiple of threads (fewer, fuller arenas fragment less and
/// give memory back when pods go). Call once, at process start.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before
    // other threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // Allocations of 128 KiB and more get pages of their own, returned
        // when freed. (glibc otherwise raises this threshold each time such
        // a block is freed, up to 32 MiB, and later large buffers then stay
        // in the heap between small long-lived objects.)
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

/// Returns the allocator's free pages to the OS (glibc keeps freed memory,
/// such as a compilation's peak, resident otherwise).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Asks for [`trim_heap`] within a second: requests that come meanwhile
/// share one trim. A trim walks the whole heap and its `madvise` calls make
/// every CPU flush its TLB, so 10,000 pods ending must cost one, not
/// 10,000 (which stalled every thread of the process, heartbeats included).
pub fn trim_heap_soon() {
    static PENDING: AtomicBool = AtomicBool::new(false);
    if PENDING.swap(true, Ordering::SeqCst) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(|| {
            std::thread::sleep(Duration::from_secs(1));
            // Requests from now on ask for the next trim.
            PENDING.store(false, Ordering::SeqCst);
            trim_heap();
        });
    if spawned.is_err() {
        PENDING.store(false, Ordering::SeqCst);
    }
}

/// Writes a compiled artifact into the cache (atomically); whether it is there.
fn store_artifact(path: &Path, bytes: &[u8]) -> bool {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let res = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(path = %path.display(), "cannot cache compiled artifact: {e}");
        return false;
    }
    true
}

async fn read_module(path: &Path) -> Result<Vec<u8>, PrepareError> {
    tokio::fs::read(path).await.map_err(|e| PrepareError::Read {
        path: path.display().to_string(),
        source: e,
    })
}

enum Entry {
    Module(wasmtime::TypedFunc<(), ()>),
    Component(wasmtime_wasi::p2::bindings::Command),
}

/// An instantiated member, not yet running.
pub struct Started {
    store: Store<Host>,
    entry: Entry,
}

impl Started {
    /// Runs the member to its end. Dropping the future stops the guest at once.
    pub async fn run(mut self) -> Exit {
        let result = match &self.entry {
            Entry::Module(start) => start.call_async(&mut self.store, ()).await,
            Entry::Component(cmd) => match cmd.wasi_cli_run().call_run(&mut self.store).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(())) => {
                    return Exit::new(1, TerminationReason::Error, "run returned an error");
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => Exit::new(0, TerminationReason::Completed, ""),
            Err(e) => classify(e, self.store.data()),
        }
    }
}

/// How an instance's error ended it (for a function's request).
pub(super) fn classify_error(e: wasmtime::Error, host: &Host) -> Exit {
    classify(e, host)
}

fn classify(e: wasmtime::Error, host: &Host) -> Exit {
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        let reason = if exit.0 == 0 {
            TerminationReason::Completed
        } else {
            TerminationReason::Error
        };
        return Exit::new(exit.0, reason, "");
    }
    if e.downcast_ref::<CpuTimeExceeded>().is_some() {
        return Exit::new(137, TerminationReason::Timeout, "CPU time limit exceeded");
    }
    if host.limiter.hit {
        return Exit::new(
            137,
            TerminationReason::OOMKilled,
            "memory limit reached while growing linear memory",
        );
    }
    let message = match e.downcast_ref::<wasmtime::Trap>() {
        Some(t) => format!("wasm trap: {t}"),
        None => format!("{e:#}"),
    };
    Exit::new(134, TerminationReason::Trap, message)
}

mod sockets;
#[cfg(test)]
mod tests;
