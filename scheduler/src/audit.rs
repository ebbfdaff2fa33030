//! The audit log: one JSON line per mutating API request, allowed or not,
//! and per read of secrets; an apply's line names the objects it wrote.

use axum::http::{Method, StatusCode};
use flotilla_api::time::now_ms;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;

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
    /// What a request wrote, when the route says (`pod default/web`).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    objects: &'a [String],
}

/// Attached to a response by a handler that writes several objects (apply),
/// so its audit line names them.
#[derive(Clone, Debug, Default)]
pub struct AuditObjects(pub Vec<String>);

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

    pub fn write(&self, who: &str, peer: IpAddr, method: &Method, path: &str, status: StatusCode) {
        self.write_objects(who, peer, method, path, status, &[]);
    }

    pub fn write_objects(
        &self,
        who: &str,
        peer: IpAddr,
        method: &Method,
        path: &str,
        status: StatusCode,
        objects: &[String],
    ) {
        let line = AuditLine {
            time_ms: now_ms(),
            who,
            peer: peer.to_string(),
            method: method.as_str(),
            path,
            status: status.as_u16(),
            objects,
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
