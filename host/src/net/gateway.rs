//! The function gateway: an HTTP/1.1 and HTTP/2 listener on the node
//! (`--gateway-addr`) that sends each request to the Service whose route
//! matches its `Host` and path — a Function's Service carries the
//! Function's routes — and on to one of that Service's ready pods, chosen
//! round robin; the answer streams back. Every node has the whole service
//! table, so a request to any node's gateway is served wherever the
//! function runs (other nodes' pods through the pod network or tunnel).

use bytes::Bytes;
use flotilla_api::function::Route;
use flotilla_api::proto::ServiceView;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;

type Body = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body the gateway forwards: a client's, or one that came over
/// the scheduler link for `flotilla invoke`.
pub type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
type Client =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Lent>;

/// The route a request takes: among the routes whose host and path prefix
/// match, one naming the host beats one for any host, then the longest
/// path prefix wins. Several Services with that same route (a Function's
/// stable and canary revisions) share its requests in proportion to their
/// weights: `pick` (a counter) walks them in turn.
pub fn route<'a>(
    table: &'a [ServiceView],
    host: &str,
    path: &str,
    pick: u64,
) -> Option<(&'a ServiceView, &'a Route)> {
    let rank = |r: &Route| (!r.host.is_empty(), r.path.trim_end_matches('/').len());
    let mut best: Vec<(&ServiceView, &Route)> = Vec::new();
    for svc in table {
        for r in &svc.routes {
            if r.weight == 0 || !r.matches(host, path) {
                continue;
            }
            match best.first().map(|(_, b)| rank(b).cmp(&rank(r))) {
                None | Some(std::cmp::Ordering::Equal) => best.push((svc, r)),
                Some(std::cmp::Ordering::Less) => best = vec![(svc, r)],
                Some(std::cmp::Ordering::Greater) => {}
            }
        }
    }
    let total: u64 = best.iter().map(|(_, r)| u64::from(r.weight)).sum();
    if best.len() < 2 || total == 0 {
        return best.first().copied();
    }
    let mut n = pick % total;
    for (svc, r) in &best {
        let w = u64::from(r.weight);
        if n < w {
            return Some((svc, r));
        }
        n -= w;
    }
    best.first().copied()
}

/// A request's host as routes name it: no port, lowercase.
fn request_host(req: &hyper::Request<Incoming>) -> String {
    let raw = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| match h.rsplit_once(':') {
                    Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
                        name.to_string()
                    }
                    _ => h.to_string(),
                })
        })
        .unwrap_or_default();
    raw.to_ascii_lowercase()
}

fn text(status: u16, body: String) -> hyper::Response<Body> {
    let body = Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed();
    hyper::Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(body)
        .expect("a valid response")
}

/// Asks the scheduler to bring up the function behind Service
/// `(namespace, name)` (scale from zero).
pub type Wake = Arc<dyn Fn(String, String) + Send + Sync>;

/// Longest a request waits for a function at zero to get an instance; past
/// it, 503 with `Retry-After`.
const HOLD: Duration = Duration::from_secs(60);
/// Most requests held at once (over all functions) waiting for instances;
/// more are answered 503 at once — never an unbounded queue.
const MAX_HELD: usize = 1024;
/// How often the wake is repeated while requests wait (a lost message,
/// a scheduler restart).
const WAKE_EVERY: Duration = Duration::from_secs(1);

/// A request body lent to the client: it stays in a slot the gateway
/// keeps until the client first reads it, so a request whose connection
/// could not be made (an instance that just stopped listening) is sent to
/// another instance with its body intact.
struct Lent {
    slot: Arc<std::sync::Mutex<Option<RequestBody>>>,
    touched: Arc<std::sync::atomic::AtomicBool>,
}

impl hyper::body::Body for Lent {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        self.touched.store(true, Ordering::Relaxed);
        let mut slot = self.slot.lock().expect("poisoned");
        match slot.as_mut() {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.slot
            .lock()
            .expect("poisoned")
            .as_ref()
            .is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.slot.lock().expect("poisoned").as_ref().map_or_else(
            || hyper::body::SizeHint::with_exact(0),
            hyper::body::Body::size_hint,
        )
    }
}

