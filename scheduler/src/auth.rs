//! API authentication and authorization.
//!
//! Callers prove who they are with a client certificate signed by the cluster
//! CA (subject `CN=user:NAME, O=ROLE[, OU=ns1,ns2]`, or `CN=node:NAME` for
//! agents) or a bearer token `flt_<id>_<secret>` whose secret is stored only as
//! a SHA-256 hash. Roles: `admin` (everything), `edit` (workloads in its
//! namespaces), `view` (read-only, secret values hidden). Agents may only read
//! their own Node through this API.

use crate::store::{Expect, Store, StoreError, WriteDurability};
use flotilla_api::time::now_ms;
use flotilla_api::{Kind, Object, ObjectMeta, Role, Token};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    User {
        name: String,
        role: Role,
        /// Empty: every namespace.
        namespaces: Vec<String>,
    },
    Node {
        name: String,
    },
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::User { name, role, .. } => write!(f, "{name} (role {role})"),
            Identity::Node { name } => write!(f, "node {name}"),
        }
    }
}

/// What a request wants to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action<'a> {
    pub write: bool,
    pub kind: Kind,
    /// `None` for cluster-scoped kinds or lists across namespaces.
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

/// Checks an action against the caller's role; the error says what is missing.
pub fn authorize(id: &Identity, a: &Action<'_>) -> Result<(), String> {
    let verb = if a.write { "change" } else { "read" };
    let what = match a.namespace {
        Some(ns) => format!("{} in namespace {ns}", a.kind.plural()),
        None => a.kind.plural().to_string(),
    };
    match id {
        Identity::Node { name } => {
            if a.kind == Kind::Node && !a.write && a.name == Some(name.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "node {name} may only read its own Node object through this API; agent credentials cannot {verb} {what}"
                ))
            }
        }
        Identity::User {
            name,
            role,
            namespaces,
        } => {
            let in_scope = match a.namespace {
                Some(ns) => namespaces.is_empty() || namespaces.iter().any(|n| n == ns),
                None => namespaces.is_empty() || !a.kind.namespaced(),
            };
            let denied = |need: &str| {
                Err(format!(
                    "{name} (role {role}) may not {verb} {what}: {need}"
                ))
            };
            match role {
                Role::Join => denied("join tokens admit nodes and nothing else"),
                Role::Admin => Ok(()),
                _ if !in_scope => denied(&format!(
                    "its credentials cover namespaces {}",
                    namespaces.join(", ")
                )),
                Role::View if a.kind == Kind::Token => denied("needs role admin"),
                Role::View if a.write => denied("needs role edit or admin"),
                Role::View => Ok(()),
                Role::Edit => {
                    let (read, write) = crate::kinds::rules(a.kind).edit_role();
                    if (a.write && write) || (!a.write && read) {
                        Ok(())
                    } else {
                        denied("needs role admin")
                    }
                }
            }
        }
    }
}

/// Prefix of every token; lets scanners recognise leaked Flotilla tokens.
pub const TOKEN_PREFIX: &str = "flt_";

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS provides randomness");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares in time independent of where the inputs differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A token as shown to clients (no hash).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub role: Role,
    pub namespaces: Vec<String>,
    pub expires_ms: u64,
    pub created_ms: u64,
    pub created_by: String,
    pub revoked: bool,
    /// Joins left (join tokens made with `--uses`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
    /// A client certificate's record: the user it was issued to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_for: Option<String>,
}

impl TokenInfo {
    pub fn from_token(t: &Token) -> TokenInfo {
        TokenInfo {
            id: t.metadata.name.clone(),
            role: t.role.unwrap_or(Role::View),
            namespaces: t.namespaces.clone(),
            expires_ms: t.expires_ms,
            created_ms: t.metadata.created_ms,
            created_by: t.created_by.clone(),
            revoked: t.revoked,
            uses_left: t.uses_left,
            certificate_for: t.certificate_for.clone(),
        }
    }
}

