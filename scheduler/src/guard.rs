//! The API's front door: authenticates every request (client certificate or
//! bearer token), authorizes it by role, rate-limits repeated failures, and
//! writes an audit line for every mutating request.

use crate::auth::{
    Action, AuthFailure, FailureKey, Identity, authorize, check_certificate, check_token,
};
use crate::cluster::Cluster;
use axum::RequestExt as _;
use axum::extract::{RawPathParams, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flotilla_api::Kind;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

/// What the transport knows about the caller, attached to each request.
#[derive(Clone, Debug)]
pub struct Peer {
    pub ip: IpAddr,
    /// Identity from a verified client certificate, if one was presented.
    pub cert: Option<Result<Identity, String>>,
    /// That certificate's serial number (hex), checked against revocations
    /// on every request.
    pub cert_serial: Option<String>,
}

impl Default for Peer {
    fn default() -> Self {
        Peer {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            cert: None,
            cert_serial: None,
        }
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// How a route is authorized. Every route declares one: `api::router`
/// registers routes only through `Routes::add`, which takes it and puts
/// [`guard`] in front of that route with it, so a route cannot be served
/// without an authorization decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authz {
    /// No credentials (health checks).
    Public,
    /// Authenticated here; the handler authorizes each object it is given
    /// before applying any (apply).
    PerObject,
    /// Credential minting and listing: admins only.
    Admin,
    /// Uploaded modules: edit and admin may upload, any user may look up.
    Blobs,
    /// The resource the route names: the kind is fixed or the `{plural}`
    /// path parameter; namespace from `{ns}` or `?namespace=`; name from
    /// `{name}`; a write unless the method is GET (or as forced).
    Resource {
        kind: Option<Kind>,
        write: Option<bool>,
    },
}

/// The action a request on a route performs, from the route's [`Authz`],
/// its path parameters and query; `Err` for a kind that does not exist.
pub fn action_for<'a>(
    authz: Authz,
    method: &Method,
    params: &'a [(String, String)],
    query: Option<&'a str>,
) -> Result<Option<Action<'a>>, String> {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (kind, write) = match authz {
        Authz::Public | Authz::PerObject | Authz::Blobs => return Ok(None),
        Authz::Admin => (Kind::Token, Some(method != Method::GET)),
        Authz::Resource { kind, write } => (
            match kind {
                Some(k) => k,
                None => {
                    let plural = param("plural").unwrap_or_default();
                    Kind::from_user(plural)
                        .ok_or_else(|| format!("unknown resource type '{plural}'"))?
                }
            },
            write,
        ),
    };
    let query_ns = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("namespace=")));
    let namespace = if kind.namespaced() {
        param("ns").or(query_ns)
    } else {
        None
    };
    Ok(Some(Action {
        write: write.unwrap_or(method != Method::GET),
        kind,
        namespace,
        name: param("name"),
    }))
}

/// Who may upload modules (`write`) or ask about them.
fn authorize_blobs(id: &Identity, write: bool) -> Result<(), String> {
    use flotilla_api::Role;
    match id {
        Identity::User { role, .. } if *role == Role::Admin || *role == Role::Edit => Ok(()),
        Identity::User { role, .. } if !write && *role == Role::View => Ok(()),
        Identity::User { name, role, .. } => Err(format!(
            "{name} (role {role}) may not {} modules: needs role edit or admin",
            if write { "upload" } else { "look up" }
        )),
        Identity::Node { name } => Err(format!(
            "node {name} fetches modules over its link, not through this API"
        )),
    }
}

/// Axum middleware in front of every route, with the route's [`Authz`]:
/// authenticates (client certificate or bearer token), rate-limits
/// failures, authorizes, and writes an audit line for every mutating
/// request.
/// The `Content-Length` a request declares, if any.
fn declared_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

