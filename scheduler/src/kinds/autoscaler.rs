//! Autoscalers: the spec and labels are the client's; the status
//! (figures, recommendations, decisions) is the autoscale controller's.

use super::{Checks, KindRules, Update, take_spec_and_labels};
use flotilla_api::autoscale::Autoscaler;
use flotilla_api::{Kind, Object};

pub struct Autoscalers;

impl KindRules for Autoscalers {
    fn kind(&self) -> Kind {
        Kind::Autoscaler
    }

    fn validate(&self, obj: &Object, _cx: &Checks<'_>) -> Result<(), String> {
        match obj {
            Object::Autoscaler(a) => a.spec.validate(),
            _ => Ok(()),
        }
    }

    fn strip_owned(&self, obj: &mut Object) {
        if let Object::Autoscaler(a) = obj {
            a.status = Default::default();
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Autoscaler(cur), Object::Autoscaler(new)) = (current, new) else {
            return Err("not an autoscaler".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |a: &mut Autoscaler| &mut a.metadata,
            |a, b| a.spec == b.spec,
            |a, n| a.spec = n.spec,
            Object::Autoscaler,
        ))
    }

    fn wakes_controllers(&self) -> bool {
        true
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}
