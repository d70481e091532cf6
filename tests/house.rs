//! The house keeps its shape: one folder per layer, each using only the layers below it;
//! no source file over 600 lines, no function over 100.

use std::path::{Path, PathBuf};

/// The layers, bottom first.
const LAYERS: [&str; 8] = [
    "normalize",
    "config",
    "observe",
    "decide",
    "state",
    "serve",
    "background",
    "admin",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn all_sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    files.sort();
    files
}

/// The code of a file without its tests and its comments.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn each_layer_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    for file in all_sources() {
        let rel = file.strip_prefix(&src).unwrap();
        let Some(layer) = rel.components().next().and_then(|c| c.as_os_str().to_str()) else {
            continue;
        };
        if rel.ends_with("tests.rs") {
            // A module's tests in a file of their own.
            continue;
        }
        let Some(rank) = LAYERS.iter().position(|l| *l == layer) else {
            // lib.rs and main.rs stand above every layer.
            continue;
        };
        let text = code(&std::fs::read_to_string(&file).unwrap());
        for (at, _) in text.match_indices("crate::") {
            let used: String = text[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if let Some(used_rank) = LAYERS.iter().position(|l| *l == used) {
                if used_rank > rank {
                    wrong.push(format!("{}: uses crate::{used}", rel.display()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "a layer uses one above it:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_layer_is_a_folder_that_says_what_it_owns() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for layer in LAYERS {
        let m = src.join(layer).join("mod.rs");
        let text = std::fs::read_to_string(&m).unwrap_or_else(|_| panic!("no {}", m.display()));
        assert!(
            text.starts_with("//!"),
            "{} does not say what it owns",
            m.display()
        );
        assert!(
            text.contains("Uses:"),
            "{} does not say which layers it uses",
            m.display()
        );
    }
    let flat: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
        .filter(|n| n != "lib.rs" && n != "main.rs")
        .collect();
    assert!(flat.is_empty(), "modules outside a layer: {flat:?}");
}

#[test]
fn no_file_over_600_lines_and_no_function_over_100() {
    let mut long = Vec::new();
    for file in all_sources() {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() > 600 {
            long.push(format!("{}: {} lines", file.display(), lines.len()));
        }
        // A function runs from its `fn` line to the first line after it that closes at the
        // `fn`'s own indentation.
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            let is_fn = [
                "fn ",
                "pub fn ",
                "pub(crate) fn ",
                "pub(super) fn ",
                "async fn ",
                "pub async fn ",
                "pub(crate) async fn ",
                "pub(super) async fn ",
            ]
            .iter()
            .any(|p| trimmed.starts_with(p));
            if !is_fn || line.ends_with(';') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            let close = format!("{}}}", " ".repeat(indent));
            if let Some(len) = lines[i + 1..].iter().position(|l| l.starts_with(&close)) {
                if len + 2 > 100 {
                    long.push(format!(
                        "{}:{}: a function of {} lines",
                        file.display(),
                        i + 1,
                        len + 2
                    ));
                }
            }
        }
    }
    assert!(long.is_empty(), "{}", long.join("\n"));
}

/// `layer::module` for a source file (`src/serve/proxy.rs` -> `serve::proxy`); lib.rs and
/// main.rs are not modules of a layer.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
    if parts.len() < 2 {
        return None;
    }
    let second = if parts[1] == "mod" { "" } else { parts[1] };
    Some(
        format!("{}::{}", parts[0], second)
            .trim_end_matches("::")
            .to_string(),
    )
}

#[test]
fn no_module_cycle() {
    use std::collections::{BTreeMap, BTreeSet};
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = all_sources();
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(me) = module_of(&src, file) else {
            continue;
        };
        if file.ends_with("tests.rs") {
            continue;
        }
        let text = code(&std::fs::read_to_string(file).unwrap());
        for (at, _) in text.match_indices("crate::") {
            let path: String = text[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            let used = match parts.as_slice() {
                [layer, module, ..] if modules.contains(&format!("{layer}::{module}")) => {
                    format!("{layer}::{module}")
                }
                [layer, ..] => layer.to_string(),
                [] => continue,
            };
            let same_layer_root = me.split("::").next() == Some(used.as_str());
            if used != me && modules.contains(&used) && !same_layer_root {
                uses.entry(me.clone()).or_default().insert(used);
            }
        }
    }
    // Depth-first search for a path back to where it started.
    fn visit(
        m: &str,
        uses: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in uses.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, uses, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in uses.keys() {
        let cycle = visit(m, &uses, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "a module cycle: {}",
            cycle.unwrap().join(" -> ")
        );
    }
    assert!(uses.len() > 20, "only {} modules use others", uses.len());
}