pub async fn guard(
    State((c, authz)): State<(Arc<Cluster>, Authz)>,
    mut req: Request,
    next: Next,
) -> Response {
    if authz == Authz::Public {
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
    let now = Instant::now();
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // A verified client certificate cannot be guessed: never rate limited.
    let failures = match (bearer, &peer.cert) {
        (None, Some(Ok(_))) => None,
        _ => Some(FailureKey::of(c.store.as_ref(), peer.ip, bearer)),
    };
    if let Some(secs) = failures
        .as_ref()
        .and_then(|k| c.auth_failures.blocked(k, now))
    {
        let whom = match failures.as_ref().and_then(|k| k.token_id.as_deref()) {
            Some(id) => format!("for token {id} from {}", peer.ip),
            None => format!("from {}", peer.ip),
        };
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed authentication attempts {whom}; try again in {secs} s"),
        );
    }
    let identity = match (bearer, &peer.cert) {
        (Some(t), _) => check_token(c.store.as_ref(), t),
        (None, Some(Ok(id))) => {
            check_certificate(c.store.as_ref(), peer.cert_serial.as_deref()).map(|()| id.clone())
        }
        (None, Some(Err(why))) => Err(AuthFailure::Invalid(why.clone())),
        (None, None) => Err(AuthFailure::Missing),
    };
    let mutating = method != Method::GET && method != Method::HEAD;
    // Writes are audited, and so is every read of secrets.
    let audited = mutating || path == "/v1/secrets" || path.starts_with("/v1/secrets/");
    let identity = match identity {
        Ok(id) => id,
        Err(f) => {
            let message = match f {
                AuthFailure::Missing => "no credentials: this API needs a client certificate or a bearer token; use the config file `flotilla up` wrote (--config / FLOTILLA_CONFIG) or pass --token".to_string(),
                AuthFailure::Invalid(why) => {
                    if let Some(k) = failures {
                        c.auth_failures.record_failure(k, now);
                    }
                    format!("authentication failed: {why}")
                }
            };
            if audited {
                c.audit.write(
                    "<unauthenticated>",
                    peer.ip,
                    &method,
                    &path,
                    StatusCode::UNAUTHORIZED,
                );
            }
            return error(StatusCode::UNAUTHORIZED, message);
        }
    };
    let who = identity.to_string();
    let params: Vec<(String, String)> = match req.extract_parts::<RawPathParams>().await {
        Ok(p) => p
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        Err(_) => Vec::new(),
    };
    let decision = match authz {
        Authz::Blobs => {
            authorize_blobs(&identity, mutating).map_err(|w| (StatusCode::FORBIDDEN, w))
        }
        _ => match action_for(authz, &method, &params, req.uri().query()) {
            Ok(Some(action)) => {
                authorize(&identity, &action).map_err(|w| (StatusCode::FORBIDDEN, w))
            }
            Ok(None) => Ok(()),
            Err(why) => Err((StatusCode::NOT_FOUND, why)),
        },
    };
    // A body declared larger than the API takes is refused before it is
    // read: the client learns the limit at once instead of streaming
    // megabytes into a connection that will be cut. (Bodies without a
    // length are still held to the same limit while they are read.)
    let decision = decision.and_then(|()| match declared_length(&req) {
        Some(len) if authz != Authz::Blobs && len > crate::api::MAX_BODY as u64 => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {len} bytes exceeds the API's limit of {} bytes; split the manifest into several applies",
                crate::api::MAX_BODY
            ),
        )),
        _ => Ok(()),
    });
    if let Err((status, why)) = decision {
        if audited {
            c.audit.write(&who, peer.ip, &method, &path, status);
        }
        return error(status, why);
    }
    req.extensions_mut().insert(identity);
    let resp = next.run(req).await;
    if audited {
        let objects = resp
            .extensions()
            .get::<crate::audit::AuditObjects>()
            .map(|o| o.0.as_slice())
            .unwrap_or_default();
        c.audit
            .write_objects(&who, peer.ip, &method, &path, resp.status(), objects);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn actions_from_routes() {
        let any = Authz::Resource {
            kind: None,
            write: None,
        };
        let p = params(&[("plural", "pods")]);
        let a = action_for(any, &Method::GET, &p, Some("namespace=team&selector=a"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.kind, a.namespace, a.write),
            (Kind::Pod, Some("team"), false)
        );
        let p = params(&[("plural", "deployments"), ("ns", "prod"), ("name", "web")]);
        let a = action_for(any, &Method::DELETE, &p, None).unwrap().unwrap();
        assert_eq!(
            (a.kind, a.namespace, a.name, a.write),
            (Kind::Deployment, Some("prod"), Some("web"), true)
        );
        let scale = Authz::Resource {
            kind: Some(Kind::Deployment),
            write: Some(true),
        };
        let p = params(&[("ns", "prod"), ("name", "web")]);
        assert!(
            action_for(scale, &Method::POST, &p, None)
                .unwrap()
                .unwrap()
                .write
        );
        let logs = Authz::Resource {
            kind: Some(Kind::Pod),
            write: Some(false),
        };
        assert!(
            !action_for(logs, &Method::GET, &p, None)
                .unwrap()
                .unwrap()
                .write
        );
        let p = params(&[("plural", "nodes"), ("name", "n1")]);
        let a = action_for(any, &Method::GET, &p, None).unwrap().unwrap();
        assert_eq!(
            (a.kind, a.namespace, a.name),
            (Kind::Node, None, Some("n1"))
        );
        let p = params(&[("plural", "gizmos")]);
        assert!(action_for(any, &Method::GET, &p, None).is_err());
        let a = action_for(Authz::Admin, &Method::POST, &[], None)
            .unwrap()
            .unwrap();
        assert_eq!((a.kind, a.write), (Kind::Token, true));
        assert!(
            action_for(Authz::PerObject, &Method::POST, &[], None)
                .unwrap()
                .is_none()
        );
    }
}
