//! Sample guest programs, compiled by this crate's build script, and the paths
//! to their `.wasm` files for tests and benchmarks.
//!
//! `*_P1` constants are WASI preview 1 core modules (wasm32-wasip1); `*_P2`
//! constants are components that export `wasi:cli/run` (wasm32-wasip2).
//!
//! ```
//! assert!(std::path::Path::new(flotilla_samples::HELLO_P2).exists());
//! ```

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// Directory holding the sample manifests.
pub const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests");

/// The Python function's source: a `wasi:http/proxy` component built by
/// componentize-py (see [`python_hello`]).
pub const PYTHON_HELLO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/hello");
/// The WIT world functions are built against (`flotilla:function/function`,
/// which includes `wasi:http/proxy`).
pub const FUNCTION_WIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../wit/http");

/// Builds the Python function with componentize-py (from PyPI; `scripts/setup`
/// installs it) unless a build of the same source is already there, and
/// returns the component's path. Built in this crate's output directory,
/// named by a hash of the program and the world, so an edit rebuilds it.
pub fn python_hello() -> Result<std::path::PathBuf, String> {
    let app = std::path::Path::new(PYTHON_HELLO_DIR).join("app.py");
    let world = std::path::Path::new(FUNCTION_WIT).join("world.wit");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for f in [&app, &world] {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let out = std::path::Path::new(env!("OUT_DIR")).join(format!("hello-py-{hash:016x}.wasm"));
    if out.exists() {
        return Ok(out);
    }
    let partial = out.with_extension(format!("{}.partial", std::process::id()));
    let run = std::process::Command::new("componentize-py")
        .args(["-d", FUNCTION_WIT, "-w", "flotilla:function/function"])
        .args(["componentize", "app", "-o"])
        .arg(&partial)
        .current_dir(PYTHON_HELLO_DIR)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .map_err(|e| {
            format!("cannot run componentize-py ({e}); scripts/setup installs it (pip install componentize-py)")
        })?;
    if !run.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(format!(
            "componentize-py failed: {}",
            String::from_utf8_lossy(&run.stderr)
        ));
    }
    std::fs::rename(&partial, &out).map_err(|e| e.to_string())?;
    Ok(out)
}
