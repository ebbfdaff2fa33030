//! The HTTP/JSON API. Errors are JSON `{"error": "..."}` with a status code the
//! CLI turns into a readable message.

use crate::agents::open_log;
use crate::auth::{Action, Identity, TokenInfo, authorize};
use crate::cluster::Cluster;
use crate::guard::Authz;
use crate::kinds::{self, Update};
use crate::store::{Expect, StoreError, WriteDurability};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use flotilla_api::meta::check_dns_label;
use flotilla_api::proto::LogRequest;
use flotilla_api::selector::Selector;
use flotilla_api::{EventType, Kind, MemberSource, Object, Role};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Largest request body accepted (bytes).
pub const MAX_BODY: usize = 8 << 20;

/// An error with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        // 503 is retryable (e.g. a write fenced by a leadership change).
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let status = match &e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::AlreadyExists(_) | StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::TooOld(_) => StatusCode::GONE,
            StoreError::Fenced(_) | StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Backend(_) | StoreError::Corrupt { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl From<flotilla_api::interfaces::KvError> for ApiError {
    fn from(e: flotilla_api::interfaces::KvError) -> ApiError {
        use flotilla_api::interfaces::KvError;
        let status = match &e {
            KvError::AccessDenied(_) => StatusCode::FORBIDDEN,
            KvError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            KvError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

/// `GET /v1/kv/{ns}/{bucket}`: a page of keys, what the bucket holds and
/// what it may.
async fn kv_list(
    State(c): State<Arc<Cluster>>,
    Path((ns, bucket)): Path<(String, String)>,
    Query(q): Query<KvListQuery>,
) -> ApiResult<Json<flotilla_api::interfaces::BucketListing>> {
    use flotilla_api::interfaces::{KvAnswer, KvOp};
    let op = KvOp::ListKeys {
        cursor: q.cursor.unwrap_or(0),
    };
    let KvAnswer::Keys { keys, cursor } = crate::kv::run(&c, &ns, &bucket, op).await? else {
        unreachable!("list-keys answers with keys")
    };
    Ok(Json(flotilla_api::interfaces::BucketListing {
        keys,
        cursor,
        usage: c.kv.store()?.usage(&ns, &bucket),
        limits: crate::kv::limits(&c, &ns),
    }))
}

#[derive(Deserialize)]
struct KvListQuery {
    cursor: Option<u64>,
}

/// `GET /v1/kv/{ns}/{bucket}/{key}`: the value's bytes.
async fn kv_get(
    State(c): State<Arc<Cluster>>,
    Path((ns, bucket, key)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    use flotilla_api::interfaces::{KvAnswer, KvOp};
    match crate::kv::run(&c, &ns, &bucket, KvOp::Get { key: key.clone() }).await? {
        KvAnswer::Value(Some(v)) => Ok((
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            v,
        )
            .into_response()),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("bucket \"{bucket}\" of namespace {ns} has no key \"{key}\""),
        )),
    }
}

/// `PUT /v1/kv/{ns}/{bucket}/{key}`: the body is the value.
async fn kv_put(
    State(c): State<Arc<Cluster>>,
    Path((ns, bucket, key)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let op = flotilla_api::interfaces::KvOp::Set {
        key,
        value: body.to_vec(),
    };
    crate::kv::run(&c, &ns, &bucket, op).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn kv_delete(
    State(c): State<Arc<Cluster>>,
    Path((ns, bucket, key)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    crate::kv::run(
        &c,
        &ns,
        &bucket,
        flotilla_api::interfaces::KvOp::Delete { key },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The API's routes. [`Routes::add`] is the only place a route is added,
/// and it takes the route's authorization: the guard runs in front of each
/// route with it (a test keeps it that way).
pub struct Routes {
    router: Router<Arc<Cluster>>,
    cluster: Arc<Cluster>,
    /// Every route added, with its authorization.
    pub declared: Vec<(&'static str, Authz)>,
}

impl Routes {
    fn new(cluster: Arc<Cluster>) -> Routes {
        Routes {
            router: Router::new(),
            cluster,
            declared: Vec::new(),
        }
    }

    fn add(
        mut self,
        path: &'static str,
        authz: Authz,
        handlers: MethodRouter<Arc<Cluster>>,
    ) -> Routes {
        let guard = axum::middleware::from_fn_with_state(
            (self.cluster.clone(), authz),
            crate::guard::guard,
        );
        self.router = self.router.route(path, handlers.route_layer(guard));
        self.declared.push((path, authz));
        self
    }

    /// The router, with the body limit and shared state; a follower
    /// serves reads itself and sends everything else to the leader
    /// ([`follower`]).
    pub fn into_router(self) -> Router {
        let follow = axum::middleware::from_fn_with_state(self.cluster.clone(), follower);
        self.router
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .layer(follow)
            .with_state(self.cluster)
    }
}

/// Whether a follower answers `method path` itself: reads of stored
/// objects (`/v1/{plural}[/{ns}]/{name}`, not events, metrics, key-value
/// data or blobs, which live with the leader), health and the leader's
/// address.
pub fn served_by_followers(method: &axum::http::Method, path: &str) -> bool {
    if path == "/healthz" || path == "/v1/leader" {
        return true;
    }
    if method != axum::http::Method::GET {
        return false;
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    parts.len() >= 2
        && parts.len() <= 4
        && parts[0] == "v1"
        && !matches!(parts[1], "events" | "metrics" | "kv" | "blobs" | "tokens")
}

/// In front of every route: the leader (and a scheduler that is the only
/// one) serves everything; a follower serves reads of stored objects once
/// its copy caught up with etcd (so no read goes back behind what a client
/// saw at the leader), and answers the rest with 307 to the leader's API
/// — writes are checked under the leader's locks (quotas, node ports) and
/// uploads, logs, metrics and key-value data live with it — or 503 with
/// Retry-After while no leader is known.
async fn follower(
    State(c): State<Arc<Cluster>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if c.leadership.is_leader() {
        return next.run(req).await;
    }
    if served_by_followers(req.method(), req.uri().path()) {
        if req.uri().path().starts_with("/v1/") && req.uri().path() != "/v1/leader" {
            let store = c.store.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.sync()).await {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("this scheduler cannot reach the store: {e}"),
                )
                .into_response();
            }
        }
        return next.run(req).await;
    }
    match c.leadership.leader() {
        Some(l) => {
            let to = format!(
                "{}{}",
                l.api,
                req.uri().path_and_query().map_or("", |p| p.as_str())
            );
            match axum::http::HeaderValue::from_str(&to) {
                Ok(v) => {
                    let mut r = ApiError::new(
                        StatusCode::TEMPORARY_REDIRECT,
                        format!("this scheduler follows; the leader is {}", l.api),
                    )
                    .into_response();
                    r.headers_mut().insert(axum::http::header::LOCATION, v);
                    r
                }
                Err(_) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "bad request path").into_response()
                }
            }
        }
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no scheduler leads right now (an election is under way); try again",
        )
        .into_response(),
    }
}

/// Who leads, as this scheduler knows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaderInfo {
    /// Whether the scheduler answering leads.
    pub leading: bool,
    /// The leader's API base URL (empty: this one, or none known).
    #[serde(default)]
    pub leader_api: String,
    /// The leader's QUIC address, for agents (empty as above).
    #[serde(default)]
    pub leader_quic: String,
    /// The leader's term (0: a scheduler that is the only one).
    #[serde(default)]
    pub term: u64,
}

async fn leader(State(c): State<Arc<Cluster>>) -> Json<LeaderInfo> {
    Json(match c.leadership.role() {
        crate::leader::Role::Leader { term } => LeaderInfo {
            leading: true,
            leader_api: String::new(),
            leader_quic: String::new(),
            term,
        },
        crate::leader::Role::Follower { leader } => LeaderInfo {
            leading: false,
            leader_api: leader.as_ref().map(|l| l.api.clone()).unwrap_or_default(),
            leader_quic: leader.map(|l| l.quic).unwrap_or_default(),
            term: 0,
        },
    })
}

/// Every route with its authorization.
pub fn routes(cluster: Arc<Cluster>) -> Routes {
    use Authz::*;
    let resource = |kind| Resource { kind, write: None };
    Routes::new(cluster)
        .add("/healthz", Public, get(|| async { "ok" }))
        .add("/v1/leader", Public, get(leader))
        .add("/v1/apply", PerObject, post(apply))
        .add("/v1/tokens", Admin, get(list_tokens).post(create_token))
        .add(
            "/v1/tokens/{id}",
            Admin,
            axum::routing::delete(revoke_token),
        )
        .add("/v1/certificates", Admin, post(create_certificate))
        .add("/v1/secrets-key/rotate", Admin, post(rotate_secret_key))
        .add(
            "/v1/nodes/{name}/cordon",
            resource(Some(Kind::Node)),
            post(cordon),
        )
        .add(
            "/v1/nodes/{name}/uncordon",
            resource(Some(Kind::Node)),
            post(uncordon),
        )
        .add("/v1/events", resource(Some(Kind::Event)), get(events))
        .add(
            "/v1/deployments/{ns}/{name}/scale",
            Resource {
                kind: Some(Kind::Deployment),
                write: Some(true),
            },
            post(scale),
        )
        .add(
            "/v1/deployments/{ns}/{name}/rollout",
            Resource {
                kind: Some(Kind::Deployment),
                write: Some(true),
            },
            post(rollout),
        )
        .add(
            "/v1/metrics/nodes",
            Resource {
                kind: Some(Kind::Node),
                write: Some(false),
            },
            get(node_metrics),
        )
        .add(
            "/v1/metrics/pods",
            Resource {
                kind: Some(Kind::Pod),
                write: Some(false),
            },
            get(pod_metrics),
        )
        .add(
            "/metrics",
            Resource {
                kind: Some(Kind::Node),
                write: Some(false),
            },
            get(prometheus),
        )
        .add(
            "/v1/pods/{ns}/{name}/logs",
            Resource {
                kind: Some(Kind::Pod),
                write: Some(false),
            },
            get(logs),
        )
        .add(
            "/v1/functions/{ns}/{name}/invoke",
            Resource {
                kind: Some(Kind::Function),
                write: Some(true),
            },
            crate::invoke::methods(),
        )
        .add(
            "/v1/functions/{ns}/{name}/invoke/{*path}",
            Resource {
                kind: Some(Kind::Function),
                write: Some(true),
            },
            crate::invoke::methods(),
        )
        // Another scheduler of the cluster copying a module (admins only).
        .add(
            "/v1/blobs/{digest}/content",
            Admin,
            get(crate::replicate::content),
        )
        .add(
            "/v1/blobs/{digest}",
            Blobs,
            axum::routing::put(crate::blobs::upload)
                .head(crate::blobs::exists)
                .layer(DefaultBodyLimit::disable()),
        )
        // A bucket's data is authorized as its namespace's ConfigMaps are:
        // view reads, edit writes.
        .add(
            "/v1/kv/{ns}/{bucket}",
            Resource {
                kind: Some(Kind::ConfigMap),
                write: Some(false),
            },
            get(kv_list),
        )
        .add(
            "/v1/kv/{ns}/{bucket}/{key}",
            resource(Some(Kind::ConfigMap)),
            get(kv_get).put(kv_put).delete(kv_delete),
        )
        .add("/v1/{plural}", resource(None), get(list))
        .add(
            "/v1/{plural}/{name}",
            resource(None),
            get(get_cluster_scoped).delete(delete_cluster_scoped),
        )
        .add(
            "/v1/{plural}/{ns}/{name}",
            resource(None),
            get(get_one).put(replace).delete(delete),
        )
}

pub fn router(cluster: Arc<Cluster>) -> Router {
    routes(cluster).into_router()
}

fn kind_of(plural: &str) -> ApiResult<Kind> {
    match Kind::from_user(plural) {
        // Tokens have their own routes, which never return the stored hashes.
        Some(Kind::Token) | None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "unknown resource type '{plural}'; known: pods, deployments, services, secrets, configmaps, volumes, nodes, events"
            ),
        )),
        Some(k) => Ok(k),
    }
}

/// Request body of `POST /v1/apply`.
#[derive(Serialize, Deserialize)]
pub struct ApplyRequest {
    pub objects: Vec<Object>,
    /// `flotilla create`: an object that exists is refused (409), never
    /// changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create_only: bool,
}

/// Outcome for one object of an apply.
#[derive(Serialize, Deserialize, Debug)]
pub struct ApplyResult {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// `created`, `configured`, `unchanged`, or `error`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct ApplyResponse {
    pub results: Vec<ApplyResult>,
}

/// Largest object (encoded) the API stores: every object goes to agents
/// inside frames of at most 4 MiB, so one object must never come near that.
pub const MAX_OBJECT_BYTES: usize = 256 << 10;
/// Most labels on an object.
pub const MAX_LABELS: usize = 64;
/// Most ports on a service.
pub const MAX_SERVICE_PORTS: usize = 256;

/// The length of `obj` encoded as JSON, counted without building it.
fn encoded_len(obj: &Object) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    match serde_json::to_writer(&mut n, obj) {
        Ok(()) => n.0,
        Err(_) => usize::MAX,
    }
}