/// Whether hyper's error `e` (or one of its causes) satisfies `what`.
fn hyper_cause(e: &hyper_util::client::legacy::Error, what: fn(&hyper::Error) -> bool) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<hyper::Error>().is_some_and(what) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Whether the client gave up on a request before sending it: hyper
/// cancels the requests queued on a connection that closes before it has
/// written them.
fn never_sent(e: &hyper_util::client::legacy::Error) -> bool {
    hyper_cause(e, hyper::Error::is_canceled)
}

/// Whether the connection closed before any answer came: what a request
/// meets on a kept-alive connection the instance closed at that moment (a
/// draining instance closes its idle ones).
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    hyper_cause(e, |h| {
        h.is_canceled() || h.is_incomplete_message() || h.is_closed()
    })
}

/// How often a request is sent again on a new connection after one closed
/// under it (several idle pooled connections may be closing at once).
const RESENDS: usize = 4;

/// Service `namespace/name` as `table` has it now (the change marked
/// seen), if it is still there.
fn latest(
    table: &mut watch::Receiver<Arc<Vec<ServiceView>>>,
    namespace: &str,
    name: &str,
) -> Option<ServiceView> {
    table
        .borrow_and_update()
        .iter()
        .find(|s| s.namespace == namespace && s.name == name)
        .cloned()
}

fn gone(namespace: &str, name: &str) -> hyper::Response<Body> {
    text(404, format!("{namespace}/{name} is gone\n"))
}

/// What the gateway counted for one route of one Service.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Answers by status class: 1xx … 5xx.
    pub answers: [std::sync::atomic::AtomicU64; 5],
    /// Time from the request's arrival to its answer's head.
    pub latency: flotilla_api::latency::Histogram,
}

/// One route's figures, for the node's `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteReading {
    pub namespace: String,
    pub service: String,
    pub host: String,
    pub path: String,
    /// Answers by status class, 1xx … 5xx.
    pub answers: [u64; 5],
    pub latency: Vec<u64>,
    pub latency_sum_us: u64,
}

type RouteKey = (String, String, String, String);

/// The node's gateway.
pub struct Gateway {
    table: watch::Receiver<Arc<Vec<ServiceView>>>,
    client: Client,
    next: AtomicUsize,
    /// Walks weighted routes (a separate count from the endpoints').
    split: std::sync::atomic::AtomicU64,
    wake: Option<Wake>,
    /// When each Service's function was last woken.
    woken: std::sync::Mutex<std::collections::HashMap<(String, String), std::time::Instant>>,
    held: AtomicUsize,
    /// Per route (namespace, service, host, path): what it answered.
    routes: std::sync::Mutex<std::collections::HashMap<RouteKey, Arc<RouteStats>>>,
}

/// Gives a held slot back when the request stops waiting.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn busy(message: String) -> hyper::Response<Body> {
    let mut r = text(503, message);
    r.headers_mut()
        .insert("retry-after", http::HeaderValue::from_static("1"));
    r
}

