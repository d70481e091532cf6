use super::*;
use crate::observe::metrics::Metrics;
use crate::state::Snapshot;

const MINIMAL: &str = r#"
[[listener]]
addr = "127.0.0.1:0"

[[site]]
hosts = ["*"]
upstream = "http://127.0.0.1:9"
"#;

fn problems(text: &str) -> Vec<Problem> {
    let dir = std::env::temp_dir();
    let path = dir.join("ipgate-test.toml");
    match Config::parse(&path, text) {
        Ok(c) => match Snapshot::build(c, &Metrics::new(), None) {
            Ok(_) => vec![],
            Err(e) => e.0,
        },
        Err(e) => e.0,
    }
}

/// The keys the problems of `text` name, in report order.
fn problem_keys(text: &str) -> Vec<String> {
    problems(text).into_iter().map(|p| p.key).collect()
}

#[test]
fn every_shipped_config_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        Snapshot::build(config, &Metrics::new(), None).unwrap_or_else(|e| panic!("{e}"));
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn minimal_config_is_valid_with_defaults() {
    let c = Config::parse(Path::new("x.toml"), MINIMAL).unwrap();
    assert_eq!(c.privacy.log_ip, LogIp::Anonymized);
    assert_eq!(c.privacy.max_retention, Duration::from_secs(30 * 86400));
    assert_eq!(c.gateway.default_ban, Duration::from_secs(3600));
    assert_eq!(c.sites[0].upstream_timeout, Duration::from_secs(60));
}

/// Each broken config names the key (and, where the key is in the file, its line).
#[test]
fn broken_configs_name_the_key_and_line() {
    let cases: &[(&str, &str, &str, Option<usize>)] = &[
        // (addition to MINIMAL, expected key, text in the message, expected line)
        ("[gateway]\nstat_dir = \"/x\"\n", "", "stat_dir", Some(9)),
        ("[gateway]\ndefault_ban = \"1 fortnight\"\n", "gateway.default_ban", "duration", Some(9)),
        ("[gateway]\nworkers = 0\n", "gateway.workers", "1 to 1024", Some(9)),
        ("[privacy]\nlog_ip = \"some\"\n", "privacy.log_ip", "anonymized", Some(9)),
        (
            "[lists.office]\naction = \"allow\"\nentries = [\"10.0.0.0/8\", \"10.0.0.300\"]\n",
            "lists.office.entries[1]",
            "10.0.0.300",
            Some(10),
        ),
        (
            "[[site]]\nhosts = [\"a.test\"]\nupstream = \"https://127.0.0.1:9\"\n",
            "site[1].upstream",
            "http://",
            Some(10),
        ),
        (
            "[[site]]\nhosts = [\"b.test\"]\nupstream = \"http://127.0.0.1:9\"\njails = [\"nope\"]\n",
            "site[1].jails[0]",
            "nope",
            Some(11),
        ),
        (
            "[lists.bad]\naction = \"block\"\n[[site]]\nhosts = [\"c.test\"]\nupstream = \"http://127.0.0.1:9\"\n[[site.route]]\npath = \"/pma\"\nallow_only = [\"bad\"]\n",
            "site[1].route[0].allow_only[0]",
            "allow",
            Some(15),
        ),
        (
            "[[site]]\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:9\"\n",
            "site[1].hosts[0]",
            "another site",
            Some(9),
        ),
        ("[limits]\nmax_header_bytes = 100\n", "limits.max_header_bytes", "8192", Some(9)),
        (
            "[privacy]\nmax_retention = \"1d\"\n[[jail]]\nname = \"j\"\nhits = 1\nwindow = \"2d\"\nban = \"1h\"\n",
            "jail[0].window",
            "max_retention",
            Some(13),
        ),
    ];
    for (add, key, text, line) in cases {
        let p = problems(&format!("{MINIMAL}{add}"));
        assert_eq!(p.len(), 1, "{add}: {p:?}");
        assert_eq!(p[0].key, *key, "{add}");
        assert!(p[0].message.contains(text), "{add}: {}", p[0].message);
        assert_eq!(p[0].line, *line, "{add}: {}", p[0]);
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
[[listener]]
addr = "nowhere"
tls = true

[privacy]
max_retention = "forever"

[[site]]
hosts = ["a.test"]
upstream = "ftp://x"
"#;
    let p = problems(text);
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "privacy.max_retention",
            "listener[0].addr",
            "tls.certificates",
            "site[0].upstream"
        ]
    );
    assert_eq!(p[1].line, Some(3));
    let shown = Errors(p).to_string();
    assert!(
        shown.contains("ipgate-test.toml:3: listener[0].addr:"),
        "{shown}"
    );
}

