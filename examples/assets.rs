//! Writes the man page and the shell completions of the `ipgate` command line into a folder,
//! for the Debian package (`scripts/package`): `ipgate.1`, `ipgate.bash`, `_ipgate` (zsh) and
//! `ipgate.fish`. Both come from the same clap definition the binary parses with.

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/assets".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let cmd = ipgate::admin::cli::Cli::command();
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut man)?;
    std::fs::write(dir.join("ipgate.1"), man)?;
    for (shell, file) in [
        (Shell::Bash, "ipgate.bash"),
        (Shell::Zsh, "_ipgate"),
        (Shell::Fish, "ipgate.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "ipgate", &mut out);
        std::fs::write(dir.join(file), out)?;
    }
    Ok(())
}
