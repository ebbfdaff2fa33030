//! The host interfaces a member asks for in its manifest (`wasi = {
//! config = [...], keyvalue = [...], logging = true }`), as plain
//! functions over the `flotilla:workload` world's bindings (`wit/workload/`:
//! `wasi:config/store`, `wasi:keyvalue` store/atomics/batch and
//! `wasi:logging`). Only what a program calls ends up imported by its
//! component, so a member asks for exactly the interfaces it uses.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/workload",
        world: "flotilla:workload/imports",
        generate_all,
    });
}

/// `wasi:config/store`: the keys of the member's ConfigMaps, as they are
/// now (a running member sees a ConfigMap's change on its next call).
pub mod config {
    use super::bindings::wasi::config::store;

    /// The value of `key`, if a ConfigMap of the member has it.
    pub fn get(key: &str) -> Option<String> {
        store::get(key).ok().flatten()
    }

    /// `key` parsed, or `default` when it is missing or does not parse.
    pub fn get_or<T: std::str::FromStr>(key: &str, default: T) -> T {
        get(key)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default)
    }

    /// Every key and value.
    pub fn all() -> Vec<(String, String)> {
        store::get_all().unwrap_or_default()
    }
}

/// `wasi:keyvalue`: buckets of the pod's namespace the member names in
/// `wasi.keyvalue`, kept by the scheduler (they survive restarts and
/// follow the pod to any node).
///
/// ```no_run
/// let bucket = flotilla_sdk::kv::open("counters").expect("the member asks for it");
/// let n = flotilla_sdk::kv::increment(&bucket, "visits", 1).unwrap();
/// bucket.set("last", n.to_string().as_bytes()).unwrap();
/// ```
pub mod kv {
    pub use super::bindings::wasi::keyvalue::store::{Bucket, Error, KeyResponse};
    use super::bindings::wasi::keyvalue::{atomics, batch, store};

    /// Opens a bucket the member asks for (`NoSuchStore` otherwise).
    pub fn open(name: &str) -> Result<Bucket, Error> {
        store::open(name)
    }

    /// Adds `delta` to the decimal number under `key` (missing: 0) in one
    /// step, however many members do it at once; the new value.
    pub fn increment(bucket: &Bucket, key: &str, delta: u64) -> Result<u64, Error> {
        atomics::increment(bucket, key, delta)
    }

    /// A key and its value, or `None` for a missing key.
    pub type Entry = Option<(String, Vec<u8>)>;

    /// Several keys in one round trip (`None` for a missing one).
    pub fn get_many(bucket: &Bucket, keys: &[String]) -> Result<Vec<Entry>, Error> {
        batch::get_many(bucket, keys)
    }

    /// Several keys in one transaction: all are set, or none.
    pub fn set_many(bucket: &Bucket, pairs: &[(String, Vec<u8>)]) -> Result<(), Error> {
        batch::set_many(bucket, pairs)
    }

    pub fn delete_many(bucket: &Bucket, keys: &[String]) -> Result<(), Error> {
        batch::delete_many(bucket, keys)
    }

    /// Every key of the bucket, page by page.
    pub fn keys(bucket: &Bucket) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = bucket.list_keys(cursor)?;
            out.extend(page.keys);
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// The error as text.
    pub fn describe(e: &Error) -> String {
        match e {
            Error::NoSuchStore => "no such bucket (is it in the member's wasi.keyvalue?)".into(),
            Error::AccessDenied => "access denied".into(),
            Error::Other(m) => m.clone(),
        }
    }
}

/// `wasi:logging`: levelled lines in the member's log (`flotilla logs
/// --level warn` shows warnings and worse).
pub mod log {
    use super::bindings::wasi::logging::logging::{Level, log};

    pub fn trace(context: &str, message: &str) {
        log(Level::Trace, context, message)
    }
    pub fn debug(context: &str, message: &str) {
        log(Level::Debug, context, message)
    }
    pub fn info(context: &str, message: &str) {
        log(Level::Info, context, message)
    }
    pub fn warn(context: &str, message: &str) {
        log(Level::Warn, context, message)
    }
    pub fn error(context: &str, message: &str) {
        log(Level::Error, context, message)
    }
    pub fn critical(context: &str, message: &str) {
        log(Level::Critical, context, message)
    }
}
