//! An admission plugin built with flotilla-sdk: every object it is given
//! must carry the labels named in `$REQUIRED` (comma-separated keys).
//! `mutate` first adds the labels of `$DEFAULTS` (`key=value,…`) an object
//! lacks, so a default can satisfy a requirement.

use flotilla_sdk::{Admission, Object};

struct RequireLabels;

fn list(var: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[flotilla_sdk::admission]
impl Admission for RequireLabels {
    fn validate(obj: &Object) -> Result<(), String> {
        let meta = obj.metadata();
        for key in list("REQUIRED") {
            if meta.label(&key).is_none() {
                return Err(format!(
                    "{} \"{}\" has no label \"{key}\"",
                    obj.kind_name(),
                    meta.name
                ));
            }
        }
        Ok(())
    }

    fn mutate(mut obj: Object) -> Result<Object, String> {
        let meta = obj.metadata_mut();
        for entry in list("DEFAULTS") {
            let Some((key, value)) = entry.split_once('=') else {
                return Err(format!("DEFAULTS entry '{entry}' is not key=value"));
            };
            if meta.label(key).is_none() {
                meta.set_label(key, value);
            }
        }
        Ok(obj)
    }
}

/// Built as a binary with the other samples; the scheduler calls the
/// exports, never `main`.
fn main() {}
