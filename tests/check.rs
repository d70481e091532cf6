//! `ipgate check`: the shipped configs pass; a broken one fails naming file, line and key.

use std::process::Command;

fn check(path: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ipgate"))
        .args(["check", "-c"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_file_in_config_passes_ipgate_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("toml") {
            let (ok, stdout, stderr) = check(&path);
            assert!(ok, "{}: {stderr}", path.display());
            assert!(stdout.contains("ok"));
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn a_broken_config_fails_with_every_problem_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        r#"[gateway]
default_ban = "forever"

[[listener]]
addr = "127.0.0.1:99999"

[[site]]
hosts = ["a.test"]
upstream = "http://127.0.0.1:8080"
jails = ["wp-login"]
"#,
    )
    .unwrap();
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    let file = path.display().to_string();
    assert!(
        lines[0].starts_with(&format!("{file}:2: gateway.default_ban:")),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!("{file}:5: listener[0].addr:")),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with(&format!("{file}:10: site[0].jails[0]:")),
        "{stderr}"
    );
}

#[test]
fn a_misspelt_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "[[listener]]\naddr = \"127.0.0.1:0\"\ntsl = true\n").unwrap();
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert!(stderr.contains(":3:") && stderr.contains("tsl"), "{stderr}");
}

#[test]
fn every_jail_snippet_passes_ipgate_check_in_a_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/jails");
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let snippet = std::fs::read_to_string(&path).unwrap();
        let names: Vec<String> = snippet
            .lines()
            .filter_map(|l| l.strip_prefix("name = "))
            .map(str::to_string)
            .collect();
        assert!(!names.is_empty(), "{}: no jail", path.display());
        // A log jail is named by no site.
        let named = if snippet.contains("\nlog = {") || snippet.contains("\n[jail.log]") {
            String::new()
        } else {
            names.join(", ")
        };
        let config = format!(
            "[[listener]]\naddr = \"127.0.0.1:0\"\n\n{snippet}\n[[site]]\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:8080\"\njails = [{named}]\n"
        );
        let file = tmp.path().join("with-snippet.toml");
        std::fs::write(&file, config).unwrap();
        let (ok, _, stderr) = check(&file);
        assert!(ok, "{}: {stderr}", path.display());
        // The ready log jails are anchored and tagged: check has nothing to say of them.
        assert!(
            !stderr.contains("note: jail"),
            "{}: {stderr}",
            path.display()
        );
        n += 1;
    }
    assert_eq!(n, 12);
}

/// The ISPConfig example and the packaged default pass `ipgate check` once the certificate
/// and list files they name exist (here: throwaway ones in a temp dir).
#[test]
fn the_deploy_configs_pass_ipgate_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["example.nl".into()]).unwrap();
    std::fs::write(tmp.path().join("fullchain.pem"), cert.cert.pem()).unwrap();
    std::fs::write(
        tmp.path().join("privkey.pem"),
        cert.key_pair.serialize_pem(),
    )
    .unwrap();
    std::fs::write(tmp.path().join("drop.txt"), "1.10.16.0/20 ; SBL256894\n").unwrap();
    let t = tmp.path().display().to_string();
    for file in [
        "deploy/examples/ispconfig-box.toml",
        "deploy/debian/ipgate.toml",
    ] {
        let mut text = std::fs::read_to_string(root.join(file)).unwrap();
        for name in [
            "example.nl",
            "webmail.example.nl",
            "cloud.example.nl",
            "panel.example.nl",
        ] {
            text = text
                .replace(
                    &format!("/etc/letsencrypt/live/{name}/fullchain.pem"),
                    &format!("{t}/fullchain.pem"),
                )
                .replace(
                    &format!("/etc/letsencrypt/live/{name}/privkey.pem"),
                    &format!("{t}/privkey.pem"),
                );
        }
        text = text.replace("/etc/ipgate/lists/drop.txt", &format!("{t}/drop.txt"));
        let path = tmp.path().join("deploy.toml");
        std::fs::write(&path, text).unwrap();
        let (ok, _, stderr) = check(&path);
        assert!(ok, "{file}: {stderr}");
    }
}

/// `ipgate check` accepts a log pattern that is not anchored at both ends, or a syslog jail
/// with no tags, but says what that risks, naming the key.
#[test]
fn check_notes_unanchored_log_patterns_and_untagged_syslog_jails() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("loose.toml");
    std::fs::write(
        &file,
        r#"
[[listener]]
addr = "127.0.0.1:0"

[[jail]]
name = "sshd"
hits = 5
window = "10m"
ban = "1h"
log = { files = ["auth.log"], match = 'Failed password for .* from <ADDR> port \d+' }

[[jail]]
name = "tight"
hits = 5
window = "10m"
ban = "1h"
log = { files = ["auth.log"], tags = ["sshd"], match = '^Failed password for .* from <ADDR> port \d+ ssh2$' }

[[site]]
hosts = ["*"]
upstream = "http://127.0.0.1:8080"
"#,
    )
    .unwrap();
    let (ok, _, stderr) = check(&file);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("note: jail[0].log.match ('sshd'): not anchored"),
        "{stderr}"
    );
    assert!(
        stderr.contains("note: jail[0].log.tags ('sshd')"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("jail[1]"),
        "the anchored, tagged jail is fine: {stderr}"
    );
}