impl Gateway {
    /// Routes over the service table `table` (the proxy's).
    pub fn new(table: watch::Receiver<Arc<Vec<ServiceView>>>) -> Gateway {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector);
        Gateway {
            table,
            client,
            next: AtomicUsize::new(0),
            split: std::sync::atomic::AtomicU64::new(0),
            wake: None,
            woken: Default::default(),
            held: AtomicUsize::new(0),
            routes: Default::default(),
        }
    }

    /// A request for a function with no ready instance waits (within
    /// [`HOLD`] and [`MAX_HELD`]) while `wake` asks for one, instead of
    /// being answered 503 at once.
    pub fn waking(mut self, wake: Wake) -> Gateway {
        self.wake = Some(wake);
        self
    }

    /// Wakes the function behind `namespace/name` unless that was done
    /// within [`WAKE_EVERY`].
    fn wake(&self, wake: &Wake, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let now = std::time::Instant::now();
        {
            let mut woken = self.woken.lock().expect("poisoned");
            if woken
                .get(&key)
                .is_some_and(|&t| now.duration_since(t) < WAKE_EVERY)
            {
                return;
            }
            woken.retain(|_, t| now.duration_since(*t) < HOLD);
            woken.insert(key.clone(), now);
        }
        wake(key.0, key.1);
    }

    /// Waits for Service `namespace/name` to have a ready endpoint, waking
    /// its function meanwhile; `Err` is the answer to give instead.
    async fn activate(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<ServiceView, hyper::Response<Body>> {
        let none = || {
            busy(format!(
                "{namespace}/{name} has no ready instance; try again\n"
            ))
        };
        let Some(wake) = &self.wake else {
            return Err(none());
        };
        if self.held.fetch_add(1, Ordering::Relaxed) >= MAX_HELD {
            self.held.fetch_sub(1, Ordering::Relaxed);
            return Err(none());
        }
        let _held = Held(&self.held);
        let deadline = tokio::time::Instant::now() + HOLD;
        let mut table = self.table.clone();
        loop {
            let svc = latest(&mut table, namespace, name).ok_or_else(|| gone(namespace, name))?;
            if !svc.endpoints.is_empty() {
                return Ok(svc);
            }
            self.wake(wake, namespace, name);
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(busy(format!(
                    "{namespace}/{name} got no ready instance within {} s; try again\n",
                    HOLD.as_secs()
                )));
            }
            let step = (deadline - now).min(WAKE_EVERY);
            if let Ok(Err(_)) = tokio::time::timeout(step, table.changed()).await {
                return Err(none());
            }
        }
    }

    /// Every route's figures so far, in a stable order.
    pub fn route_readings(&self) -> Vec<RouteReading> {
        let routes = self.routes.lock().expect("poisoned");
        let mut out: Vec<RouteReading> = routes
            .iter()
            .map(|((namespace, service, host, path), st)| RouteReading {
                namespace: namespace.clone(),
                service: service.clone(),
                host: host.clone(),
                path: path.clone(),
                answers: std::array::from_fn(|i| st.answers[i].load(Ordering::Relaxed)),
                latency: st.latency.counts(),
                latency_sum_us: st.latency.sum_us(),
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.host, &a.path).cmp(&(
                &b.namespace,
                &b.service,
                &b.host,
                &b.path,
            ))
        });
        out
    }

    fn route_stats(&self, svc: &ServiceView, route: &Route) -> Arc<RouteStats> {
        let key = (
            svc.namespace.clone(),
            svc.name.clone(),
            route.host.clone(),
            route.path.clone(),
        );
        self.routes
            .lock()
            .expect("poisoned")
            .entry(key)
            .or_default()
            .clone()
    }

    /// Answers one request that came in over HTTP or HTTPS.
    pub async fn answer(&self, req: hyper::Request<Incoming>) -> hyper::Response<Body> {
        let arrived = std::time::Instant::now();
        let (resp, stats) = self.route_and_forward(req).await;
        if let Some(st) = stats {
            st.latency.observe(arrived.elapsed());
            let class = usize::from(resp.status().as_u16() / 100).clamp(1, 5) - 1;
            st.answers[class].fetch_add(1, Ordering::Relaxed);
        }
        resp
    }

    /// The answer to a request, and the figures of the route it took.
    async fn route_and_forward(
        &self,
        mut req: hyper::Request<Incoming>,
    ) -> (hyper::Response<Body>, Option<Arc<RouteStats>>) {
        let host = request_host(&req);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        // The table as this request sees it; a change after this moment
        // is one it waits for when every instance refuses.
        let mut watched = self.table.clone();
        let table = watched.borrow_and_update().clone();
        let pick = self.split.fetch_add(1, Ordering::Relaxed);
        let Some((svc, r)) = route(&table, &host, &path, pick) else {
            let none = text(
                404,
                format!("no function route matches host '{host}' and path '{path}'\n"),
            );
            return (none, None);
        };
        let stats = self.route_stats(svc, r);
        let svc = svc.clone();
        // An HTTP/2 request names its host in the URI only: keep it as the
        // Host header, which is what the function sees after the hop.
        if !req.headers().contains_key(http::header::HOST)
            && let Some(a) = req.uri().authority().cloned()
            && let Ok(v) = http::HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(http::header::HOST, v);
        }
        let (parts, body) = req.into_parts();
        let resp = self
            .forward(svc, parts, body.map_err(Into::into).boxed_unsync(), watched)
            .await;
        (resp, Some(stats))
    }

    /// Serves a request for Function `namespace/function` that came over
    /// the scheduler link (`flotilla invoke`): no route is matched, the
    /// Function's own Service takes it, waking the function if need be.
    pub async fn invoke(
        &self,
        namespace: &str,
        function: &str,
        req: hyper::Request<RequestBody>,
    ) -> hyper::Response<Body> {
        let mut watched = self.table.clone();
        let Some(svc) = latest(&mut watched, namespace, function) else {
            return text(
                404,
                format!(
                    "function {namespace}/{function} has no service this node knows of (yet)\n"
                ),
            );
        };
        let (mut parts, body) = req.into_parts();
        if !parts.headers.contains_key(http::header::HOST) {
            // As if the request had come in for the function's first
            // named host.
            let host = svc
                .routes
                .iter()
                .find(|r| !r.host.is_empty() && !r.host.starts_with('*'))
                .map_or("localhost", |r| r.host.as_str());
            if let Ok(v) = http::HeaderValue::from_str(host) {
                parts.headers.insert(http::header::HOST, v);
            }
        }
        self.forward(svc, parts, body, watched).await
    }

    /// Sends a request for Service `svc` to one of its ready instances
    /// (waking its function when it has none), trying another while the
    /// body is unread, and waiting on `table` when every one refuses.
    async fn forward(
        &self,
        mut svc: ServiceView,
        parts: http::request::Parts,
        body: RequestBody,
        mut table: watch::Receiver<Arc<Vec<ServiceView>>>,
    ) -> hyper::Response<Body> {
        let (namespace, name) = (svc.namespace.clone(), svc.name.clone());
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let slot = Arc::new(std::sync::Mutex::new(Some(body)));
        // Instances that refused the connection: each is tried once.
        let mut refused: Vec<String> = Vec::new();
        let mut last_error = String::new();
        let deadline = tokio::time::Instant::now() + HOLD;
        loop {
            if svc.endpoints.is_empty() {
                svc = match self.activate(&namespace, &name).await {
                    Ok(svc) => svc,
                    Err(answer) => return answer,
                };
            }
            let Some(port) = svc.ports.first() else {
                return text(502, format!("service {name} has no port\n"));
            };
            let fresh: Vec<&String> = svc
                .endpoints
                .iter()
                .filter(|e| !refused.contains(e))
                .collect();
            let first = self.next.fetch_add(1, Ordering::Relaxed);
            // Each ready instance at most once, while the body is unread:
            // one that refuses the connection (it began draining, and this
            // node has not heard yet) is passed over.
            for k in 0..fresh.len() {
                let endpoint = fresh[(first + k) % fresh.len()];
                let target = format!("http://{endpoint}:{}{path}", port.target());
                let uri: http::Uri = match target.parse() {
                    Ok(uri) => uri,
                    Err(e) => return text(400, format!("cannot forward {path}: {e}\n")),
                };
                // A request never sent — the pooled connection it was
                // given closed first (an instance that began draining
                // closes its idle ones) — goes again on another. So does
                // one that may have been sent on a connection that closed
                // before any answer, when its method is idempotent and it
                // has no body left to send (HTTP's rule for replaying
                // requests, as Go's client applies it).
                let replayable = matches!(
                    parts.method,
                    http::Method::GET
                        | http::Method::HEAD
                        | http::Method::OPTIONS
                        | http::Method::TRACE
                );
                let mut resent = 0;
                loop {
                    let touched = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let mut hop = hyper::Request::new(Lent {
                        slot: slot.clone(),
                        touched: touched.clone(),
                    });
                    *hop.method_mut() = parts.method.clone();
                    *hop.uri_mut() = uri.clone();
                    // Whatever version came in, the hop to the pod is
                    // HTTP/1.1 (the pooled client's); the Host header stays
                    // the client's.
                    *hop.version_mut() = http::Version::HTTP_11;
                    *hop.headers_mut() = parts.headers.clone();
                    let e = match self.client.request(hop).await {
                        Ok(resp) => return resp.map(BodyExt::boxed),
                        Err(e) => e,
                    };
                    last_error = format!("the instance at {endpoint} did not answer: {e}");
                    let unread = !touched.load(Ordering::Relaxed);
                    let again = never_sent(&e) || (replayable && closed_unanswered(&e));
                    if unread && resent < RESENDS && again {
                        resent += 1;
                        continue;
                    }
                    if !unread || !(e.is_connect() || never_sent(&e)) {
                        return text(502, format!("{namespace}/{name}: {last_error}\n"));
                    }
                    refused.push(endpoint.clone());
                    break;
                }
            }
            // Every instance this node knows refused: the table is behind
            // (the old ones drain, the new one is not in it yet). Wait for
            // it to change, within the hold.
            let now = tokio::time::Instant::now();
            if now >= deadline
                || tokio::time::timeout(deadline - now, table.changed())
                    .await
                    .map_or(true, |r| r.is_err())
            {
                return text(502, format!("{namespace}/{name}: {last_error}\n"));
            }
            svc = match latest(&mut table, &namespace, &name) {
                Some(s) => s,
                None => return gone(&namespace, &name),
            };
        }
    }
}

