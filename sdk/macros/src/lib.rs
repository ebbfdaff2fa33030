//! `#[flotilla_sdk::admission]` and `#[flotilla_sdk::scheduler]`: put on an
//! `impl flotilla_sdk::Admission for T` (or `Scheduler`) block, they keep
//! the block and export `T` as the component's `flotilla:plugin` world
//! (through `flotilla_sdk::export_admission!(T)` / `export_scheduler!(T)`). No parser
//! crate: the macro only needs the type after `for` and, for a scheduler,
//! the names of the functions the block defines (a hook it leaves to the
//! trait's default is answered without looking at the nodes).

use proc_macro::{Delimiter, TokenStream, TokenTree};

/// Exports the type of an `impl flotilla_sdk::Admission for T { … }` block
/// as the `flotilla:plugin/admission` world.
#[proc_macro_attribute]
pub fn admission(attr: TokenStream, item: TokenStream) -> TokenStream {
    export(attr, item, "admission")
}

/// Exports the type of an `impl flotilla_sdk::Scheduler for T { … }` block
/// as the `flotilla:plugin/scheduler` world.
#[proc_macro_attribute]
pub fn scheduler(attr: TokenStream, item: TokenStream) -> TokenStream {
    export(attr, item, "scheduler")
}

fn export(attr: TokenStream, item: TokenStream, world: &str) -> TokenStream {
    if !attr.is_empty() {
        return error(&format!("#[{world}] takes no arguments"));
    }
    let Some(ty) = implemented_for(item.clone()) else {
        return error(&format!(
            "#[{world}] goes on an `impl flotilla_sdk::{} for YourType {{ … }}` block",
            if world == "admission" {
                "Admission"
            } else {
                "Scheduler"
            }
        ));
    };
    let args = if world == "scheduler" {
        // How the impl provides each hook, so the exports skip what it
        // leaves to the trait's defaults and make no list of nodes for a
        // per-node function.
        let fns = defined_fns(item.clone());
        let how = |each: &str, all: &str| match (
            fns.iter().any(|f| f == all),
            fns.iter().any(|f| f == each),
        ) {
            (true, _) => "batch",
            (false, true) => "each",
            (false, false) => "none",
        };
        format!(
            "{ty}, filter = {}, score = {}",
            how("filter", "filter_all"),
            how("score", "score_all")
        )
    } else {
        ty
    };
    let call: TokenStream = format!("::flotilla_sdk::export_{world}!({args});")
        .parse()
        .expect("a macro call parses");
    let mut out = item;
    out.extend(call);
    out
}

/// The type tokens between `for` and the impl's body, as text.
fn implemented_for(item: TokenStream) -> Option<String> {
    let mut tokens = item.into_iter();
    let mut seen_impl = false;
    for t in tokens.by_ref() {
        match &t {
            TokenTree::Ident(i) if i.to_string() == "impl" => seen_impl = true,
            TokenTree::Ident(i) if seen_impl && i.to_string() == "for" => break,
            _ => {}
        }
    }
    let mut ty = String::new();
    for t in tokens {
        if let TokenTree::Group(g) = &t
            && g.delimiter() == Delimiter::Brace
        {
            return (!ty.is_empty()).then_some(ty);
        }
        ty.push_str(&t.to_string());
        ty.push(' ');
    }
    None
}

/// The names of the functions the impl block defines (`fn NAME`).
fn defined_fns(item: TokenStream) -> Vec<String> {
    let Some(body) = item.into_iter().find_map(|t| match t {
        TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => Some(g.stream()),
        _ => None,
    }) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut after_fn = false;
    for t in body {
        match &t {
            TokenTree::Ident(i) if after_fn => {
                out.push(i.to_string());
                after_fn = false;
            }
            TokenTree::Ident(i) => after_fn = i.to_string() == "fn",
            _ => after_fn = false,
        }
    }
    out
}

fn error(message: &str) -> TokenStream {
    format!("::core::compile_error!({message:?});")
        .parse()
        .expect("compile_error! parses")
}
