//! The block set in the kernel (`[firewall]`): ipgate runs inside a network
//! namespace this test makes (never the host's firewall), beside a small TCP server on a
//! non-HTTP port; a client namespace connects from a banned and an unbanned address.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A server and a client namespace joined by a veth pair: 10.77.0.1 / fd77::1 on the server
/// side; 10.77.0.2, 10.77.0.3, fd77::2 and fd77::3 on the client side. Deleted on drop.
struct Netns {
    srv: String,
    cli: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        assert!(
            sh(&["sh", "-c", "command -v nft && command -v ip"]),
            "nft and ip are needed: scripts/test installs Debian's nftables and iproute2"
        );
        let id = format!("{}-{tag}", std::process::id());
        let ns = Netns {
            srv: format!("ipg-s-{id}"),
            cli: format!("ipg-c-{id}"),
        };
        let (s, c) = (ns.srv.as_str(), ns.cli.as_str());
        let steps: &[&[&str]] = &[
            &["ip", "netns", "add", s],
            &["ip", "netns", "add", c],
            &[
                "ip", "link", "add", "veth-s", "netns", s, "type", "veth", "peer", "name",
                "veth-c", "netns", c,
            ],
            &[
                "ip",
                "-n",
                s,
                "addr",
                "add",
                "10.77.0.1/24",
                "dev",
                "veth-s",
            ],
            &[
                "ip",
                "-n",
                c,
                "addr",
                "add",
                "10.77.0.2/24",
                "dev",
                "veth-c",
            ],
            &[
                "ip",
                "-n",
                c,
                "addr",
                "add",
                "10.77.0.3/24",
                "dev",
                "veth-c",
            ],
            &[
                "ip",
                "-n",
                s,
                "addr",
                "add",
                "fd77::1/64",
                "dev",
                "veth-s",
                "nodad",
            ],
            &[
                "ip",
                "-n",
                c,
                "addr",
                "add",
                "fd77::2/64",
                "dev",
                "veth-c",
                "nodad",
            ],
            &[
                "ip",
                "-n",
                c,
                "addr",
                "add",
                "fd77::3/64",
                "dev",
                "veth-c",
                "nodad",
            ],
            &["ip", "-n", s, "link", "set", "lo", "up"],
            &["ip", "-n", c, "link", "set", "lo", "up"],
            &["ip", "-n", s, "link", "set", "veth-s", "up"],
            &["ip", "-n", c, "link", "set", "veth-c", "up"],
        ];
        for step in steps {
            assert!(
                sh(step),
                "network namespace setup failed (root is needed): {step:?}"
            );
        }
        ns
    }

    fn exec(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// A TCP server on port 2222 of the server side (IPv4 and IPv6): holds each connection
    /// until the client closes it.
    fn tcp_server(&self) -> Server {
        const PY: &str = r#"
import socket, threading
def hold(c):
    while c.recv(4096):
        pass
    c.close()
def serve(family, addr):
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 2222)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=hold, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(socket.AF_INET6, "fd77::1"), daemon=True).start()
serve(socket.AF_INET, "10.77.0.1")
"#;
        Server(
            self.exec(&self.srv, "python3")
                .args(["-c", PY])
                .spawn()
                .unwrap(),
        )
    }

    /// Whether a TCP connection from `src` (client side) to the server's port 2222 is
    /// established within 1 s: `false` is an unanswered SYN.
    fn connects(&self, src: &str) -> bool {
        match self.probe(src) {
            Probe::Open => true,
            Probe::Dropped => false,
            Probe::Refused => panic!("{src} was refused with a reset, not dropped"),
        }
    }

    /// What a TCP connection from `src` (client side) to the server's port 2222 meets
    /// within 1 s.
    fn probe(&self, src: &str) -> Probe {
        const PY: &str = r#"
import socket, sys
src, dst = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET); s.settimeout(1.0); s.bind((src, 0))
try:
    s.connect((dst, 2222)); sys.exit(0)
