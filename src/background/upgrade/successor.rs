//! The new process's side of an upgrade: it says when its config, lists and certificates
//! are loaded, waits until the old process has closed the store, says when it serves, then
//! takes the entries the old process enforced after closing the store.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::{Gap, CLOSED, ERROR, LOADED, SERVING};
use crate::serve::worker::upgrading_from;
use crate::state::AppState;

/// The longest the old process may take to close the store once told to.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// This process's line to the process it takes over from.
pub struct Successor {
    control: BufReader<UnixStream>,
}

impl Successor {
    /// The control socket (our standard input), when this process was started by
    /// `ipgate upgrade`.
    pub fn from_env() -> Option<Successor> {
        upgrading_from()?;
        let stdin = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
        let stream = UnixStream::from(stdin);
        // Standard input of another kind fails here, and the variable is ignored.
        stream.set_read_timeout(Some(CLOSE_WAIT)).ok()?;
        Some(Successor {
            control: BufReader::new(stream),
        })
    }

    fn say(&mut self, line: &str) -> std::io::Result<()> {
        self.control
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
    }

    /// Config, lists and certificates are loaded and the sockets taken; waits until the old
    /// process has closed the store (only one process may hold it).
    pub fn loaded(&mut self) -> Result<(), String> {
        self.say(LOADED)
            .map_err(|e| format!("upgrade: cannot reach the old process: {e}"))?;
        let mut line = String::new();
        match self.control.read_line(&mut line) {
            Ok(_) if line.trim_end() == CLOSED => Ok(()),
            Ok(0) => Err("upgrade: the old process went away before closing the store".into()),
            Ok(_) => Err(format!("upgrade: unexpected answer {:?}", line.trim_end())),
            Err(e) => Err(format!(
                "upgrade: the old process did not close the store: {e}"
            )),
        }
    }

    /// Tells the old process why this one cannot take over (it keeps serving).
    pub fn failed(mut self, why: &str) {
        let _ = self.say(&format!("{ERROR} {}", why.replace('\n', "; ")));
    }

    /// Serving: the old process stops accepting and finishes its requests. Then takes, in
    /// the background, the entries it enforces after it closed the store. False when the
    /// old process cannot be told (it gave up on this one, which must then stop).
    pub fn serving(mut self, state: Arc<AppState>) -> bool {
        if let Err(e) = self.say(&format!("{SERVING} {}", std::process::id())) {
            warn!(error = %e, "upgrade: cannot tell the old process that this one serves");
            return false;
        }
        state.metrics.upgrades.with_label_values(&["ok"]).inc();
        let control = self.control.into_inner();
        let _ = control.set_read_timeout(None);
        let _ = control.set_nonblocking(true);
        if let Ok(control) = tokio::net::UnixStream::from_std(control) {
            tokio::spawn(take_gap(state, control));
        }
        true
    }
}

/// Applies every entry the old process passes, until it closes the socket (it exits).
async fn take_gap(state: Arc<AppState>, control: tokio::net::UnixStream) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(control).lines();
    let mut taken = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        if line == super::QUIC_RELEASED {
            info!("upgrade: the old process closed its QUIC connections; HTTP/3 served here");
            state.quic.ours.send_replace(true);
            continue;
        }
        let Ok(gap) = serde_json::from_str::<Gap>(&line) else {
            warn!(line = %line, "upgrade: cannot read an entry the old process passed");
            continue;
        };
        let entry = gap.entry.entry();
        if entry.expires_at <= crate::decide::clock::now_ms() {
            continue;
        }
        if let Err(e) = state.add_entry(gap.action, gap.target, entry).await {
            warn!(error = %e, "upgrade: an entry passed by the old process is not durable yet");
        }
        taken += 1;
    }
    // The old process is gone: its QUIC endpoints with it.
    state.quic.ours.send_replace(true);
    if taken > 0 {
        info!(
            entries = taken,
            "upgrade: took the entries the old process made after closing the store"
        );
    }
}