fn validate(obj: &Object, cluster: &Cluster) -> Result<(), String> {
    let m = obj.meta();
    check_dns_label(&m.name).map_err(|w| format!("name '{}' {w}", m.name))?;
    if obj.kind().namespaced() {
        check_dns_label(&m.namespace).map_err(|w| format!("namespace '{}' {w}", m.namespace))?;
    } else if !m.namespace.is_empty() {
        return Err(format!(
            "{}s are cluster-scoped: they have no namespace",
            obj.kind().to_string().to_lowercase()
        ));
    }
    let kind = obj.kind().to_string().to_lowercase();
    if m.labels.len() > MAX_LABELS {
        return Err(format!(
            "{kind} {} has {} labels; at most {MAX_LABELS} are allowed",
            m.name,
            m.labels.len()
        ));
    }
    if let Object::Service(s) = obj
        && s.spec.ports.len() > MAX_SERVICE_PORTS
    {
        return Err(format!(
            "service {} has {} ports; at most {MAX_SERVICE_PORTS} are allowed",
            m.name,
            s.spec.ports.len()
        ));
    }
    let size = encoded_len(obj);
    if size > MAX_OBJECT_BYTES {
        return Err(format!(
            "{kind} {} is {size} bytes encoded; objects may be at most {MAX_OBJECT_BYTES} bytes (large data belongs in a module or image, not in env or args)",
            m.name
        ));
    }
    let rules = kinds::rules(obj.kind());
    rules.client_writable()?;
    rules.validate(
        obj,
        &kinds::Checks {
            blobs: &cluster.blobs,
            node_ports: cluster.cfg.node_ports,
            plugins: &cluster.plugins,
        },
    )
}

/// A write past a namespace's quota: 403, as Kubernetes answers.
fn quota_refused(why: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, why)
}

/// `obj` checked by the API and passed through the admission plugins
/// that select it (which may change it): what a client's write stores.
fn admitted(cluster: &Cluster, obj: Object) -> ApiResult<Object> {
    let unprocessable = |e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e);
    validate(&obj, cluster).map_err(unprocessable)?;
    use crate::plugins::Refusal;
    cluster
        .plugins
        .admit(cluster, obj, |o| validate(o, cluster))
        .map_err(|r| match r {
            Refusal::Denied(why) => ApiError::new(StatusCode::FORBIDDEN, why),
            Refusal::Failed(why) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, why),
            Refusal::Invalid(why) => unprocessable(format!("after admission plugins: {why}")),
        })
}

