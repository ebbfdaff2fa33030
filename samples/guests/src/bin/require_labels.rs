//! An admission plugin (`flotilla:plugin/admission`, wit/plugin/plugin.wit):
//! every object it is given must carry the labels named in `$REQUIRED`
//! (comma-separated keys). `mutate` first adds the labels of `$DEFAULTS`
//! (`key=value,…`) an object lacks, so a default can satisfy a
//! requirement.

wit_bindgen::generate!({
    path: "../../wit/plugin",
    world: "flotilla:plugin/admission",
});

use flotilla::plugin::types::Metadata;

struct RequireLabels;

/// The object's kind as people write it, and its metadata.
fn parts(obj: &mut Object) -> (String, &mut Metadata) {
    match obj {
        Object::Pod(p) => ("pod".into(), &mut p.metadata),
        Object::Deployment(d) => ("deployment".into(), &mut d.metadata),
        Object::Job(j) => ("job".into(), &mut j.metadata),
        Object::Function(f) => ("function".into(), &mut f.metadata),
        Object::Other(o) => (o.kind.to_lowercase(), &mut o.metadata),
    }
}

fn list(var: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

impl Guest for RequireLabels {
    fn validate(mut obj: Object) -> Result<(), String> {
        let (kind, meta) = parts(&mut obj);
        for key in list("REQUIRED") {
            if !meta.labels.iter().any(|(k, _)| *k == key) {
                return Err(format!("{kind} \"{}\" has no label \"{key}\"", meta.name));
            }
        }
        Ok(())
    }

    fn mutate(mut obj: Object) -> Result<Object, String> {
        let (_, meta) = parts(&mut obj);
        for entry in list("DEFAULTS") {
            let Some((key, value)) = entry.split_once('=') else {
                return Err(format!("DEFAULTS entry '{entry}' is not key=value"));
            };
            if !meta.labels.iter().any(|(k, _)| k == key) {
                meta.labels.push((key.into(), value.into()));
            }
        }
        meta.labels.sort();
        Ok(obj)
    }
}

export!(RequireLabels);

/// Built as a binary with the other samples; the scheduler calls the
/// exports, never `main`.
fn main() {}
