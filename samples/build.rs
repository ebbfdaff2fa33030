//! Compiles the guest programs in `guests/` for wasm32-wasip1 (core modules) and
//! wasm32-wasip2 (components) and exposes their paths as constants.

use std::env;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &[
    "hello",
    "counter",
    "crasher",
    "memhog",
    "spinner",
    "tcp",
    "files",
    "health",
    "http",
    "require_labels",
    "allowed_registries",
    "plugin_chaos",
    "zone_spread",
    "least_loaded",
    "kv_counter",
];
const TARGETS: &[(&str, &str)] = &[("wasm32-wasip1", "P1"), ("wasm32-wasip2", "P2")];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let guests = manifest_dir.join("guests");
    // A fixed place under the workspace target dir, so the sample manifests can
    // name the modules with stable relative paths.
    let target_dir = manifest_dir.join("../target/guests");
    // The guests, the WIT their bindings come from (`health`, `http`, the
    // plugin worlds) and the SDK the plugin samples are built with.
    for watched in [
        guests.join("src"),
        guests.join("Cargo.toml"),
        manifest_dir.join("../wit/health.wit"),
        manifest_dir.join("../wit/http"),
        manifest_dir.join("../wit/plugin"),
        manifest_dir.join("../wit/workload"),
        manifest_dir.join("../sdk/src"),
        manifest_dir.join("../sdk/macros/src"),
    ] {
        println!("cargo:rerun-if-changed={}", watched.display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (target, _) in TARGETS {
        cmd.arg("--target").arg(target);
    }
    // The outer build's settings must not leak into the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_LLVM_COV",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the guest programs");
    assert!(
        status.success(),
        "building the guest programs failed; run `rustup target add wasm32-wasip1 wasm32-wasip2`"
    );

    let mut out = String::new();
    for (target, suffix) in TARGETS {
        for guest in GUESTS {
            let path = target_dir
                .join(target)
                .join("release")
                .join(format!("{guest}.wasm"));
            let path = path.canonicalize().unwrap_or(path);
            assert!(path.exists(), "guest {} missing", path.display());
            writeln!(
                out,
                "/// `{guest}` built for {target}.\npub const {}_{suffix}: &str = {:?};",
                guest.to_uppercase(),
                path.display().to_string()
            )
            .unwrap();
        }
    }
    let out_file = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("guests.rs");
    std::fs::write(out_file, out).unwrap();
}
