//! Functions: the spec and labels are the client's; the status is the
//! functions controller's. The component must be uploaded and export
//! `wasi:http/incoming-handler`.

use super::{Checks, KindRules, Update, take_spec_and_labels};
use flotilla_api::function::Function;
use flotilla_api::{Kind, MemberSource, Object};

pub struct Functions;

impl KindRules for Functions {
    fn kind(&self) -> Kind {
        Kind::Function
    }

    fn validate(&self, obj: &Object, cx: &Checks<'_>) -> Result<(), String> {
        let Object::Function(f) = obj else {
            return Ok(());
        };
        if f.metadata.name.len() > flotilla_api::function::MAX_NAME {
            return Err(format!(
                "a function's name is at most {} characters (its canary is NAME-canary)",
                flotilla_api::function::MAX_NAME
            ));
        }
        f.spec.validate()?;
        if let Some(c) = &f.spec.canary
            && let MemberSource::Module { digest, size } = &c.source
        {
            crate::blobs::check_uploaded(cx.blobs, digest, *size)
                .map_err(|e| format!("canary: {e}"))?;
            crate::blobs::check_http_export(cx.blobs, digest)
                .map_err(|e| format!("canary: {e}"))?;
        }
        if let MemberSource::Module { digest, size } = &f.spec.source {
            crate::blobs::check_uploaded(cx.blobs, digest, *size)?;
            crate::blobs::check_http_export(cx.blobs, digest)?;
        }
        flotilla_api::config::validate_pod(&flotilla_api::PodSpec {
            members: vec![f.spec.member()],
            ..Default::default()
        })
    }

    fn strip_owned(&self, obj: &mut Object) {
        if let Object::Function(f) = obj {
            f.status = Default::default();
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Function(cur), Object::Function(new)) = (current, new) else {
            return Err("not a function".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |f: &mut Function| &mut f.metadata,
            |a, b| a.spec == b.spec,
            |a, n| a.spec = n.spec,
            Object::Function,
        ))
    }

    fn wakes_controllers(&self) -> bool {
        true
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}
