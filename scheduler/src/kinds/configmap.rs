//! ConfigMaps: data and labels are the client's; no status. Keys and base64
//! values are checked here; the size cap is the API's, for every kind.

use super::{Checks, KindRules, Update, take_spec_and_labels};
use flotilla_api::config::{ConfigMap, check_data};
use flotilla_api::{Kind, Object};

pub struct ConfigMaps;

impl KindRules for ConfigMaps {
    fn kind(&self) -> Kind {
        Kind::ConfigMap
    }

    fn validate(&self, obj: &Object, _cx: &Checks<'_>) -> Result<(), String> {
        match obj {
            Object::ConfigMap(c) => check_data(&c.data, &c.binary_data),
            _ => Ok(()),
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::ConfigMap(cur), Object::ConfigMap(new)) = (current, new) else {
            return Err("not a configmap".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |c: &mut ConfigMap| &mut c.metadata,
            |a, b| a.data == b.data && a.binary_data == b.binary_data,
            |c, n| {
                c.data = n.data;
                c.binary_data = n.binary_data;
            },
            Object::ConfigMap,
        ))
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}
