//! `flotilla run`: what `docker run --rm` is to Docker — upload a module (or
//! name an image), run it as a one-member pod that is never restarted,
//! stream its output, exit with its exit code, and remove the pod.

use crate::client::Client;
use anyhow::{Context, Result, bail};
use flotilla_api::{
    MemberSource, MemberSpec, MemberState, Object, ObjectMeta, Pod, PodPhase, PodSpec,
    RestartPolicy,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// What `flotilla run` was asked to run.
pub struct RunArgs {
    pub file: Option<String>,
    pub image: Option<String>,
    pub env: Vec<String>,
    pub name: Option<String>,
    pub keep: bool,
    pub args: Vec<String>,
}

/// Exit status when the member never ran (it could not be started).
const NOT_RUN: u8 = 125;

pub fn run(c: &Client, namespace: &str, a: RunArgs) -> Result<ExitCode> {
    let (source, stem) = match (&a.file, &a.image) {
        (Some(f), None) => {
            let path = Path::new(f);
            let (digest, size) = flotilla_api::manifest::check_module_file(path)
                .map_err(|e| anyhow::anyhow!("{}\nhint: {}", e.message, e.hint))?;
            let files = BTreeMap::from([(digest.clone(), path.to_path_buf())]);
            crate::manifests::upload(c, &files)?;
            let stem = path
                .file_stem()
                .map_or("app".into(), |s| s.to_string_lossy().into_owned());
            (MemberSource::Module { digest, size }, stem)
        }
        (None, Some(i)) => {
            let source = if i.starts_with("oci://") {
                MemberSource::artifact(i)
            } else {
                MemberSource::container(i)
            };
            let repo = i.trim_start_matches("oci://");
            let repo = repo.split(['@', ':']).next().unwrap_or(repo);
            let stem = repo.rsplit('/').next().unwrap_or("app").to_string();
            (source, stem)
        }
        (Some(_), Some(_)) => bail!("give a module file or --image, not both"),
        (None, None) => bail!("give a module file to run (flotilla run ./app.wasm) or --image REF"),
    };
    let mut env = std::collections::BTreeMap::new();
    for kv in &a.env {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("-e {kv}: write -e NAME=VALUE");
        };
        env.insert(k.to_string(), v.into());
    }
    let member_name = dns_label(&stem);
    let name = a.name.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!(
            "run-{member_name}-{:06x}",
            (nanos ^ u128::from(std::process::id())) & 0xff_ffff
        )
    });
    let member = MemberSpec {
        name: member_name.clone(),
        source,
        args: a.args.clone(),
        env,
        restart: RestartPolicy::Never,
        ..MemberSpec::default()
    };
    flotilla_api::object::validate_member(&member).map_err(anyhow::Error::msg)?;
    let pod = Object::Pod(Pod {
        metadata: ObjectMeta {
            name: name.clone(),
            namespace: namespace.to_string(),
            ..Default::default()
        },
        spec: PodSpec {
            members: vec![member],
            ..Default::default()
        },
        ..Default::default()
    });
    let res = c.apply(vec![pod])?;
    if let Some(e) = res.results.into_iter().find_map(|r| r.error) {
        bail!("pod {name}: {e}");
    }
    let mut out = std::io::stdout();
    let outcome = c.follow_until_done(namespace, &name, &member_name, &mut out);
    let _ = out.flush();
    if a.keep {
        eprintln!("pod {name} kept (flotilla delete pod {name})");
    } else if let Err(e) = c.delete(flotilla_api::Kind::Pod, namespace, &name) {
        eprintln!("warning: could not remove pod {name}: {e:#}");
    }
    let pod = outcome.with_context(|| format!("following pod {name}"))?;
    Ok(ExitCode::from(exit_code(&pod)))
}

/// The member's exit code (traps 134, limits 137, as the agent records
/// them), or 125 with the reason on stderr when it never ran.
fn exit_code(p: &Pod) -> u8 {
    let term = p.status.members.first().and_then(|m| match &m.state {
        MemberState::Terminated(t) => Some(t),
        _ => m.last_termination.as_ref(),
    });
    match term {
        Some(t) => {
            if !t.message.is_empty() && t.exit_code != 0 {
                eprintln!("{}: {}", t.reason, t.message);
            }
            u8::try_from(t.exit_code.clamp(0, 255)).unwrap_or(1)
        }
        None => {
            eprintln!(
                "the member did not run: {} {}",
                p.status.reason, p.status.message
            );
            NOT_RUN
        }
    }
}

/// A DNS label from a file stem (`my_app.v2` → `my-app-v2`).
fn dns_label(s: &str) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(40);
    let out = out.trim_matches('-').to_string();
    if out.is_empty() { "app".into() } else { out }
}

/// Whether a pod is done for good (a one-shot pod never restarts).
pub fn finished(p: &Pod) -> bool {
    matches!(
        p.status.phase,
        PodPhase::Succeeded | PodPhase::Failed | PodPhase::Lost
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_from_file_stems() {
        assert_eq!(dns_label("My_App.v2"), "my-app-v2");
        assert_eq!(dns_label("__"), "app");
    }
}
