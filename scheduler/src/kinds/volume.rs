//! Persistent Volumes: the client sets the capacity; the scheduler owns the
//! status (the node it is bound to). Delete is refused while a pod uses it
//! (in the API's delete).

use super::{Checks, KindRules, Update, take_spec_and_labels};
use flotilla_api::config::PersistentVolume;
use flotilla_api::{Kind, Object};

pub struct Volumes;

impl KindRules for Volumes {
    fn kind(&self) -> Kind {
        Kind::Volume
    }

    fn validate(&self, obj: &Object, _cx: &Checks<'_>) -> Result<(), String> {
        match obj {
            Object::Volume(v) if v.spec.capacity.0 == 0 => {
                Err("a volume's capacity must be more than 0".into())
            }
            _ => Ok(()),
        }
    }

    fn strip_owned(&self, obj: &mut Object) {
        if let Object::Volume(v) = obj {
            v.status = Default::default();
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Volume(cur), Object::Volume(new)) = (current, new) else {
            return Err("not a volume".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |v: &mut PersistentVolume| &mut v.metadata,
            |a, b| a.spec == b.spec,
            |v, n| v.spec = n.spec,
            Object::Volume,
        ))
    }

    fn wakes_controllers(&self) -> bool {
        true
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}

/// The pods (not finished) that use the volume `ns/name`.
pub fn users<'a>(pods: impl IntoIterator<Item = &'a Object>, ns: &str, name: &str) -> Vec<String> {
    pods.into_iter()
        .filter_map(|o| match o {
            Object::Pod(p)
                if p.metadata.namespace == ns
                    && !p.status.phase.is_terminal()
                    && persistent_names(&p.spec).any(|n| n == name) =>
            {
                Some(p.metadata.name.clone())
            }
            _ => None,
        })
        .collect()
}

/// The names of the persistent Volumes a pod uses.
pub fn persistent_names(spec: &flotilla_api::PodSpec) -> impl Iterator<Item = &str> {
    spec.volumes.iter().filter_map(|v| match &v.source {
        flotilla_api::config::VolumeSource::Persistent(r) => Some(r.name.as_str()),
        _ => None,
    })
}