#[test]
fn certificate_problems_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
    std::fs::write(dir.path().join("a.crt"), a.cert.pem()).unwrap();
    std::fs::write(dir.path().join("b.key"), b.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("junk.crt"), "not pem").unwrap();
    let text = format!(
        "{MINIMAL}[tls]\ncertificates = [{{ cert = \"a.crt\", key = \"b.key\" }}, \
         {{ cert = \"missing.crt\", key = \"b.key\" }}, {{ cert = \"junk.crt\", key = \"b.key\" }}]\n"
    );
    let path = dir.path().join("ipgate.toml");
    let config = Config::parse(&path, &text).unwrap();
    let p = Snapshot::build(config, &Metrics::new(), None)
        .err()
        .unwrap()
        .0;
    assert_eq!(p.len(), 3, "{p:?}");
    assert_eq!(p[0].key, "tls.certificates[0].key");
    assert!(p[0].message.contains("does not match"), "{}", p[0].message);
    assert_eq!(p[0].file, dir.path().join("b.key"));
    assert_eq!(p[1].key, "tls.certificates[1].cert");
    assert_eq!(p[1].file, dir.path().join("missing.crt"));
    assert!(p[1].message.contains("cannot read"), "{}", p[1].message);
    assert_eq!(p[2].key, "tls.certificates[2].cert");
}

