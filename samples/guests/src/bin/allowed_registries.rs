//! An admission plugin built with flotilla-sdk: the container images and
//! wasm artifacts of pods, Deployments, Jobs and Functions must come from
//! the registries in `$ALLOWED` (comma-separated `host[:port]`). Uploaded
//! modules are always allowed.

use flotilla_sdk::{Admission, Object, Source};

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

#[flotilla_sdk::admission]
impl Admission for AllowedRegistries {
    fn validate(obj: &Object) -> Result<(), String> {
        let allowed: Vec<String> = std::env::var("ALLOWED")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let what = format!("{} \"{}\"", obj.kind_name(), obj.metadata().name);
        if let Object::Function(f) = obj {
            return check(&what, &f.source, &allowed);
        }
        for m in obj.pod_spec().map(|s| s.members.as_slice()).unwrap_or_default() {
            check(&format!("{what} member \"{}\"", m.name), &m.source, &allowed)?;
        }
        Ok(())
    }
}

/// Built as a binary with the other samples; the scheduler calls the
/// exports, never `main`.
fn main() {}
