//! Connections over a client's cap from a client that keeps reconnecting, held unread and
//! then reset. A client over `limits.max_connections_per_client` is reset at accept; one
//! refused more than [`REPEATED`] times in a second is reconnecting as fast as it is reset
//! (a silent holder reopening every connection it loses), and resetting it only feeds its
//! loop. Its connection is held instead: accepted by the kernel, never read, never
//! registered with the event loop (so it costs no CPU while held), and reset after
//! [`HOLD`]. It never reaches TLS, and it is counted as refused (`per_client`) as before.
//!
//! Each listener of each worker has a tarpit, and together they hold at most [`CAPACITY`]
//! connections (the gauge counts them all); when full, a tarpit's oldest is reset to make
//! room, so the descriptors they take stay bounded, whatever the number of workers.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::time::{Instant, Sleep};

/// Refusals in one second above which a client's next over-cap connections are held.
pub const REPEATED: u32 = 64;
/// How long a held connection is kept before it is reset.
pub const HOLD: Duration = Duration::from_secs(30);
/// Connections the whole process holds at most.
pub const CAPACITY: usize = 1024;

/// One worker's held connections, oldest first (all are held for the same time, so they
/// also expire in this order), and the timer of the next one due.
pub struct Tarpit {
    held: VecDeque<(Instant, mio::net::TcpStream)>,
    /// Armed only while a connection is held: no timer per accept.
    due: Pin<Box<Sleep>>,
    capacity: usize,
    gauge: IntGauge,
}

impl Tarpit {
    /// A tarpit within a budget of `capacity` connections, counted by `gauge` across every
    /// tarpit sharing it ([`CAPACITY`] on the listeners).
    pub fn new(capacity: usize, gauge: IntGauge) -> Tarpit {
        Tarpit {
            held: VecDeque::new(),
            due: Box::pin(tokio::time::sleep_until(Instant::now())),
            capacity,
            gauge,
        }
    }

    /// Holds `tcp` for [`HOLD`], resetting the oldest when the budget is spent.
    pub fn hold(&mut self, tcp: mio::net::TcpStream) {
        let now = Instant::now();
        // The budget is the whole process's (the gauge counts every listener's tarpit):
        // when it is spent, this tarpit's oldest makes room, or the new one is reset.
        if self.gauge.get() >= self.capacity as i64 {
            if self.held.pop_front().is_none() {
                return;
            }
            self.gauge.dec();
        }
        if self.held.is_empty() {
            self.due.as_mut().reset(now + HOLD);
        }
        self.held.push_back((now + HOLD, tcp));
        self.gauge.inc();
    }

    /// Whether a connection is held (and [`Tarpit::due`] worth waiting for).
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// Ready when the oldest held connection's time may be up.
    pub async fn due(&mut self) {
        self.due.as_mut().await;
    }

    /// Resets the connections whose time is up.
    pub fn expire(&mut self) {
        let now = Instant::now();
        while self.held.front().is_some_and(|(until, _)| *until <= now) {
            self.held.pop_front();
            self.gauge.dec();
        }
        if let Some((next, _)) = self.held.front() {
            self.due.as_mut().reset(*next);
        }
    }
}

impl Drop for Tarpit {
    fn drop(&mut self) {
        self.gauge.sub(self.held.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// A connection accepted from `listener`, as the accept loop has it (zero linger, so a
    /// drop resets it), and the client's end.
    fn accepted(listener: &std::net::TcpListener) -> (mio::net::TcpStream, std::net::TcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        (mio::net::TcpStream::from_std(server), client)
    }

    fn reset(client: &mut std::net::TcpStream) -> bool {
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 1];
        match client.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn held_connections_are_reset_when_due_and_the_oldest_makes_room() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gauge = IntGauge::new("held", "held").unwrap();
        let mut tarpit = Tarpit::new(2, gauge.clone());
        let (a, mut a_client) = accepted(&listener);
        tarpit.hold(a);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (b, _b_client) = accepted(&listener);
        tarpit.hold(b);
        assert!(tarpit.holds());
        assert_eq!(gauge.get(), 2);
        // Full: the oldest is reset to make room.
        tokio::time::advance(Duration::from_secs(1)).await;
        let (c, _c_client) = accepted(&listener);
        tarpit.hold(c);
        assert_eq!(gauge.get(), 2);
        assert!(reset(&mut a_client), "the oldest was not reset");
        // Another tarpit in the same budget, holding none: its new one is reset at once.
        let mut other = Tarpit::new(2, gauge.clone());
        let (d, mut d_client) = accepted(&listener);
        other.hold(d);
        assert!(!other.holds());
        assert_eq!(gauge.get(), 2);
        assert!(reset(&mut d_client), "held past the budget");
        // Not due yet, then due one after the other.
        tokio::time::advance(HOLD - Duration::from_millis(1001)).await;
        tarpit.expire();
        assert_eq!(gauge.get(), 2);
        tokio::time::advance(Duration::from_millis(2)).await;
        tarpit.expire();
        assert_eq!(gauge.get(), 1, "b was due");
        tokio::time::timeout(Duration::from_secs(2), tarpit.due())
            .await
            .expect("the timer is armed for c");
        tarpit.expire();
        assert_eq!(gauge.get(), 0);
        assert!(!tarpit.holds());
        drop(tarpit);
        assert_eq!(gauge.get(), 0);
    }
}
