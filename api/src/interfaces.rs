//! Host interfaces a wasm member (or a Function) may ask for beyond WASI's
//! CLI, sockets and HTTP: `wasi:config/store` (its ConfigMaps' keys, seen
//! as they change), `wasi:keyvalue` (store, atomics, batch: buckets of its
//! namespace, kept by the scheduler, with quotas) and `wasi:logging`
//! (levelled lines into its log). Each is off unless the member's manifest
//! asks: a component importing one it did not ask for is refused when it
//! is instantiated, naming the interface and the field to add.
//!
//! Also the key-value wire types the agent and the scheduler share, and
//! the limits of a bucket.

use serde::{Deserialize, Serialize};

/// What a member asks for (`wasi = { config = ["app"], keyvalue =
/// ["counters"], logging = true }` in a manifest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInterfaces {
    /// ConfigMaps whose keys `wasi:config/store` answers with (a key of a
    /// later one wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config: Vec<String>,
    /// Buckets of the pod's namespace `wasi:keyvalue/store.open` may open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyvalue: Vec<String>,
    /// `wasi:logging/logging`: lines `[LEVEL] context: message` in the
    /// member's log.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logging: bool,
}

/// For `skip_serializing_if` on a boxed field.
pub fn boxed_is_default(h: &HostInterfaces) -> bool {
    h.is_default()
}

/// One of the interfaces a member must ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    Config,
    KeyValue,
    Logging,
}

impl Interface {
    /// The interface an import of a component belongs to, if it is one a
    /// member must ask for (`wasi:keyvalue/atomics@0.2.0-draft` → KeyValue).
    pub fn of_import(name: &str) -> Option<Interface> {
        let package = name.split('/').next().unwrap_or(name);
        match package.split('@').next().unwrap_or(package) {
            "wasi:config" => Some(Interface::Config),
            "wasi:keyvalue" => Some(Interface::KeyValue),
            "wasi:logging" => Some(Interface::Logging),
            _ => None,
        }
    }

    /// How a manifest asks for it.
    pub fn manifest_hint(self) -> &'static str {
        match self {
            Interface::Config => "wasi = { config = [\"CONFIGMAP\"] }",
            Interface::KeyValue => "wasi = { keyvalue = [\"BUCKET\"] }",
            Interface::Logging => "wasi = { logging = true }",
        }
    }
}

impl HostInterfaces {
    pub fn is_default(&self) -> bool {
        *self == HostInterfaces::default()
    }

    pub fn allows(&self, i: Interface) -> bool {
        match i {
            Interface::Config => !self.config.is_empty(),
            Interface::KeyValue => !self.keyvalue.is_empty(),
            Interface::Logging => self.logging,
        }
    }

    /// The pure check the CLI and the API share: names are object names
    /// and bucket names, none twice.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.config {
            crate::meta::check_dns_label(c).map_err(|why| format!("wasi.config '{c}' {why}"))?;
            if !seen.insert(c) {
                return Err(format!("wasi.config names '{c}' twice"));
            }
        }
        seen.clear();
        for b in &self.keyvalue {
            check_bucket(b)?;
            if !seen.insert(b) {
                return Err(format!("wasi.keyvalue names bucket '{b}' twice"));
            }
        }
        Ok(())
    }

    /// Whether a component importing `imports` (names as the component
    /// model gives them) may run as member `member`: the first import of an
    /// interface it did not ask for, named, with what to add.
    pub fn check_imports<'a>(
        &self,
        member: &str,
        imports: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), String> {
        for name in imports {
            if let Some(i) = Interface::of_import(name)
                && !self.allows(i)
            {
                return Err(format!(
                    "the component imports {name}, which member \"{member}\" does not ask for; host interfaces are off unless the manifest asks: add {} to the member",
                    i.manifest_hint()
                ));
            }
        }
        Ok(())
    }
}