#[test]
fn targets_are_canonical() {
    assert_eq!(parse_target("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
    assert_eq!(
        parse_target("10.1.2.3/8").unwrap().to_string(),
        "10.0.0.0/8"
    );
    assert_eq!(
        parse_target("::ffff:10.1.2.3").unwrap().to_string(),
        "10.1.2.3/32"
    );
    assert_eq!(
        parse_target("2001:db8::1/48").unwrap().to_string(),
        "2001:db8::/48"
    );
    assert!(parse_target("10.0.0.0/33").is_err());
    assert!(parse_target("example.nl").is_err());
}

#[test]
fn durations_follow_the_spec() {
    assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
    assert_eq!(
        parse_duration("7d").unwrap(),
        Duration::from_secs(7 * 86400)
    );
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("soon").is_err());
}

#[test]
fn restart_only_changes_are_named_and_the_rest_is_not() {
    let path = std::env::temp_dir().join("ipgate-test.toml");
    let base = Config::parse(&path, MINIMAL).unwrap();
    assert!(base.restart_changes(&base.clone()).is_empty());
    let changed = Config::parse(
        &path,
        &format!(
            "[gateway]\nworkers = 3\nstate_dir = \"elsewhere\"\n[limits]\nmax_connections = 7\n\
             header_read_timeout = \"3s\"\n[log]\naccess = \"off\"\n[admin]\naddr = \"127.0.0.1:0\"\n{}",
            MINIMAL.replace("127.0.0.1:0", "127.0.0.1:1")
        ),
    )
    .unwrap();
    assert_eq!(
        base.restart_changes(&changed),
        [
            "listener",
            "admin.addr",
            "admin.token_file",
            "gateway.workers",
            "gateway.state_dir",
            "limits.max_connections",
            "log.access",
        ]
    );
}

#[test]
fn configured_hosts_lose_case_and_one_trailing_dot_like_requests() {
    let path = std::env::temp_dir().join("ipgate-test.toml");
    let text =
        "[[listener]]\naddr = \"127.0.0.1:0\"\n[[jail]]\nname = \"j\"\nhosts = [\"A.test.\"]\n\
                hits = 1\nwindow = \"1m\"\nban = \"1m\"\n[[site]]\nhosts = [\"B.Test.\"]\n\
                upstream = \"http://127.0.0.1:9\"\njails = [\"j\"]\n";
    let c = Config::parse(&path, text).unwrap();
    assert_eq!(c.sites[0].hosts, ["b.test"]);
    assert_eq!(c.jails[0].hosts, ["a.test"]);
}

#[test]
fn fleet_keys_are_checked() {
    let bad = |fleet: &str| problem_keys(&format!("{MINIMAL}\n[fleet]\n{fleet}"));
    assert_eq!(
        bad("redis = \"http://127.0.0.1:6379\"\ngateway_id = \"web1\""),
        vec!["fleet.redis"]
    );
    assert_eq!(
        bad("redis = \"redis://127.0.0.1:6379/0\"\ngateway_id = \"web 1:x\""),
        vec!["fleet.gateway_id"]
    );
    assert!(bad("redis = \"rediss://10.0.0.5:6379/0\"\ngateway_id = \"web1\"").is_empty());
}

#[test]
fn redirect_https_and_hsts_are_checked() {
    let tls_listener = "[tls]\nself_signed = true\n[[listener]]\naddr = \"127.0.0.1:0\"\ntls = true\nredirect_https = true\n";
    assert_eq!(
        problem_keys(&format!("{MINIMAL}{tls_listener}")),
        vec!["listener[1].redirect_https"]
    );
    let plain = MINIMAL.replace("127.0.0.1:0\"", "127.0.0.1:0\"\nredirect_https = true");
    assert!(problem_keys(&plain).is_empty());
    let site =
        |hsts: &str| MINIMAL.replace("upstream =", &format!("hsts = \"{hsts}\"\nupstream ="));
    assert!(problem_keys(&site("1y")).is_empty());
    assert_eq!(problem_keys(&site("forever")), vec!["site[0].hsts"]);
    assert_eq!(problem_keys(&site("0s")), vec!["site[0].hsts"]);
}

#[test]
fn acme_is_checked() {
    let site = |hosts: &str, acme: &str| {
        format!(
            "[[listener]]\naddr = \"127.0.0.1:0\"\n{acme}\n[[site]]\nhosts = {hosts}\n\
             upstream = \"http://127.0.0.1:9\"\nacme = true\n"
        )
    };
    let good = "[acme]\ndirectory = \"https://acme.test/dir\"\ncontact = [\"mailto:a@b.nl\"]\n";
    assert!(problem_keys(&site("[\"a.nl\", \"www.a.nl\"]", good)).is_empty());
    assert_eq!(problem_keys(&site("[\"a.nl\"]", "")), vec!["site[0].acme"]);
    assert_eq!(
        problem_keys(&site("[\"*\", \"*.a.nl\", \"192.0.2.1\"]", good)),
        vec!["site[0].hosts[0]", "site[0].hosts[1]", "site[0].hosts[2]"]
    );
    let bad = "[acme]\ndirectory = \"http://acme.test/dir\"\ncontact = [\"a@b.nl\"]\n\
               challenge = \"dns-01\"\nca_file = \"/nonexistent/ca.pem\"\n";
    assert_eq!(
        problem_keys(&site("[\"a.nl\"]", bad)),
        vec![
            "acme.directory",
            "acme.contact[0]",
            "acme.challenge",
            "acme.ca_file"
        ]
    );
    // HTTP-01 needs a plain listener; this one has only TLS.
    let tls_only = format!(
        "[tls]\nself_signed = true\n{}",
        site("[\"a.nl\"]", &format!("{good}challenge = \"http-01\"\n")).replace(
            "addr = \"127.0.0.1:0\"",
            "addr = \"127.0.0.1:0\"\ntls = true"
        )
    );
    assert_eq!(problem_keys(&tls_only), vec!["acme.challenge"]);
}

#[test]
fn firewall_keys_are_checked() {
    let fw = |body: &str| problem_keys(&format!("{MINIMAL}\n[firewall]\n{body}"));
    assert!(fw("ports = [22]\nverdict = \"reject\"").is_empty());
    assert!(fw("ports = [22]\nverdict = \"drop\"\ntable = \"ipgate_1-a\"").is_empty());
    assert_eq!(fw("ports = []"), vec!["firewall.ports"]);
    assert_eq!(fw("ports = [0, 22]"), vec!["firewall.ports"]);
    assert_eq!(
        fw("ports = [22]\ntable = \"ip gate\""),
        vec!["firewall.table"]
    );
    assert_eq!(
        fw("ports = [22]\nverdict = \"refuse\""),
        vec!["firewall.verdict"]
    );
}
