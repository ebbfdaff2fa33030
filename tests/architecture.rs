//! Keeps ARCHITECTURE.md honest: every crate and top-level folder is on the map.

#[test]
fn every_crate_and_folder_is_mapped() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/ARCHITECTURE.md")).unwrap();
    let cargo = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    let members = cargo
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("workspace members");
    for m in members.split('"').skip(1).step_by(2) {
        assert!(
            doc.contains(&format!("`{m}/`")),
            "ARCHITECTURE.md does not map crate {m}/"
        );
    }
    for entry in std::fs::read_dir(root).unwrap() {
        let e = entry.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().unwrap().is_dir() && !name.starts_with('.') && name != "target" {
            assert!(
                doc.contains(&format!("`{name}/")),
                "ARCHITECTURE.md does not map folder {name}/"
            );
        }
    }
}

/// Every module file (in sub-folders too) is on the map, by its path from
/// the crate's `src` or by its file name.
#[test]
fn every_source_module_is_named() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/ARCHITECTURE.md")).unwrap();
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    for dir in ["api/src", "scheduler/src", "host/src", "src"] {
        let base = std::path::Path::new(root).join(dir);
        let mut files = Vec::new();
        walk(&base, &mut files);
        for f in files {
            let rel = f.strip_prefix(&base).unwrap().to_string_lossy().to_string();
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            if name == "lib.rs" {
                continue;
            }
            let stem = name.trim_end_matches(".rs");
            let named = if name == "mod.rs" || name == "tests.rs" {
                doc.contains(&rel)
            } else {
                doc.contains(&rel) || doc.contains(&name) || doc.contains(&format!("::{stem}"))
            };
            assert!(named, "{dir}/{rel} missing from ARCHITECTURE.md");
        }
    }
}
