//! The layering rules, read from the sources: the library crates know nothing of the
//! command line and print nothing, and the library's modules import each other without
//! cycles.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read the sources").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// A file's lines without comments (doc links are not imports) and without its unit
/// tests (the `#[cfg(test)]` module at its end).
fn code(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read a source file")
        .lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .map(|l| l.split("//").next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn the_library_crates_know_nothing_of_the_command_line_and_print_nothing() {
    let forbidden = [
        "retrain_cli",
        "clap::",
        "indicatif",
        "ctrlc",
        "println!",
        "eprintln!",
        "print!(",
    ];
    for krate in ["checkpoint", "kernels", "onnx", "retrain"] {
        for file in sources(&crates_dir().join(krate).join("src")) {
            for (i, line) in code(&file).iter().enumerate() {
                for word in forbidden {
                    assert!(
                        !line.contains(word),
                        "{}:{}: {word} in a library crate",
                        file.display(),
                        i + 1
                    );
                }
            }
        }
    }
}

/// The top-level module a file of the library belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

#[test]
fn the_library_modules_import_each_other_without_cycles() {
    let src = crates_dir().join("retrain/src");
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(&src) {
        let module = module_of(&src, &file);
        let used = imports.entry(module.clone()).or_default();
        for line in code(&file) {
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    used.insert(name);
                }
            }
        }
    }
    assert!(imports.len() > 10, "found the modules: {imports:?}");
    // Depth-first search for a path back to where it started.
    fn reaches(
        from: &str,
        target: &str,
        imports: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        imports.get(from).is_some_and(|next| {
            next.iter().any(|n| {
                n == target || (seen.insert(n.clone()) && reaches(n, target, imports, seen))
            })
        })
    }
    for module in imports.keys() {
        let mut seen = BTreeSet::new();
        assert!(
            !reaches(module, module, &imports, &mut seen),
            "{module} imports itself through {seen:?}"
        );
    }
}