/// Creates a token; returns the secret form (shown once) and what was stored.
pub fn create_token(
    store: &dyn Store,
    role: Role,
    namespaces: Vec<String>,
    ttl: Duration,
    created_by: &str,
) -> Result<(String, TokenInfo), StoreError> {
    let id = random_hex(6);
    let secret = random_hex(24);
    let token = Token {
        metadata: ObjectMeta {
            name: id.clone(),
            ..Default::default()
        },
        role: Some(role),
        namespaces,
        expires_ms: now_ms().saturating_add(ttl.as_millis() as u64),
        secret_sha256: sha256_hex(&secret),
        revoked: false,
        created_by: created_by.to_string(),
        uses_left: None,
        certificate_for: None,
    };
    let stored = store.put(Object::Token(token), Expect::Absent, WriteDurability::Sync)?;
    let Object::Token(t) = &*stored else {
        unreachable!("a token was stored")
    };
    Ok((
        format!("{TOKEN_PREFIX}{id}_{secret}"),
        TokenInfo::from_token(t),
    ))
}

/// Marks a token revoked; it stops working with the next request.
pub fn revoke_token(store: &dyn Store, id: &str) -> Result<TokenInfo, StoreError> {
    let key = flotilla_api::object::key(Kind::Token, "", id);
    loop {
        let cur = store
            .get(&key)
            .ok_or_else(|| StoreError::NotFound(format!("token {id}")))?;
        let Object::Token(t) = &*cur else {
            return Err(StoreError::NotFound(format!("token {id}")));
        };
        let mut nt = t.clone();
        nt.revoked = true;
        match store.put(
            Object::Token(nt),
            Expect::Version(t.metadata.resource_version),
            WriteDurability::Sync,
        ) {
            Ok(o) => match &*o {
                Object::Token(t) => return Ok(TokenInfo::from_token(t)),
                _ => unreachable!("a token was stored"),
            },
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The serial number of a DER certificate, in hex.
pub fn cert_serial(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(
        cert.tbs_certificate
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Records a user's client certificate just issued (`cert_pem`), named by
/// its serial, so `flotilla token list` shows it and `flotilla token
/// revoke SERIAL` revokes it.
pub fn record_certificate(
    store: &dyn Store,
    cert_pem: &str,
    user: &str,
    role: Role,
    namespaces: &[String],
    ttl: Duration,
    created_by: &str,
) -> Result<TokenInfo, StoreError> {
    let serial = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .ok()
        .and_then(|(_, pem)| cert_serial(&pem.contents))
        .ok_or_else(|| StoreError::Backend("an issued certificate did not parse".into()))?;
    let record = Token {
        metadata: ObjectMeta {
            name: serial,
            ..Default::default()
        },
        role: Some(role),
        namespaces: namespaces.to_vec(),
        expires_ms: now_ms().saturating_add(ttl.as_millis() as u64),
        secret_sha256: String::new(),
        revoked: false,
        created_by: created_by.to_string(),
        uses_left: None,
        certificate_for: Some(user.to_string()),
    };
    let stored = store.put(Object::Token(record), Expect::Absent, WriteDurability::Sync)?;
    let Object::Token(t) = &*stored else {
        unreachable!("a token was stored")
    };
    Ok(TokenInfo::from_token(t))
}

/// Refuses a client certificate (TLS already verified it against the CA)
/// whose record was revoked. Certificates with no record — issued straight
/// from the CA files, or before certificates were recorded — pass.
pub fn check_certificate(store: &dyn Store, serial: Option<&str>) -> Result<(), AuthFailure> {
    let Some(serial) = serial else {
        return Ok(());
    };
    let Some(obj) = store.get(&flotilla_api::object::key(Kind::Token, "", serial)) else {
        return Ok(());
    };
    match &*obj {
        Object::Token(t) if t.revoked && t.certificate_for.is_some() => {
            Err(AuthFailure::Invalid(format!(
                "client certificate {serial} of user {} has been revoked",
                t.certificate_for.as_deref().unwrap_or_default()
            )))
        }
        _ => Ok(()),
    }
}

/// Why a presented credential was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid(String),
}

/// A bearer token's id and secret (`flt_<id>_<secret>`), or why it is
/// not one.
fn parse_token(bearer: &str) -> Result<(&str, &str), &'static str> {
    let (id, secret) = bearer
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .ok_or("malformed token (expected flt_<id>_<secret>)")?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("malformed token id");
    }
    Ok((id, secret))
}

/// Resolves a bearer token to an identity.
pub fn check_token(store: &dyn Store, bearer: &str) -> Result<Identity, AuthFailure> {
    let bad = |why: &str| Err(AuthFailure::Invalid(why.to_string()));
    let (id, secret) = match parse_token(bearer) {
        Ok(t) => t,
        Err(why) => return bad(why),
    };
    let Some(obj) = store.get(&flotilla_api::object::key(Kind::Token, "", id)) else {
        return bad("unknown token");
    };
    let Object::Token(t) = &*obj else {
        return bad("unknown token");
    };
    // A certificate's record has no secret and is no bearer token.
    if t.certificate_for.is_some() || !same(&sha256_hex(secret), &t.secret_sha256) {
        return bad("unknown token");
    }
    if t.revoked {
        return bad(&format!("token {id} has been revoked"));
    }
    if t.expires_ms <= now_ms() {
        return bad(&format!(
            "token {id} has expired; ask an admin for a new one (flotilla token create)"
        ));
    }
    if t.role == Some(Role::Join) {
        return bad("this is a join token: it admits nodes (flotilla host --join), not API calls");
    }
    Ok(Identity::User {
        name: format!("token:{id}"),
        role: t.role.unwrap_or(Role::View),
        namespaces: t.namespaces.clone(),
    })
}

/// Prefix of join tokens: `FLT1.<sha256 of the CA certificate>.<id>.<secret>`.
pub const JOIN_PREFIX: &str = "FLT1";

/// Creates a join token pinned to the CA with hash `ca_sha256`.
pub fn create_join_token(
    store: &dyn Store,
    ca_sha256: &str,
    ttl: Duration,
    created_by: &str,
    uses: Option<u32>,
) -> Result<(String, TokenInfo), StoreError> {
    let (api_form, mut info) = create_token(store, Role::Join, Vec::new(), ttl, created_by)?;
    let rest = api_form.trim_start_matches(TOKEN_PREFIX);
    let (id, secret) = rest.split_once('_').expect("tokens are id_secret");
    if uses.is_some() {
        let key = flotilla_api::object::key(Kind::Token, "", id);
        let cur = store
            .get(&key)
            .ok_or_else(|| StoreError::NotFound(format!("token {id}")))?;
        let Object::Token(mut t) = (*cur).clone() else {
            return Err(StoreError::NotFound(format!("token {id}")));
        };
        t.uses_left = uses;
        let v = t.metadata.resource_version;
        store.put(Object::Token(t), Expect::Version(v), WriteDurability::Sync)?;
        info.uses_left = uses;
    }
    Ok((format!("{JOIN_PREFIX}.{ca_sha256}.{id}.{secret}"), info))
}

/// Takes one use of a join token limited in uses (after
/// [`check_join_token`]); `Err` when none is left.
pub fn use_join_token(store: &dyn Store, id_secret: &str) -> Result<(), String> {
    let id = id_secret.split_once('.').map_or(id_secret, |(id, _)| id);
    let key = flotilla_api::object::key(Kind::Token, "", id);
    loop {
        let cur = store.get(&key).ok_or("unknown join token")?;
        let Object::Token(t) = &*cur else {
            return Err("unknown join token".into());
        };
        let left = match t.uses_left {
            None => return Ok(()),
            Some(0) => {
                return Err(format!(
                    "join token {id} is used up; create a new one with `flotilla token create --join`"
                ));
            }
            Some(n) => n - 1,
        };
        let mut t = t.clone();
        t.uses_left = Some(left);
        let v = t.metadata.resource_version;
        match store.put(Object::Token(t), Expect::Version(v), WriteDurability::Sync) {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Checks the `<id>.<secret>` part of a join token.
pub fn check_join_token(store: &dyn Store, id_secret: &str) -> Result<(), String> {
    let (id, secret) = id_secret.split_once('.').ok_or("malformed join token")?;
    let key = flotilla_api::object::key(Kind::Token, "", id);
    let obj = store.get(&key).ok_or("unknown join token")?;
    let Object::Token(t) = &*obj else {
        return Err("unknown join token".into());
    };
    if t.role != Some(Role::Join) || !same(&sha256_hex(secret), &t.secret_sha256) {
        return Err("unknown join token".into());
    }
    if t.revoked {
        return Err(format!("join token {id} has been revoked"));
    }
    if t.expires_ms <= now_ms() {
        return Err(format!(
            "join token {id} has expired; create a new one with `flotilla token create --join`"
        ));
    }
    if t.uses_left == Some(0) {
        return Err(format!(
            "join token {id} is used up; create a new one with `flotilla token create --join`"
        ));
    }
    Ok(())
}

/// Reads the identity from a client certificate the TLS layer already verified
/// against the cluster CA (chain and validity period).
pub fn identity_from_cert(der: &[u8]) -> Result<Identity, AuthFailure> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| AuthFailure::Invalid(format!("unreadable client certificate: {e}")))?;
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let cn = first(&mut subject.iter_common_name()).unwrap_or_default();
    if let Some(node) = cn.strip_prefix("node:") {
        return Ok(Identity::Node {
            name: node.to_string(),
        });
    }
    let Some(user) = cn.strip_prefix("user:") else {
        return Err(AuthFailure::Invalid(format!(
            "client certificate subject CN={cn} names neither a user nor a node"
        )));
    };
    let role = first(&mut subject.iter_organization())
        .and_then(|o| Role::parse(&o))
        .ok_or_else(|| {
            AuthFailure::Invalid("client certificate carries no role (O=admin|edit|view)".into())
        })?;
    let namespaces = first(&mut subject.iter_organizational_unit())
        .map(|ou| {
            ou.split(',')
                .map(str::to_string)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(Identity::User {
        name: user.to_string(),
        role,
        namespaces,
    })
}

/// Limits repeated authentication failures per peer address.
pub struct FailureLimiter {
    window: Duration,
    max: usize,
    seen: Mutex<HashMap<FailureKey, Vec<Instant>>>,
}

/// Whose failures count together: one address and one token id, or one
/// address for everything else (unknown ids, bad certificates). Failures
/// against unknown ids from behind a NAT so never lock out the users of
/// real tokens there, and guessing the secret of one token locks only
/// that token from that address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FailureKey {
    pub ip: IpAddr,
    pub token_id: Option<String>,
}

impl FailureKey {
    /// The key of a request from `ip` presenting `bearer` (if any).
    pub fn of(store: &dyn Store, ip: IpAddr, bearer: Option<&str>) -> FailureKey {
        let token_id = bearer
            .and_then(|b| parse_token(b).ok())
            .map(|(id, _)| id)
            .filter(|id| {
                store
                    .get(&flotilla_api::object::key(Kind::Token, "", id))
                    .is_some()
            })
            .map(str::to_string);
        FailureKey { ip, token_id }
    }
}

impl FailureLimiter {
    pub fn new(max: usize, window: Duration) -> FailureLimiter {
        FailureLimiter {
            window,
            max,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `key` may try again, if it is blocked now.
    pub fn blocked(&self, key: &FailureKey, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().expect("poisoned");
        let v = seen.get_mut(key)?;
        v.retain(|t| now.duration_since(*t) < self.window);
        (v.len() >= self.max).then(|| {
            let oldest = v[0];
            (self.window - now.duration_since(oldest)).as_secs().max(1)
        })
    }

    pub fn record_failure(&self, key: FailureKey, now: Instant) {
        let mut seen = self.seen.lock().expect("poisoned");
        if seen.len() > 10_000 {
            // Bounded memory under a spray of addresses: forget stale entries.
            let window = self.window;
            seen.retain(|_, v| v.last().is_some_and(|t| now.duration_since(*t) < window));
        }
        seen.entry(key).or_default().push(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Role, ns: &[&str]) -> Identity {
        Identity::User {
            name: "u".into(),
            role,
            namespaces: ns.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn act(write: bool, kind: Kind, ns: Option<&str>) -> Action<'_> {
        Action {
            write,
            kind,
            namespace: ns,
            name: None,
        }
    }

    #[test]
    fn roles() {
        let admin = user(Role::Admin, &[]);
        let edit = user(Role::Edit, &["team"]);
        let view = user(Role::View, &[]);
        assert!(authorize(&admin, &act(true, Kind::Token, None)).is_ok());
        assert!(authorize(&edit, &act(true, Kind::Pod, Some("team"))).is_ok());
        let e = authorize(&edit, &act(true, Kind::Pod, Some("prod"))).unwrap_err();
        assert!(
            e.contains("covers namespaces team") || e.contains("cover namespaces team"),
            "{e}"
        );
        assert!(
            authorize(&edit, &act(true, Kind::Node, None))
                .unwrap_err()
                .contains("needs role admin")
        );
        assert!(authorize(&edit, &act(false, Kind::Node, None)).is_ok());
        assert!(authorize(&edit, &act(true, Kind::Token, None)).is_err());
        assert!(authorize(&view, &act(false, Kind::Pod, Some("x"))).is_ok());
        assert!(
            authorize(&view, &act(true, Kind::Pod, Some("x")))
                .unwrap_err()
                .contains("needs role edit or admin")
        );
        assert!(authorize(&view, &act(false, Kind::Token, None)).is_err());
        let node = Identity::Node { name: "n1".into() };
        let own = Action {
            write: false,
            kind: Kind::Node,
            namespace: None,
            name: Some("n1"),
        };
        let other = Action {
            write: false,
            kind: Kind::Node,
            namespace: None,
            name: Some("n2"),
        };
        assert!(authorize(&node, &own).is_ok());
        assert!(authorize(&node, &other).is_err());
        assert!(authorize(&node, &act(false, Kind::Pod, Some("default"))).is_err());
    }

    #[test]
    fn tokens_are_hashed_expire_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let (secret, info) = create_token(
            &store,
            Role::Edit,
            vec!["a".into()],
            Duration::from_secs(60),
            "admin",
        )
        .unwrap();
        assert!(secret.starts_with("flt_"));
        let stored = store.get(&format!("tokens/{}", info.id)).unwrap();
        let json = serde_json::to_string(&*stored).unwrap();
        assert!(
            !json.contains(secret.rsplit('_').next().unwrap()),
            "secret stored in plain text"
        );
        assert_eq!(
            check_token(&store, &secret).unwrap(),
            Identity::User {
                name: format!("token:{}", info.id),
                role: Role::Edit,
                namespaces: vec!["a".into()]
            }
        );
        let wrong = format!("{}x", &secret[..secret.len() - 1]);
        assert_eq!(
            check_token(&store, &wrong),
            Err(AuthFailure::Invalid("unknown token".into()))
        );
        assert!(check_token(&store, "garbage").is_err());
        revoke_token(&store, &info.id).unwrap();
        assert!(
            matches!(check_token(&store, &secret), Err(AuthFailure::Invalid(w)) if w.contains("revoked"))
        );
        let (expired, _) =
            create_token(&store, Role::View, vec![], Duration::ZERO, "admin").unwrap();
        assert!(
            matches!(check_token(&store, &expired), Err(AuthFailure::Invalid(w)) if w.contains("expired"))
        );
    }

    #[test]
    fn failures_are_rate_limited_per_peer_and_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let (known, _) = create_token(
            &store,
            Role::Admin,
            vec![],
            Duration::from_secs(60),
            "admin",
        )
        .unwrap();
        let l = FailureLimiter::new(3, Duration::from_secs(60));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        // Someone behind the NAT at `ip` sprays made-up tokens.
        let spray = FailureKey::of(&store, ip, Some("flt_abcdef_0000"));
        assert_eq!(spray.token_id, None);
        let t = Instant::now();
        for _ in 0..3 {
            assert!(l.blocked(&spray, t).is_none());
            l.record_failure(spray.clone(), t);
        }
        assert_eq!(l.blocked(&spray, t), Some(60));
        assert_eq!(
            l.blocked(&FailureKey::of(&store, ip, Some("flt_0123_x")), t),
            Some(60),
            "every unknown id from there counts together"
        );
        assert!(l.blocked(&FailureKey::of(&store, other, None), t).is_none());
        // A real token's holder behind the same NAT is not locked out.
        let holder = FailureKey::of(&store, ip, Some(&known));
        assert!(holder.token_id.is_some());
        assert!(l.blocked(&holder, t).is_none());
        // Guessing that token's secret locks that token from there only.
        let id = holder.token_id.clone().unwrap();
        let guess = format!("{TOKEN_PREFIX}{id}_wrong");
        for _ in 0..3 {
            l.record_failure(FailureKey::of(&store, ip, Some(&guess)), t);
        }
        assert_eq!(l.blocked(&holder, t), Some(60));
        assert!(
            l.blocked(&FailureKey::of(&store, other, Some(&known)), t)
                .is_none()
        );
        assert!(l.blocked(&spray, t + Duration::from_secs(61)).is_none());
    }
}
