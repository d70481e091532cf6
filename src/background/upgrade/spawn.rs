//! Starting the successor with the listening sockets, by systemd's socket-passing convention
//! (`LISTEN_FDS` sockets from descriptor 3 on), and a control socket as its standard input.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::serve::worker::UPGRADE_FROM;

/// The binary this process was started from, as it is named on disk (after a package
/// upgrade replaced the file, `/proc/self/exe` reads "PATH (deleted)"; the path is what
/// is wanted: the new file).
pub fn binary() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// Starts `exe` with this process's arguments, `sockets` as descriptors 3.. (named by
/// `names`), and `control` as its standard input. Every other descriptor is closed on exec
/// (Rust opens them close-on-exec). The child's stdout and stderr are ours: its log goes
/// where ours goes.
pub fn successor(
    exe: &Path,
    sockets: Vec<(OwnedFd, String)>,
    control: OwnedFd,
) -> std::io::Result<tokio::process::Child> {
    use command_fds::{CommandFdExt, FdMapping};
    let names: Vec<String> = sockets.iter().map(|(_, name)| name.clone()).collect();
    let mappings: Vec<FdMapping> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (fd, _))| FdMapping {
            parent_fd: fd,
            child_fd: 3 + i as i32,
        })
        .collect();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut command = tokio::process::Command::new(exe);
    command
        .args(args)
        .env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("LISTEN_PID", "")
        .env(UPGRADE_FROM, std::process::id().to_string())
        .stdin(std::process::Stdio::from(control));
    if crate::background::systemd::watched() {
        // systemd set it to the first process; the new one looks for its parent's pid.
        command.env("WATCHDOG_PID", std::process::id().to_string());
    } else {
        command
            .env_remove("WATCHDOG_PID")
            .env_remove("WATCHDOG_USEC");
    }
    command.env_remove("LISTEN_FDS_FIRST_FD");
    command
        .fd_mappings(mappings)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    command.spawn()
}