/// For a service with node ports: that no other service holds any of
/// them (409 naming the holder); the returned guard is held until the
/// write is done, so two writes cannot both take a port.
fn claim_node_ports<'a>(
    cluster: &'a Cluster,
    obj: &Object,
) -> ApiResult<Option<std::sync::MutexGuard<'a, ()>>> {
    let Object::Service(s) = obj else {
        return Ok(None);
    };
    let wanted: Vec<(u16, flotilla_api::Protocol)> = s
        .spec
        .ports
        .iter()
        .filter_map(|p| Some((p.node_port?, p.protocol)))
        .collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    let guard = cluster.node_port_claims.lock().expect("poisoned");
    let key = obj.key();
    for other in cluster.store.list("services/") {
        let Object::Service(o) = &*other else {
            continue;
        };
        if other.key() == key {
            continue;
        }
        for p in &o.spec.ports {
            if let Some(np) = p.node_port
                && wanted.contains(&(np, p.protocol))
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "node_port {np}/{} is held by service {}/{}",
                        p.protocol, o.metadata.namespace, o.metadata.name
                    ),
                ));
            }
        }
    }
    Ok(Some(guard))
}

/// Normalizes what a client sent: identity and status are the server's.
fn incoming(mut obj: Object) -> Object {
    let m = obj.meta_mut();
    m.uid.clear();
    m.resource_version = 0;
    m.generation = 0;
    m.owner = None;
    kinds::rules(obj.kind()).strip_owned(&mut obj);
    obj
}

pub(crate) fn apply_one(
    cluster: &Cluster,
    obj: Object,
    create_only: bool,
) -> ApiResult<&'static str> {
    let mut obj = admitted(cluster, incoming(obj))?;
    let _claim = claim_node_ports(cluster, &obj)?;
    let mut usage = cluster.quota_claims.lock().expect("poisoned");
    kinds::quota::enforce(cluster, &mut usage, &mut obj).map_err(quota_refused)?;
    let key = obj.key();
    // Apply carries no resource version: the client asks for its spec to
    // win, so a controller's status write between this read and the write
    // is not the client's conflict. Read, merge and write again.
    for _ in 0..APPLY_ATTEMPTS {
        if let Some(done) = apply_at_current(cluster, &key, obj.clone(), create_only)? {
            return Ok(done);
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        format!("{key} kept changing while it was applied; try again"),
    ))
}

/// Times apply re-reads an object that a controller changed under it.
const APPLY_ATTEMPTS: usize = 8;

/// One read-merge-write of an applied object against what is stored now;
/// `None` when the object changed between the read and the write.
fn apply_at_current(
    cluster: &Cluster,
    key: &str,
    mut obj: Object,
    create_only: bool,
) -> ApiResult<Option<&'static str>> {
    let current = cluster.store.get(key);
    if let Some(current) = &current {
        keep_pins(current, &mut obj);
    }
    if create_only && current.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{} {} already exists; change it with flotilla apply, or delete it first",
                obj.kind().to_string().to_lowercase(),
                obj.meta().name
            ),
        ));
    }
    let Some(current) = current else {
        let stored = match cluster
            .store
            .put(obj, Expect::Absent, WriteDurability::Sync)
        {
            Ok(stored) => stored,
            Err(StoreError::AlreadyExists(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        cluster.event(
            &stored,
            EventType::Normal,
            "Created",
            "created by apply".into(),
        );
        return Ok(Some("created"));
    };
    if current.kind() != obj.kind() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{key} exists as another kind"),
        ));
    }
    let rules = kinds::rules(obj.kind());
    let updated = rules
        .update(&current, obj)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    let Update::Write(next) = updated else {
        return Ok(Some("unchanged"));
    };
    let stored = match cluster.store.put(
        *next,
        Expect::Version(current.meta().resource_version),
        WriteDurability::Sync,
    ) {
        Ok(stored) => stored,
        Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if stored.meta().generation != current.meta().generation {
        cluster.event(
            &stored,
            EventType::Normal,
            "Updated",
            format!("generation {}", stored.meta().generation),
        );
    }
    if rules.wakes_controllers() {
        cluster.kick.notify_one();
    }
    Ok(Some("configured"))
}

async fn apply(
    State(c): State<Arc<Cluster>>,
    Extension(id): Extension<Identity>,
    Json(req): Json<ApplyRequest>,
) -> ApiResult<(Extension<crate::audit::AuditObjects>, Json<ApplyResponse>)> {
    // All or nothing: every object must be allowed before any is applied.
    for obj in &req.objects {
        let kind = obj.kind();
        let ns = obj.meta().namespace.as_str();
        authorize(
            &id,
            &Action {
                write: true,
                kind,
                namespace: kind.namespaced().then_some(ns),
                name: Some(&obj.meta().name),
            },
        )
        .map_err(|why| ApiError::new(StatusCode::FORBIDDEN, why))?;
        host_paths_allowed(&id, obj)?;
    }
    // Jobs' `after` lists name Jobs and make no cycle, with what is stored.
    if req.objects.iter().any(|o| matches!(o, Object::Job(_))) {
        let c = c.clone();
        let objects = req.objects.clone();
        blocking(move || {
            crate::kinds::job::check_after(&c, &objects)
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))
        })
        .await?;
    }
    // Registry references are resolved first (network, async); the writes
    // fsync: off the async workers, which also answer agents' heartbeats.
    let (mut objects, create_only) = (req.objects, req.create_only);
    let refused = resolve_all(&c, &mut objects).await;
    let results =
        tokio::task::spawn_blocking(move || apply_all(&c, objects, &refused, create_only))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // The audit line names what was written (`pod default/web`).
    let written = results
        .iter()
        .filter(|r| r.error.is_none() && r.action != "unchanged")
        .map(|r| {
            let kind = r.kind.to_string().to_lowercase();
            match r.namespace.as_str() {
                "" => format!("{kind} {}", r.name),
                ns => format!("{kind} {ns}/{}", r.name),
            }
        })
        .collect();
    Ok((
        Extension(crate::audit::AuditObjects(written)),
        Json(ApplyResponse { results }),
    ))
}

/// The members of a pod or Deployment, to resolve or compare.
fn members_mut(obj: &mut Object) -> Option<&mut Vec<flotilla_api::MemberSpec>> {
    match obj {
        Object::Pod(p) => Some(&mut p.spec.members),
        Object::Deployment(d) => Some(&mut d.spec.template.spec.members),
        _ => None,
    }
}

