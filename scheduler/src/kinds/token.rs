//! Tokens are made and revoked through their own admin-only routes and are
//! stored only as hashes; they are never applied or read back.

use super::{KindRules, Update};
use flotilla_api::{Kind, Object};

pub struct Tokens;

impl KindRules for Tokens {
    fn kind(&self) -> Kind {
        Kind::Token
    }

    fn client_writable(&self) -> Result<(), &'static str> {
        Err("tokens are made with `flotilla token create`")
    }

    fn update(&self, _: &Object, _: Object) -> Result<Update, String> {
        Err("tokens are made with `flotilla token create`".into())
    }

    fn edit_role(&self) -> (bool, bool) {
        (false, false)
    }
}
