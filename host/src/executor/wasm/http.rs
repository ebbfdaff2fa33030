//! Functions: a `wasi:http/proxy` component served one fresh instance per
//! request from its pre-linked `ProxyPre` (the pooling allocator makes an
//! instance in microseconds). Each request is held to the function's
//! limits on its own: a trap, a memory blow-up or a timeout answers that
//! request with 500 or 504 and leaves nothing behind for the next; more
//! requests than `max_concurrency` at once are answered 503 with
//! `Retry-After` at once, never queued.

use super::runtime::{Exit, Prepared, RunSpec, WasmRuntime};
use crate::logs::LogSink;
use bytes::Bytes;
use flotilla_api::{Labels, TerminationReason};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiBody, WasiHttpHooks, WasiHttpView};

/// The header every answer carries: the request's id, also written before
/// the function's own log lines for it.
pub const REQUEST_ID_HEADER: &str = "x-flotilla-request-id";

/// Where a function's outgoing requests (`wasi:http/outgoing-handler`) may
/// go: nowhere unless its spec lists hosts.
#[derive(Clone, Debug, Default)]
pub struct Outgoing {
    /// Host names (or `host:port`) allowed; `*` allows any.
    pub allow: Arc<[String]>,
}

impl Outgoing {
    fn allows(&self, uri: &http::Uri) -> bool {
        let Some(host) = uri.host() else {
            return false;
        };
        let with_port = uri.port_u16().map(|p| format!("{host}:{p}"));
        self.allow
            .iter()
            .any(|a| a == "*" || a == host || with_port.as_deref() == Some(a.as_str()))
    }
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                ),
                wasmtime_wasi_http::Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for Outgoing {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> SendFuture {
        drop(fut);
        if !self.allows(request.uri()) {
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// What each request of a function is held to.
#[derive(Clone, Debug)]
pub struct Limits {
    /// From the request's arrival to the end of the function's work
    /// (answer and body written): past it, 504 (or the body is cut).
    pub timeout: Duration,
    /// Requests served at once; more are answered 503.
    pub max_concurrency: usize,
    /// Each instance's linear memories together.
    pub memory: Option<u64>,
    /// Opt-in: instances that answered without failing take later
    /// requests too ([`flotilla_api::function::HttpServe::reuse_instances`]).
    pub reuse: bool,
}

/// An instance kept for the next request (with `reuse`): its store, its
/// export and the log sink its output goes through (tagged anew per
/// request).
struct Warm {
    store: wasmtime::Store<super::runtime::Host>,
    proxy: wasmtime_wasi_http::p2::bindings::Proxy,
    log: LogSink,
}

/// Counts of what a function answered (for metrics and tests).
#[derive(Debug, Default)]
pub struct Counts {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub rejected: AtomicU64,
}

/// Counts one request on a run's meter as in flight while its instance
/// lives (it may go on writing the body after the answer's head), and
/// that time as busy when it ends.
struct InFlight(Arc<crate::metrics::Usage>, std::time::Instant);

impl InFlight {
    fn new(u: Arc<crate::metrics::Usage>) -> InFlight {
        u.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(u, std::time::Instant::now())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        let us = u64::try_from(self.1.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.0.busy_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// A function ready to serve: the component, its environment and limits.
pub struct HttpFunction {
    runtime: Arc<WasmRuntime>,
    prepared: Arc<Prepared>,
    name: String,
    env: Labels,
    log: LogSink,
    outgoing: Outgoing,
    limits: Limits,
    permits: Arc<Semaphore>,
    pub counts: Counts,
    next_id: AtomicU64,
    /// The run's meter: requests so far and in flight, for the scheduler.
    usage: Option<Arc<crate::metrics::Usage>>,
    /// Idle instances (with `limits.reuse`); at most `max_concurrency`.
    warm: std::sync::Mutex<Vec<Warm>>,
    /// The host interfaces its instances may use.
    workload: super::interfaces::Workload,
}

pub type Response = hyper::Response<HyperOutgoingBody>;

fn text(status: u16, body: String) -> Response {
    let body = Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed_unsync();
    hyper::Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(body)
        .expect("a valid response")
}

impl HttpFunction {
    /// `prepared` must be a component exporting `wasi:http/incoming-handler`.
    pub fn new(
        runtime: Arc<WasmRuntime>,
        prepared: Arc<Prepared>,
        name: &str,
        env: Labels,
        log: LogSink,
        outgoing: Outgoing,
        limits: Limits,
    ) -> Result<HttpFunction, String> {
        match &*prepared {
            Prepared::Component { proxy: Some(_), .. } => {}
            _ => {
                return Err(
                    "the module is not a wasi:http component (it does not export wasi:http/incoming-handler@0.2)".into(),
                );
            }
        }
        let permits = Arc::new(Semaphore::new(limits.max_concurrency.max(1)));
        Ok(HttpFunction {
            runtime,
            prepared,
            name: name.to_string(),
            env,
            log,
            outgoing,
            limits,
            permits,
            counts: Counts::default(),
            next_id: AtomicU64::new(1),
            usage: None,
            warm: std::sync::Mutex::new(Vec::new()),
            workload: super::interfaces::Workload {
                member: name.to_string(),
                ..Default::default()
            },
        })
    }

    /// Gives its instances the host interfaces `workload` allows; refused
    /// (with the reason) when the component imports one it does not.
    pub fn with_workload(
        mut self,
        workload: super::interfaces::Workload,
    ) -> Result<HttpFunction, String> {
        workload.check(self.prepared.gated())?;
        self.workload = workload;
        Ok(self)
    }

    /// Counts its requests (so far and in flight) on `usage` too: what
    /// the node reports, from which the scheduler tells an idle function.
    pub fn counting(mut self, usage: Arc<crate::metrics::Usage>) -> HttpFunction {
        usage.serves_http.store(true, Ordering::Relaxed);
        self.usage = Some(usage);
        self
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.limits.max_concurrency.max(1) - self.permits.available_permits()
    }

    /// Serves one request in a fresh instance.
    pub async fn handle(self: &Arc<Self>, req: hyper::Request<Incoming>) -> Response {
        let arrived = std::time::Instant::now();
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(u) = &self.usage {
            u.requests.fetch_add(1, Ordering::Relaxed);
        }
        let id = format!(
            "{:x}-{}",
            std::process::id(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let mut resp = self.serve(req, &id).await;
        if let Some(u) = &self.usage {
            u.latency.observe(arrived.elapsed());
            if resp.status().is_server_error() {
                u.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Ok(v) = http::HeaderValue::from_str(&id) {
            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        resp
    }

    async fn serve(self: &Arc<Self>, mut req: hyper::Request<Incoming>, id: &str) -> Response {
        // wasi:http gives the guest an authority: HTTP/1.1 requires a Host
        // header, an HTTP/1.0 request without one is taken as for localhost.
        if req.uri().authority().is_none() && !req.headers().contains_key(http::header::HOST) {
            if req.version() != http::Version::HTTP_10 {
                return text(400, "the request has no Host header\n".into());
            }
            req.headers_mut().insert(
                http::header::HOST,
                http::HeaderValue::from_static("localhost"),
            );
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.counts.rejected.fetch_add(1, Ordering::Relaxed);
            let mut r = text(
                503,
                format!(
                    "function {} is serving {} requests, its max_concurrency; try again\n",
                    self.name, self.limits.max_concurrency
                ),
            );
            r.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
            return r;
        };
        let tag = format!("[req {id}] ");
        let warm = if self.limits.reuse {
            self.warm.lock().expect("poisoned").pop()
        } else {
            None
        };
        let (mut store, proxy, log) = match warm {
            Some(w) => {
                w.log.retag(&tag);
                (w.store, Some(w.proxy), w.log)
            }
            None => {
                let log = self.log.tagged(&tag);
                let spec = RunSpec {
                    argv0: &self.name,
                    args: &[],
                    env: &self.env,
                    preopens: &[],
                    blocking_io: false,
                    memory_limit: self.limits.memory,
                    cpu_time: None,
                    cpu_millis: 0,
                    log: log.clone(),
                    network: false,
                    usage: None,
                    outgoing: self.outgoing.clone(),
                    workload: &self.workload,
                };
                match self.runtime.store_for(&self.prepared, spec) {
                    Ok(s) => (s, None, log),
                    Err(e) => return self.failed(id, e),
                }
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let made = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)
            .and_then(|r| Ok((r, store.data_mut().http().new_response_outparam(tx)?)));
        let (request, outparam) = match made {
            Ok(x) => x,
            Err(e) => return text(500, format!("cannot pass the request on: {e:#}\n")),
        };
        let Prepared::Component {
            proxy: Some(pre), ..
        } = &*self.prepared
        else {
            unreachable!("checked in new");
        };
        let pre = pre.clone();
        let timeout = self.limits.timeout;
        let busy = self.usage.clone().map(InFlight::new);
        let this = self.clone();
        // The instance lives in its own task, so it can go on writing the
        // body after the answer's head has left; the permit goes with it.
        let task = tokio::spawn(async move {
            let work = async {
                let proxy = match proxy {
                    Some(p) => p,
                    None => pre.instantiate_async(&mut store).await?,
                };
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, request, outparam)
                    .await?;
                Ok::<_, wasmtime::Error>(proxy)
            };
            let outcome = tokio::time::timeout(timeout, work).await;
            let result = match outcome {
                Ok(Ok(proxy)) => {
                    // Answered without failing: kept for the next request
                    // when the function opted in.
                    if this.limits.reuse {
                        this.warm
                            .lock()
                            .expect("poisoned")
                            .push(Warm { store, proxy, log });
                    }
                    Ok(())
                }
                Ok(Err(e)) => Err(Some(super::runtime::classify_error(e, store.data()))),
                Err(_) => Err(None),
            };
            drop((permit, busy));
            result
        });
        match rx.await {
            Ok(Ok(resp)) => resp,
            Ok(Err(code)) => {
                self.counts.errors.fetch_add(1, Ordering::Relaxed);
                text(500, format!("the function answered an error: {code:?}\n"))
            }
            // The outparam was dropped unset: the instance ended without
            // answering (trapped, ran out of memory or time, or returned).
            Err(_) => match task.await {
                Ok(Ok(())) => {
                    self.counts.errors.fetch_add(1, Ordering::Relaxed);
                    text(500, "the function returned without answering\n".into())
                }
                Ok(Err(Some(exit))) => self.failed(id, exit),
                Ok(Err(None)) => {
                    self.counts.timeouts.fetch_add(1, Ordering::Relaxed);
                    self.note(&format!(
                        "request {id}: timed out after {} ms",
                        timeout.as_millis()
                    ));
                    text(
                        504,
                        format!(
                            "function {} did not answer within its timeout of {} ms\n",
                            self.name,
                            timeout.as_millis()
                        ),
                    )
                }
                Err(e) => {
                    self.counts.errors.fetch_add(1, Ordering::Relaxed);
                    text(500, format!("the request's task ended: {e}\n"))
                }
            },
        }
    }

    /// A line of the agent's own in the function's log.
    fn note(&self, line: &str) {
        let _ = self
            .log
            .write_all(format!("[flotilla] {line}\n").as_bytes());
    }

    fn failed(&self, id: &str, exit: Exit) -> Response {
        self.counts.errors.fetch_add(1, Ordering::Relaxed);
        let what = match exit.reason {
            TerminationReason::OOMKilled => "ran out of memory",
            TerminationReason::Trap => "trapped",
            _ => "failed",
        };
        self.note(&format!("request {id}: {what}: {}", exit.message));
        text(
            500,
            format!("function {} {what}: {}\n", self.name, exit.message),
        )
    }
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener`, every
/// request through `function`, until `drain` resolves; then it stops
/// accepting and returns once the requests in flight are answered (see
/// [`crate::net::gateway::accept`]). Dropping the future closes the
/// connections at once.
pub async fn serve(
    listener: tokio::net::TcpListener,
    function: Arc<HttpFunction>,
    drain: impl Future<Output = ()>,
) {
    crate::net::gateway::accept(listener, drain, move |req| {
        let function = function.clone();
        async move { function.handle(req).await }
    })
    .await
}

#[cfg(test)]
mod tests;
