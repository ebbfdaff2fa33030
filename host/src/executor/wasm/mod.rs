//! Wasm members: a compiled module's `InstancePre`, a fresh `Store` per
//! run, driven on the agent's runtime or, for networked pods, on the pod's
//! thread inside its network namespace. Stopping drops the run's future,
//! which interrupts the guest at its next epoch tick.

pub mod http;
pub mod interfaces;
pub mod runtime;

use super::{BoxFuture, Prepared, Run, RunCx};
use crate::executor::wasm::runtime::{self as wasm, Exit, RunSpec, WasmRuntime};
use crate::logs::LogSink;
use crate::net::podnet::PodThread;
use flotilla_api::TerminationReason;
use flotilla_api::time::now_ms;
use std::sync::Arc;
use std::time::Duration;

/// A wasm member ready to run.
pub struct WasmMember {
    pub runtime: Arc<WasmRuntime>,
    pub prepared: Arc<wasm::Prepared>,
    /// The pod's own thread (pods with a network or with volumes), set
    /// once the sandbox exists.
    pub thread: std::sync::OnceLock<Arc<PodThread>>,
    /// The pod has a network: its members may open sockets.
    pub networked: std::sync::atomic::AtomicBool,
    /// What the current run was started with, for `health` probe checks
    /// (each a fresh instance set up the same way).
    last_run: std::sync::Mutex<Option<Arc<RunInputs>>>,
}

/// A run's inputs, kept for the health checks made beside it.
struct RunInputs {
    spec: flotilla_api::MemberSpec,
    workload: interfaces::Workload,
    env: flotilla_api::Labels,
    mounts: Vec<crate::volume::ResolvedMount>,
    log: LogSink,
}

impl WasmMember {
    pub fn new(runtime: Arc<WasmRuntime>, prepared: Arc<wasm::Prepared>) -> WasmMember {
        WasmMember {
            runtime,
            prepared,
            thread: std::sync::OnceLock::new(),
            networked: std::sync::atomic::AtomicBool::new(false),
            last_run: std::sync::Mutex::new(None),
        }
    }
}

/// How long a stop waits for a guest's future to be dropped (an epoch
/// tick, unless its thread is blocked in a file operation).
const STOP_WAIT: Duration = Duration::from_secs(5);

enum Task {
    Local(tokio::task::JoinHandle<Exit>),
    Pod(crate::net::podnet::Abortable<Exit>),
}

struct WasmRun {
    started_ms: u64,
    task: Option<Task>,
    usage: Arc<crate::metrics::Usage>,
    /// A function's server: told to drain (stop accepting, finish what it
    /// serves) when the run stops, before it is aborted.
    drain: Option<tokio::sync::watch::Sender<bool>>,
}

impl Prepared for WasmMember {
    fn runtime(&self) -> &'static str {
        flotilla_api::RUNTIME_WASM
    }

    fn health<'a>(
        &'a self,
        _pod_uid: &'a str,
        _member: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.check_health())
    }

    fn start<'a>(&'a self, cx: RunCx<'a>) -> BoxFuture<'a, Result<Box<dyn Run>, Exit>> {
        Box::pin(async move {
            if let Some(serve) = &cx.member.http {
                return self.serve_http(&cx, serve).await;
            }
            let log = LogSink::new(cx.log.clone(), cx.log_cap);
            let (runtime, p, spec, env, mounts, workload) = (
                self.runtime.clone(),
                self.prepared.clone(),
                cx.member.clone(),
                cx.env.clone(),
                cx.mounts.to_vec(),
                cx.workload.clone(),
            );
            // Kept only for a member whose health probe will need them.
            if spec.probes().any(|(_, p)| p.calls_health()) {
                *self.last_run.lock().expect("poisoned") = Some(Arc::new(RunInputs {
                    spec: spec.clone(),
                    workload: workload.clone(),
                    env: env.clone(),
                    mounts: mounts.clone(),
                    log: log.clone(),
                }));
            }
            let network = self.networked.load(std::sync::atomic::Ordering::Relaxed);
            let usage = Arc::new(crate::metrics::Usage::default());
            let counted = usage.clone();
            // On the pod's own thread, file operations may block it rather
            // than hop to the blocking pool for every call.
            let own_thread = self.thread.get().is_some();
            let run = async move {
                let spec_run = RunSpec {
                    argv0: &spec.name,
                    args: &spec.args,
                    env: &env,
                    preopens: &mounts,
                    blocking_io: own_thread,
                    memory_limit: spec.resources.memory.map(|b| b.0),
                    cpu_time: spec.resources.cpu_time.map(|m| m.as_duration()),
                    cpu_millis: u64::from(spec.resources.cpu),
                    log,
                    network,
                    usage: Some(counted.clone()),
                    outgoing: Default::default(),
                    workload: &workload,
                };
                match runtime.start(&p, spec_run).await {
                    Ok(started) => started.run().await,
                    Err(exit) => exit,
                }
            };
            // Its CPU time: the thread's, while the run is polled.
            let run = crate::metrics::Metered::new(run, usage.clone());
            // Members of a networked pod run on the pod's thread, inside
            // its namespace; the others on the agent's runtime.
            let task = match self.thread.get() {
                Some(t) => Task::Pod(t.spawn(run)),
                None => Task::Local(tokio::spawn(run)),
            };
            Ok(Box::new(WasmRun {
                started_ms: now_ms(),
                task: Some(task),
                usage,
                drain: None,
            }) as Box<dyn Run>)
        })
    }
}

