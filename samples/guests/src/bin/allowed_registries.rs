//! An admission plugin (`flotilla:plugin/admission`): the container images
//! and wasm artifacts of pods, Deployments, Jobs and Functions must come
//! from the registries in `$ALLOWED` (comma-separated `host[:port]`).
//! Uploaded modules are always allowed.

wit_bindgen::generate!({
    path: "../../wit/plugin",
    world: "flotilla:plugin/admission",
});

use flotilla::plugin::types::{PodSpec, Source};

struct AllowedRegistries;

fn check(what: &str, source: &Source, allowed: &[String]) -> Result<(), String> {
    let reference = match source {
        Source::Module(_) => return Ok(()),
        Source::Artifact(r) | Source::Image(r) => r,
    };
    let host = reference.split('/').next().unwrap_or_default();
    if allowed.iter().any(|a| a == host) {
        return Ok(());
    }
    Err(format!(
        "{what} comes from registry \"{host}\", which is not one of {}",
        allowed.join(", ")
    ))
}

fn check_pod(kind: &str, name: &str, spec: &PodSpec, allowed: &[String]) -> Result<(), String> {
    for m in &spec.members {
        check(
            &format!("{kind} \"{name}\" member \"{}\"", m.name),
            &m.source,
            allowed,
        )?;
    }
    Ok(())
}

impl Guest for AllowedRegistries {
    fn validate(obj: Object) -> Result<(), String> {
        let allowed: Vec<String> = std::env::var("ALLOWED")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        match &obj {
            Object::Pod(p) => check_pod("pod", &p.metadata.name, &p.spec, &allowed),
            Object::Deployment(d) => {
                check_pod("deployment", &d.metadata.name, &d.template, &allowed)
            }
            Object::Job(j) => check_pod("job", &j.metadata.name, &j.template, &allowed),
            Object::Function(f) => check(
                &format!("function \"{}\"", f.metadata.name),
                &f.source,
                &allowed,
            ),
            Object::Other(_) => Ok(()),
        }
    }

    fn mutate(obj: Object) -> Result<Object, String> {
        Ok(obj)
    }
}

export!(AllowedRegistries);

/// Built as a binary with the other samples; the scheduler calls the
/// exports, never `main`.
fn main() {}
