//! `flotilla-shim`: the per-container shim as a small binary of its own, so
//! starting a container does not exec the whole `flotilla` program (the
//! agent falls back to `flotilla shim` when this binary is not installed next
//! to it). The work is in `flotilla_host::executor::container::shim`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // Takes the same arguments as `flotilla shim …`.
    let rest = match argv.get(1).map(String::as_str) {
        Some("shim") => &argv[2..],
        _ => &argv[1..],
    };
    match flotilla_host::executor::container::shim::ShimArgs::parse(rest) {
        Ok(a) => ExitCode::from(flotilla_host::executor::container::shim::run(a) as u8),
        Err(e) => {
            eprintln!("error: flotilla-shim: {e}");
            ExitCode::FAILURE
        }
    }
}
