//! The command line: `run` (the default) and `check`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "ipgate",
    version,
    about = "TLS-terminating reverse proxy with IP block and allow lists"
)]
pub struct Cli {
    /// Config file.
    #[arg(short = 'c', long = "config", global = true, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config, its list files and certificates; name every problem.
    Check,
}
