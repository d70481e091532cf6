//! Worker threads, one per CPU by default (`gateway.workers`). Each runs its own
//! single-threaded Tokio runtime with its own socket on every client listener (SO_REUSEPORT:
//! the kernel spreads new connections over the workers; a socket passed by systemd is one
//! socket the workers share instead) and its own upstream connection pool.
//! A client connection, its requests and their upstream connections therefore live on one
//! thread: no task migrates, no wake-up crosses threads and no pool lock is shared on the
//! request path. What the workers share is read-mostly: the [`AppState`] (snapshot behind an
//! `ArcSwap`, sharded temporary entries, atomic metrics).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;
use tracing::{error, warn};

use crate::config;
use crate::serve::listener;
use crate::serve::proxy::Context;
use crate::state::AppState;

/// The client listeners of one worker: its own socket for each configured listener.
pub type Sockets = Vec<(std::net::TcpListener, config::Listener)>;

/// The UDP sockets of the listeners with `http3 = true` (all served by the first worker).
pub type Quic = Vec<(std::net::UdpSocket, config::Listener)>;

/// Binds `count` listening sockets on `addr` (port 0: a free port, the same for all). More
/// than one share the port through SO_REUSEPORT; a single one is bound without it, so a port
/// another process holds is always an error.
pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut sockets: Vec<std::net::TcpListener> = Vec::with_capacity(count);
    let mut at = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        if count > 1 {
            socket.set_reuse_port(true)?;
        }
        socket.set_nonblocking(true)?;
        // Accepted sockets inherit both (Linux; `tests::accepted_sockets_inherit_...`):
        // a refused client is reset by a bare close, with no setsockopt per attempt, and an
        // admitted one turns lingering back off (`listener::accept_loop`).
        socket.set_linger(Some(std::time::Duration::ZERO))?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&at.into())?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        if at.port() == 0 {
            at = listener.local_addr()?;
        }
        sockets.push(listener);
    }
    Ok(sockets)
}

/// Listening sockets passed in by systemd's socket activation (`LISTEN_FDS`) or by the
/// process this one upgrades, each to be taken by the listener whose address it is bound to,
/// or whose name it has (`LISTEN_FDNAMES`; see [`socket_name`]).
pub struct Inherited(Vec<Option<(Held, String)>>);

/// An inherited socket: a TCP listener, or the UDP socket of an HTTP/3 listener.
enum Held {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Held {
    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Held::Tcp(l) => l.local_addr().ok(),
            Held::Udp(u) => u.local_addr().ok(),
        }
    }
}

/// The name under which an upgrade passes a socket: what it is for (`listener0`, `quic0`,
/// `admin`, `demo`; a listener's by its place in the config) and its configured address, so
/// a listener on port 0 (a free port) finds its own again. (`:` separates the names in
/// `LISTEN_FDNAMES`, so the address's colons become `_`.)
pub fn socket_name(kind: &str, addr: SocketAddr) -> String {
    format!("{kind}@{addr}").replace(':', "_")
}

/// `LISTEN_PID` must name the process the sockets are for, which is unknown before the
/// fork; an upgrade's new process checks this variable against its parent instead.
pub const UPGRADE_FROM: &str = "IPGATE_UPGRADE_FROM";

/// The pid of the process this one upgrades, when it is one (the variable names our
/// parent; one inherited from further up names someone else).
pub fn upgrading_from() -> Option<u32> {
    let from = std::env::var(UPGRADE_FROM).ok()?.parse::<u32>().ok()?;
    (from == std::os::unix::process::parent_id()).then_some(from)
}

impl Inherited {
    /// The TCP listening sockets in the environment: none without `LISTEN_FDS`, or unless
    /// `LISTEN_PID` names this process (systemd's rule; a variable inherited from a parent
    /// is not for us) or the process this one upgrades passed them. Taken sockets are
    /// close-on-exec; a socket that is not listening (`Accept=yes` passes connections) is
    /// refused.
    pub fn from_env() -> Inherited {
        let ours = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            == Some(std::process::id())
            || upgrading_from().is_some();
        if !ours {
            return Inherited(Vec::new());
        }
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .unwrap_or_default()
            .split(':')
            .map(str::to_string)
            .collect();
        let mut fds = listenfd::ListenFd::from_env();
        let list = (0..fds.len())
            .map(|i| {
                let name = names.get(i).cloned().unwrap_or_default();
                match fds.take_tcp_listener(i) {
                    Ok(Some(l)) if socket2::SockRef::from(&l).is_listener().unwrap_or(false) => {
                        Some((Held::Tcp(l), name))
                    }
                    Ok(_) => {
                        warn!(fd = i + 3, "an inherited socket is not listening (Accept=yes?): not served");
                        None
                    }
                    Err(e) => match fds.take_udp_socket(i) {
                        Ok(Some(u)) => Some((Held::Udp(u), name)),
                        _ => {
                            warn!(fd = i + 3, error = %e, "an inherited file descriptor is not a TCP or UDP socket: left alone");
                            None
                        }
                    },
                }
            })
            .collect();
        Inherited(list)
    }