/// Serves the gateway on `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, gateway: Arc<Gateway>) {
    accept(listener, std::future::pending(), move |req| {
        let gateway = gateway.clone();
        async move { gateway.answer(req).await }
    })
    .await
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener`, every
/// request answered by `handle`. When `drain` resolves it stops accepting
/// (the listener closes, so new connections are refused at once and a
/// gateway tries another instance), asks every open connection to end
/// after the request it is serving (HTTP/1.1 answers `Connection: close`,
/// HTTP/2 sends GOAWAY) and returns once all have ended. Dropping the
/// future closes the connections at once.
pub async fn accept<H, F, B>(
    listener: tokio::net::TcpListener,
    drain: impl Future<Output = ()>,
    handle: H,
) where
    H: Fn(hyper::Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (closing, closed) = watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut drain = std::pin::pin!(drain);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Reap finished connections as they end.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            () = &mut drain => break,
        };
        let Ok((conn, _)) = accepted else {
            // Out of descriptors or similar: give it a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = conn.set_nodelay(true);
        let handle = handle.clone();
        let mut closed = closed.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = handle(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = closed.wait_for(|c| *c) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = closing.send(true);
    while conns.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, routes: &[(&str, &str)]) -> ServiceView {
        ServiceView {
            namespace: "default".into(),
            name: name.into(),
            cluster_ip: "10.96.0.1".into(),
            ports: vec![],
            endpoints: vec![],
            routes: routes
                .iter()
                .map(|(h, p)| Route {
                    host: h.to_string(),
                    path: p.to_string(),
                    weight: 100,
                })
                .collect(),
        }
    }

    #[test]
    fn the_most_specific_route_wins() {
        let table = vec![
            svc("catch-all", &[("", "/")]),
            svc("api", &[("", "/api")]),
            svc("shop-api", &[("shop.example", "/api")]),
            svc("shop-cart", &[("shop.example", "/api/cart/")]),
        ];
        let to =
            |host: &str, path: &str| route(&table, host, path, 0).map(|(s, _)| s.name.as_str());
        assert_eq!(to("x", "/"), Some("catch-all"));
        assert_eq!(to("x", "/apis"), Some("catch-all"));
        assert_eq!(to("x", "/api/v1"), Some("api"));
        assert_eq!(to("shop.example", "/api/v1"), Some("shop-api"));
        assert_eq!(to("shop.example", "/api/cart?id=3"), Some("shop-cart"));
        assert_eq!(to("shop.example", "/other"), Some("catch-all"));
        let no_catch_all = &table[1..];
        assert_eq!(
            route(no_catch_all, "x", "/other", 0).map(|(s, _)| &s.name),
            None
        );
    }

    #[test]
    fn one_route_on_two_services_splits_by_weight() {
        let mut stable = svc("web", &[("", "/api")]);
        stable.routes[0].weight = 90;
        let mut canary = svc("web-canary", &[("", "/api")]);
        canary.routes[0].weight = 10;
        let table = vec![stable, canary, svc("other", &[("", "/")])];
        let mut counts = std::collections::HashMap::new();
        for pick in 0..1000 {
            let (s, _) = route(&table, "h", "/api/x", pick).unwrap();
            *counts.entry(s.name.clone()).or_insert(0) += 1;
        }
        assert_eq!(counts["web"], 900);
        assert_eq!(counts["web-canary"], 100);
        assert!(!counts.contains_key("other"));
    }

    /// A backend on `listener` answering `name: METHOD PATH BODY`.
    fn backend(listener: tokio::net::TcpListener, name: &'static str) {
        tokio::spawn(accept(
            listener,
            std::future::pending(),
            move |req| async move {
                let method = req.method().to_string();
                let path = req.uri().path().to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let body = format!("{name}: {method} {path} {}", String::from_utf8_lossy(&body));
                hyper::Response::new(Full::new(Bytes::from(body)))
            },
        ));
    }

    fn served(name: &str, port: u16, endpoints: &[&str]) -> ServiceView {
        let mut s = svc(name, &[("", "/")]);
        s.ports = vec![flotilla_api::ServicePort {
            port: 80,
            target_port: Some(port),
            protocol: flotilla_api::Protocol::Tcp,
            node_port: None,
            name: "http".into(),
        }];
        s.endpoints = endpoints.iter().map(|e| e.to_string()).collect();
        s
    }

    async fn post(gateway: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
        let stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post(path)
            .header("host", "fn.example")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn gateway(g: Gateway) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, Arc::new(g)));
        addr
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_on_another_instance_with_the_body() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        backend(l, "live");
        // 127.0.0.2 is loopback too, but nothing listens there: refused.
        let table = vec![served("web", port, &["127.0.0.2", "127.0.0.1"])];
        let (_tx, rx) = watch::channel(Arc::new(table));
        let g = gateway(Gateway::new(rx)).await;
        for i in 0..4 {
            let (status, body) = post(g, "/up", &format!("body {i}")).await;
            assert_eq!(
                (status, body.as_str()),
                (200, format!("live: POST /up body {i}").as_str())
            );
        }

        // Every instance the table names refuses (the old one drains, the
        // new one is not in this node's table yet): the request waits for
        // the table and goes to the new one.
        let (tx, rx) = watch::channel(Arc::new(vec![served("web", port, &["127.0.0.2"])]));
        let g = gateway(Gateway::new(rx)).await;
        let call = tokio::spawn(async move { post(g, "/late", "body").await });
        // The request has its own view of the table once it has arrived.
        while tx.receiver_count() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx.send_replace(Arc::new(vec![served("web", port, &["127.0.0.1"])]));
        let (status, body) = call.await.unwrap();
        assert_eq!((status, body.as_str()), (200, "live: POST /late body"));
    }

    #[tokio::test]
    async fn a_request_for_a_function_at_zero_waits_for_its_wake() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(Arc::new(vec![served("fn", port, &[])]));
        let tx = Arc::new(tx);
        let woken = Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = Arc::new(std::sync::Mutex::new(Some(l)));
        let wake: Wake = {
            let (tx, woken) = (tx.clone(), woken.clone());
            Arc::new(move |ns, name| {
                woken.lock().unwrap().push(format!("{ns}/{name}"));
                // As the scheduler would: an instance comes up and the
                // table names it.
                if let Some(l) = listener.lock().unwrap().take() {
                    backend(l, "woken");
                    tx.send_replace(Arc::new(vec![served("fn", port, &["127.0.0.1"])]));
                }
            })
        };
        let g = gateway(Gateway::new(rx.clone()).waking(wake)).await;
        let (status, body) = post(g, "/x", "hi").await;
        assert_eq!((status, body.as_str()), (200, "woken: POST /x hi"));
        assert_eq!(*woken.lock().unwrap(), vec!["default/fn".to_string()]);

        // Without a way to wake, no instance is 503 with Retry-After.
        tx.send_replace(Arc::new(vec![served("fn", port, &[])]));
        let g = gateway(Gateway::new(rx)).await;
        let (status, body) = post(g, "/x", "hi").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("no ready instance"), "{body}");
    }

    #[tokio::test]
    async fn each_routes_answers_are_counted_and_an_invoke_needs_no_route() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        backend(l, "live");
        let mut web = served("web", port, &["127.0.0.1"]);
        web.routes = vec![Route {
            host: String::new(),
            path: "/api".into(),
            weight: 100,
        }];
        let (_tx, rx) = watch::channel(Arc::new(vec![web]));
        let gw = Arc::new(Gateway::new(rx));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, gw.clone()));
        for _ in 0..3 {
            assert_eq!(post(addr, "/api/a", "x").await.0, 200);
        }
        // No route: 404, counted nowhere.
        assert_eq!(post(addr, "/elsewhere", "x").await.0, 404);
        let r = gw.route_readings();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (
                r[0].service.as_str(),
                r[0].host.as_str(),
                r[0].path.as_str()
            ),
            ("web", "", "/api")
        );
        assert_eq!(r[0].answers, [0, 3, 0, 0, 0]);
        assert_eq!(r[0].latency.iter().sum::<u64>(), 3);

        // An invoke names the function's Service: any path, any method,
        // its body passed on.
        let body = Full::new(Bytes::from("direct"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let req = hyper::Request::put("/not/routed").body(body).unwrap();
        let resp = gw.invoke("default", "web", req).await;
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, "live: PUT /not/routed direct");
        assert_eq!(gw.route_readings()[0].answers, [0, 3, 0, 0, 0]);
        let req = hyper::Request::get("/")
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .unwrap();
        assert_eq!(gw.invoke("default", "nope", req).await.status(), 404);
    }

    /// A backend whose first `drop_first` connections are closed as soon
    /// as a request head has arrived, unanswered; later ones answer `ok`.
    fn closing_backend(listener: tokio::net::TcpListener, drop_first: usize) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut conn, _)) = listener.accept().await {
                n += 1;
                let drop_it = n <= drop_first;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => head.extend_from_slice(&buf[..k]),
                        }
                    }
                    if drop_it {
                        return;
                    }
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
    }

    #[tokio::test]
    async fn an_idempotent_request_whose_connection_closed_unanswered_is_sent_again() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        closing_backend(l, 2);
        let (_tx, rx) = watch::channel(Arc::new(vec![served("web", port, &["127.0.0.1"])]));
        let g = gateway(Gateway::new(rx)).await;
        let stream = tokio::net::TcpStream::connect(g).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get("/x")
            .header("host", "fn.example")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");

        // A POST whose body went out may have been acted on: not sent
        // again, the caller is told.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        closing_backend(l, 1);
        let (_tx, rx) = watch::channel(Arc::new(vec![served("web", port, &["127.0.0.1"])]));
        let g = gateway(Gateway::new(rx)).await;
        let (status, body) = post(g, "/x", "body").await;
        assert_eq!(status, 502, "{body}");
    }
}