impl WasmMember {
    /// A run of a member with `http`: its first tcp port (bound inside the
    /// pod's namespace, on the pod's thread) served on the agent's
    /// workload runtime, a fresh instance per request, until stopped.
    async fn serve_http(
        &self,
        cx: &RunCx<'_>,
        serve: &flotilla_api::function::HttpServe,
    ) -> Result<Box<dyn Run>, Exit> {
        let start_error = |m: String| Exit::new(-1, TerminationReason::StartError, m);
        let port = cx
            .member
            .ports
            .iter()
            .find(|p| p.protocol == flotilla_api::Protocol::Tcp)
            .map(|p| p.port)
            .ok_or_else(|| start_error("a member with http needs a tcp port".into()))?;
        let bind = move || std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port));
        let bound = match self.thread.get() {
            Some(t) => t
                .spawn(async move { bind() })
                .await
                .map_err(|e| start_error(format!("binding port {port}: {e}")))?,
            None => bind(),
        };
        let listener = bound
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .map_err(|e| start_error(format!("cannot listen on port {port}: {e}")))?;
        let function = http::HttpFunction::new(
            self.runtime.clone(),
            self.prepared.clone(),
            &cx.member.name,
            cx.env.clone(),
            LogSink::new(cx.log.clone(), cx.log_cap),
            http::Outgoing {
                allow: serve.allow_hosts.clone().into(),
            },
            http::Limits {
                timeout: serve.timeout.duration(),
                max_concurrency: serve.max_concurrency as usize,
                memory: cx.member.resources.memory.map(|b| b.0),
                reuse: serve.reuse_instances,
            },
        )
        .and_then(|f| f.with_workload(cx.workload.clone()))
        .map_err(start_error)?;
        let usage = Arc::new(crate::metrics::Usage::default());
        let function = Arc::new(function.counting(usage.clone()));
        let (drain, mut draining) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let drained = async move {
                let _ = draining.wait_for(|d| *d).await;
            };
            http::serve(listener, function, drained).await;
            Exit::new(0, TerminationReason::Completed, "")
        });
        Ok(Box::new(WasmRun {
            started_ms: now_ms(),
            task: Some(Task::Local(task)),
            usage,
            drain: Some(drain),
        }))
    }

    /// One `health` probe check beside the current run, on the pod's
    /// thread when it has one (inside its network namespace, so the check
    /// reaches the run's ports on 127.0.0.1).
    async fn check_health(&self) -> Result<(), String> {
        let inputs = self
            .last_run
            .lock()
            .expect("poisoned")
            .clone()
            .ok_or_else(|| "the member has not started yet".to_string())?;
        let (runtime, p) = (self.runtime.clone(), self.prepared.clone());
        let network = self.networked.load(std::sync::atomic::Ordering::Relaxed);
        let own_thread = self.thread.get().is_some();
        let check = async move {
            let spec = RunSpec {
                argv0: &inputs.spec.name,
                args: &inputs.spec.args,
                env: &inputs.env,
                preopens: &inputs.mounts,
                blocking_io: own_thread,
                memory_limit: inputs.spec.resources.memory.map(|b| b.0),
                cpu_time: inputs.spec.resources.cpu_time.map(|m| m.as_duration()),
                cpu_millis: u64::from(inputs.spec.resources.cpu),
                log: inputs.log.clone(),
                network,
                usage: None,
                outgoing: Default::default(),
                workload: &inputs.workload,
            };
            runtime.check_health(&p, spec).await
        };
        // Dropping this future (the probe's timeout) aborts the check.
        match self.thread.get() {
            Some(t) => t
                .spawn(check)
                .await
                .unwrap_or_else(|e| Err(format!("the check ended: {e}"))),
            None => check.await,
        }
    }
}

impl Run for WasmRun {
    fn started_ms(&self) -> u64 {
        self.started_ms
    }

    fn meter(&self) -> Option<crate::metrics::Meter> {
        Some(crate::metrics::Meter::Wasm(self.usage.clone()))
    }

    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(async move {
            let ended = match self.task.as_mut() {
                Some(Task::Local(h)) => h.await,
                Some(Task::Pod(h)) => h.await,
                None => return Exit::new(-1, TerminationReason::Error, "run already ended"),
            };
            self.task = None;
            ended.unwrap_or_else(|e| Exit::new(-1, TerminationReason::Error, format!("run: {e}")))
        })
    }

    fn stop(mut self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        // A function's server first drains within the grace period: it
        // stops accepting and answers the requests it has. Then (or for
        // any other run at once) aborting the task drops the guest's
        // future, and with it the store and its sockets. That happens on
        // the task's thread: wait for it, so the sockets are closed (their
        // peers told) before the pod's network goes away.
        let task = self.task.take();
        let drain = self.drain.take();
        Box::pin(async move {
            match task {
                Some(Task::Local(mut h)) => {
                    if let Some(d) = drain {
                        let _ = d.send(true);
                        if tokio::time::timeout(grace, &mut h).await.is_ok() {
                            return;
                        }
                    }
                    h.abort();
                    let _ = tokio::time::timeout(STOP_WAIT, h).await;
                }
                Some(Task::Pod(h)) => h.cancel(STOP_WAIT).await,
                None => {}
            }
        })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}
