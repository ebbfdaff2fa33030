//! Plugins: cluster-scoped, admins only. The component must be uploaded
//! (or pulled from a registry at apply, `plugins::artifact`) and be one the scheduler can run as the plugin's hook says (compiled
//! and linked at apply, so a wrong world is refused then, not at the
//! first write it should have admitted).

use super::{Checks, KindRules, Update, take_spec_and_labels};
use flotilla_api::plugin::Plugin;
use flotilla_api::{Kind, MemberSource, Object};

pub struct Plugins;

impl KindRules for Plugins {
    fn kind(&self) -> Kind {
        Kind::Plugin
    }

    fn validate(&self, obj: &Object, cx: &Checks<'_>) -> Result<(), String> {
        let Object::Plugin(p) = obj else {
            return Ok(());
        };
        p.spec.validate()?;
        if let MemberSource::Module { digest, size } = &p.spec.source {
            crate::blobs::check_uploaded(cx.blobs, digest, *size)?;
        }
        cx.plugins.check(cx.blobs, p)
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Plugin(cur), Object::Plugin(new)) = (current, new) else {
            return Err("not a plugin".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |p: &mut Plugin| &mut p.metadata,
            |a, b| a.spec == b.spec,
            |a, n| a.spec = n.spec,
            Object::Plugin,
        ))
    }

    fn edit_role(&self) -> (bool, bool) {
        (false, false)
    }
}
