//! `flotilla rollout status|history|undo|pause|resume|restart`: a
//! Deployment's rollouts, read from its status and changed through
//! `POST /v1/deployments/NS/NAME/rollout`.

use crate::client::Client;
use crate::table::Table;
use anyhow::{Result, bail};
use clap::Subcommand;
use flotilla_api::rollout::RolloutPhase;
use flotilla_api::{Deployment, Kind, Object};
use flotilla_scheduler::api::{RolloutAction, RolloutRequest};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Follow the rollout until it completes (exit 0) or halts (exit 1).
    Status {
        /// `deployment/NAME`, or `deployment NAME`, or just `NAME`.
        target: String,
        name: Option<String>,
        /// Print the state once instead of following it.
        #[arg(long)]
        no_watch: bool,
        /// Give up following after this long (e.g. 90s, 5m) [default: no limit].
        #[arg(long)]
        timeout: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: crate::Output,
    },
    /// The revisions the Deployment keeps, oldest first.
    History {
        target: String,
        name: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: crate::Output,
    },
    /// Roll back to the previous revision, or to --to-revision N.
    Undo {
        target: String,
        name: Option<String>,
        #[arg(long)]
        to_revision: Option<u64>,
    },
    /// Replace no pod until `rollout resume` (template changes wait).
    Pause {
        target: String,
        name: Option<String>,
    },
    /// Roll again after a pause, or retry a rollout that halted.
    Resume {
        target: String,
        name: Option<String>,
    },
    /// Replace every pod with a fresh one, as a rolling update.
    Restart {
        target: String,
        name: Option<String>,
    },
}

/// The Deployment a `deployment/NAME`, `deployment NAME` or `NAME` names.
pub fn deployment_name(target: &str, name: Option<&str>, verb: &str) -> Result<String> {
    let is_deployment = |k: &str| Kind::from_user(k) == Some(Kind::Deployment);
    Ok(match (target.split_once('/'), name) {
        (Some((k, n)), None) if is_deployment(k) => n.to_string(),
        (None, Some(n)) if is_deployment(target) => n.to_string(),
        (None, None) => target.to_string(),
        _ => bail!("only deployments have rollouts: flotilla rollout {verb} deployment/NAME"),
    })
}

fn get(c: &Client, ns: &str, name: &str) -> Result<Deployment> {
    match c.get(Kind::Deployment, ns, name)? {
        Object::Deployment(d) => Ok(d),
        _ => bail!("deployment/{name} is not a deployment"),
    }
}