/// A reference the scheduler could not resolve this time keeps the digest
/// the stored object pinned for it (re-applying the same manifest while the
/// registry is away changes nothing).
fn keep_pins(current: &Object, new: &mut Object) {
    let pinned: Vec<flotilla_api::MemberSpec> = match current {
        Object::Pod(p) => p.spec.members.clone(),
        Object::Deployment(d) => d.spec.template.spec.members.clone(),
        _ => return,
    };
    let Some(members) = members_mut(new) else {
        return;
    };
    for m in members.iter_mut() {
        let Some(old) = pinned.iter().find(|o| o.name == m.name) else {
            continue;
        };
        match (&mut m.source, &old.source) {
            (
                MemberSource::Artifact { reference, digest },
                MemberSource::Artifact {
                    reference: r,
                    digest: d,
                },
            ) if digest.is_empty() && reference == r => digest.clone_from(d),
            (
                MemberSource::Container {
                    image,
                    digest,
                    options,
                },
                old_source,
            ) if digest.is_empty() => {
                match old_source {
                    MemberSource::Container {
                        image: i,
                        digest: d,
                        ..
                    } if i == image => digest.clone_from(d),
                    // Resolved as a wasm artifact the first time.
                    MemberSource::Artifact {
                        reference: r,
                        digest: d,
                    } if r == image && options.is_default() => {
                        m.source = MemberSource::Artifact {
                            reference: r.clone(),
                            digest: d.clone(),
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Resolves the registry references of pods and Deployments (see
/// [`crate::resolve`]); the ones a registry says do not exist are refused,
/// by index.
async fn resolve_all(c: &Cluster, objects: &mut [Object]) -> HashMap<usize, String> {
    let resolver = crate::resolve::Resolver::new(c.cfg.registries.clone());
    let mut seen = HashMap::new();
    let mut refused = HashMap::new();
    for (i, obj) in objects.iter_mut().enumerate() {
        if let Object::Plugin(p) = obj
            && let Err(e) = crate::plugins::artifact::fetch(c, &resolver, p).await
        {
            refused.insert(i, e);
        }
        if let Some(members) = members_mut(obj)
            && let Err(e) = resolver.resolve_members(members, &mut seen).await
        {
            refused.insert(i, e.to_string());
        }
    }
    refused
}

fn apply_all(
    c: &Cluster,
    objects: Vec<Object>,
    refused: &HashMap<usize, String>,
    create_only: bool,
) -> Vec<ApplyResult> {
    objects
        .into_iter()
        .enumerate()
        .map(|(i, obj)| {
            let (kind, namespace, name) = (
                obj.kind(),
                obj.meta().namespace.clone(),
                obj.meta().name.clone(),
            );
            let outcome = match refused.get(&i) {
                Some(why) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, why.clone())),
                None => apply_one(c, obj, create_only),
            };
            match outcome {
                Ok(action) => ApplyResult {
                    kind,
                    namespace,
                    name,
                    action: action.into(),
                    error: None,
                },
                Err(e) => ApplyResult {
                    kind,
                    namespace,
                    name,
                    action: "error".into(),
                    error: Some(e.message),
                },
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct ListQuery {
    namespace: Option<String>,
    selector: Option<String>,
}

async fn list(
    State(c): State<Arc<Cluster>>,
    Extension(id): Extension<Identity>,
    Path(plural): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<Object>>> {
    let kind = kind_of(&plural)?;
    let selector = Selector::parse(q.selector.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let prefix = match (&q.namespace, kind.namespaced()) {
        (Some(ns), true) => format!("{}/{ns}/", kind.plural()),
        _ => format!("{}/", kind.plural()),
    };
    let objs = c
        .store
        .list(&prefix)
        .into_iter()
        .filter(|o| selector.matches(&o.meta().labels))
        .filter(|o| visible(&id, o))
        .map(|o| redact(&id, &o))
        .collect();
    Ok(Json(objs))
}

fn get_obj(c: &Cluster, kind: Kind, ns: &str, name: &str) -> ApiResult<Arc<Object>> {
    let key = flotilla_api::object::key(kind, ns, name);
    c.store.get(&key).ok_or_else(|| {
        let where_ = if kind.namespaced() {
            format!(" in namespace {ns}")
        } else {
            String::new()
        };
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{} {name} not found{where_}",
                kind.to_string().to_lowercase()
            ),
        )
    })
}

/// `?newer_than=V`: answer once the object's resource version is above V
/// (a long poll, so a client waiting for a change is told at once instead
/// of polling), or after `wait_ms` (at most a minute) with what is stored.
#[derive(Deserialize)]
struct GetQuery {
    newer_than: Option<u64>,
    wait_ms: Option<u64>,
}

/// Longest a `newer_than` poll is held.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

async fn get_one(
    State(c): State<Arc<Cluster>>,
    Extension(id): Extension<Identity>,
    Path((plural, ns, name)): Path<(String, String, String)>,
    Query(q): Query<GetQuery>,
) -> ApiResult<Json<Object>> {
    let kind = kind_of(&plural)?;
    let Some(seen) = q.newer_than else {
        return Ok(Json(redact(&id, &*get_obj(&c, kind, &ns, &name)?)));
    };
    let wait = std::time::Duration::from_millis(q.wait_ms.unwrap_or(30_000)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let key = flotilla_api::object::key(kind, &ns, &name);
    // Subscribed before the first look, so no change slips between them.
    let (_, mut changes) = c.store.watch_from(u64::MAX)?;
    loop {
        let o = get_obj(&c, kind, &ns, &name)?;
        if o.meta().resource_version > seen {
            return Ok(Json(redact(&id, &o)));
        }
        loop {
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Err(_) | Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    return Ok(Json(redact(&id, &*get_obj(&c, kind, &ns, &name)?)));
                }
                Ok(Ok(ev)) if ev.object.key() != key => continue,
                // This object changed, or changes were missed: look again.
                Ok(_) => break,
            }
        }
    }
}

/// Whether a listed object may be shown to the caller (namespace scope).
fn visible(id: &Identity, o: &Object) -> bool {
    match id {
        Identity::User {
            namespaces, role, ..
        } => {
            *role == Role::Admin
                || namespaces.is_empty()
                || !o.kind().namespaced()
                || namespaces.contains(&o.meta().namespace)
        }
        Identity::Node { .. } => false,
    }
}

/// What a secret key rotation did.
#[derive(Serialize, Deserialize, Debug)]
pub struct RotateResponse {
    /// The id of the key Secrets are now sealed with.
    pub key: u32,
    /// How many Secrets were sealed again.
    pub secrets: usize,
}

/// A new key for Secrets at rest: every Secret is sealed again with it,
/// then the old keys are forgotten.
async fn rotate_secret_key(State(c): State<Arc<Cluster>>) -> ApiResult<Json<RotateResponse>> {
    let sealer = c.sealer.get().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "this scheduler keeps secrets unsealed (no key)",
        )
    })?;
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e);
    tokio::task::spawn_blocking(move || {
        let key = sealer.rotate().map_err(|e| internal(e.to_string()))?;
        let secrets = c.store.reseal().map_err(|e| internal(e.to_string()))?;
        sealer.forget_old().map_err(|e| internal(e.to_string()))?;
        tracing::info!(key, secrets, "secret key rotated");
        Ok(Json(RotateResponse { key, secrets }))
    })
    .await
    .map_err(|e| internal(e.to_string()))?
}

/// `host_path` volumes reach the node's filesystem, and capabilities past
/// the safe set reach past the container: only admins may write pods (or
/// Deployments) that have them.
fn host_paths_allowed(id: &Identity, obj: &Object) -> ApiResult<()> {
    let spec = match obj {
        Object::Pod(p) => &p.spec,
        Object::Deployment(d) => &d.spec.template.spec,
        _ => return Ok(()),
    };
    let admin = matches!(
        id,
        Identity::User {
            role: Role::Admin,
            ..
        }
    );
    if !admin && let Some((member, cap)) = flotilla_api::object::privileged_capability(spec) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "member '{member}' adds capability {cap}, which only the admin role may grant; others may add {}",
                flotilla_api::object::SAFE_CAPABILITIES.join(", ")
            ),
        ));
    }
    match spec
        .volumes
        .iter()
        .find(|v| matches!(v.source, flotilla_api::config::VolumeSource::HostPath(_)))
    {
        Some(v) if !admin => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "volume '{}' is a host_path, which only the admin role may use: it reaches the node's own files; use an empty_dir or a persistent volume instead",
                v.name
            ),
        )),
        _ => Ok(()),
    }
}

/// A copy of `o` fit for the caller: `view` sees secret keys, not values.
fn redact(id: &Identity, o: &Object) -> Object {
    match (id, o) {
        (
            Identity::User {
                role: Role::View, ..
            },
            Object::Secret(s),
        ) => {
            let mut s = s.clone();
            for v in s.data.values_mut().chain(s.binary_data.values_mut()) {
                *v = REDACTED.to_string();
            }
            Object::Secret(s)
        }
        _ => o.clone(),
    }
}

/// What `view` callers see in place of secret values.
pub const REDACTED: &str = "<hidden>";

async fn get_cluster_scoped(
    State(c): State<Arc<Cluster>>,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<Json<Object>> {
    let kind = kind_of(&plural)?;
    if kind.namespaced() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{plural} are namespaced: use /v1/{plural}/NAMESPACE/NAME"),
        ));
    }
    Ok(Json((*get_obj(&c, kind, "", &name)?).clone()))
}

/// `PUT`: replaces an object at the resource version the client read (409 if stale).
async fn replace(
    State(c): State<Arc<Cluster>>,
    Path((plural, ns, name)): Path<(String, String, String)>,
    Extension(id): Extension<Identity>,
    Json(mut obj): Json<Object>,
) -> ApiResult<Json<Object>> {
    let kind = kind_of(&plural)?;
    host_paths_allowed(&id, &obj)?;
    if let Some(why) = resolve_all(&c, std::slice::from_mut(&mut obj))
        .await
        .remove(&0)
    {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, why));
    }
    if obj.kind() != kind || obj.meta().namespace != ns || obj.meta().name != name {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body does not match the URL's kind, namespace and name",
        ));
    }
    // Locks held and an fsynced write: off the async workers.
    blocking(move || replace_blocking(&c, kind, &ns, &name, obj)).await
}

