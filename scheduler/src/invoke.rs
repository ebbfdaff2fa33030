//! `flotilla invoke`: an HTTP request for a Function, sent through the API
//! to a node's gateway over that node's link — so it reaches functions on
//! nodes behind NAT, with the caller's API credentials, and needs no route.
//!
//! `ANY /v1/functions/{ns}/{name}/invoke[/{path}]`: the method, the rest of
//! the path, the query, the headers (but the API's own) and the body are
//! the function's request; its answer streams back as it is, with the
//! node that served it in `x-flotilla-node`. Errors of the API itself
//! (no such function, no node) are the API's JSON errors, without that
//! header.

use crate::api::ApiError;
use crate::cluster::Cluster;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use flotilla_api::function::FUNCTION_LABEL;
use flotilla_api::proto::{FrameReader, InvokeReply, InvokeRequest, StreamOpen, encode};
use flotilla_api::{Kind, Object};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The header naming the node that served an invoke.
pub const NODE_HEADER: &str = "x-flotilla-node";
/// A `Host` for the function (the API request's own `Host` names the API).
pub const HOST_HEADER: &str = "x-flotilla-invoke-host";
/// Nodes asked in turn before the invoke is refused.
const MAX_NODES: usize = 4;
/// Longest wait for a node to answer: its gateway holds a request for a
/// function at zero up to a minute, and the function's own timeout comes
/// on top.
const ANSWER_WITHIN: Duration = Duration::from_secs(300);

