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

#[test]
fn every_source_module_is_named() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/ARCHITECTURE.md")).unwrap();
    for dir in ["api/src", "scheduler/src", "host/src", "src"] {
        for entry in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().to_string();
            if let Some(stem) = name.strip_suffix(".rs")
                && stem != "lib"
            {
                assert!(
                    doc.contains(&format!("{stem}.rs")) || doc.contains(&format!("::{stem}")),
                    "{dir}/{name} missing from ARCHITECTURE.md"
                );
            }
        }
    }
}