pub fn run(c: &Client, ns: &str, cmd: RolloutCmd) -> Result<ExitCode> {
    let act =
        |target: String, name: Option<String>, verb, action, to_revision| -> Result<ExitCode> {
            let name = deployment_name(&target, name.as_deref(), verb)?;
            let obj = c.rollout(
                ns,
                &name,
                &RolloutRequest {
                    action,
                    to_revision,
                },
            )?;
            let Object::Deployment(d) = obj else {
                bail!("the API answered with something other than a deployment");
            };
            let done = match action {
                RolloutAction::Undo => {
                    let to = d
                        .status
                        .revisions
                        .iter()
                        .find(|r| {
                            r.template == d.spec.template && r.restarted_ms == d.spec.restarted_ms
                        })
                        .map(|r| format!("revision {}", r.number))
                        .unwrap_or_else(|| "the earlier template".into());
                    format!("rolled back to {to}")
                }
                RolloutAction::Pause => "paused".into(),
                RolloutAction::Resume => "resumed".into(),
                RolloutAction::Restart => "restarted".into(),
            };
            println!("deployment/{name} {done}");
            Ok(ExitCode::SUCCESS)
        };
    match cmd {
        RolloutCmd::Undo {
            target,
            name,
            to_revision,
        } => act(target, name, "undo", RolloutAction::Undo, to_revision),
        RolloutCmd::Pause { target, name } => {
            act(target, name, "pause", RolloutAction::Pause, None)
        }
        RolloutCmd::Resume { target, name } => {
            act(target, name, "resume", RolloutAction::Resume, None)
        }
        RolloutCmd::Restart { target, name } => {
            act(target, name, "restart", RolloutAction::Restart, None)
        }
        RolloutCmd::History {
            target,
            name,
            output,
        } => {
            let name = deployment_name(&target, name.as_deref(), "history")?;
            let d = get(c, ns, &name)?;
            if output == crate::Output::Json {
                crate::print_json(&d.status.revisions)?;
                return Ok(ExitCode::SUCCESS);
            }
            print!("{}", history(&d, flotilla_api::time::now_ms()));
            Ok(ExitCode::SUCCESS)
        }
        RolloutCmd::Status {
            target,
            name,
            no_watch,
            timeout,
            output,
        } => {
            let name = deployment_name(&target, name.as_deref(), "status")?;
            let limit = timeout
                .map(|t| flotilla_api::probe::Millis::parse(&t).map(|m| m.duration()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            status(c, ns, &name, !no_watch, limit, output)
        }
    }
}

/// One line on where the rollout stands.
fn line(d: &Deployment) -> String {
    let s = &d.status;
    let want = d.spec.replicas;
    match s.rollout.phase {
        RolloutPhase::Complete => format!(
            "deployment/{} rolled out: revision {}, {want} of {want} pods ready",
            d.metadata.name, s.revision
        ),
        RolloutPhase::Progressing => format!(
            "revision {}: {} of {want} updated pods ready, {} older pod(s) left",
            s.revision,
            s.updated_ready,
            s.replicas.saturating_sub(s.updated)
        ),
        RolloutPhase::Paused => format!(
            "deployment/{} is paused at revision {} ({} of {want} pods updated); `flotilla rollout resume` continues it",
            d.metadata.name, s.revision, s.updated
        ),
        RolloutPhase::Halted => format!(
            "deployment/{} halted at revision {}: {}",
            d.metadata.name, s.revision, s.rollout.message
        ),
    }
}

/// Whether the controller has seen the Deployment's latest spec.
fn observed(d: &Deployment) -> bool {
    d.status.observed_generation >= d.metadata.generation
}

fn status(
    c: &Client,
    ns: &str,
    name: &str,
    watch: bool,
    limit: Option<Duration>,
    output: crate::Output,
) -> Result<ExitCode> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let d = get(c, ns, name)?;
        let settled = observed(&d)
            && matches!(
                d.status.rollout.phase,
                RolloutPhase::Complete | RolloutPhase::Halted | RolloutPhase::Paused
            );
        if output == crate::Output::Json {
            if settled || !watch {
                crate::print_json(&serde_json::json!({
                    "revision": d.status.revision,
                    "observed": observed(&d),
                    "replicas": d.spec.replicas,
                    "updated": d.status.updated,
                    "updated_ready": d.status.updated_ready,
                    "ready": d.status.ready,
                    "rollout": d.status.rollout,
                }))?;
            }
        } else {
            let now = if observed(&d) {
                line(&d)
            } else {
                format!(
                    "waiting for the controller to see generation {}",
                    d.metadata.generation
                )
            };
            if now != last {
                println!("{now}");
                last = now;
            }
        }
        let code = match d.status.rollout.phase {
            RolloutPhase::Halted => ExitCode::FAILURE,
            _ => ExitCode::SUCCESS,
        };
        if settled || !watch {
            return Ok(code);
        }
        if limit.is_some_and(|l| started.elapsed() >= l) {
            eprintln!(
                "gave up following after {:?}; the rollout goes on",
                limit.unwrap_or_default()
            );
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The `rollout history` table.
fn history(d: &Deployment, now: u64) -> String {
    let mut t = Table::new(&["REVISION", "CURRENT", "AGE", "HASH", "MEMBERS"]);
    for r in &d.status.revisions {
        let members: Vec<String> = r
            .template
            .spec
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.source.label()))
            .collect();
        t.row(vec![
            r.number.to_string(),
            if r.number == d.status.revision {
                "*".into()
            } else {
                String::new()
            },
            flotilla_api::time::age(r.created_ms, now),
            r.hash.clone(),
            members.join(","),
        ]);
    }
    if t.is_empty() {
        return format!("deployment/{} has no revisions yet\n", d.metadata.name);
    }
    t.render()
}