except socket.timeout:
    sys.exit(2)
except ConnectionRefusedError:
    sys.exit(3)
"#;
        let dst = if src.contains(':') {
            "fd77::1"
        } else {
            "10.77.0.1"
        };
        let status = self
            .exec(&self.cli, "python3")
            .args(["-c", PY, src, dst])
            .status()
            .unwrap();
        match status.code() {
            Some(0) => Probe::Open,
            Some(2) => Probe::Dropped,
            Some(3) => Probe::Refused,
            other => panic!("the probe failed: {other:?}"),
        }
    }

    /// Opens one connection from each of `srcs` in turn and holds them all: which were
    /// established within 1 s (`.` dropped SYN, `o` open), e.g. `ooo.`; then closes them.
    fn hold(&self, srcs: &[&str]) -> String {
        const PY: &str = r#"
import socket, sys
out, held = "", []
for src in sys.argv[1:]:
    dst = "fd77::1" if ":" in src else "10.77.0.1"
    s = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET); s.settimeout(1.0)
    s.bind((src, 0))
    try:
        s.connect((dst, 2222)); held.append(s); out += "o"
    except socket.timeout:
        out += "."
print(out)
"#;
        let out = self
            .exec(&self.cli, "python3")
            .args(["-c", PY])
            .args(srcs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits up to `limit` for `connects(src) == want`.
    fn until(&self, src: &str, want: bool, limit: Duration) -> bool {
        let want = if want { Probe::Open } else { Probe::Dropped };
        self.until_probe(src, want, limit)
    }

    /// Waits up to `limit` for `probe(src) == want`.
    fn until_probe(&self, src: &str, want: Probe, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.probe(src) == want {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What `nft ARGS` prints on the server side.
    fn nft(&self, args: &[&str]) -> String {
        let out = self.exec(&self.srv, "nft").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The elements of one of the table's sets, as `nft` lists them.
    fn elements(&self, table: &str, set: &str) -> String {
        self.nft(&["list", "set", "inet", table, set])
    }

    fn tables(&self) -> String {
        self.nft(&["list", "tables"])
    }

    /// The test table's input chain.
    fn rules(&self) -> String {
        self.nft(&["list", "chain", "inet", "ipgate_test", "input"])
    }
}

#[derive(Debug, PartialEq)]
enum Probe {
    /// Established.
    Open,
    /// The SYN went unanswered for 1 s.
    Dropped,
    /// Reset at once.
    Refused,
}

/// The TCP server, killed on drop (also when an assert fails).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        sh(&["ip", "netns", "del", &self.srv]);
        sh(&["ip", "netns", "del", &self.cli]);
    }
}

/// Runs the CLI inside the server namespace against the gateway's admin API.
fn cli(ns: &Netns, files: &GatewayFiles, gw: &BinaryGateway, args: &[&str]) {
    let out = files.cli(gw.admin, Some(&ns.srv), args).output().unwrap();
    assert!(
        out.status.success(),
        "ipgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The gateway's metrics, fetched from inside the server namespace.
fn admin_metrics(ns: &Netns, gw: &BinaryGateway) -> String {
    let out = ns
        .exec(&ns.srv, "python3")
        .args([
            "-c",
            "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())",
            &format!("http://{}/metrics", gw.admin),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const FIREWALL: &str = "[firewall]\nports = [2222]\ntable = \"ipgate_test\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_drops_banned_clients_on_other_ports_and_follows_every_change() {
    let ns = Netns::new("fw");
    let _server = ns.tcp_server();
    let files = GatewayBuilder::new().extra(FIREWALL).files().await;
    let gw = files.start_in(&ns.srv, "info");
    assert!(
        ns.until("10.77.0.3", true, Duration::from_secs(5)),
        "the TCP server is not up"
    );
    assert!(ns.tables().contains("table inet ipgate_test"));

    // A ban: the SYN from .3 goes unanswered, .2 still connects; IPv6 likewise.
    cli(&ns, &files, &gw, &["ban", "10.77.0.3", "--ttl", "1h"]);
    cli(&ns, &files, &gw, &["ban", "fd77::3", "--ttl", "1h"]);
    assert!(ns.until("10.77.0.3", false, Duration::from_secs(2)));
    assert!(ns.until("fd77::3", false, Duration::from_secs(2)));
    assert!(ns.connects("10.77.0.2"));
    assert!(ns.connects("fd77::2"));
    // With its own remaining time in the kernel.
    let block4 = ns.elements("ipgate_test", "block4");
    assert!(block4.contains("10.77.0.3 timeout 1h"), "{block4}");

    // Allow wins in the kernel too.
    cli(&ns, &files, &gw, &["allow", "10.77.0.3", "--ttl", "1h"]);
    assert!(ns.until("10.77.0.3", true, Duration::from_secs(2)));
    cli(&ns, &files, &gw, &["disallow", "10.77.0.3"]);
    assert!(ns.until("10.77.0.3", false, Duration::from_secs(2)));

    // A 3 s ban leaves the kernel on time.
    cli(&ns, &files, &gw, &["ban", "10.77.0.2", "--ttl", "3s"]);
    assert!(ns.until("10.77.0.2", false, Duration::from_secs(2)));
    let banned_at = Instant::now();
    assert!(ns.until("10.77.0.2", true, Duration::from_secs(6)));
    assert!(
        banned_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        banned_at.elapsed()
    );
    assert!(!ns.elements("ipgate_test", "block4").contains("10.77.0.2"));

    // unban and forget remove the element at once.
    cli(&ns, &files, &gw, &["unban", "10.77.0.3"]);
    assert!(
        ns.until("10.77.0.3", true, Duration::from_secs(2)),
        "{}",
        gw.output.text()
    );
    cli(&ns, &files, &gw, &["forget", "fd77::3"]);
    assert!(
        ns.until("fd77::3", true, Duration::from_secs(2)),
        "{}",
        gw.output.text()
    );
    assert!(!ns.elements("ipgate_test", "block6").contains("fd77::3"));

    // Someone deletes the table: the next update fails, is counted, and the rebuild that
    // follows restores every element.
    assert!(sh(&[
        "ip",
        "netns",
        "exec",
        &ns.srv,
        "nft",
        "delete",
        "table",
        "inet",
        "ipgate_test"
    ]));
    assert!(ns.connects("fd77::2"));
    cli(&ns, &files, &gw, &["ban", "fd77::2", "--ttl", "1h"]);
    assert!(
        ns.until("fd77::2", false, Duration::from_secs(3)),
        "{}",
        gw.output.text()
    );
    let metrics = admin_metrics(&ns, &gw);
    assert!(
        metric(&metrics, "ipgate_firewall_errors_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    cli(&ns, &files, &gw, &["unban", "fd77::2"]);

    // A restart rebuilds the set from the store; at stop the table goes.
    cli(&ns, &files, &gw, &["ban", "10.77.0.3", "--ttl", "1h"]);
    assert!(ns.until("10.77.0.3", false, Duration::from_secs(2)));
    gw.signal("TERM");
    assert!(gw.wait().await.success());
    assert!(!ns.tables().contains("ipgate_test"), "{}", ns.tables());
    assert!(ns.connects("10.77.0.3"));
    let gw = files.start_in(&ns.srv, "info");
    assert!(ns.until("10.77.0.3", false, Duration::from_secs(2)));
    assert!(ns.connects("10.77.0.2"));
    gw.signal("TERM");
    assert!(gw.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_lists_are_mirrored_and_the_table_can_be_kept_at_stop() {
    let ns = Netns::new("st");
    let _server = ns.tcp_server();
    // 100,000 /32s of 10.200.0.0/15, and the client's .3; allowed .2 inside a blocked /24.
    let mut list = String::with_capacity(100_001 * 16);
    for i in 0..100_000u32 {
        list.push_str(&format!(
            "10.{}.{}.{}\n",
            200 + i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    list.push_str("10.77.0.3\n");
    let extra = format!(
        "{FIREWALL}keep_at_stop = true\n\
         [lists.drop]\naction = \"block\"\nfiles = [\"lists/drop.txt\"]\n\
         [lists.office]\naction = \"allow\"\nentries = [\"fd77::2\"]\n\
         [lists.net]\naction = \"block\"\nentries = [\"fd77::/64\"]\n"
    );
    let files = GatewayBuilder::new()
        .file("lists/drop.txt", &list)
        .extra(&extra)
        .files()
        .await;
    // The kernel's slab memory (the namespaces share it with the host: a rough figure).
    let slab = || {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Slab:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = slab();
    let started = Instant::now();
    let gw = files.start_in(&ns.srv, "info");
    let loaded = started.elapsed();
    eprintln!(
        "100,001 static CIDRs: gateway up with its table in {loaded:?}; kernel slab +{} KiB",
        slab().saturating_sub(before)
    );
    assert!(
        ns.until("10.77.0.2", true, Duration::from_secs(5)),
        "the TCP server is not up"
    );
    assert!(!ns.connects("10.77.0.3"));
    // An allow entry inside a blocked network: allowed; its neighbour: dropped.
    assert!(ns.connects("fd77::2"));
    assert!(!ns.connects("fd77::3"));
    let metrics = admin_metrics(&ns, &gw);
    assert_eq!(
        metric(
            &metrics,
            r#"ipgate_firewall_elements{family="ipv4",set="block"}"#
        ),
        Some(100_001.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"ipgate_firewall_elements{family="ipv6",set="allow"}"#
        ),
        Some(1.0)
    );
    assert_eq!(metric(&metrics, "ipgate_firewall_errors_total"), Some(0.0));

    // A line added to the list file reaches the kernel (the file is re-read on its own).
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(files.dir.path().join("lists/drop.txt"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"10.77.0.2\n").unwrap();
    drop(f);
    assert!(ns.until("10.77.0.2", false, Duration::from_secs(10)));

    // Kept at stop: still enforced by the kernel alone.
    gw.signal("TERM");
    assert!(gw.wait().await.success());
    assert!(ns.tables().contains("ipgate_test"));
    assert!(!ns.connects("10.77.0.3"));
}

/// A feed served by Python's http.server inside the server namespace (its loopback): the
/// list's entries reach the kernel, and a new copy of the feed replaces them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_reaches_the_kernel_and_its_next_copy_replaces_it() {
    let ns = Netns::new("fd");
    let _server = ns.tcp_server();
    let extra = format!(
        "{FIREWALL}[lists.feed]\naction = \"block\"\nurl = \"http://127.0.0.1:8787/drop.txt\"\n\
         refresh = \"1s\"\n"
    );
    let files = GatewayBuilder::new()
        .file("feed/drop.txt", "10.77.0.3\n")
        .extra(&extra)
        .files()
        .await;
    let served = files.dir.path().join("feed");
    let _http = Server(
        ns.exec(&ns.srv, "python3")
            .args([
                "-m",
                "http.server",
                "8787",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&served)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _gw = files.start_in(&ns.srv, "info");
    assert!(
        ns.until("10.77.0.3", false, Duration::from_secs(10)),
        "the feed's entry did not reach the kernel"
    );
    assert!(ns.connects("10.77.0.2"));
    // The next copy (newer than the If-Modified-Since the gateway sends): one swap.
    let file = served.join("drop.txt");
    std::fs::write(&file, "10.77.0.2\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    assert!(
        ns.until("10.77.0.3", true, Duration::from_secs(10)),
        "the old copy's entry stayed in the kernel"
    );
    assert!(!ns.connects("10.77.0.2"));
    assert!(ns.elements("ipgate_test", "block4").contains("10.77.0.2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reject_verdict_resets_a_blocked_client_at_once() {
    let ns = Netns::new("rj");
    let _server = ns.tcp_server();
    let extra = format!(
        "{FIREWALL}verdict = \"reject\"\n\
         [lists.drop]\naction = \"block\"\nentries = [\"10.77.0.3\", \"fd77::3\"]\n"
    );
    let files = GatewayBuilder::new().extra(&extra).files().await;
    let _gw = files.start_in(&ns.srv, "info");
    assert!(
        ns.until("10.77.0.2", true, Duration::from_secs(5)),
        "the TCP server is not up"
    );
    assert!(
        ns.until("fd77::2", true, Duration::from_secs(5)),
        "the TCP server is not up on IPv6"
    );
    // Refused: a reset came back (a dropped SYN is `Dropped` after the probe's second). The
    // server's first reply to an IPv6 address waits for neighbour discovery, which on a busy
    // machine can outlast one probe: a few are allowed.
    assert!(ns.until_probe("10.77.0.3", Probe::Refused, Duration::from_secs(5)));
    assert!(ns.until_probe("fd77::3", Probe::Refused, Duration::from_secs(5)));
    assert!(
        ns.rules().contains("reject with tcp reset"),
        "{}",
        ns.rules()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_caps_connections_per_client_and_frees_the_slots_they_release() {
    let ns = Netns::new("cap");
    let _server = ns.tcp_server();
    let extra = format!(
        "{FIREWALL}connection_cap = true\n[limits]\nmax_connections_per_client = 3\n\
         [lists.office]\naction = \"allow\"\nentries = [\"10.77.0.4\"]\n"
    );
    let files = GatewayBuilder::new()
        .gateway_keys("trusted_proxies = [\"10.77.0.3\"]\n")
        .extra(&extra)
        .files()
        .await;
    let _gw = files.start_in(&ns.srv, "info");
    ns.exec(&ns.cli, "ip")
        .args(["addr", "add", "10.77.0.4/24", "dev", "veth-c"])
        .status()
        .unwrap();
    assert!(
        ns.until("10.77.0.2", true, Duration::from_secs(5)),
        "the TCP server is not up"
    );
    let two = ["10.77.0.2"; 4];
    // The fourth connection's SYN is dropped while three are held.
    assert_eq!(ns.hold(&two), "ooo.");
    // They were closed at the end of that run: the slots are free again.
    assert_eq!(ns.hold(&two), "ooo.");
    // A trusted proxy and an allow-listed client are not capped.
    assert_eq!(ns.hold(&["10.77.0.3"; 5]), "ooooo");
    assert_eq!(ns.hold(&["10.77.0.4"; 5]), "ooooo");
    // IPv6 clients count per /64: two addresses share one cap.
    assert_eq!(
        ns.hold(&["fd77::2", "fd77::3", "fd77::2", "fd77::3"]),
        "ooo."
    );
    // The drops are counted on the rule.
    let rules = ns.rules();
    assert!(rules.contains("ct count over 3"), "{rules}");
    assert!(!rules.contains("counter packets 0 "), "{rules}");
}

#[test]
fn without_cap_net_admin_start_says_so() {
    // setpriv drops every capability: start must fail naming CAP_NET_ADMIN.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ipgate.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nstate_dir = \"state\"\n[[listener]]\naddr = \"127.0.0.1:0\"\n\
             [[site]]\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:9\"\n{FIREWALL}"
        ),
    )
    .unwrap();
    let run = |sub: &str| {
        Command::new("setpriv")
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(env!("CARGO_BIN_EXE_ipgate"))
            .args([sub, "-c"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = run("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    let out = run("check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
}
