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
/// returns the component's path.
pub fn python_hello() -> Result<std::path::PathBuf, String> {
    componentize(
        PYTHON_HELLO_DIR,
        FUNCTION_WIT,
        "flotilla:function/function",
        "hello-py",
    )
}

/// The Python admission plugin's source (`flotilla:plugin/admission`,
/// from the WIT alone).
pub const PYTHON_PLUGIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/require_team");
/// The plugin worlds (`flotilla:plugin`).
pub const PLUGIN_WIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../wit/plugin");

/// Builds the Python admission plugin with componentize-py, as
/// [`python_hello`] builds the function.
pub fn python_plugin() -> Result<std::path::PathBuf, String> {
    componentize(
        PYTHON_PLUGIN_DIR,
        PLUGIN_WIT,
        "flotilla:plugin/admission",
        "require-team-py",
    )
}

/// Builds `dir/app.py` for `world` of the WIT in `wit` with componentize-py
/// unless a build of the same source is already there. Built in this
/// crate's output directory, named by a hash of the program and the WIT,
/// so an edit rebuilds it.
fn componentize(
    dir: &str,
    wit: &str,
    world: &str,
    name: &str,
) -> Result<std::path::PathBuf, String> {
    let app = std::path::Path::new(dir).join("app.py");
    let mut sources = vec![app];
    let mut wit_files: Vec<std::path::PathBuf> = std::fs::read_dir(wit)
        .map_err(|e| format!("{wit}: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wit"))
        .collect();
    wit_files.sort();
    sources.extend(wit_files);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for f in &sources {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let out = std::path::Path::new(env!("OUT_DIR")).join(format!("{name}-{hash:016x}.wasm"));
    if out.exists() {
        return Ok(out);
    }
    let partial = out.with_extension(format!("{}.partial", std::process::id()));
    let run = std::process::Command::new("componentize-py")
        .args(["-d", wit, "-w", world])
        .args(["componentize", "app", "-o"])
        .arg(&partial)
        .current_dir(dir)
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
