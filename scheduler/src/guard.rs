//! The API's front door: authenticates every request (client certificate or
//! bearer token), authorizes it by role, rate-limits repeated failures, and
//! writes an audit line for every mutating request.

use crate::auth::{Action, AuthFailure, Identity, authorize, check_token};
use crate::cluster::Cluster;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flotilla_api::Kind;
use flotilla_api::time::now_ms;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the transport knows about the caller, attached to each request.
#[derive(Clone, Debug)]
pub struct Peer {
    pub ip: IpAddr,
    /// Identity from a verified client certificate, if one was presented.
    pub cert: Option<Result<Identity, String>>,
}

impl Default for Peer {
    fn default() -> Self {
        Peer {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            cert: None,
        }
    }
}

/// Append-only JSON-lines audit log.
pub struct Audit {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

#[derive(serde::Serialize)]
struct AuditLine<'a> {
    time_ms: u64,
    who: &'a str,
    peer: String,
    method: &'a str,
    path: &'a str,
    status: u16,
}

impl Audit {
    pub fn new(path: PathBuf) -> Audit {
        Audit {
            path,
            file: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn write(&self, who: &str, peer: IpAddr, method: &Method, path: &str, status: StatusCode) {
        let line = AuditLine {
            time_ms: now_ms(),
            who,
            peer: peer.to_string(),
            method: method.as_str(),
            path,
            status: status.as_u16(),
        };
        let mut json = serde_json::to_vec(&line).expect("audit lines serialize");
        json.push(b'\n');
        let mut f = self.file.lock().expect("poisoned");
        if f.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            *f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
                .map_err(|e| tracing::error!("cannot open audit log {}: {e}", self.path.display()))
                .ok();
        }
        if let Some(file) = f.as_mut()
            && let Err(e) = file.write_all(&json)
        {
            tracing::error!("audit log write failed: {e}");
        }
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(crate::api::ErrorBody { error: message })).into_response()
}

/// The action a request performs, from its method and path; `None` when the
/// handler authorizes itself (apply) or the path is unknown (404 follows).
fn action_of<'a>(method: &Method, path: &'a str, query: Option<&'a str>) -> Option<Action<'a>> {
    let segs: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let write = method != Method::GET;
    let query_ns = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("namespace=")));
    let kind = Kind::from_user(segs.first()?)?;
    let (namespace, name, write) = match segs.as_slice() {
        [_] => (query_ns, None, write),
        [_, name] => (None, Some(*name), write),
        [_, ns, name] => (Some(*ns), Some(*name), write),
        [_, ns, name, "logs"] => (Some(*ns), Some(*name), false),
        [_, ns, name, "scale"] => (Some(*ns), Some(*name), true),
        _ => return None,
    };
    let namespace = if kind.namespaced() { namespace } else { None };
    Some(Action {
        write,
        kind,
        namespace,
        name,
    })
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

/// Axum middleware guarding every `/v1` route.
pub async fn guard(State(c): State<Arc<Cluster>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if !path.starts_with("/v1/") {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
    let now = Instant::now();
    if let Some(secs) = c.auth_failures.blocked(peer.ip, now) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many failed authentication attempts from {}; try again in {secs} s",
                peer.ip
            ),
        );
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let identity = match (bearer, &peer.cert) {
        (Some(t), _) => check_token(c.store.as_ref(), t),
        (None, Some(Ok(id))) => Ok(id.clone()),
        (None, Some(Err(why))) => Err(AuthFailure::Invalid(why.clone())),
        (None, None) => Err(AuthFailure::Missing),
    };
    let identity = match identity {
        Ok(id) => id,
        Err(f) => {
            let message = match f {
                AuthFailure::Missing => "no credentials: this API needs a client certificate or a bearer token; use the config file `flotilla up` wrote (--config / FLOTILLA_CONFIG) or pass --token".to_string(),
                AuthFailure::Invalid(why) => {
                    c.auth_failures.record_failure(peer.ip, now);
                    format!("authentication failed: {why}")
                }
            };
            if method != Method::GET {
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
    // Credentials are minted by admins only.
    if path == "/v1/tokens" || path.starts_with("/v1/tokens/") || path == "/v1/certificates" {
        let write = method != Method::GET;
        if let Err(why) = authorize(
            &identity,
            &Action {
                write,
                kind: Kind::Token,
                namespace: None,
                name: None,
            },
        ) {
            if write {
                c.audit
                    .write(&who, peer.ip, &method, &path, StatusCode::FORBIDDEN);
            }
            return error(StatusCode::FORBIDDEN, why);
        }
    } else if path.starts_with("/v1/blobs/") {
        // Uploaded modules are content-addressed and shared by namespaces:
        // any user who may change pods somewhere may upload; any user but
        // a join token may ask whether one is there. Nodes fetch theirs
        // over the QUIC link, never here.
        let write = method != Method::GET && method != Method::HEAD;
        if let Err(why) = authorize_blobs(&identity, write) {
            if write {
                c.audit
                    .write(&who, peer.ip, &method, &path, StatusCode::FORBIDDEN);
            }
            return error(StatusCode::FORBIDDEN, why);
        }
    } else if let Some(action) = action_of(&method, &path, req.uri().query())
        && let Err(why) = authorize(&identity, &action)
    {
        if method != Method::GET {
            c.audit
                .write(&who, peer.ip, &method, &path, StatusCode::FORBIDDEN);
        }
        return error(StatusCode::FORBIDDEN, why);
    }
    req.extensions_mut().insert(identity);
    let resp = next.run(req).await;
    if method != Method::GET {
        c.audit.write(&who, peer.ip, &method, &path, resp.status());
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_from_paths() {
        let a = action_of(&Method::GET, "/v1/pods", Some("namespace=team&selector=a")).unwrap();
        assert_eq!(
            (a.kind, a.namespace, a.write),
            (Kind::Pod, Some("team"), false)
        );
        let a = action_of(&Method::DELETE, "/v1/deployments/prod/web", None).unwrap();
        assert_eq!(
            (a.kind, a.namespace, a.name, a.write),
            (Kind::Deployment, Some("prod"), Some("web"), true)
        );
        let a = action_of(&Method::POST, "/v1/deployments/prod/web/scale", None).unwrap();
        assert!(a.write);
        let a = action_of(&Method::GET, "/v1/pods/prod/web/logs", None).unwrap();
        assert!(!a.write);
        let a = action_of(&Method::GET, "/v1/nodes/n1", None).unwrap();
        assert_eq!(
            (a.kind, a.namespace, a.name),
            (Kind::Node, None, Some("n1"))
        );
        assert!(action_of(&Method::POST, "/v1/apply", None).is_none());
    }
}
