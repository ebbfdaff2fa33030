//! A misbehaving admission plugin for tests of failure policies: what it
//! does depends on the object's label `chaos`:
//! - `trap`: panics (a trap) in `validate`;
//! - `spin`: never returns from `validate`;
//! - `hog`: allocates in `validate` until its memory limit stops it;
//! - `deny`: denies, saying so;
//! - `rename`: `mutate` returns the object under another name;
//! - anything else (or no label): admits, and `mutate` adds the label
//!   `chaos-seen=yes`.

wit_bindgen::generate!({
    path: "../../wit/plugin",
    world: "flotilla:plugin/admission",
});

use flotilla::plugin::types::Metadata;

struct Chaos;

fn meta(obj: &mut Object) -> &mut Metadata {
    match obj {
        Object::Pod(p) => &mut p.metadata,
        Object::Deployment(d) => &mut d.metadata,
        Object::Job(j) => &mut j.metadata,
        Object::Function(f) => &mut f.metadata,
        Object::Other(o) => &mut o.metadata,
    }
}

fn chaos(obj: &mut Object) -> String {
    meta(obj)
        .labels
        .iter()
        .find(|(k, _)| k == "chaos")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

impl Guest for Chaos {
    fn validate(mut obj: Object) -> Result<(), String> {
        match chaos(&mut obj).as_str() {
            "trap" => panic!("chaos: trap requested"),
            "spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "hog" => {
                let mut kept: Vec<Vec<u8>> = Vec::new();
                loop {
                    kept.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&kept);
                }
            }
            "deny" => Err(format!("chaos denies \"{}\"", meta(&mut obj).name)),
            _ => Ok(()),
        }
    }

    fn mutate(mut obj: Object) -> Result<Object, String> {
        if chaos(&mut obj) == "rename" {
            meta(&mut obj).name.push_str("-renamed");
            return Ok(obj);
        }
        let m = meta(&mut obj);
        if !m.labels.iter().any(|(k, _)| k == "chaos-seen") {
            m.labels.push(("chaos-seen".into(), "yes".into()));
            m.labels.sort();
        }
        Ok(obj)
    }
}

export!(Chaos);

/// Built as a binary with the other samples; the scheduler calls the
/// exports, never `main`.
fn main() {}
