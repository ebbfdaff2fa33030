//! Secrets: data and labels are the client's; no status.

use super::{Checks, KindRules, Update, take_spec_and_labels};
use flotilla_api::{Kind, Object, Secret};

pub struct Secrets;

impl KindRules for Secrets {
    fn kind(&self) -> Kind {
        Kind::Secret
    }

    fn validate(&self, obj: &Object, _cx: &Checks<'_>) -> Result<(), String> {
        match obj {
            Object::Secret(s) => flotilla_api::config::check_data(&s.data, &s.binary_data),
            _ => Ok(()),
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Secret(cur), Object::Secret(new)) = (current, new) else {
            return Err("not a secret".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |s: &mut Secret| &mut s.metadata,
            |a, b| a.data == b.data && a.binary_data == b.binary_data,
            |s, n| {
                s.data = n.data;
                s.binary_data = n.binary_data;
            },
            Object::Secret,
        ))
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}
