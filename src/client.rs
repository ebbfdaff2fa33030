//! A small blocking client of the scheduler's HTTP API that turns failures
//! into messages people can act on.

use anyhow::{Context, Result, anyhow, bail};
use flotilla_api::{Event, Kind, Object};
use flotilla_scheduler::api::{ApplyRequest, ApplyResponse, ErrorBody, ScaleRequest};
use serde::de::DeserializeOwned;
use std::io::Read;
use std::time::Duration;

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(3))
                .build(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn send(&self, req: ureq::Request, body: Option<serde_json::Value>) -> Result<ureq::Response> {
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<ErrorBody>(&text)
                    .map(|b| b.error)
                    .unwrap_or(text);
                Err(anyhow!(ApiError { code, message: msg }))
            }
            Err(ureq::Error::Transport(t)) => Err(anyhow!(
                "cannot reach the Flotilla API at {}: {t}\nhint: is `flotilla up` running? Point the CLI elsewhere with --server or FLOTILLA_SERVER",
                self.base
            )),
        }
    }

    fn json<T: DeserializeOwned>(
        &self,
        req: ureq::Request,
        body: Option<serde_json::Value>,
    ) -> Result<T> {
        let r = self.send(req, body)?;
        r.into_json()
            .context("the API sent a response this CLI does not understand")
    }

    pub fn apply(&self, objects: Vec<Object>) -> Result<ApplyResponse> {
        let body = serde_json::to_value(ApplyRequest { objects })?;
        self.json(self.agent.post(&self.url("/v1/apply")), Some(body))
    }

    pub fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        selector: Option<&str>,
    ) -> Result<Vec<Object>> {
        let mut req = self.agent.get(&self.url(&format!("/v1/{}", kind.plural())));
        if let Some(ns) = namespace {
            req = req.query("namespace", ns);
        }
        if let Some(s) = selector {
            req = req.query("selector", s);
        }
        self.json(req, None)
    }

    fn object_path(kind: Kind, namespace: &str, name: &str) -> String {
        if kind.namespaced() {
            format!("/v1/{}/{namespace}/{name}", kind.plural())
        } else {
            format!("/v1/{}/{name}", kind.plural())
        }
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Object> {
        self.json(
            self.agent
                .get(&self.url(&Self::object_path(kind, namespace, name))),
            None,
        )
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<Object> {
        self.json(
            self.agent
                .delete(&self.url(&Self::object_path(kind, namespace, name))),
            None,
        )
    }

    pub fn scale(&self, namespace: &str, name: &str, replicas: u32) -> Result<Object> {
        let body = serde_json::to_value(ScaleRequest { replicas })?;
        self.json(
            self.agent
                .post(&self.url(&format!("/v1/deployments/{namespace}/{name}/scale"))),
            Some(body),
        )
    }

    pub fn events(
        &self,
        namespace: Option<&str>,
        kind: Option<Kind>,
        name: Option<&str>,
    ) -> Result<Vec<Event>> {
        let mut req = self.agent.get(&self.url("/v1/events"));
        if let Some(ns) = namespace {
            req = req.query("namespace", ns);
        }
        if let Some(k) = kind {
            req = req.query("kind", k.plural());
        }
        if let Some(n) = name {
            req = req.query("name", n);
        }
        self.json(req, None)
    }

    /// Streams a member's log into `out` until the server ends it.
    pub fn logs(
        &self,
        namespace: &str,
        pod: &str,
        opts: &LogOptions<'_>,
        out: &mut dyn std::io::Write,
    ) -> Result<()> {
        let LogOptions {
            member,
            follow,
            previous,
            tail,
        } = *opts;
        let mut req = self
            .agent
            .get(&self.url(&format!("/v1/pods/{namespace}/{pod}/logs")))
            .query("follow", if follow { "true" } else { "false" })
            .query("previous", if previous { "true" } else { "false" });
        if let Some(m) = member {
            req = req.query("member", m);
        }
        if let Some(t) = tail {
            req = req.query("tail", &t.to_string());
        }
        let mut reader = self.send(req, None)?.into_reader();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) => bail!("log stream broke: {e}"),
            };
            out.write_all(&buf[..n])?;
            out.flush()?;
        }
    }
}

/// What part of a log to read.
#[derive(Clone, Copy, Default)]
pub struct LogOptions<'a> {
    pub member: Option<&'a str>,
    pub follow: bool,
    pub previous: bool,
    pub tail: Option<u64>,
}

/// An error response of the API, kept apart so callers can inspect the code.
#[derive(Debug)]
pub struct ApiError {
    pub code: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if self.code == 409 {
            f.write_str(" (409 Conflict)")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}
