//! Docs that cannot rot: the configuration reference names every key the config types have
//! and no other; every TOML example in the docs, the README and config/ passes `ipgate check`;
//! every relative link in the docs and the README resolves.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown files users read: the README, the changelog and everything in docs/.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md"), root().join("CHANGELOG.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "md") {
            docs.push(p);
        }
    }
    docs.sort();
    docs
}

/// Every leaf key of the config, as dotted paths (`site.route.path`, `lists.NAME.action`),
/// from the JSON Schema that `ipgate schema` prints.
fn schema_keys() -> BTreeSet<String> {
    let schema: serde_json::Value = serde_json::from_str(&ipgate::config::schema()).unwrap();
    let mut keys = BTreeSet::new();
    walk(&schema, &schema, "", &mut keys);
    keys
}

fn resolve<'a>(root: &'a serde_json::Value, v: &'a serde_json::Value) -> &'a serde_json::Value {
    match v.get("$ref").and_then(|r| r.as_str()) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            resolve(root, &root["$defs"][name])
        }
        None => v,
    }
}

fn walk(root: &serde_json::Value, v: &serde_json::Value, at: &str, keys: &mut BTreeSet<String>) {
    let v = resolve(root, v);
    // Option<T>: anyOf [T, null].
    if let Some(any) = v.get("anyOf").and_then(|a| a.as_array()) {
        for alt in any {
            if alt.get("type").and_then(|t| t.as_str()) != Some("null") {
                walk(root, alt, at, keys);
            }
        }
        return;
    }
    if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
        for (name, sub) in props {
            let path = if at.is_empty() {
                name.clone()
            } else {
                format!("{at}.{name}")
            };
            walk(root, sub, &path, keys);
        }
        return;
    }
    if let Some(map) = v.get("additionalProperties").filter(|m| m.is_object()) {
        walk(root, map, &format!("{at}.NAME"), keys);
        return;
    }
    if let Some(items) = v.get("items") {
        let item = resolve(root, items);
        if item.get("properties").is_some() {
            walk(root, item, at, keys);
            return;
        }
    }
    keys.insert(at.to_string());
}

/// The keys the reference documents: the first cell of its table rows.
fn documented_keys() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |"))
        .map(|(key, _)| key.to_string())
        .filter(|k| {
            k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        })
        .collect()
}

#[test]
fn the_configuration_reference_names_every_key_and_no_other() {
    let keys = schema_keys();
    assert!(keys.len() > 80, "the schema gave only {} keys", keys.len());
    let documented = documented_keys();
    let missing: Vec<_> = keys.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&keys).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "docs/configuration.md lacks {missing:?} and names keys that do not exist: {unknown:?}"
    );
}

#[test]
fn ipgate_schema_prints_the_json_schema() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipgate"))
        .arg("schema")
        .output()
        .unwrap();
    assert!(out.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["title"], "ipgate config");
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown keys are errors"
    );
    assert!(schema["properties"]["limits"].is_object());
}

/// The ```toml blocks of a Markdown file.
fn toml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```toml") => {
                current = Some((n + 1, String::new()))
            }
            Some(_) if line.trim_start().starts_with("```") => blocks.extend(current.take()),
            Some((_, block)) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// A fragment made a whole config: what it lacks of a gateway, a listener and a site is
/// added (the site under a name no fragment uses).
fn whole(fragment: &str) -> String {
    let has = |table: &str| fragment.lines().any(|l| l.trim() == table);
    let mut text = String::new();
    if !has("[gateway]") {
        text.push_str("[gateway]\nstate_dir = \"state\"\n\n");
    }
    if !has("[[listener]]") {
        text.push_str("[[listener]]\naddr = \"127.0.0.1:0\"\ntls = false\n\n");
    }
    text.push_str(fragment);
    if !has("[[site]]") {
        text.push_str(
            "\n[[site]]\nhosts = [\"docs-example.invalid\"]\nupstream = \"http://127.0.0.1:9\"\n",
        );
    }
    text
}

/// Problems `ipgate check` finds in a config, leaving out files that exist only on an
/// operator's machine (certificates, lists, logs named by an example).
fn problems(text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("example.toml");
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipgate"))
        .arg("check")
        .arg("-c")
        .arg(&file)
        .output()
        .unwrap();
    if out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with(&*file.to_string_lossy()))
        .filter(|l| !l.contains(": note: "))
        .filter(|l| !l.contains("No such file or directory"))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_toml_example_passes_ipgate_check() {
    let mut checked = 0;
    let mut failed = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (line, block) in toml_blocks(&text) {
            let found = problems(&whole(&block));
            if !found.is_empty() {
                failed.push(format!(
                    "{}:{line}:\n  {}",
                    doc.display(),
                    found.join("\n  ")
                ));
            }
            checked += 1;
        }
    }
    let mut configs = vec![root().join("config/ipgate.toml")];
    for folder in ["config/jails", "config/sites", "config/lists"] {
        for entry in std::fs::read_dir(root().join(folder)).unwrap() {
            configs.push(entry.unwrap().path());
        }
    }
    for file in configs {
        let text = std::fs::read_to_string(&file).unwrap();
        // The example config's own relative paths resolve from config/.
        let text = text.replace(
            "\"example/",
            &format!("\"{}/config/example/", root().display()),
        );
        let found = problems(&whole(&text));
        if !found.is_empty() {
            failed.push(format!("{}:\n  {}", file.display(), found.join("\n  ")));
        }
        checked += 1;
    }
    assert!(checked > 20, "only {checked} examples found");
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Every `](target)` in `text` that is a relative link.
fn relative_links(text: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = &rest[..end];
        let external = target.contains("://") || target.starts_with("mailto:");
        if !external && !target.starts_with('#') && !target.contains(' ') {
            links.push(target.split('#').next().unwrap().to_string());
        }
    }
    links
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut broken = Vec::new();
    let mut seen = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for link in relative_links(&text) {
            seen += 1;
            let target: &Path = Path::new(&link);
            if !doc.parent().unwrap().join(target).exists() {
                broken.push(format!("{}: {link}", doc.display()));
            }
        }
    }
    assert!(seen > 5, "only {seen} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn no_document_cites_a_file_outside_the_repository() {
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for bad in ["SPEC", "../shared", "shared project folder"] {
            assert!(!text.contains(bad), "{} cites {bad}", doc.display());
        }
    }
}