/// A bucket name: 1–63 characters of lowercase letters, digits, `-`, `_`
/// and `.`, starting with a letter or digit.
pub fn check_bucket(b: &str) -> Result<(), String> {
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.as_bytes()[0].is_ascii_alphanumeric()
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bucket name '{b}' must be 1-63 characters of a-z, 0-9, '-', '_' and '.', starting with a letter or digit"
        ))
    }
}

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value, in bytes (a frame carries it base64-encoded).
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// What a bucket may hold when no Quota of its namespace says.
pub const DEFAULT_BUCKET_BYTES: u64 = 64 << 20;
pub const DEFAULT_BUCKET_KEYS: u64 = 100_000;
/// Keys per `list-keys` page.
pub const LIST_PAGE: usize = 1000;

/// A key a bucket may hold: 1 to [`MAX_KEY_BYTES`] bytes, no NUL.
pub fn check_key(k: &str) -> Result<(), String> {
    if k.is_empty() {
        return Err("a key must not be empty".into());
    }
    if k.len() > MAX_KEY_BYTES {
        return Err(format!(
            "a key is at most {MAX_KEY_BYTES} bytes; this one has {}",
            k.len()
        ));
    }
    if k.contains('\0') {
        return Err("a key must not contain NUL".into());
    }
    Ok(())
}

/// One key-value operation on a bucket, as the agent sends it for a
/// member (on a stream of its own, [`KvRequest`]) and the API runs it for
/// `flotilla kv`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvOp {
    Get {
        key: String,
    },
    Set {
        key: String,
        #[serde(with = "b64")]
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    Exists {
        key: String,
    },
    /// A page of keys in order, from `cursor` (the number of keys before it).
    ListKeys {
        #[serde(default)]
        cursor: u64,
    },
    /// Adds `delta` to the key's value read as a decimal u64 (missing: 0);
    /// the new value is stored as decimal text and answered.
    Increment {
        key: String,
        delta: u64,
    },
    GetMany {
        keys: Vec<String>,
    },
    /// All or nothing, in one transaction.
    SetMany {
        pairs: Vec<KvPair>,
    },
    DeleteMany {
        keys: Vec<String>,
    },
}

impl KvOp {
    /// Whether it may change the bucket (and so is held to its quota).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            KvOp::Set { .. }
                | KvOp::Delete { .. }
                | KvOp::Increment { .. }
                | KvOp::SetMany { .. }
                | KvOp::DeleteMany { .. }
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvPair {
    pub key: String,
    #[serde(with = "b64")]
    pub value: Vec<u8>,
}

/// What an operation answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvAnswer {
    Done,
    Value(#[serde(with = "b64_opt")] Option<Vec<u8>>),
    Exists(bool),
    Keys {
        keys: Vec<String>,
        /// Where the next page starts (none: this was the last).
        cursor: Option<u64>,
    },
    Count(u64),
    Values(Vec<Option<KvPair>>),
}

/// Why an operation failed; no write of a failed operation is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum KvError {
    /// The member did not ask for the bucket, or the pod is not this node's.
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// Over the bucket's quota, a key or value too large, a non-number
    /// incremented.
    #[error("{0}")]
    Refused(String),
    /// The scheduler could not be reached or failed.
    #[error("{0}")]
    Unavailable(String),
}

/// The frame an agent sends on a stream of its own for a member's
/// key-value operation; the scheduler answers with one [`KvReply`] frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRequest {
    pub namespace: String,
    /// The pod the member belongs to (it must be bound to the node and
    /// declare the bucket).
    pub pod: String,
    pub bucket: String,
    pub op: KvOp,
}

pub type KvReply = Result<KvAnswer, KvError>;

/// `GET /v1/kv/{ns}/{bucket}`: a page of its keys, from `?cursor=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketListing {
    pub keys: Vec<String>,
    /// Where the next page starts (none: this was the last).
    pub cursor: Option<u64>,
    pub usage: BucketUsage,
    pub limits: BucketLimits,
}

/// How much of a bucket's quota is used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketUsage {
    pub keys: u64,
    /// Keys' and values' bytes together.
    pub bytes: u64,
}

/// What a bucket may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketLimits {
    pub keys: u64,
    pub bytes: u64,
}

