//! Services: spec and labels are the client's; the virtual IP and the
//! endpoints (status) are the services controller's, which a write wakes.

use super::{KindRules, Update, take_spec_and_labels};
use flotilla_api::{Kind, Object, Service};

pub struct Services;

impl KindRules for Services {
    fn kind(&self) -> Kind {
        Kind::Service
    }

    fn strip_owned(&self, obj: &mut Object) {
        if let Object::Service(s) = obj {
            s.status = Default::default();
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Service(cur), Object::Service(new)) = (current, new) else {
            return Err("not a service".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |s: &mut Service| &mut s.metadata,
            |a, b| a.spec == b.spec,
            |s, n| s.spec = n.spec,
            Object::Service,
        ))
    }

    fn wakes_controllers(&self) -> bool {
        true
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}