fn replace_blocking(
    c: &Cluster,
    kind: Kind,
    ns: &str,
    name: &str,
    obj: Object,
) -> ApiResult<Json<Object>> {
    let obj = admitted(c, obj)?;
    let _claim = claim_node_ports(c, &obj)?;
    let expected = obj.meta().resource_version;
    if expected == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "metadata.resource_version is required for a replace; read the object first",
        ));
    }
    let cur = get_obj(c, kind, ns, name)?;
    let mut obj = incoming(obj);
    let mut usage = c.quota_claims.lock().expect("poisoned");
    kinds::quota::enforce(c, &mut usage, &mut obj).map_err(quota_refused)?;
    let merged = match kinds::rules(kind)
        .update(&cur, obj)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?
    {
        Update::Write(next) => *next,
        // Nothing to change: still a write at the version read (409 if stale).
        Update::Unchanged => (*cur).clone(),
    };
    let stored = c
        .store
        .put(merged, Expect::Version(expected), WriteDurability::Sync)?;
    if kinds::rules(kind).wakes_controllers() {
        c.kick.notify_one();
    }
    Ok(Json((*stored).clone()))
}

fn delete_obj(c: &Cluster, kind: Kind, ns: &str, name: &str) -> ApiResult<Json<Object>> {
    if kind == Kind::Event {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "events cannot be deleted; they age out",
        ));
    }
    let obj = get_obj(c, kind, ns, name)?;
    if kind == Kind::Volume {
        let pods = c.store.list(&format!("pods/{ns}/"));
        let users = kinds::volume::users(pods.iter().map(|p| &**p), ns, name);
        if !users.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "volume {name} is used by pod {}; delete the pods that use it first",
                    users.join(", ")
                ),
            ));
        }
    }
    let deleted = c.store.delete(&obj.key(), None)?;
    if kind == Kind::Node
        && let Some(conn) = c.connection(name)
    {
        // Its certificate admits it no more: the session ends now, and a
        // reconnect is refused until it joins again.
        conn.close(2u32.into(), b"node deleted by an admin");
    }
    if let Object::Deployment(d) = &*deleted {
        // Cascade: the pods it owns go with it.
        for p in c.store.list(&format!("pods/{ns}/")) {
            if p.meta()
                .owner
                .as_ref()
                .is_some_and(|o| o.uid == d.metadata.uid)
            {
                let _ = c.store.delete(&p.key(), None);
            }
        }
    }
    c.event(&deleted, EventType::Normal, "Deleted", "deleted".into());
    c.kick.notify_one();
    Ok(Json((*deleted).clone()))
}

/// Runs a store-writing handler body off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn delete(
    State(c): State<Arc<Cluster>>,
    Path((plural, ns, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Object>> {
    let kind = kind_of(&plural)?;
    blocking(move || delete_obj(&c, kind, &ns, &name)).await
}

async fn delete_cluster_scoped(
    State(c): State<Arc<Cluster>>,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<Json<Object>> {
    let kind = kind_of(&plural)?;
    blocking(move || delete_obj(&c, kind, "", &name)).await
}

/// Body of `POST .../scale`.
#[derive(Serialize, Deserialize)]
pub struct ScaleRequest {
    pub replicas: u32,
}

async fn scale(
    State(c): State<Arc<Cluster>>,
    Path((ns, name)): Path<(String, String)>,
    Json(req): Json<ScaleRequest>,
) -> ApiResult<Json<Object>> {
    if req.replicas > flotilla_api::manifest::MAX_REPLICAS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("at most {} replicas", flotilla_api::manifest::MAX_REPLICAS),
        ));
    }
    // Locks held and fsynced writes: off the async workers.
    blocking(move || scale_blocking(&c, &ns, &name, req.replicas)).await
}

pub(crate) fn scale_blocking(
    c: &Cluster,
    ns: &str,
    name: &str,
    replicas: u32,
) -> ApiResult<Json<Object>> {
    change_deployment(c, ns, name, |d, nd| {
        if d.spec.replicas == replicas {
            return Ok(None);
        }
        nd.spec.replicas = replicas;
        Ok(Some(Change {
            reason: "Scaled",
            message: format!("replicas {} → {replicas}", d.spec.replicas),
            quota: true,
        }))
    })
}

/// A change `change_deployment` is to write, and the event it makes.
struct Change {
    reason: &'static str,
    message: String,
    /// The change may claim more: checked against the namespace's quota.
    quota: bool,
}

/// Reads a Deployment, lets `f` change a copy (`None`: nothing to do, the
/// current object is the answer) and writes it back at the version read,
/// reading again when another writer got there first (five tries).
fn change_deployment(
    c: &Cluster,
    ns: &str,
    name: &str,
    mut f: impl FnMut(
        &flotilla_api::Deployment,
        &mut flotilla_api::Deployment,
    ) -> ApiResult<Option<Change>>,
) -> ApiResult<Json<Object>> {
    for _ in 0..5 {
        let cur = get_obj(c, Kind::Deployment, ns, name)?;
        let Object::Deployment(d) = &*cur else {
            unreachable!("key names a deployment")
        };
        let mut nd = d.clone();
        let Some(change) = f(d, &mut nd)? else {
            return Ok(Json((*cur).clone()));
        };
        if nd.spec != d.spec {
            nd.metadata.generation += 1;
        }
        let mut obj = Object::Deployment(nd);
        if change.quota {
            let mut usage = c.quota_claims.lock().expect("poisoned");
            kinds::quota::enforce(c, &mut usage, &mut obj).map_err(quota_refused)?;
        }
        match c.store.put(
            obj,
            Expect::Version(d.metadata.resource_version),
            WriteDurability::Sync,
        ) {
            Ok(stored) => {
                c.event(&stored, EventType::Normal, change.reason, change.message);
                c.kick.notify_one();
                return Ok(Json((*stored).clone()));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "deployment kept changing; try again",
    ))
}

/// What `POST .../rollout` does to a Deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    /// Back to the revision before the current one, or `to_revision`.
    Undo,
    /// No pod is replaced until `Resume`.
    Pause,
    /// Rolling again after `Pause`, or after the rollout halted.
    Resume,
    /// Every pod replaced by a fresh one, as a rolling update.
    Restart,
}

/// Body of `POST .../rollout`.
#[derive(Serialize, Deserialize)]
pub struct RolloutRequest {
    pub action: RolloutAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_revision: Option<u64>,
}

async fn rollout(
    State(c): State<Arc<Cluster>>,
    Path((ns, name)): Path<(String, String)>,
    Json(req): Json<RolloutRequest>,
) -> ApiResult<Json<Object>> {
    blocking(move || rollout_blocking(&c, &ns, &name, &req)).await
}

fn rollout_blocking(
    c: &Cluster,
    ns: &str,
    name: &str,
    req: &RolloutRequest,
) -> ApiResult<Json<Object>> {
    use flotilla_api::rollout::RolloutPhase;
    change_deployment(c, ns, name, |d, nd| {
        let what = match req.action {
            RolloutAction::Pause => {
                if d.spec.paused {
                    return Ok(None);
                }
                nd.spec.paused = true;
                "paused".to_string()
            }
            RolloutAction::Resume => {
                let halted = d.status.rollout.phase == RolloutPhase::Halted;
                if !d.spec.paused && !halted {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        format!("deployment {name} is neither paused nor halted"),
                    ));
                }
                nd.spec.paused = false;
                // The deadline starts again from now.
                nd.status.rollout.phase = RolloutPhase::Progressing;
                nd.status.rollout.progress_ms = flotilla_api::time::now_ms();
                if halted {
                    "resumed after it halted".to_string()
                } else {
                    "resumed".to_string()
                }
            }
            RolloutAction::Restart => {
                if d.spec.paused {
                    return Err(paused(name));
                }
                nd.spec.restarted_ms = flotilla_api::time::now_ms().max(d.spec.restarted_ms + 1);
                "restarted: every pod is replaced".to_string()
            }
            RolloutAction::Undo => {
                if d.spec.paused {
                    return Err(paused(name));
                }
                let target = undo_target(d, name, req.to_revision)?;
                nd.spec.template = target.template.clone();
                nd.spec.restarted_ms = target.restarted_ms;
                format!("rolling back to revision {}", target.number)
            }
        };
        Ok(Some(Change {
            reason: "Rollout",
            message: what,
            // The older template asks for what it asks for: within quota.
            quota: req.action == RolloutAction::Undo,
        }))
    })
}

