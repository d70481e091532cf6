//! The policy engine end to end: static lists, allow wins, allow_only, temporary entries by
//! CLI and API, X-Forwarded-For and PROXY headers, durability.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn a_statically_blocked_client_is_closed_before_the_handshake_while_others_pass() {
    let extra = r#"
[lists.deny]
action = "block"
entries = ["127.0.0.2/32", "2001:db8::/32"]
"#;
    let gw = spawn_gateway(DEFAULT_SITES, extra).await;
    assert!(refused_with("127.0.0.2", gw.tls, CLIENT_HELLO_START).await);
    assert!(refused("127.0.0.2", gw.plain).await);
    // Reset, not closed with a FIN: the gateway keeps no TIME_WAIT socket per attempt.
    let reset = match try_connect_from("127.0.0.2", gw.plain).await {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(mut tcp) => {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await;
            matches!(read, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset)
        }
    };
    assert!(reset, "a blocked client's connection was not reset");
    assert_eq!(https_get_from(&gw, "127.0.0.1", "/").await.0, 200);
    assert_eq!(https_get_from(&gw, "127.0.0.3", "/").await.0, 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, r#"ipgate_connections_rejected_total{reason="blocked"}"#),
        Some(3.0)
    );
    assert_eq!(
        metric(&m, r#"ipgate_list_entries{kind="static",list="deny"}"#),
        Some(2.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn allow_wins_over_block() {
    let extra = r#"
[lists.office]
action = "allow"
entries = ["127.0.0.3"]

[lists.deny]
action = "block"
entries = ["127.0.0.0/24"]
"#;
    let gw = spawn_gateway(DEFAULT_SITES, extra).await;
    assert_eq!(https_get_from(&gw, "127.0.0.3", "/").await.0, 200);
    assert!(refused_with("127.0.0.4", gw.tls, CLIENT_HELLO_START).await);
    // A temporary allow entry wins over the static block too.
    let (status, _) = admin_call(
        gw.admin,
        "POST",
        "/v1/entries",
        Some(serde_json::json!({"target": "127.0.0.4", "action": "allow", "ttl": "1h"})),
        Some(&gw.token()),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(https_get_from(&gw, "127.0.0.4", "/").await.0, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn allow_only_gives_403_to_outsiders() {
    let extra = r#"
[lists.office]
action = "allow"
entries = ["127.0.0.3/32"]
"#;
    let sites = r#"
[[site]]
name = "panel"
hosts = ["*"]
upstream = "http://{upstream}"
[[site.route]]
path = "/phpmyadmin"
allow_only = ["office"]
"#;
    let gw = spawn_gateway(sites, extra).await;
    assert_eq!(
        https_get_from(&gw, "127.0.0.3", "/phpmyadmin/").await.0,
        200
    );
    assert_eq!(
        https_get_from(&gw, "127.0.0.1", "/phpmyadmin/index.php")
            .await
            .0,
        403
    );
    assert_eq!(https_get_from(&gw, "127.0.0.1", "/blog/").await.0, 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"ipgate_requests_total{outcome="denied",site="panel"}"#
        ),
        Some(1.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_ban_by_cli_blocks_and_then_passes_after_its_ttl() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    assert_eq!(https_get_from(&gw, "127.0.0.5", "/").await.0, 200);
    let out = gw
        .cli(&["ban", "127.0.0.5", "--ttl", "2s", "--reason", "test ban"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("blocked 127.0.0.5/32"));
    assert!(refused_with("127.0.0.5", gw.tls, CLIENT_HELLO_START).await);
    // Others are unaffected.
    assert_eq!(https_get_from(&gw, "127.0.0.6", "/").await.0, 200);

    let list = gw.cli(&["list", "--block", "--json"]).await;
    let entries = json(&String::from_utf8_lossy(&list.stdout));
    assert_eq!(entries[0]["target"], "127.0.0.5/32");
    assert_eq!(entries[0]["source"], "api");
    assert_eq!(entries[0]["reason"], "test ban");

    // Expiry: it passes again within the TTL plus the sweeper's second.
    assert!(
        eventually(Duration::from_secs(6), || async {
            !refused_with("127.0.0.5", gw.tls, CLIENT_HELLO_START).await
        })
        .await,
        "ban never expired"
    );
    assert_eq!(https_get_from(&gw, "127.0.0.5", "/").await.0, 200);
    // And its memory is freed by the sweeper.
    assert!(
        eventually(Duration::from_secs(3), || async {
            let m = gw.metrics().await;
            metric(&m, r#"ipgate_list_entries{kind="temporary",list="block"}"#) == Some(0.0)
        })
        .await
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn cli_errors_are_one_line_with_non_zero_exit() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let out = gw.cli(&["ban", "300.1.2.3"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("300.1.2.3"), "{err}");
    let out = gw.cli(&["unban", "192.0.2.1"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no temporary block entry"));
    gw.shutdown().await;
}

const DENY_198: &str = r#"
[lists.deny]
action = "block"
entries = ["198.51.100.7/32", "2001:db8:bad::/48"]
"#;

#[tokio::test]
async fn forwarded_for_is_ignored_from_untrusted_peers_and_honoured_from_trusted_ones() {
    let gw = GatewayBuilder::new()
        .gateway_keys(r#"trusted_proxies = ["127.0.0.1/32", "10.0.0.0/8"]"#)
        .extra(DENY_198)
        .spawn()
        .await;
    // Untrusted peer: its X-Forwarded-For decides nothing and is replaced.
    let c = connect_from("127.0.0.6", gw.plain).await;
    let (status, body) = get_on(c, "/", "a.test", &[("x-forwarded-for", "198.51.100.7")]).await;
    assert_eq!(status, 200);
    let echo = json(&body);
    assert_eq!(echoed(&echo, "x-real-ip"), Some("127.0.0.6"));
    assert_eq!(echoed(&echo, "x-forwarded-for"), Some("127.0.0.6"));

    // Trusted peer: the rightmost untrusted address is the client, and it is blocked: 403.
    let c = connect_from("127.0.0.1", gw.plain).await;
    let (status, _) = get_on(
        c,
        "/",
        "a.test",
        &[("x-forwarded-for", "198.51.100.7, 10.1.1.1")],
    )
    .await;
    assert_eq!(status, 403);
    // A spoofed entry left of the real client does not help.
    let c = connect_from("127.0.0.1", gw.plain).await;
    let (status, body) = get_on(
        c,
        "/",
        "a.test",
        &[("x-forwarded-for", "198.51.100.7, 203.0.113.9")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(echoed(&json(&body), "x-real-ip"), Some("203.0.113.9"));
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, r#"ipgate_requests_total{outcome="blocked",site="*"}"#),
        Some(1.0)
    );
    gw.shutdown().await;
}

fn real_ip(answer: &str) -> Option<String> {
    let body = answer.split("\r\n\r\n").nth(1)?;
    echoed(&json(body), "x-real-ip").map(str::to_string)
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_from_trusted_peers() {
    let gw = GatewayBuilder::new()
        .gateway_keys(r#"trusted_proxies = ["127.0.0.1/32"]"#)
        .extra(DENY_198)
        .proxy_listener()
        .spawn()
        .await;
    let pp = gw.listeners[2];
    let dst: std::net::SocketAddr = "192.0.2.1:443".parse().unwrap();

    // v1 TCP4: the header's source is the client.
    let a = through_proxy("127.0.0.1", pp, &proxy_v1("203.0.113.5")).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert_eq!(real_ip(&a).as_deref(), Some("203.0.113.5"));
    // v1 with a blocked source: closed before any byte.
    let a = through_proxy("127.0.0.1", pp, &proxy_v1("198.51.100.7")).await;
    assert_eq!(a, "");
    // v2 TCP6.
    let src6: std::net::SocketAddr = "[2001:db8:1::5]:40000".parse().unwrap();
    let dst6: std::net::SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let a = through_proxy("127.0.0.1", pp, &proxy_v2(src6, dst6)).await;
    assert_eq!(real_ip(&a).as_deref(), Some("2001:db8:1::5"), "{a}");
    // v2 TCP6 from a blocked /48.
    let bad6: std::net::SocketAddr = "[2001:db8:bad::9]:40000".parse().unwrap();
    assert_eq!(
        through_proxy("127.0.0.1", pp, &proxy_v2(bad6, dst6)).await,
        ""
    );
    // v2 TCP4 with an IPv4-mapped source counts as IPv4.
    let a = through_proxy(
        "127.0.0.1",
        pp,
        &proxy_v2("203.0.113.6:1".parse().unwrap(), dst),
    )
    .await;
    assert_eq!(real_ip(&a).as_deref(), Some("203.0.113.6"));
    // v2 LOCAL: the peer itself.
    let a = through_proxy("127.0.0.1", pp, &proxy_v2_local()).await;
    assert_eq!(real_ip(&a).as_deref(), Some("127.0.0.1"), "{a}");
    // Missing or malformed header: closed.
    assert_eq!(through_proxy("127.0.0.1", pp, b"").await, "");
    // Regression: a v1 line with its CRLF but bad addresses waited out the handshake timeout
    // (ppp calls it incomplete).
    assert_eq!(
        through_proxy("127.0.0.1", pp, b"PROXY TCP4 nonsense\r\n").await,
        ""
    );
    // TLS sent straight to a PROXY listener, and a few bytes that cannot start a PROXY header
    // followed by silence: closed at once, not after the handshake timeout.
    for first in [CLIENT_HELLO_START, b"GET"] {
        use tokio::io::AsyncWriteExt;
        let mut tcp = connect_from("127.0.0.1", pp).await;
        tcp.write_all(first).await.unwrap();
        let mut out = Vec::new();
        read_until_closed(&mut tcp, &mut out).await;
        assert!(out.is_empty());
    }
    // A header from an untrusted peer is not believed: closed.
    assert_eq!(
        through_proxy("127.0.0.9", pp, &proxy_v1("203.0.113.5")).await,
        ""
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, r#"ipgate_connections_rejected_total{reason="blocked"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"ipgate_connections_rejected_total{reason="untrusted_proxy"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"ipgate_connections_rejected_total{reason="proxy_header"}"#
        ),
        Some(4.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_api_needs_the_token_and_validates_input() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let token = gw.token();
    let (s, _) = admin_call(gw.admin, "GET", "/v1/entries", None, None).await;
    assert_eq!(s, 401);
    let (s, _) = admin_call(
        gw.admin,
        "GET",
        "/v1/entries",
        None,
        Some("wrong-token-xxxxxxxx"),
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = admin_call(gw.admin, "GET", "/healthz", None, None).await;
    assert_eq!(s, 200);
    for body in [
        serde_json::json!({"target": "10.0.0.300", "action": "block"}),
        serde_json::json!({"target": "10.0.0.1", "action": "ban"}),
        serde_json::json!({"target": "10.0.0.1", "action": "block", "ttl": "soon"}),
        serde_json::json!({"target": "10.0.0.1"}),
    ] {
        let (s, v) = admin_call(
            gw.admin,
            "POST",
            "/v1/entries",
            Some(body.clone()),
            Some(&token),
        )
        .await;
        assert_eq!(s, 400, "{body}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (s, _) = admin_call(gw.admin, "GET", "/v1/ips/not-an-ip", None, Some(&token)).await;
    assert_eq!(s, 400);

    let (s, e) = admin_call(
        gw.admin,
        "POST",
        "/v1/entries",
        Some(serde_json::json!({"target": "2001:db8::1", "action": "block", "ttl": "10m", "reason": "r"})),
        Some(&token),
    )
    .await;
    assert_eq!(s, 201);
    assert_eq!(e["target"], "2001:db8::1/128");
    assert_eq!(e["source"], "api");
    assert!(e["expires_at"].as_str().unwrap().ends_with('Z'));
    let (s, v) = admin_call(gw.admin, "GET", "/v1/ips/2001:db8::1", None, Some(&token)).await;
    assert_eq!(s, 200);
    assert_eq!(v["decision"], "block");
    assert_eq!(v["rule"]["kind"], "temporary");
    let (s, _) = admin_call(
        gw.admin,
        "DELETE",
        "/v1/entries?target=2001:db8::1&action=block",
        None,
        Some(&token),
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = admin_call(
        gw.admin,
        "DELETE",
        "/v1/entries?target=2001:db8::1&action=block",
        None,
        Some(&token),
    )
    .await;
    assert_eq!(s, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_ban_survives_kill_9_and_restart() {
    let files = GatewayBuilder::new().files().await;
    let gw = files.start("info");
    let cli =
        |args: &[&str], admin: std::net::SocketAddr| files.cli(admin, None, args).output().unwrap();
    let out = cli(
        &["ban", "127.0.0.7", "--ttl", "1h", "--reason", "durable"],
        gw.admin,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Acknowledged: now kill -9 at once, no chance to flush anything.
    gw.signal("KILL");
    let _ = gw.wait().await;

    let gw = files.start("info");
    assert!(refused("127.0.0.7", gw.plain).await);
    let c = connect_from("127.0.0.8", gw.plain).await;
    assert_eq!(get_on(c, "/", "a.test", &[]).await.0, 200);
    let out = cli(&["lookup", "127.0.0.7", "--json"], gw.admin);
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["decision"], "block");
    assert_eq!(v["entries"][0]["reason"], "durable");
    gw.signal("TERM");
    assert_eq!(gw.wait().await.code(), Some(0));
}
