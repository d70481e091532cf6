//! Accepting client connections, on a thread of their own per listening socket (SPEC 3, 16).
//!
//! The thread blocks in `accept` and decides at once: a blocked client, one over
//! `limits.max_connections_per_client`, or one over `limits.max_connections` is reset right
//! there (the socket inherited zero linger from the listening socket, see [`crate::worker`],
//! so a bare close is an RST with no TIME_WAIT left behind). An admitted connection is handed
//! to its worker's event loop, which does everything else.
//!
//! Why a thread: on a worker busy serving keep-alive clients, the accept task waits its turn
//! behind every ready connection, so under load a refused attempt waited ~0.3 ms for its
//! reset, and a large enough flood could fill the accept queue legitimate clients need. Here
//! refusing never waits for request work. Each worker keeps its own SO_REUSEPORT socket, so
//! the kernel still spreads connections over the workers and a connection still lives on
//! one thread.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tracing::warn;

use crate::client_addr;
use crate::clients::ClientSlot;
use crate::config;
use crate::listener::admit_client;
use crate::state::AppState;

/// How often a thread blocked in `accept` looks whether shutdown has started.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// A connection the acceptor let in, on its way to a worker.
pub struct Admitted {
    pub tcp: std::net::TcpStream,
    pub peer: SocketAddr,
    /// The peer's address (a PROXY header may name another client later).
    pub client: IpAddr,
    /// Its place under the per-client cap (`None`: exempt, or decided after the PROXY header).
    pub client_slot: Option<ClientSlot>,
    /// Its place under `limits.max_connections`.
    pub permit: OwnedSemaphorePermit,
    /// When its first request head is due (`limits.header_read_timeout` after accept, TLS
    /// and PROXY header included).
    pub head_by: Instant,
}

/// Starts the acceptor thread of one listening socket; admitted connections go to `to`.
pub fn spawn(
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    conf: config::Listener,
    to: mpsc::UnboundedSender<Admitted>,
    stop: watch::Receiver<bool>,
    name: String,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(false)?;
    // A blocking accept that returns now and then, to notice shutdown.
    socket2::SockRef::from(&listener).set_read_timeout(Some(STOP_CHECK))?;
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run(&state, &listener, &conf, &to, &stop))
}

fn run(
    state: &AppState,
    listener: &std::net::TcpListener,
    conf: &config::Listener,
    to: &mpsc::UnboundedSender<Admitted>,
    stop: &watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let (tcp, peer) = match listener.accept() {
            Ok(a) => a,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // Out of descriptors and the like: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let Some(admitted) = admit(state, conf, tcp, peer) else {
            continue;
        };
        if to.send(admitted).is_err() {
            // The worker has stopped.
            return;
        }
    }
}

/// The decision on one accepted connection; `None`: it was reset.
fn admit(
    state: &AppState,
    conf: &config::Listener,
    tcp: std::net::TcpStream,
    peer: SocketAddr,
) -> Option<Admitted> {
    let client = client_addr::peer(peer);
    // The address is known now (unless a PROXY header will name it): a blocked client is
    // closed before a byte is read (SPEC 3), and a client over its connection cap too
    // (SPEC 16), before either can take a connection slot.
    let client_slot = if conf.proxy_protocol {
        None
    } else {
        match admit_client(state, client) {
            Ok(slot) => slot,
            Err(reason) => {
                reason.inc();
                return None;
            }
        }
    };
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        state.metrics.rejected.max_connections.inc();
        return None;
    };
    // Admitted: a normal close again (a reset would drop a response still in the send
    // buffer).
    if let Err(e) = socket2::SockRef::from(&tcp).set_linger(None) {
        warn!(error = %e, "cannot set up a connection");
        return None;
    }
    let header_read_timeout = state.snapshot.load().config.limits.header_read_timeout;
    Some(Admitted {
        tcp,
        peer,
        client,
        client_slot,
        permit,
        head_by: Instant::now() + header_read_timeout,
    })
}
