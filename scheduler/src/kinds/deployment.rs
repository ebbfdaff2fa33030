//! Deployments: the spec and labels are the client's (a spec change is a
//! new generation, which the controller rolls out), except `paused` and
//! `restarted_ms`, which only the `rollout` verbs change; the status is the
//! controller's.

use super::{Checks, KindRules, Update, take_spec_and_labels};
use flotilla_api::{Deployment, Kind, Object};

pub struct Deployments;

impl KindRules for Deployments {
    fn kind(&self) -> Kind {
        Kind::Deployment
    }

    fn validate(&self, obj: &Object, cx: &Checks<'_>) -> Result<(), String> {
        match obj {
            Object::Deployment(d) => {
                d.spec.strategy.validate()?;
                if d.spec.progress_deadline.0 < 1000 {
                    return Err(format!(
                        "progress_deadline = {} is too short (at least 1 s)",
                        d.spec.progress_deadline
                    ));
                }
                super::pod::validate_spec(&d.spec.template.spec, cx)
            }
            _ => Ok(()),
        }
    }

    fn strip_owned(&self, obj: &mut Object) {
        if let Object::Deployment(d) = obj {
            d.status = Default::default();
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Deployment(cur), Object::Deployment(mut new)) = (current, new) else {
            return Err("not a deployment".into());
        };
        // Pausing and restarting are `rollout`'s; an apply keeps them.
        new.spec.paused = cur.spec.paused;
        new.spec.restarted_ms = cur.spec.restarted_ms;
        Ok(take_spec_and_labels(
            cur,
            new,
            |d: &mut Deployment| &mut d.metadata,
            |a, b| a.spec == b.spec,
            |d, n| d.spec = n.spec,
            Object::Deployment,
        ))
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}