/// The revision `rollout undo` goes back to: `to_revision`, or the one
/// before the current.
fn undo_target<'a>(
    d: &'a flotilla_api::Deployment,
    name: &str,
    to_revision: Option<u64>,
) -> ApiResult<&'a flotilla_api::rollout::Revision> {
    let revs = &d.status.revisions;
    let target = match to_revision {
        Some(n) => revs.iter().find(|r| r.number == n).ok_or_else(|| {
            let kept: Vec<String> = revs.iter().map(|r| r.number.to_string()).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "deployment {name} has no revision {n}; it keeps {}",
                    if kept.is_empty() {
                        "none yet".to_string()
                    } else {
                        kept.join(", ")
                    }
                ),
            )
        })?,
        None => revs
            .iter()
            .rev()
            .find(|r| r.number < d.status.revision)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    format!("deployment {name} has no earlier revision to go back to"),
                )
            })?,
    };
    if target.number == d.status.revision {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("revision {} is already the current one", target.number),
        ));
    }
    Ok(target)
}

fn paused(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!("deployment {name} is paused; `flotilla rollout resume deployment/{name}` first"),
    )
}

/// A node's use (`flotilla top nodes`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeTop {
    pub name: String,
    /// Millicores over the last interval the agent sampled (`None`: not
    /// yet two samples).
    pub cpu_millis: Option<u64>,
    pub memory_bytes: u64,
    pub allocatable_cpu_millis: u64,
    pub allocatable_memory_bytes: u64,
    pub at_ms: u64,
}

/// A member's use.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberTop {
    pub name: String,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: u64,
    pub cpu_seconds: f64,
}

/// A pod's use (`flotilla top pods`): the sum of its members'.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodTop {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: u64,
    pub members: Vec<MemberTop>,
}

async fn node_metrics(State(c): State<Arc<Cluster>>) -> ApiResult<Json<Vec<NodeTop>>> {
    let figures = c.usage.figures();
    let mut out = Vec::new();
    for f in figures {
        let Some(obj) = c
            .store
            .get(&flotilla_api::object::key(Kind::Node, "", &f.node))
        else {
            continue;
        };
        let Object::Node(n) = &*obj else { continue };
        out.push(NodeTop {
            name: f.node,
            cpu_millis: f.cpu_millis,
            memory_bytes: f.memory_bytes,
            allocatable_cpu_millis: n.status.allocatable.cpu,
            allocatable_memory_bytes: n.status.allocatable.memory,
            at_ms: f.at_ms,
        });
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
struct MetricsQuery {
    namespace: Option<String>,
}

/// Every pod's figures the agents reported (of `namespace`, or all).
pub fn pod_figures(c: &Cluster, namespace: Option<&str>) -> Vec<PodTop> {
    pod_figures_of(c, &c.store.list("pods/"), namespace)
}

/// [`pod_figures`] for pods already listed (`listed`: objects under `pods/`).
pub fn pod_figures_of(c: &Cluster, listed: &[Arc<Object>], namespace: Option<&str>) -> Vec<PodTop> {
    let pods: std::collections::HashMap<String, (String, String, String)> = listed
        .iter()
        .filter_map(|o| match &**o {
            Object::Pod(p) => Some((
                p.metadata.uid.clone(),
                (
                    p.metadata.namespace.clone(),
                    p.metadata.name.clone(),
                    p.status.node.clone().unwrap_or_default(),
                ),
            )),
            _ => None,
        })
        .collect();
    let mut by_pod: std::collections::BTreeMap<(String, String), PodTop> = Default::default();
    for node in c.usage.figures() {
        for m in node.members {
            let Some((ns, name, on)) = pods.get(&m.pod_uid) else {
                continue;
            };
            if namespace.is_some_and(|want| want != ns) || *on != node.node {
                continue;
            }
            let top = by_pod
                .entry((ns.clone(), name.clone()))
                .or_insert_with(|| PodTop {
                    namespace: ns.clone(),
                    name: name.clone(),
                    node: on.clone(),
                    cpu_millis: Some(0),
                    memory_bytes: 0,
                    members: Vec::new(),
                });
            top.cpu_millis = top.cpu_millis.zip(m.cpu_millis).map(|(a, b)| a + b);
            top.memory_bytes += m.memory_bytes;
            top.members.push(MemberTop {
                name: m.member,
                cpu_millis: m.cpu_millis,
                memory_bytes: m.memory_bytes,
                cpu_seconds: m.cpu_seconds,
            });
        }
    }
    by_pod.into_values().collect()
}

async fn pod_metrics(
    State(c): State<Arc<Cluster>>,
    Query(q): Query<MetricsQuery>,
) -> ApiResult<Json<Vec<PodTop>>> {
    blocking(move || Ok(Json(pod_figures(&c, q.namespace.as_deref())))).await
}

/// The scheduler's metrics in the Prometheus text format.
async fn prometheus(
    State(c): State<Arc<Cluster>>,
) -> ApiResult<([(axum::http::HeaderName, &'static str); 1], String)> {
    let text = blocking(move || Ok(crate::usage::prometheus(&c, &pod_figures(&c, None)))).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    ))
}

#[derive(Deserialize)]
struct EventQuery {
    namespace: Option<String>,
    kind: Option<String>,
    name: Option<String>,
}

async fn events(
    State(c): State<Arc<Cluster>>,
    Query(q): Query<EventQuery>,
) -> ApiResult<Json<Vec<flotilla_api::Event>>> {
    let kind = q.kind.as_deref().map(kind_of).transpose()?;
    Ok(Json(c.events.list(
        q.namespace.as_deref(),
        kind,
        q.name.as_deref(),
    )))
}

#[derive(Deserialize)]
struct LogQuery {
    member: Option<String>,
    #[serde(default)]
    previous: bool,
    #[serde(default)]
    follow: bool,
    tail: Option<u64>,
}

async fn logs(
    State(c): State<Arc<Cluster>>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Response> {
    let obj = get_obj(&c, Kind::Pod, &ns, &name)?;
    let Object::Pod(pod) = &*obj else {
        unreachable!("key names a pod")
    };
    let member = match q.member {
        Some(m) => m,
        None if pod.spec.members.len() == 1 => pod.spec.members[0].name.clone(),
        None => {
            let names: Vec<&str> = pod.spec.members.iter().map(|m| m.name.as_str()).collect();
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "pod {name} has several members; choose one with -c: {}",
                    names.join(", ")
                ),
            ));
        }
    };
    let node = pod.status.node.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "pod {name} is not on a node yet ({}); it has no logs",
                pod.status.phase
            ),
        )
    })?;
    let req = LogRequest {
        pod_uid: pod.metadata.uid.clone(),
        member,
        previous: q.previous,
        follow: q.follow,
        tail_lines: q.tail,
    };
    let (rx, rest) = open_log(&c, &node, &req)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    Ok(Response::new(link_body(rx, rest)))
}

/// A response body from what an agent sends on a link stream: `rest`
/// (already read with the reply frame), then the stream to its end.
pub(crate) fn link_body(rx: quinn::RecvStream, rest: Vec<u8>) -> Body {
    use futures_util::StreamExt;
    let first = futures_util::stream::iter(
        (!rest.is_empty()).then(|| Ok::<_, std::io::Error>(Bytes::from(rest))),
    );
    let tail = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => Some((Ok(chunk.bytes), rx)),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), rx)),
        }
    });
    Body::from_stream(first.chain(tail))
}

