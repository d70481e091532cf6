//! Limits per network (`rate_limit.network`): the clients of one IPv4 /24 or IPv6 /48 share
//! one bucket beside their own; another network is not affected; over it a network's clients
//! are challenged where the challenge is on (429 where it is off); allow-listed clients and
//! pass holders are not counted; the state stays bounded under rotating networks.

mod common;

use std::time::Duration;

use common::*;

/// Per client: out of reach, and idle only after 100 s. Per network: 4 at once, then one
/// every 20 s (nothing refills while a test runs).
const LIMITED: &str = r#"
[rate_limit]
requests_per_second = 1
burst = 100
network = { rate = 0.05, burst = 4 }

[lists.office]
action = "allow"
entries = ["127.0.7.200"]
"#;

/// Statuses of `n` sequential plain GETs of `/` for a.test from `local` (`None`: refused).
async fn statuses(gw: &TestGateway, local: &str, n: usize, headers: &[(&str, &str)]) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        let tcp = connect_from(local, gw.plain).await;
        out.push(get_on(tcp, "/", "a.test", headers).await.0);
    }
    out
}

#[tokio::test]
async fn the_clients_of_one_ipv4_24_share_a_limit_and_another_network_does_not() {
    let gw = GatewayBuilder::new().extra(LIMITED).spawn().await;
    // Allow-listed: neither limited nor counted (the /24's bucket is still full after).
    assert_eq!(statuses(&gw, "127.0.7.200", 6, &[]).await, [200; 6]);
    assert_eq!(statuses(&gw, "127.0.7.1", 2, &[]).await, [200, 200]);
    assert_eq!(statuses(&gw, "127.0.7.2", 2, &[]).await, [200, 200]);
    // The /24's burst is spent: a third address of it is refused, with a retry time.
    let tcp = connect_from("127.0.7.3", gw.plain).await;
    assert_eq!(get_on(tcp, "/", "a.test", &[]).await.0, 429);
    assert_eq!(statuses(&gw, "127.0.8.1", 3, &[]).await, [200, 200, 200]);
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"ipgate_requests_total{outcome="rate_limited",site="*"}"#
        ),
        Some(1.0)
    );
    // lookup shows the network's bucket; forget leaves it: it is about the network.
    let out = gw.cli(&["lookup", "127.0.7.9", "--json"]).await;
    let lookup: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let limits = lookup["rate_limits"].as_array().unwrap();
    assert!(
        limits.iter().any(|l| l["rule"] == "network:global"),
        "{lookup}"
    );
    assert!(gw.cli(&["forget", "127.0.7.9"]).await.status.success());
    assert_eq!(statuses(&gw, "127.0.7.4", 1, &[]).await, [429]);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_clients_of_one_ipv6_48_share_a_limit() {
    let gw = GatewayBuilder::new()
        .gateway_keys(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .extra(LIMITED)
        .spawn()
        .await;
    let from = |ip| [("x-forwarded-for", ip)];
    let proxy = "127.0.7.100";
    assert_eq!(
        statuses(&gw, proxy, 2, &from("2001:db8:1:1::1")).await,
        [200; 2]
    );
    assert_eq!(
        statuses(&gw, proxy, 2, &from("2001:db8:1:2::1")).await,
        [200; 2]
    );
    assert_eq!(
        statuses(&gw, proxy, 1, &from("2001:db8:1:ffff::9")).await,
        [429]
    );
    assert_eq!(
        statuses(&gw, proxy, 3, &from("2001:db8:2::1")).await,
        [200; 3]
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn over_the_limit_a_network_is_challenged_and_a_pass_is_not_counted() {
    let sites = r#"
[challenge]
difficulty = 8

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "auto"
"#;
    let gw = GatewayBuilder::new()
        .extra(LIMITED)
        .sites(sites)
        .spawn()
        .await;
    let html = [("accept", "text/html")];
    assert_eq!(statuses(&gw, "127.0.9.1", 4, &html).await, [200; 4]);
    let tcp = connect_from("127.0.9.2", gw.plain).await;
    let (status, page) = get_on(tcp, "/", "a.test", &html).await;
    assert_eq!(status, 429);
    assert!(
        page.contains("ipgate-puzzle"),
        "challenged, not refused: {page}"
    );
    let tcp = connect_from("127.0.9.2", gw.plain).await;
    assert_eq!(get_on(tcp, &solution(&page), "a.test", &[]).await.0, 303);
    // With its pass, the client is not counted against its network any more.
    assert_eq!(statuses(&gw, "127.0.9.2", 8, &html).await, [200; 8]);
    gw.shutdown().await;
}

#[tokio::test]
async fn network_state_stays_bounded_under_rotating_networks() {
    let gw = GatewayBuilder::new()
        .extra(LIMITED)
        .extra("[limits]\nmax_tracked_clients = 20\n")
        .spawn()
        .await;
    for n in 0..60 {
        let local = format!("127.{}.{}.1", 20 + n / 200, n % 200);
        assert_eq!(statuses(&gw, &local, 1, &[]).await, [200]);
    }
    let text = gw.metrics().await;
    let evicted = metric(&text, "ipgate_client_evictions_total").unwrap_or(0.0);
    assert!(
        evicted >= 80.0,
        "60 clients and 60 networks kept in 20 + 20: {evicted}"
    );
    let bounded = eventually(Duration::from_secs(8), || async {
        metric(&gw.metrics().await, "ipgate_tracked_clients").is_some_and(|t| t > 0.0 && t <= 40.0)
    })
    .await;
    assert!(bounded);
    gw.shutdown().await;
}