/// Headers that belong to one hop (or to the API), never passed on.
fn passed_on(name: &str) -> bool {
    !matches!(
        name,
        "host"
            | "authorization"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The nodes to ask, best first: those running a ready instance of the
/// function, then every other connected node (its gateway wakes a
/// function at zero).
fn candidates(c: &Cluster, ns: &str, name: &str) -> Vec<String> {
    let mut nodes: Vec<String> = Vec::new();
    for p in c.store.list(&format!("pods/{ns}/")) {
        if let Object::Pod(p) = &*p
            && p.metadata.labels.get(FUNCTION_LABEL).map(String::as_str) == Some(name)
            && p.is_ready()
            && let Some(n) = &p.status.node
            && !nodes.contains(n)
        {
            nodes.push(n.clone());
        }
    }
    let connected: Vec<String> = c
        .sessions
        .lock()
        .expect("poisoned")
        .keys()
        .cloned()
        .collect();
    nodes.retain(|n| connected.contains(n));
    let mut rest: Vec<String> = connected
        .into_iter()
        .filter(|n| !nodes.contains(n))
        .collect();
    rest.sort();
    nodes.extend(rest);
    nodes.truncate(MAX_NODES);
    nodes
}

fn refused(status: StatusCode, message: String) -> ApiError {
    ApiError { status, message }
}

/// The request as the function will see it.
fn request_for(ns: &str, name: &str, rest: Option<&str>, req: &Request) -> InvokeRequest {
    let mut path = format!("/{}", rest.unwrap_or("").trim_start_matches('/'));
    if let Some(q) = req.uri().query() {
        path.push('?');
        path.push_str(q);
    }
    let mut headers = Vec::new();
    for (k, v) in req.headers() {
        let Ok(v) = v.to_str() else { continue };
        if k.as_str() == HOST_HEADER {
            headers.push(("host".to_string(), v.to_string()));
        } else if passed_on(k.as_str()) {
            headers.push((k.to_string(), v.to_string()));
        }
    }
    InvokeRequest {
        namespace: ns.to_string(),
        function: name.to_string(),
        method: req.method().to_string(),
        path,
        headers,
    }
}

/// An invoke stream a node accepted: where to send the body, where the
/// answer comes from.
struct Accepted {
    node: String,
    send: quinn::SendStream,
    reader: FrameReader<quinn::RecvStream>,
}

/// Asks `node` to take `open`; `Err` says why it did not.
async fn offer(c: &Cluster, node: &str, open: &[u8]) -> Result<Accepted, String> {
    let conn = c
        .connection(node)
        .ok_or_else(|| format!("node {node} is not connected"))?;
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("node {node}: {e}"))?;
    send.write_all(open)
        .await
        .map_err(|e| format!("node {node}: {e}"))?;
    let mut reader = FrameReader::new(recv);
    match tokio::time::timeout(ANSWER_WITHIN, reader.next::<InvokeReply>()).await {
        Ok(Ok(InvokeReply::Accepted)) => Ok(Accepted {
            node: node.to_string(),
            send,
            reader,
        }),
        Ok(Ok(InvokeReply::Err { message })) => Err(format!("node {node}: {message}")),
        Ok(Ok(InvokeReply::Head { .. })) => Err(format!("node {node} answered out of turn")),
        Ok(Err(e)) => Err(format!("node {node}: {e}")),
        Err(_) => Err(format!("node {node} did not answer")),
    }
}

/// Copies the caller's body onto the stream, then finishes it (or resets
/// it if the caller's body broke off, so the function sees no false end).
async fn feed(body: Body, mut send: quinn::SendStream) {
    use futures_util::StreamExt;
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        match chunk {
            Ok(bytes) => {
                if send.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Err(_) => {
                let _ = send.reset(1u32.into());
                return;
            }
        }
    }
    let _ = send.finish();
}

/// The route's handlers: every method a function may be called with, the
/// body unbounded (it streams; the function's own limits apply).
pub fn methods() -> axum::routing::MethodRouter<Arc<Cluster>> {
    use axum::routing::MethodFilter;
    let all = [
        MethodFilter::GET,
        MethodFilter::POST,
        MethodFilter::PUT,
        MethodFilter::PATCH,
        MethodFilter::DELETE,
        MethodFilter::HEAD,
        MethodFilter::OPTIONS,
    ]
    .into_iter()
    .reduce(MethodFilter::or)
    .expect("a method");
    axum::routing::on(all, invoke).layer(axum::extract::DefaultBodyLimit::disable())
}

async fn invoke(
    State(c): State<Arc<Cluster>>,
    Path(params): Path<HashMap<String, String>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (ns, name) = (&params["ns"], &params["name"]);
    let key = flotilla_api::object::key(Kind::Function, ns, name);
    if c.store.get(&key).is_none() {
        return Err(refused(
            StatusCode::NOT_FOUND,
            format!("function {name} not found in namespace {ns}"),
        ));
    }
    let open = encode(&StreamOpen::Invoke(request_for(
        ns,
        name,
        params.get("path").map(String::as_str),
        &req,
    )));
    let mut why = Vec::new();
    let mut accepted = None;
    for node in candidates(&c, ns, name) {
        match offer(&c, &node, &open).await {
            Ok(a) => {
                accepted = Some(a);
                break;
            }
            Err(e) => why.push(e),
        }
    }
    let Some(Accepted {
        node,
        send,
        mut reader,
    }) = accepted
    else {
        let why = if why.is_empty() {
            "no node is connected".to_string()
        } else {
            why.join("; ")
        };
        return Err(refused(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no node could take a request for function {name}: {why}"),
        ));
    };
    tokio::spawn(feed(req.into_body(), send));
    let (status, headers) =
        match tokio::time::timeout(ANSWER_WITHIN, reader.next::<InvokeReply>()).await {
            Ok(Ok(InvokeReply::Head { status, headers })) => (status, headers),
            Ok(Ok(InvokeReply::Err { message })) => {
                return Err(refused(
                    StatusCode::BAD_GATEWAY,
                    format!("node {node}: {message}"),
                ));
            }
            Ok(Ok(InvokeReply::Accepted)) => {
                return Err(refused(
                    StatusCode::BAD_GATEWAY,
                    format!("node {node} answered out of turn"),
                ));
            }
            Ok(Err(e)) => {
                return Err(refused(
                    StatusCode::BAD_GATEWAY,
                    format!("node {node} broke off: {e}"),
                ));
            }
            Err(_) => {
                return Err(refused(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "node {node} gave no answer within {} s",
                        ANSWER_WITHIN.as_secs()
                    ),
                ));
            }
        };
    let (recv, rest) = reader.into_parts();
    let mut resp = Response::new(crate::api::link_body(recv, rest));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (k, v) in headers {
        if !passed_on(&k) || k == "content-length" {
            continue;
        }
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            axum::http::HeaderValue::from_str(&v),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(&node) {
        resp.headers_mut().insert(NODE_HEADER, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_function_gets_the_callers_request_but_not_the_apis_headers() {
        let req = axum::http::Request::builder()
            .method("PUT")
            .uri("/v1/functions/prod/hello/invoke/api/who?x=1&y=2")
            .header("host", "scheduler:7443")
            .header("authorization", "Bearer secret")
            .header("connection", "keep-alive")
            .header("content-type", "text/plain")
            .header(HOST_HEADER, "hello.example")
            .body(Body::empty())
            .unwrap();
        let r = request_for("prod", "hello", Some("api/who"), &req);
        assert_eq!(
            (r.namespace.as_str(), r.function.as_str(), r.method.as_str()),
            ("prod", "hello", "PUT")
        );
        assert_eq!(r.path, "/api/who?x=1&y=2");
        let mut h = r.headers.clone();
        h.sort();
        assert_eq!(
            h,
            vec![
                ("content-type".to_string(), "text/plain".to_string()),
                ("host".to_string(), "hello.example".to_string()),
            ]
        );
        let bare = axum::http::Request::builder()
            .uri("/v1/functions/prod/hello/invoke")
            .body(Body::empty())
            .unwrap();
        assert_eq!(request_for("prod", "hello", None, &bare).path, "/");
    }
}
