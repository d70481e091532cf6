//! Fleet mode against a real `redis-server` (Debian package; `scripts/test` installs
//! it): each test starts its own server on a free port and three gateway processes.
//! `IPGATE_TEST_REDIS_SERVER=/path/to/valkey-server` runs them against Valkey instead.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A `redis-server` of the test's own, without persistence (a restart starts empty); killed
/// on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
    /// With TLS and a password: the directory with its certificate (`redis.crt` for
    /// localhost, signed by `ca.crt`) and the gateways' `password` file.
    secure: Option<tempfile::TempDir>,
}

const PASSWORD: &str = "fleet-test-password";

impl Redis {
    fn start() -> Redis {
        Redis::new(None)
    }

    /// Over TLS only (rediss://, a certificate the gateways trust through `fleet.ca_file`)
    /// and with `requirepass` (the gateways' `fleet.password_file`).
    fn start_secure() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        ca.issue(dir.path(), "redis", &["localhost"]);
        std::fs::write(dir.path().join("ca.crt"), ca.ca_pem()).unwrap();
        std::fs::write(dir.path().join("password"), format!("{PASSWORD}\n")).unwrap();
        Redis::new(Some(dir))
    }

    fn new(secure: Option<tempfile::TempDir>) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            port,
            child: None,
            secure,
        };
        r.restart();
        r
    }

    /// The `[fleet]` keys a gateway needs for this server.
    fn fleet_keys(&self) -> String {
        match &self.secure {
            None => format!("redis = \"{}\"\n", self.url()),
            Some(dir) => format!(
                "redis = \"rediss://localhost:{}/0\"\npassword_file = \"{}\"\nca_file = \"{}\"\n",
                self.port,
                dir.path().join("password").display(),
                dir.path().join("ca.crt").display()
            ),
        }
    }

    /// Starts the server (again) on the same port, empty.
    fn restart(&mut self) {
        let server = std::env::var("IPGATE_TEST_REDIS_SERVER");
        let mut cmd = Command::new(server.as_deref().unwrap_or("redis-server"));
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        match &self.secure {
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
            Some(dir) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(dir.path().join("redis.crt"))
                    .arg("--tls-key-file")
                    .arg(dir.path().join("redis.key"))
                    .args(["--tls-auth-clients", "no", "--requirepass", PASSWORD]);
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: run scripts/test, which installs it");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = self
            .client()
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        {
            assert!(Instant::now() < deadline, "redis-server did not start: {e}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The test's own URL.
    fn url(&self) -> String {
        match self.secure {
            None => format!("redis://127.0.0.1:{}/0", self.port),
            Some(_) => format!("rediss://:{PASSWORD}@localhost:{}/0", self.port),
        }
    }

    /// The test's own client (over TLS trusting the server's certificate, as the gateways).
    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.secure {
            None => redis::Client::open(self.url()),
            Some(dir) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(dir.path().join("ca.crt")).unwrap()),
                },
            ),
        }
    }

    fn con(&self) -> redis::Connection {
        self.client().unwrap().get_connection().unwrap()
    }

    /// Every key, and every stream record, as text: what the store holds.
    fn dump(&self) -> String {
        let mut con = self.con();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
        let mut out = keys.join("\n");
        let records: redis::Value = redis::cmd("XRANGE")
            .arg("ipgate:changes")
            .arg("-")
            .arg("+")
            .query(&mut con)
            .unwrap();
        out.push_str(&format!("\n{records:?}"));
        for k in keys.iter().filter(|k| k.starts_with("ipgate:entry:")) {
            let v: Option<String> = redis::cmd("GET").arg(k).query(&mut con).unwrap();
            out.push_str(&format!("\n{k} = {v:?}"));
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

const JAIL: &str = r#"
[privacy]
max_retention = "1h"

[[jail]]
name = "login"
method = "POST"
path = "/login"
status = [200]
hits = 2
window = "1m"
ban = "2s"
ban_factor = 4.0
max_ban = "1h"

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
jails = ["login"]

[[site]]
name = "blog"
hosts = ["b.test"]
upstream = "http://{upstream}"
"#;

/// Gateway number `i` of a fleet on `redis`.
async fn member(redis: &Redis, upstream: SocketAddr, i: usize) -> GatewayFiles {
    let fleet = format!("[fleet]\n{}gateway_id = \"g{i}\"\n", redis.fleet_keys());
    GatewayBuilder::new()
        .upstream(upstream)
        .sites(JAIL)
        .extra(&fleet)
        .files()
        .await
}

struct Member {
    files: GatewayFiles,
    gw: BinaryGateway,
}

impl Member {
    fn token(&self) -> String {
        std::fs::read_to_string(self.files.token_file())
            .unwrap()
            .trim()
            .to_string()
    }

    async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        admin_call(self.gw.admin, method, path, body, Some(&self.token())).await
    }

    async fn ban(&self, target: &str, ttl: &str) -> u16 {
        let body = json!({"target": target, "action": "block", "ttl": ttl});
        self.api("POST", "/v1/entries", Some(body)).await.0
    }

    async fn connected(&self) -> Option<f64> {
        let text = admin_metrics(self.gw.admin).await;
        metric(&text, "ipgate_fleet_connected")
    }
}

async fn admin_metrics(admin: SocketAddr) -> String {
    admin_call_text(admin, "/metrics").await
}

async fn admin_call_text(admin: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn fleet_of(redis: &Redis, upstream: SocketAddr, n: usize) -> Vec<Member> {
    let mut members = Vec::new();
    for i in 1..=n {
        let files = member(redis, upstream, i).await;
        let gw = files.start("info");
        members.push(Member { files, gw });
    }
    for m in &members {
        assert!(
            eventually(Duration::from_secs(10), || async {
                m.connected().await == Some(1.0)
            })
            .await,
            "a gateway did not connect to the fleet:\n{}",
            m.gw.output.text()
        );
    }
    members
}

/// How long until `check` holds, polling every 10 ms, at most `limit`.
async fn within<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Whether `local` is refused (blocked) by every one of `members`.
async fn blocked_everywhere<const N: usize>(members: [&Member; N], local: &str) -> bool {
    for m in members {
        if !refused(local, m.gw.plain).await {
            return false;
        }
    }
    true
}

async fn served_everywhere<const N: usize>(members: [&Member; N], local: &str) -> bool {
    for m in members {
        if !served_from(local, m.gw.plain).await {
            return false;
        }
    }
    true
}

const SECOND: Duration = Duration::from_secs(1);

/// How long the first entry of a lookup has left.
fn time_left(lookup: &serde_json::Value) -> Duration {
    let until = lookup["entries"][0]["expires_at"]
        .as_str()
        .unwrap_or_default();
    let until = humantime::parse_rfc3339(until).unwrap_or_else(|_| panic!("{lookup}"));
    until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_unbans_and_jail_bans_reach_every_gateway_within_a_second() {
    let redis = Redis::start();
    let up = Upstream::start().await;
    let fleet = fleet_of(&redis, up.addr, 3).await;
    let [g1, g2, g3] = [&fleet[0], &fleet[1], &fleet[2]];

    // A ban on g1 holds on g2 and g3 within a second.
    assert!(served_everywhere([g2, g3], "127.0.2.1").await);
    assert_eq!(g1.ban("127.0.2.1", "10m").await, 201);
    let took = within(SECOND, || blocked_everywhere([g2, g3], "127.0.2.1")).await;
    assert!(took.is_some(), "the ban did not reach g2 and g3 within 1 s");
    // g2 says where it came from and that the fleet has it.
    let (_, lookup) = g2.api("GET", "/v1/ips/127.0.2.1", None).await;
    let entry = &lookup["entries"][0];
    assert_eq!(entry["origin"], "g1", "{lookup}");
    assert_eq!(entry["shared"], true, "{lookup}");
    let (_, own) = g1.api("GET", "/v1/ips/127.0.2.1", None).await;
    assert_eq!(own["entries"][0]["origin"], "g1", "{own}");

    // Unbanned on g2: served everywhere within a second.
    let (status, _) = g2
        .api("DELETE", "/v1/entries?target=127.0.2.1&action=block", None)
        .await;
    assert_eq!(status, 204);
    let took = within(SECOND, || served_everywhere([g1, g3], "127.0.2.1")).await;
    assert!(
        took.is_some(),
        "the unban did not reach g1 and g3 within 1 s"
    );

    // A jail ban on g3 (two failed logins) holds on g1 and g2 within a second.
    for _ in 0..2 {
        assert_eq!(
            post_from(g3.gw.plain, "127.0.2.2", "/login", "a.test").await,
            Some(200)
        );
    }
    assert!(
        within(SECOND, || async { refused("127.0.2.2", g3.gw.plain).await })
            .await
            .is_some()
    );
    let took = within(SECOND, || blocked_everywhere([g1, g2], "127.0.2.2")).await;
    assert!(
        took.is_some(),
        "the jail ban did not reach g1 and g2 within 1 s"
    );
    // A change in the store that claims 10 days is kept no longer than max_retention (1 h).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let change = json!({"kind": "put", "action": "block", "target": "127.0.2.9/32",
        "entry": {"created_at": now_ms, "expires_at": now_ms + 10 * 86_400_000,
                  "source": "api", "reason": null, "origin": "elsewhere"}});
    let _: String = redis::cmd("XADD")
        .arg("ipgate:changes")
        .arg("*")
        .arg("origin")
        .arg("elsewhere")
        .arg("change")
        .arg(change.to_string())
        .query(&mut redis.con())
        .unwrap();
    assert!(within(SECOND, || blocked_everywhere([g1], "127.0.2.9"))
        .await
        .is_some());
    let (_, lookup) = g1.api("GET", "/v1/ips/127.0.2.9", None).await;
    let left = time_left(&lookup);
    assert!(
        left <= Duration::from_secs(3600),
        "kept for {left:?}: {lookup}"
    );
    let m = admin_metrics(g1.gw.admin).await;
    assert!(
        metric(&m, r#"ipgate_fleet_changes_total{direction="applied"}"#).unwrap_or(0.0) >= 3.0,
        "{m}"
    );
    let m = admin_metrics(g3.gw.admin).await;
    assert!(
        metric(&m, r#"ipgate_fleet_changes_total{direction="sent"}"#).unwrap_or(0.0) >= 2.0,
        "{m}"
    );

    // A ban for one site travels with its scope: blocked on the blog everywhere, served on
    // a.test; unbanned in that scope on another gateway.
    let status_on = |m: &Member, host: &'static str| {
        let addr = m.gw.plain;
        async move {
            let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            raw_status(addr, "127.0.2.3", &head).await
        }
    };
    let body = json!({"target": "127.0.2.3", "action": "block", "ttl": "10m", "site": "blog"});
    assert_eq!(g1.api("POST", "/v1/entries", Some(body)).await.0, 201);
    let took = within(SECOND, || async {
        status_on(g2, "b.test").await == Some(403) && status_on(g3, "b.test").await == Some(403)
    })
    .await;
    assert!(
        took.is_some(),
        "the site ban did not reach g2 and g3 within 1 s"
    );
    assert_eq!(status_on(g2, "a.test").await, Some(200));
    let (_, lookup) = g3.api("GET", "/v1/ips/127.0.2.3", None).await;
    assert_eq!(lookup["entries"][0]["scope"], "site:blog", "{lookup}");
    assert!(redis.dump().contains("site%3Ablog"), "{}", redis.dump());
    let (status, _) = g2
        .api("DELETE", "/v1/entries?target=127.0.2.3&site=blog", None)
        .await;
    assert_eq!(status, 204);
    let took = within(SECOND, || async {
        status_on(g1, "b.test").await == Some(200) && status_on(g3, "b.test").await == Some(200)
    })
    .await;
    assert!(
        took.is_some(),
        "the site unban did not reach g1 and g3 within 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_offense_on_another_gateway_bans_longer() {
    let redis = Redis::start();
    let up = Upstream::start().await;
    let fleet = fleet_of(&redis, up.addr, 3).await;
    let [g1, g2, g3] = [&fleet[0], &fleet[1], &fleet[2]];
    // First offense on g1: banned 2 s everywhere.
    for _ in 0..2 {
        post_from(g1.gw.plain, "127.0.2.3", "/login", "a.test").await;
    }
    assert!(
        within(SECOND * 2, || blocked_everywhere([g2, g3], "127.0.2.3"))
            .await
            .is_some()
    );
    assert!(
        within(SECOND * 5, || served_everywhere([g1, g2, g3], "127.0.2.3"))
            .await
            .is_some(),
        "the first ban did not end"
    );
    // Second offense on g2: it knows the first, so the ban is 2 s x 4 = 8 s.
    for _ in 0..2 {
        assert_eq!(
            post_from(g2.gw.plain, "127.0.2.3", "/login", "a.test").await,
            Some(200)
        );
    }
    // (The ban follows the response.)
    assert!(
        within(SECOND, || async { refused("127.0.2.3", g2.gw.plain).await })
            .await
            .is_some()
    );
    let (_, lookup) = g2.api("GET", "/v1/ips/127.0.2.3", None).await;
    let left = time_left(&lookup);
    assert!(
        left > Duration::from_secs(5),
        "not escalated: {left:?} left\n{lookup}"
    );
    assert_eq!(
        lookup["offenses"][0]["at"].as_array().map(Vec::len),
        Some(2),
        "{lookup}"
    );
    // And on the others it holds past the first ban's length.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(blocked_everywhere([g1, g3], "127.0.2.3").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_erases_an_address_on_every_gateway_and_in_the_store() {
    let redis = Redis::start();
    let up = Upstream::start().await;
    let fleet = fleet_of(&redis, up.addr, 3).await;
    let [g1, g2, g3] = [&fleet[0], &fleet[1], &fleet[2]];
    // Offenses and a ban on g1, another entry from g3.
    for _ in 0..2 {
        post_from(g1.gw.plain, "127.0.2.4", "/login", "a.test").await;
    }
    assert_eq!(g3.ban("127.0.2.4", "1h").await, 201);
    assert!(
        within(SECOND * 2, || blocked_everywhere([g1, g2, g3], "127.0.2.4"))
            .await
            .is_some()
    );
    assert!(redis.dump().contains("127.0.2.4"));
    // Forgotten on g2.
    let (status, erased) = g2.api("DELETE", "/v1/ips/127.0.2.4", None).await;
    assert_eq!(status, 200, "{erased}");
    let gone_everywhere = || async {
        for m in [g1, g2, g3] {
            let (_, l) = m.api("GET", "/v1/ips/127.0.2.4", None).await;
            let empty = |k: &str| l[k].as_array().is_none_or(Vec::is_empty);
            if !(empty("entries") && empty("offenses")) {
                return false;
            }
        }
        true
    };
    assert!(
        within(SECOND * 2, gone_everywhere).await.is_some(),
        "a gateway still holds the address"
    );
    assert!(served_everywhere([g1, g2, g3], "127.0.2.4").await);
    // Nothing about it left in the store: keys or stream records (the forget record itself
    // lingers 3 s for the gateways to read).
    let clean = within(SECOND * 6, || async { !redis.dump().contains("127.0.2.4") }).await;
    assert!(
        clean.is_some(),
        "the store still holds the address:\n{}",
        redis.dump()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_outage_bans_stay_local_then_the_fleet_converges_even_on_an_empty_store() {
    let mut redis = Redis::start();
    let up = Upstream::start().await;
    let mut fleet = fleet_of(&redis, up.addr, 3).await;
    // Before the outage: a ban from g3, everywhere.
    assert_eq!(fleet[2].ban("127.0.3.1", "1h").await, 201);
    assert!(within(SECOND, || blocked_everywhere(
        [&fleet[0], &fleet[1]],
        "127.0.3.1"
    ))
    .await
    .is_some());

    // The store goes away.
    redis.kill();
    for m in &fleet {
        assert!(
            eventually(Duration::from_secs(10), || async {
                m.connected().await == Some(0.0)
            })
            .await,
            "ipgate_fleet_connected stayed 1"
        );
    }
    // New bans are taken and enforced locally.
    assert_eq!(fleet[0].ban("127.0.3.2", "1h").await, 201);
    assert!(refused("127.0.3.2", fleet[0].gw.plain).await);
    assert!(served_from("127.0.3.2", fleet[1].gw.plain).await);
    // g2 bans, then restarts while the store is still away: its outbox survives.
    assert_eq!(fleet[1].ban("127.0.3.3", "1h").await, 201);
    {
        let Member { files, gw } = fleet.remove(1);
        gw.signal("TERM");
        assert!(gw.wait().await.success());
        let gw = files.start("info");
        fleet.insert(1, Member { files, gw });
    }
    assert!(refused("127.0.3.3", fleet[1].gw.plain).await);

    // The store comes back empty: outboxes are sent, and what it lost is published again.
    redis.restart();
    let all = ["127.0.3.1", "127.0.3.2", "127.0.3.3"];
    let converged = || async {
        for ip in all {
            if !blocked_everywhere([&fleet[0], &fleet[1], &fleet[2]], ip).await {
                return false;
            }
        }
        true
    };
    assert!(
        within(Duration::from_secs(10), converged).await.is_some(),
        "the fleet did not converge:\n{}",
        redis.dump()
    );
    // A gateway that starts later gets every live entry.
    let files = member(&redis, up.addr, 4).await;
    let late = Member {
        gw: files.start("info"),
        files,
    };
    assert!(
        within(Duration::from_secs(10), || blocked_everywhere(
            [&late],
            all[0]
        ))
        .await
        .is_some(),
        "the late joiner has nothing:\n{}",
        late.gw.output.text()
    );
    for ip in all {
        assert!(refused(ip, late.gw.plain).await, "{ip}");
    }
    // Every key the fleet keeps expires within max_retention (1 h here).
    let mut con = redis.con();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    assert!(
        keys.iter().any(|k| k.starts_with("ipgate:entry:")),
        "{keys:?}"
    );
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query(&mut con).unwrap();
        assert!(ttl > 0 && ttl <= 3_600_000, "{k}: PTTL {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_unread_changes_were_trimmed_resyncs() {
    // Over rediss:// with a password, too: the gateways connect (fleet_of waits for it) only
    // with fleet.ca_file and fleet.password_file.
    let redis = Redis::start_secure();
    let up = Upstream::start().await;
    let fleet = fleet_of(&redis, up.addr, 3).await;
    let [g1, g2, g3] = [&fleet[0], &fleet[1], &fleet[2]];
    // g3 stops reading (paused). Its pending XREAD takes the first ban's record; the second
    // one the stream loses before g3 asks again.
    g3.gw.signal("STOP");
    assert_eq!(g1.ban("127.0.4.1", "1h").await, 201);
    assert!(within(SECOND, || blocked_everywhere([g2], "127.0.4.1"))
        .await
        .is_some());
    assert_eq!(g1.ban("127.0.4.2", "1h").await, 201);
    assert!(within(SECOND, || blocked_everywhere([g2], "127.0.4.2"))
        .await
        .is_some());
    let mut con = redis.con();
    let _: () = redis::cmd("XTRIM")
        .arg("ipgate:changes")
        .arg("MAXLEN")
        .arg(0)
        .query(&mut con)
        .unwrap();
    g3.gw.signal("CONT");
    // It notices (entries were added that it never read) and takes the entry from the keys.
    assert!(
        within(Duration::from_secs(6), || blocked_everywhere(
            [g3],
            "127.0.4.2"
        ))
        .await
        .is_some(),
        "g3 never resynced:\n{}",
        g3.gw.output.text()
    );
    assert!(g3.gw.output.text().contains("resyncing"));
}

#[tokio::test]
async fn a_challenge_made_on_one_gateway_is_solved_on_another_and_its_pass_holds_on_both() {
    let redis = Redis::start();
    let upstream = Upstream::start().await;
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("challenge.key");
    std::fs::write(
        &secret,
        "0123456789abcdef0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let sites = "[[site]]\nhosts = [\"a.test\"]\nupstream = \"http://{upstream}\"\nchallenge = \"always\"\n";
    let mut members = Vec::new();
    for i in 1..=2 {
        let extra = format!(
            "[fleet]\n{}gateway_id = \"c{i}\"\n[challenge]\ndifficulty = 8\nsecret_file = \"{}\"\n",
            redis.fleet_keys(),
            secret.display()
        );
        let files = GatewayBuilder::new()
            .upstream(upstream.addr)
            .sites(sites)
            .extra(&extra)
            .files()
            .await;
        let gw = files.start("info");
        members.push(Member { files, gw });
    }
    let html_get = |addr: SocketAddr, path: String| async move {
        let tcp = connect_from("127.0.5.1", addr).await;
        get_on(tcp, &path, "a.test", &[("accept", "text/html")]).await
    };
    let (g1, g2) = (members[0].gw.plain, members[1].gw.plain);
    let (status, html) = html_get(g1, "/".into()).await;
    assert_eq!(status, 403);
    // Gateway 2 verifies gateway 1's puzzle (one key for the fleet) and makes the pass.
    assert_eq!(html_get(g2, solution(&html)).await.0, 303);
    assert_eq!(html_get(g2, "/".into()).await.0, 200);
    // The pass reaches gateway 1 through the store.
    let shared = eventually(Duration::from_secs(2), || async {
        html_get(g1, "/".into()).await.0 == 200
    })
    .await;
    assert!(
        shared,
        "gateway 1 does not honour the pass made on gateway 2"
    );
    // A replay of the same solution on gateway 1 is refused: its pass names the puzzle.
    assert_eq!(html_get(g1, solution(&html)).await.0, 403);
    // Forget on gateway 1 erases it on both.
    let (status, _) = members[0].api("DELETE", "/v1/ips/127.0.5.1", None).await;
    assert_eq!(status, 200);
    let gone = eventually(Duration::from_secs(2), || async {
        html_get(g2, "/".into()).await.0 == 403
    })
    .await;
    assert!(gone, "gateway 2 still honours a forgotten pass");
}

/// The console on one gateway acts for the fleet: an unban and a forget clicked in the page
/// of g1 reach g2, whose ban and offense history they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_of_one_gateway_unbans_and_forgets_on_every_gateway() {
    let redis = Redis::start();
    let up = Upstream::start().await;
    let fleet = fleet_of(&redis, up.addr, 2).await;
    let [g1, g2] = [&fleet[0], &fleet[1]];
    let who = "127.0.2.30";
    assert_eq!(g2.ban(who, "1h").await, 201);
    assert!(within(SECOND * 2, || blocked_everywhere([g1, g2], who))
        .await
        .is_some());

    let mut b = common::cdp::Browser::start().await;
    b.open(&format!("http://{}/", g1.gw.admin)).await;
    b.sign_in(&g1.token()).await;
    let listed = "refresh().then(() => document.querySelector('[data-view=entries]')\
                  .textContent.includes('127.0.2.30/32'))";
    assert!(
        b.until(listed).await,
        "{}",
        b.text("[data-view=entries]").await
    );
    b.eval("document.querySelector('button[data-act=unban][data-target=\"127.0.2.30/32\"]').click(); true")
        .await;
    assert!(
        b.until("document.querySelector('#message').textContent.startsWith('Unbanned')")
            .await,
        "{}",
        b.text("#message").await
    );
    assert!(
        within(SECOND * 2, || served_everywhere([g1, g2], who))
            .await
            .is_some(),
        "the unban did not reach g2"
    );

    // Offenses on g2, forgotten from g1's page.
    for _ in 0..2 {
        post_from(g2.gw.plain, who, "/login", "a.test").await;
    }
    let held_on_g2 = || async {
        let (_, l) = g2.api("GET", &format!("/v1/ips/{who}"), None).await;
        !l["offenses"].as_array().is_none_or(Vec::is_empty)
            || !l["jail_counters"].as_array().is_none_or(Vec::is_empty)
    };
    // The second failure's ban (and its offense record) is made just after its answer.
    assert!(
        within(SECOND * 2, held_on_g2).await.is_some(),
        "g2 holds nothing to forget"
    );
    b.eval(&format!(
        "document.querySelector('#ip').value = {who:?}; \
         document.querySelector('#lookup-form').requestSubmit(); true"
    ))
    .await;
    assert!(
        b.until("!!document.querySelector('button[data-act=forget]')")
            .await
    );
    b.eval("document.querySelector('button[data-act=forget]').click(); true")
        .await;
    assert!(
        b.until("document.querySelector('#message').textContent.startsWith('Forgot')")
            .await,
        "{}",
        b.text("#message").await
    );
    assert!(
        within(SECOND * 2, || async { !held_on_g2().await })
            .await
            .is_some(),
        "g2 still holds the address"
    );
}

/// An upgraded gateway (`ipgate upgrade`) goes on in the fleet where its old process left
/// off: its new process reads the stream (a ban made on another gateway after the upgrade
/// holds on it), sends its own changes, and keeps what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_gateway_goes_on_in_the_fleet() {
    let redis = Redis::start();
    let up = Upstream::start().await;
    let fleet = fleet_of(&redis, up.addr, 2).await;
    let [g1, g2] = [&fleet[0], &fleet[1]];
    assert_eq!(g2.ban("127.0.2.40", "1h").await, 201);
    assert!(
        within(SECOND * 2, || blocked_everywhere([g1, g2], "127.0.2.40"))
            .await
            .is_some()
    );

    let (status, v) = g1.api("POST", "/v1/upgrade", None).await;
    assert_eq!(status, 200, "{v}\n{}", g1.gw.output.text());
    let _new = KillOnDrop(v["pid"].as_u64().unwrap() as u32);
    assert_eq!(g2.ban("127.0.2.41", "1h").await, 201);
    // (A connection that reached the old process in its last moment is answered 503.)
    assert!(within(SECOND * 2, || async {
        g1.ban("127.0.2.42", "1h").await == 201
    })
    .await
    .is_some());
    for who in ["127.0.2.40", "127.0.2.41", "127.0.2.42"] {
        assert!(
            within(SECOND * 3, || blocked_everywhere([g1, g2], who))
                .await
                .is_some(),
            "{who} is not blocked on both after the upgrade\n{}",
            g1.gw.output.text()
        );
    }
    assert_eq!(g1.connected().await, Some(1.0));
}
