//! The audit log: one JSON line per mutating API request, allowed or not.

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

    pub fn write(&self, who: &str, peer: IpAddr, method: &Method, path: &str, status: StatusCode) {
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
