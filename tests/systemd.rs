//! systemd's side of a start: the listening sockets taken from socket activation (Debian's
//! `systemd-socket-activate` passes them as systemd does, `LISTEN_FDS`), served without the
//! config's own address being bound a second time; and the notifications of `Type=notify`
//! (READY=1 once serving, WATCHDOG=1 while running, STOPPING=1 at shutdown) read from a
//! notification socket the test makes, as systemd's.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// A process killed on drop (also when an assert fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Its stderr lines, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for a line holding `text`; the lines seen on the way are returned too.
fn wait_for(rx: &mpsc::Receiver<String>, text: &str, seen: &mut Vec<String>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(text);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// Listening TCP sockets on `port` (`ss`, from iproute2).
fn listening_on(port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2) is needed");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_from_socket_activation_are_served_and_not_bound_again() {
    let (plain, tls) = (free_port(), free_port());
    let files = GatewayBuilder::new().ports(plain, tls).files().await;
    let mut child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{plain}")])
        .args(["-l", &format!("127.0.0.1:{tls}")])
        .args(["-E", "RUST_LOG=info"])
        .arg(env!("CARGO_BIN_EXE_ipgate"))
        .args(["run", "-c"])
        .arg(&files.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian's systemd) is needed");
    let rx = lines(&mut child);
    let _child = Killed(child);
    let mut seen = Vec::new();
    // systemd-socket-activate listens first and starts the gateway on the first connection.
    assert!(wait_for(&rx, "Listening on", &mut seen), "{seen:#?}");
    assert!(wait_for(&rx, "Listening on", &mut seen), "{seen:#?}");
    let served = plain_get(format!("127.0.0.1:{plain}").parse().unwrap(), "/", "a.test");
    let (code, _) = tokio::time::timeout(Duration::from_secs(20), served)
        .await
        .expect("no answer through the inherited socket");
    assert_eq!(code, 200);
    assert!(
        wait_for(&rx, "listening sockets inherited", &mut seen),
        "{seen:#?}"
    );
    assert!(wait_for(&rx, "admin listening", &mut seen), "{seen:#?}");
    let inherited = seen
        .iter()
        .filter(|l| l.contains("listening sockets inherited"))
        .count();
    assert_eq!(inherited, 2, "{seen:#?}");
    // One socket on each port: the one systemd made. The workers share it.
    assert_eq!(listening_on(plain), 1);
    assert_eq!(listening_on(tls), 1);
    let tls_addr: std::net::SocketAddr = format!("127.0.0.1:{tls}").parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let cfg = client_config(&files.ca.ca_der, &[b"http/1.1"]);
    let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("a TLS handshake on the inherited socket");
}

/// What the gateway tells systemd, read from a notification socket the test makes, as
/// systemd's.
struct Notices {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    /// The notices heard since the last `clear`.
    heard: Vec<String>,
}

impl Notices {
    fn new() -> Notices {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Notices {
            socket,
            _dir: dir,
            path,
            heard: Vec::new(),
        }
    }

    /// Reads notices until one holds `what` (panics after 20 s of silence).
    fn until(&mut self, what: &str) {
        let mut buf = [0u8; 512];
        while !self.heard.iter().any(|h| h.contains(what)) {
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {what} within 20 s ({e}): heard {:?}", self.heard));
            self.heard
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    fn clear(&mut self) {
        self.heard.clear();
    }

    /// `ipgate run -c CONFIG` as systemd would start it with `Type=notify` and a watchdog:
    /// systemd names the process the watchdog is for, the shell's PID, which exec keeps.
    fn start(&self, config: &std::path::Path, stderr: Stdio) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(r#"WATCHDOG_PID=$$ exec "$0" run -c "$1""#)
            .arg(env!("CARGO_BIN_EXE_ipgate"))
            .arg(config)
            .env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", "400000")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    }
}

#[test]
fn systemd_hears_ready_the_watchdog_and_stopping() {
    let mut notices = Notices::new();
    let files = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(GatewayBuilder::new().files());
    let mut child = notices.start(&files.config, Stdio::null());
    let pid = child.id();
    notices.until("READY=1");
    notices.until("WATCHDOG=1");
    let first = notices
        .heard
        .iter()
        .position(|h| h.contains("WATCHDOG=1"))
        .unwrap();
    notices.heard.truncate(first);
    notices.until("WATCHDOG=1");
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    notices.until("STOPPING=1");
    assert!(child.wait().unwrap().success());
    assert!(notices.heard[0].contains("READY=1"), "{:?}", notices.heard);
}

/// Across two upgrades in a row (`ipgate upgrade`), systemd hears of each new main process
/// (MAINPID=), each new process says READY=1, and the newest keeps the watchdog fed after
/// the ones before it have exited (systemd named the first in WATCHDOG_PID).
#[test]
fn after_upgrades_systemd_hears_each_new_main_pid_and_its_watchdog() {
    let mut notices = Notices::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = rt.block_on(GatewayBuilder::new().files());
    let mut child = notices.start(&files.config, Stdio::piped());
    let rx = lines(&mut child);
    let mut seen = Vec::new();
    assert!(wait_for(&rx, "admin listening", &mut seen), "{seen:#?}");
    let admin: std::net::SocketAddr = seen
        .last()
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
        .and_then(|a| a.parse().ok())
        .unwrap();
    let token = std::fs::read_to_string(files.token_file()).unwrap();
    notices.until("READY=1");
    let _first = Killed(child);
    let mut newest = Vec::new();
    for round in 0..2 {
        let (status, v) = rt.block_on(admin_call(
            admin,
            "POST",
            "/v1/upgrade",
            None,
            Some(token.trim()),
        ));
        assert_eq!(status, 200, "upgrade {round}: {v}");
        let pid = v["pid"].as_u64().unwrap() as u32;
        newest.push(KillOnDrop(pid));
        notices.clear();
        notices.until(&format!("MAINPID={pid}"));
        notices.until("READY=1");
        // Every process before it has exited (the first one is a zombie of ours until reaped).
        let gone = |p: u32| !running(p);
        let before: Vec<u32> = newest[..newest.len() - 1].iter().map(|k| k.0).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !before.iter().all(|&p| gone(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            before.iter().all(|&p| gone(p)),
            "round {round}: an old process is still running"
        );
        // Only the newest runs now: two watchdog notices must come from it.
        notices.clear();
        notices.until("WATCHDOG=1");
        notices.clear();
        notices.until("WATCHDOG=1");
    }
    let last = newest.last().unwrap().0;
    Command::new("kill")
        .args(["-TERM", &last.to_string()])
        .status()
        .unwrap();
    notices.clear();
    notices.until("STOPPING=1");
}