/// Body of `POST /v1/tokens`.
#[derive(Serialize, Deserialize)]
pub struct TokenRequest {
    pub role: Role,
    /// A join token for agents (`FLT1.…`) instead of an API token.
    #[serde(default)]
    pub join: bool,
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub ttl_secs: u64,
    /// Joins a join token admits (`None`: any number until it expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
}

/// Reply to `POST /v1/tokens`: the token itself is shown only here.
#[derive(Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    pub info: TokenInfo,
}

async fn create_token(
    State(c): State<Arc<Cluster>>,
    Extension(id): Extension<Identity>,
    Json(req): Json<TokenRequest>,
) -> ApiResult<Json<TokenCreated>> {
    for ns in &req.namespaces {
        check_dns_label(ns).map_err(|w| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("namespace '{ns}' {w}"),
            )
        })?;
    }
    if req.join {
        let ca = c.ca.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this scheduler cannot admit nodes",
            )
        })?;
        if req.ttl_secs == 0 || req.ttl_secs > 365 * 86_400 {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "ttl must be between 1 s and 1 year",
            ));
        }
        let (token, info) = crate::auth::create_join_token(
            c.store.as_ref(),
            &ca.cert_sha256(),
            std::time::Duration::from_secs(req.ttl_secs),
            &id.to_string(),
            req.uses,
        )?;
        return Ok(Json(TokenCreated { token, info }));
    }
    if req.role == Role::Join {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "make join tokens with --join",
        ));
    }
    if req.role == Role::Edit && req.namespaces.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "an edit token needs --namespace (edit works on workloads in given namespaces)",
        ));
    }
    if req.ttl_secs == 0 || req.ttl_secs > 10 * 365 * 86_400 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ttl must be between 1 s and 10 years",
        ));
    }
    let (token, info) = crate::auth::create_token(
        c.store.as_ref(),
        req.role,
        req.namespaces,
        std::time::Duration::from_secs(req.ttl_secs),
        &id.to_string(),
    )?;
    Ok(Json(TokenCreated { token, info }))
}

async fn list_tokens(State(c): State<Arc<Cluster>>) -> Json<Vec<TokenInfo>> {
    Json(
        c.store
            .list("tokens/")
            .iter()
            .filter_map(|o| match &**o {
                Object::Token(t) => Some(TokenInfo::from_token(t)),
                _ => None,
            })
            .collect(),
    )
}

async fn revoke_token(
    State(c): State<Arc<Cluster>>,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenInfo>> {
    Ok(Json(crate::auth::revoke_token(c.store.as_ref(), &id)?))
}

/// Body of `POST /v1/certificates`: a client certificate for a user.
#[derive(Serialize, Deserialize)]
pub struct CertificateRequest {
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub ttl_secs: u64,
}

/// A freshly issued client certificate, its key and the CA to trust.
#[derive(Serialize, Deserialize)]
pub struct CertificateIssued {
    /// The certificate's serial (hex): its id in `flotilla token list`,
    /// for `flotilla token revoke`.
    #[serde(default)]
    pub serial: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub expires_ms: u64,
}

async fn create_certificate(
    State(c): State<Arc<Cluster>>,
    Extension(id): Extension<Identity>,
    Json(req): Json<CertificateRequest>,
) -> ApiResult<Json<CertificateIssued>> {
    check_dns_label(&req.name).map_err(|w| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("user name '{}' {w}", req.name),
        )
    })?;
    if req.ttl_secs == 0 || req.ttl_secs > 10 * 365 * 86_400 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ttl must be between 1 s and 10 years",
        ));
    }
    let ca = c.ca.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this scheduler cannot issue certificates",
        )
    })?;
    let pair = ca
        .issue_user(
            &req.name,
            req.role,
            &req.namespaces,
            std::time::Duration::from_secs(req.ttl_secs),
        )
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // No certificate leaves without its revocable record.
    let record = crate::auth::record_certificate(
        c.store.as_ref(),
        &pair.cert_pem,
        &req.name,
        req.role,
        &req.namespaces,
        std::time::Duration::from_secs(req.ttl_secs),
        &id.to_string(),
    )?;
    Ok(Json(CertificateIssued {
        serial: record.id,
        cert_pem: pair.cert_pem,
        key_pem: pair.key_pem,
        ca_pem: ca.cert_pem().to_string(),
        expires_ms: flotilla_api::time::now_ms() + req.ttl_secs * 1000,
    }))
}