    /// Every inherited socket named `name` or bound to `addr` (each is taken once): one
    /// from systemd, or a worker's each from the process this one upgrades.
    pub fn take(&mut self, addr: SocketAddr, name: &str) -> Vec<std::net::TcpListener> {
        let mut taken = Vec::new();
        for held in &mut self.0 {
            let ours = held.as_ref().is_some_and(|(h, n)| {
                matches!(h, Held::Tcp(_))
                    && (n == name || (addr.port() != 0 && h.local_addr() == Some(addr)))
            });
            if let Some((Held::Tcp(l), _)) = held.take_if(|_| ours) {
                taken.push(l);
            }
        }
        taken
    }

    /// The inherited UDP socket named `name` (an HTTP/3 listener's, from the process this
    /// one upgrades), or bound to `addr`.
    pub fn take_udp(&mut self, addr: SocketAddr, name: &str) -> Option<std::net::UdpSocket> {
        let held = self.0.iter_mut().find(|held| {
            held.as_ref().is_some_and(|(h, n)| {
                matches!(h, Held::Udp(_))
                    && (n == name || (addr.port() != 0 && h.local_addr() == Some(addr)))
            })
        })?;
        match held.take() {
            Some((Held::Udp(u), _)) => Some(u),
            _ => None,
        }
    }

    /// The addresses of inherited sockets no listener took.
    pub fn unused(&self) -> Vec<SocketAddr> {
        self.0
            .iter()
            .flatten()
            .filter_map(|(h, _)| h.local_addr())
            .collect()
    }
}

/// Spreads inherited sockets over `count` workers, every socket served: with fewer sockets
/// than workers, the workers share them (handles on one socket share its accept queue);
/// with more, a worker serves several. None is closed: closing a member of an SO_REUSEPORT
/// group would drop the connections waiting in its queue.
pub fn share(
    sockets: Vec<std::net::TcpListener>,
    count: usize,
) -> std::io::Result<Vec<Vec<std::net::TcpListener>>> {
    let count = count.max(1);
    let mut workers: Vec<Vec<std::net::TcpListener>> = (0..count).map(|_| Vec::new()).collect();
    for l in &sockets {
        l.set_nonblocking(true)?;
        let socket = socket2::SockRef::from(l);
        socket.set_linger(Some(std::time::Duration::ZERO))?;
        socket.set_tcp_nodelay(true)?;
    }
    let k = sockets.len();
    if k == 0 {
        return Ok(workers);
    }
    for w in k..count {
        workers[w].push(sockets[w % k].try_clone()?);
    }
    for (i, l) in sockets.into_iter().enumerate() {
        workers[i % count].push(l);
    }
    Ok(workers)
}

/// Runs one worker thread until `stop` turns true and its connections have finished (or
/// `limits.shutdown_grace` is over). Blocks the calling thread.
pub fn run(state: Arc<AppState>, sockets: Sockets, quic: Quic, stop: watch::Receiver<bool>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start a worker runtime; its sockets are closed");
            return;
        }
    };
    runtime.block_on(async move {
        let worker = Arc::new(Context {
            state,
            upstream: Arc::default(),
            stop: stop.clone(),
            upgrades: tokio_util::task::TaskTracker::new(),
        });
        let graceful = GracefulShutdown::new();
        let loops = sockets.into_iter().map(|(socket, conf)| {
            listener::accept_loop(worker.clone(), socket, conf, &graceful, stop.clone())
        });
        let quic = quic.into_iter().map(|(socket, conf)| {
            crate::serve::quic::serve(worker.clone(), socket, conf, &graceful, stop.clone())
        });
        tokio::join!(
            futures_util::future::join_all(loops),
            futures_util::future::join_all(quic)
        );
        if worker
            .state
            .handed_over
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            last_call(&graceful).await;
        }
        let grace = worker.state.snapshot.load().config.limits.shutdown_grace;
        // Requests in flight, then upgraded connections (which close themselves when the
        // grace period is over), get the grace period.
        let finished = async {
            graceful.shutdown().await;
            worker.upgrades.close();
            worker.upgrades.wait().await;
        };
        if tokio::time::timeout(grace, finished).await.is_err() {
            warn!(
                ?grace,
                "grace period over, closing the connections still open"
            );
        }
    });
    // Tasks still running (a jail ban being written) get a moment to finish.
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// The longest an upgraded process waits for its HTTP/1 keep-alive connections to close
/// after their next response (`Connection: close`), before closing the idle ones: a
/// client sending on an idle connection just as it is closed would see a reset.
const LAST_CALL: Duration = Duration::from_secs(1);

async fn last_call(graceful: &GracefulShutdown) {
    let until = tokio::time::Instant::now() + LAST_CALL;
    while graceful.count() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_share_one_port_and_a_taken_port_is_an_error() {
        let sockets = bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = sockets[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(sockets
            .iter()
            .all(|s| s.local_addr().unwrap().port() == port));
        // A single socket is bound without SO_REUSEPORT: the port is exclusive both ways.
        let single = bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let taken = single[0].local_addr().unwrap();
        assert!(bind(taken, 1).is_err());
        assert!(bind(taken, 2).is_err());
    }

    /// The listener relies on this: a refused connection is reset by a bare close.
    #[test]
    fn accepted_sockets_inherit_zero_linger_and_nodelay() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 1).unwrap().remove(0);
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert_eq!(sock.linger().unwrap(), Some(std::time::Duration::ZERO));
        assert!(sock.tcp_nodelay().unwrap());
    }
}