impl Default for BucketLimits {
    fn default() -> Self {
        BucketLimits {
            keys: DEFAULT_BUCKET_KEYS,
            bytes: DEFAULT_BUCKET_BYTES,
        }
    }
}

impl BucketLimits {
    /// Whether `usage` is within the limits, or the message naming the
    /// bucket, the figure and the cap.
    pub fn check(&self, bucket: &str, usage: BucketUsage) -> Result<(), KvError> {
        if usage.keys > self.keys {
            return Err(KvError::Refused(format!(
                "bucket \"{bucket}\" is over its quota: {} keys of at most {}",
                usage.keys, self.keys
            )));
        }
        if usage.bytes > self.bytes {
            return Err(KvError::Refused(format!(
                "bucket \"{bucket}\" is over its quota: {} of at most {}",
                size(usage.bytes),
                size(self.bytes)
            )));
        }
        Ok(())
    }
}

/// Bytes for people: `22 bytes`, `1.5KiB`, `64MiB`.
pub fn size(b: u64) -> String {
    if b < 1024 {
        format!("{b} bytes")
    } else {
        format!("{}B", crate::quantity::Bytes(b).human())
    }
}

/// A value as standard base64 in JSON.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::b64::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::b64")] Vec<u8>);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_of_interfaces_not_asked_for_are_named() {
        let none = HostInterfaces::default();
        let imports = [
            "wasi:cli/environment@0.2.6",
            "wasi:keyvalue/atomics@0.2.0-draft",
        ];
        let err = none.check_imports("counter", imports).unwrap_err();
        assert!(
            err.contains("wasi:keyvalue/atomics@0.2.0-draft")
                && err.contains("member \"counter\"")
                && err.contains("keyvalue = [\"BUCKET\"]"),
            "{err}"
        );
        let kv = HostInterfaces {
            keyvalue: vec!["counters".into()],
            ..Default::default()
        };
        kv.check_imports("counter", imports).unwrap();
        let err = kv
            .check_imports("counter", ["wasi:logging/logging@0.1.0-draft"])
            .unwrap_err();
        assert!(err.contains("logging = true"), "{err}");
        assert_eq!(
            Interface::of_import("wasi:config/store@0.2.0-rc.1"),
            Some(Interface::Config)
        );
        assert_eq!(Interface::of_import("wasi:configure/x"), None);
    }

    #[test]
    fn names_are_checked() {
        let bad = HostInterfaces {
            keyvalue: vec!["Counters".into()],
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("bucket name 'Counters'")
        );
        let twice = HostInterfaces {
            config: vec!["a".into(), "a".into()],
            ..Default::default()
        };
        assert!(twice.validate().unwrap_err().contains("twice"));
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
        check_key("a/b c").unwrap();
    }

    #[test]
    fn ops_and_answers_cross_as_json() {
        let op = KvOp::SetMany {
            pairs: vec![KvPair {
                key: "k".into(),
                value: vec![0, 255, 7],
            }],
        };
        let text = serde_json::to_string(&op).unwrap();
        assert!(text.contains("\"AP8H\""), "{text}");
        assert_eq!(serde_json::from_str::<KvOp>(&text).unwrap(), op);
        for a in [
            KvAnswer::Value(None),
            KvAnswer::Value(Some(b"x".to_vec())),
            KvAnswer::Count(3),
        ] {
            let t = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<KvAnswer>(&t).unwrap(), a);
        }
    }

    #[test]
    fn limits_name_the_bucket_and_the_figures() {
        let l = BucketLimits { keys: 2, bytes: 10 };
        l.check("b", BucketUsage { keys: 2, bytes: 10 }).unwrap();
        let e = l.check("b", BucketUsage { keys: 3, bytes: 1 }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bucket \"b\" is over its quota: 3 keys of at most 2"
        );
        assert!(
            l.check("b", BucketUsage { keys: 1, bytes: 11 })
                .unwrap_err()
                .to_string()
                .contains("over its quota")
        );
    }
}
