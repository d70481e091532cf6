//! The `ipgate` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use ipgate::admin::cli::{Cli, Command, JailCommand};
use ipgate::config::Config;
use ipgate::observe::metrics::Metrics;
use ipgate::state::Snapshot;
use ipgate::Gateway;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command.as_ref().unwrap_or(&Command::Run) {
        Command::Check => check(&cli.config),
        Command::Schema => {
            println!("{}", ipgate::config::schema());
            ExitCode::SUCCESS
        }
        Command::Run => run(&cli.config),
        Command::Overview { lang, format } => overview(&cli.config, lang, format),
        Command::Jail(JailCommand::Test { name, input }) => jail_test(&cli.config, name, input),
        command => admin(&cli, command),
    }
}

fn admin(cli: &Cli, command: &Command) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(ipgate::admin::cli::admin_command(cli, command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn overview(path: &std::path::Path, lang: &str, format: &str) -> ExitCode {
    use ipgate::state::overview::{html, markdown, Lang};
    let lang = Lang::parse(lang).unwrap_or(Lang::En);
    match Config::load(path) {
        Ok(c) => {
            match format {
                "html" => print!("{}", html(&c, lang, None)),
                _ => print!("{}", markdown(&c, lang)),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ipgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn jail_test(path: &std::path::Path, name: &str, input: &Option<String>) -> ExitCode {
    let result = Config::load(path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .and_then(|c| ipgate::background::logjail::dry::run(&c, name, input.as_deref()));
    match result {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ipgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let result = Config::load(path).and_then(|c| {
        let firewall = c.firewall.clone();
        let notes = c.notes();
        Snapshot::build(c, &Metrics::new(), None).map(|_| (firewall, notes))
    });
    match result {
        Ok((firewall, notes)) => {
            println!("{}: ok", path.display());
            for note in notes {
                eprintln!("{}: note: {note}", path.display());
            }
            if let Some(f) = firewall {
                // Not a config error (the service may hold the right); said all the same.
                if !ipgate::background::firewall::has_net_admin() {
                    eprintln!(
                        "{}: note: [firewall] needs CAP_NET_ADMIN, which this process lacks: \
                         `ipgate run` as this user would refuse to start",
                        path.display()
                    );
                }
                if !ipgate::background::firewall::nft_found(&f.nft) {
                    eprintln!(
                        "{}: note: firewall.nft: '{}' is not found (apt install nftables)",
                        path.display(),
                        f.nft.display()
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    // Client connections run on the worker threads (`ipgate::serve::worker`), each with its own
    // runtime; this one serves the admin API, signals, the sweeper and the file watcher.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ipgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Started by `ipgate upgrade`: the old process is told why, when this one fails.
        let mut successor = ipgate::background::upgrade::Successor::from_env();
        let failed = |successor: &mut Option<_>, why: String| {
            eprintln!("{why}");
            if let Some(s) = Option::<ipgate::background::upgrade::Successor>::take(successor) {
                s.failed(&why);
            }
            ExitCode::FAILURE
        };
        let config = match Config::load(path) {
            Ok(c) => c,
            Err(errors) => return failed(&mut successor, errors.to_string()),
        };
        let gateway = match Gateway::bind_with(config, &mut successor).await {
            Ok(g) => g,
            Err(e) => return failed(&mut successor, format!("ipgate: {e}")),
        };
        gateway.run(ipgate::background::shutdown::terminate()).await;
        ExitCode::SUCCESS
    })
}