fn set_unschedulable(c: &Cluster, name: &str, value: bool) -> ApiResult<Json<Object>> {
    for _ in 0..5 {
        let cur = get_obj(c, Kind::Node, "", name)?;
        let Object::Node(n) = &*cur else {
            unreachable!("key names a node")
        };
        if n.unschedulable == value {
            return Ok(Json((*cur).clone()));
        }
        let mut nn = n.clone();
        nn.unschedulable = value;
        match c.store.put(
            Object::Node(nn),
            Expect::Version(n.metadata.resource_version),
            WriteDurability::Sync,
        ) {
            Ok(stored) => {
                let what = if value { "Cordoned" } else { "Uncordoned" };
                c.event(
                    &stored,
                    EventType::Normal,
                    what,
                    format!("node {name} {}", what.to_lowercase()),
                );
                return Ok(Json((*stored).clone()));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "node kept changing; try again",
    ))
}

/// Marks a node unschedulable: running pods stay, new ones go elsewhere.
async fn cordon(
    State(c): State<Arc<Cluster>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Object>> {
    set_unschedulable(&c, &name, true)
}

async fn uncordon(
    State(c): State<Arc<Cluster>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Object>> {
    set_unschedulable(&c, &name, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// Routes are added only by `Routes::add`, which takes an authorization:
    /// a `.route(` anywhere else in this file would be a route the guard
    /// never sees.
    #[test]
    fn every_route_is_added_with_its_authorization() {
        let src = include_str!("api.rs");
        let code = &src[..src.find("#[cfg(test)]").unwrap()];
        assert_eq!(
            code.matches(".route(").count(),
            1,
            "routes must be added through Routes::add (with an Authz), not Router::route"
        );
        assert_eq!(code.matches("Router::new()").count(), 1);
    }

    fn cluster(dir: &std::path::Path) -> Arc<Cluster> {
        let store = crate::store::RedbStore::open(&dir.join("s.redb")).unwrap();
        crate::cluster::for_tests(Arc::new(store), dir)
    }

    #[tokio::test]
    async fn a_read_with_newer_than_answers_with_the_next_version_or_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(dir.path());
        let mut pod = flotilla_api::Pod::default();
        pod.metadata.name = "p".into();
        pod.metadata.namespace = "default".into();
        let stored = c
            .store
            .put(Object::Pod(pod), Expect::Absent, WriteDurability::Lazy)
            .unwrap();
        let v = stored.meta().resource_version;
        let admin = Identity::User {
            name: "admin".into(),
            role: Role::Admin,
            namespaces: Vec::new(),
        };
        let read = |newer_than, wait_ms| {
            get_one(
                State(c.clone()),
                Extension(admin.clone()),
                Path(("pods".into(), "default".into(), "p".into())),
                Query(GetQuery {
                    newer_than,
                    wait_ms,
                }),
            )
        };
        // Nothing newer: what is stored, once the wait is over.
        let Json(o) = read(Some(v), Some(10)).await.unwrap();
        assert_eq!(o.meta().resource_version, v);
        // An older version asked about: answered at once.
        let Json(o) = read(Some(v - 1), Some(60_000)).await.unwrap();
        assert_eq!(o.meta().resource_version, v);
        // A change while a reader waits: the reader gets it.
        let waiting = tokio::spawn(read(Some(v), Some(60_000)));
        let mut changed = (*stored).clone();
        changed.meta_mut().labels.insert("x".into(), "y".into());
        c.store
            .put(changed, Expect::Version(v), WriteDurability::Lazy)
            .unwrap();
        let Json(o) = waiting.await.unwrap().unwrap();
        assert!(o.meta().resource_version > v);
        assert_eq!(o.meta().labels["x"], "y");
        // Gone while waited on: 404.
        let v = o.meta().resource_version;
        let waiting = tokio::spawn(read(Some(v), Some(60_000)));
        c.store.delete(&o.key(), Some(v)).unwrap();
        let err = waiting.await.unwrap().unwrap_err();
        assert_eq!(err.status, StatusCode::NOT_FOUND);
    }

    fn service(ns: &str, name: &str, node_port: u16, protocol: flotilla_api::Protocol) -> Object {
        let mut s = flotilla_api::Service::default();
        s.metadata.name = name.into();
        s.metadata.namespace = ns.into();
        s.spec.selector.insert("app".into(), name.into());
        s.spec.ports.push(flotilla_api::ServicePort {
            port: 80,
            target_port: None,
            protocol,
            node_port: Some(node_port),
            name: String::new(),
        });
        Object::Service(s)
    }

    /// A controller writes a Service's status just before each of the
    /// first `races` version-checked writes to it.
    fn race_status(
        races: Arc<std::sync::atomic::AtomicUsize>,
    ) -> impl Fn(&crate::store::RedbStore, crate::store::testing::Write<'_>) + Send + Sync + 'static
    {
        use crate::store::Store;
        use std::sync::atomic::Ordering;
        move |inner, w| {
            let crate::store::testing::Write::One(obj, Expect::Version(_)) = w else {
                return;
            };
            let Some(Object::Service(cur)) = inner.get(&obj.key()).as_deref().cloned() else {
                return;
            };
            if races
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                return;
            }
            let mut by_controller = cur.clone();
            by_controller.status.cluster_ip = format!("10.96.0.{}", inner.revision());
            let v = cur.metadata.resource_version;
            inner
                .put(
                    Object::Service(by_controller),
                    Expect::Version(v),
                    WriteDurability::Lazy,
                )
                .unwrap();
        }
    }

    /// Apply carries no version, so a controller's write between its read
    /// and its write is merged, not a 409 for the user (CI saw exactly that
    /// on a Function whose status the functions controller had just
    /// written); an object that never settles is still refused in the end.
    #[test]
    fn apply_merges_over_a_controller_write_instead_of_refusing_it() {
        use flotilla_api::Protocol::Tcp;
        let dir = tempfile::tempdir().unwrap();
        let races = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let store = Arc::new(crate::store::testing::Racing {
            inner: crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap(),
            before: race_status(races.clone()),
        });
        let c = crate::cluster::for_tests(store, dir.path());
        assert_eq!(
            apply_one(&c, service("default", "web", 30080, Tcp), false).unwrap(),
            "created"
        );
        // Two controller writes land under the next apply: it still lands,
        // on top of the controller's status.
        races.store(2, std::sync::atomic::Ordering::SeqCst);
        let mut changed = service("default", "web", 30080, Tcp);
        changed
            .meta_mut()
            .labels
            .insert("tier".into(), "web".into());
        assert_eq!(apply_one(&c, changed.clone(), false).unwrap(), "configured");
        let Some(Object::Service(s)) = c.store.get("services/default/web").as_deref().cloned()
        else {
            panic!("the service is gone")
        };
        assert_eq!(s.metadata.labels["tier"], "web");
        assert!(s.status.cluster_ip.starts_with("10.96.0."), "{s:?}");
        assert_eq!(races.load(std::sync::atomic::Ordering::SeqCst), 0);
        // An object that changes under every attempt: 409, nothing lost.
        races.store(APPLY_ATTEMPTS, std::sync::atomic::Ordering::SeqCst);
        changed
            .meta_mut()
            .labels
            .insert("tier".into(), "api".into());
        let err = apply_one(&c, changed, false).unwrap_err();
        assert_eq!(err.status, StatusCode::CONFLICT);
        assert!(err.message.contains("kept changing"), "{}", err.message);
        let Some(Object::Service(s)) = c.store.get("services/default/web").as_deref().cloned()
        else {
            panic!("the service is gone")
        };
        assert_eq!(s.metadata.labels["tier"], "web");
    }

    #[test]
    fn node_ports_are_in_range_and_held_by_one_service_cluster_wide() {
        use flotilla_api::Protocol::{Tcp, Udp};
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(dir.path());
        assert_eq!(
            apply_one(&c, service("default", "web", 30080, Tcp), false).unwrap(),
            "created"
        );
        // Another namespace asks for the same port: refused, naming the holder.
        let err = apply_one(&c, service("prod", "shop", 30080, Tcp), false).unwrap_err();
        assert_eq!(err.status, StatusCode::CONFLICT);
        assert_eq!(
            err.message,
            "node_port 30080/TCP is held by service default/web"
        );
        assert!(c.store.get("services/prod/shop").is_none());
        // The same number for the other protocol is another port.
        assert_eq!(
            apply_one(&c, service("prod", "dns", 30080, Udp), false).unwrap(),
            "created"
        );
        // The holder itself may apply again.
        let mut again = service("default", "web", 30080, Tcp);
        again.meta_mut().labels.insert("v".into(), "2".into());
        assert_eq!(apply_one(&c, again, false).unwrap(), "configured");
        // Outside the range: refused with the range.
        let err = apply_one(&c, service("default", "low", 80, Tcp), false).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            err.message
                .contains("outside the node port range 30000-32767"),
            "{}",
            err.message
        );
        // Once the holder is gone, the port is free.
        c.store.delete("services/default/web", None).unwrap();
        assert_eq!(
            apply_one(&c, service("prod", "shop", 30080, Tcp), false).unwrap(),
            "created"
        );
    }

    #[test]
    fn objects_past_the_size_limits_are_refused_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(dir.path());
        // One service with 120,000 ports (what cut every agent off before).
        let mut svc = flotilla_api::Service::default();
        svc.metadata.name = "wide".into();
        svc.metadata.namespace = "default".into();
        svc.spec.selector.insert("app".into(), "wide".into());
        svc.spec.ports = (1..=120_000u32)
            .map(|p| flotilla_api::ServicePort {
                port: (p % 65_535 + 1) as u16,
                target_port: None,
                protocol: flotilla_api::Protocol::Tcp,
                node_port: None,
                name: String::new(),
            })
            .collect();
        let err = apply_one(&c, Object::Service(svc), false).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            err.message,
            "service wide has 120000 ports; at most 256 are allowed"
        );
        // A pod whose environment is 5 MiB.
        let mut pod = flotilla_api::Pod::default();
        pod.metadata.name = "fat".into();
        pod.metadata.namespace = "default".into();
        let mut m = flotilla_api::MemberSpec {
            name: "c".into(),
            source: MemberSource::artifact("oci://127.0.0.1:5000/app:1"),
            ..Default::default()
        };
        m.env.insert("BLOB".into(), "x".repeat(5 << 20).into());
        pod.spec.members.push(m);
        let err = apply_one(&c, Object::Pod(pod), false).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            err.message.contains("objects may be at most 262144 bytes"),
            "{}",
            err.message
        );
        assert!(c.store.list("").is_empty(), "nothing stored");
    }

    #[tokio::test]
    async fn every_declared_route_refuses_anonymous_requests() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = cluster(dir.path());
        let routes = routes(cluster);
        let declared = routes.declared.clone();
        assert!(declared.len() >= 14, "{declared:?}");
        let app = routes.into_router();
        for (path, authz) in declared {
            let uri = path
                .replace("{plural}", "pods")
                .replace("{digest}", &format!("sha256:{}", "0".repeat(64)))
                .replace(['{', '}'], "");
            for method in ["GET", "POST", "PUT", "DELETE", "HEAD"] {
                let req = axum::http::Request::builder()
                    .method(method)
                    .uri(&uri)
                    .body(Body::empty())
                    .unwrap();
                let status = app.clone().oneshot(req).await.unwrap().status();
                if status == StatusCode::METHOD_NOT_ALLOWED {
                    continue;
                }
                if authz == Authz::Public {
                    assert_eq!(status, StatusCode::OK, "{method} {uri}");
                } else {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}");
                }
            }
        }
    }
}
