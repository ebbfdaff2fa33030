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
type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Incoming,
>;

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

/// The node's gateway.
pub struct Gateway {
    table: watch::Receiver<Arc<Vec<ServiceView>>>,
    client: Client,
    next: AtomicUsize,
    /// Walks weighted routes (a separate count from the endpoints').
    split: std::sync::atomic::AtomicU64,
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
        }
    }

    async fn handle(&self, mut req: hyper::Request<Incoming>) -> hyper::Response<Body> {
        let host = request_host(&req);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let table = self.table.borrow().clone();
        let pick = self.split.fetch_add(1, Ordering::Relaxed);
        let Some((svc, _)) = route(&table, &host, &path, pick) else {
            return text(
                404,
                format!("no function route matches host '{host}' and path '{path}'\n"),
            );
        };
        let Some(port) = svc.ports.first() else {
            return text(502, format!("service {} has no port\n", svc.name));
        };
        if svc.endpoints.is_empty() {
            let mut r = text(
                503,
                format!(
                    "{}/{} has no ready instance; try again\n",
                    svc.namespace, svc.name
                ),
            );
            r.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
            return r;
        }
        // An HTTP/2 request names its host in the URI only: keep it as the
        // Host header, which is what the function sees after the hop.
        if !req.headers().contains_key(http::header::HOST)
            && let Some(a) = req.uri().authority().cloned()
            && let Ok(v) = http::HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(http::header::HOST, v);
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % svc.endpoints.len();
        let target = format!("http://{}:{}{path}", svc.endpoints[i], port.target());
        match target.parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return text(400, format!("cannot forward {path}: {e}\n")),
        }
        // Whatever version came in, the hop to the pod is HTTP/1.1 (the
        // pooled client's); the Host header stays the client's.
        *req.version_mut() = http::Version::HTTP_11;
        match self.client.request(req).await {
            Ok(resp) => resp.map(BodyExt::boxed),
            Err(e) => text(
                502,
                format!(
                    "{}/{}: the instance at {} did not answer: {e}\n",
                    svc.namespace, svc.name, svc.endpoints[i]
                ),
            ),
        }
    }
}

/// Serves the gateway on `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, gateway: Arc<Gateway>) {
    accept(listener, move |req| {
        let gateway = gateway.clone();
        async move { gateway.handle(req).await }
    })
    .await
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener`, every
/// request answered by `handle`, until the future is dropped. The
/// connections belong to this future: dropping it closes them.
pub async fn accept<H, F, B>(listener: tokio::net::TcpListener, handle: H)
where
    H: Fn(hyper::Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Reap finished connections as they end.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((conn, _)) = accepted else {
            // Out of descriptors or similar: give it a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = conn.set_nodelay(true);
        let handle = handle.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = handle(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(conn), service)
                .await;
        });
    }
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
}
