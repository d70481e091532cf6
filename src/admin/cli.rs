//! The command line: `run` (the default) and `check` act on the config; the admin commands
//! (`ban`, `unban`, `allow`, `disallow`, `list`, `lookup`, `forget`, `reload`) call the
//! running gateway's admin API, found through the same config file or `--admin` and
//! `--token-file`. Errors are one line on stderr with a non-zero exit.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::admin::api::{
    ApiError, CounterView, EntryView, Forgotten, LimitView, Lookup, NewEntry, OffenseView,
    ReloadRefused, Reloaded, RuleView,
};
use crate::config::{Action, Config, DEFAULT_CONFIG_PATH};

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
    /// Admin API base URL (default: from the config's admin.addr), e.g. http://127.0.0.1:9191
    #[arg(long, global = true)]
    pub admin: Option<String>,
    /// File holding the admin token (default: the config's admin.token_file).
    #[arg(long = "token-file", global = true)]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config, its list files and certificates; name every problem.
    Check,
    /// Add a temporary block entry for an address or CIDR.
    Ban(EntryArgs),
    /// Remove a temporary block entry.
    Unban {
        target: String,
        /// Only the block entry scoped to this site (default: the target's block entries in
        /// every scope).
        #[arg(long)]
        site: Option<String>,
    },
    /// Add a temporary allow entry for an address or CIDR.
    Allow(EntryArgs),
    /// Remove a temporary allow entry.
    Disallow { target: String },
    /// Every entry, static and temporary.
    List {
        /// Only block entries.
        #[arg(long, conflicts_with_all = ["allow", "pass"])]
        block: bool,
        /// Only allow entries.
        #[arg(long, conflicts_with = "pass")]
        allow: bool,
        /// Only passes (solved challenges).
        #[arg(long)]
        pass: bool,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// The decision for an address, why, and every datum held about it.
    Lookup {
        ip: String,
        #[arg(long)]
        json: bool,
    },
    /// Erase every datum held about an address that is not configuration.
    Forget { ip: String },
    /// Reload the config (same as SIGHUP).
    Reload,
    /// Start the binary on disk with the same config and hand it the listening sockets
    /// and the state, without refusing a connection (same as SIGUSR2). Exits non-zero,
    /// naming why, when the new process does not take over (the old one serves on).
    Upgrade,
    /// Every certificate served: names, source, expiry and, for ACME, the next renewal.
    Certs {
        #[arg(long)]
        json: bool,
    },
    /// Jails: try a log jail on a log.
    #[command(subcommand)]
    Jail(JailCommand),
    /// Print the JSON Schema of the config file (for editors: taplo, Even Better TOML).
    Schema,
    /// Write the security overview for visitors from the config: what is stored about their
    /// addresses, why, for how long, where, and how to ask about it.
    Overview {
        #[arg(long, default_value = "en", value_parser = ["en", "nl"])]
        lang: String,
        #[arg(long, default_value = "md", value_parser = ["md", "html"])]
        format: String,
    },
    /// Force a site's challenge: on (every client without a pass), off, auto (while its
    /// upstream is saturated), or config (back to the config's mode). Holds until changed,
    /// across reloads, not restarts.
    Challenge {
        site: String,
        #[arg(value_parser = ["on", "off", "auto", "config"])]
        mode: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JailCommand {
    /// Run a log jail's parsing and patterns over a log, banning nobody: lines read,
    /// matched and ignored, the addresses it would count, and the first lines that did not
    /// parse (like fail2ban-regex).
    Test {
        /// The jail's name in the config.
        name: String,
        /// A log file, or - for standard input (journalctl --output=json lines are read as
        /// journal entries); default: the jail's own files or journal, from their start.
        input: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct EntryArgs {
    /// IPv4 or IPv6 address or CIDR.
    pub target: String,
    /// How long, like 90s, 10m, 1h, 7d (default: gateway.default_ban).
    #[arg(long)]
    pub ttl: Option<String>,
    /// Why, kept with the entry.
    #[arg(long)]
    pub reason: Option<String>,
    /// Block on this site only (its `name`, or its first host); other sites serve the client.
    #[arg(long)]
    pub site: Option<String>,
}

/// Talks to the admin API.
pub struct AdminClient {
    authority: String,
    token: String,
}

impl AdminClient {
    /// Finds the admin address and token from the flags, else from the config file.
    pub fn from_cli(cli: &Cli) -> anyhow::Result<AdminClient> {
        let config = if cli.admin.is_none() || cli.token_file.is_none() {
            let c = Config::load(&cli.config).map_err(|e| {
                anyhow!(
                    "{} (use --admin and --token-file to skip the config)",
                    e.to_string().lines().next().unwrap_or_default()
                )
            })?;
            Some(c)
        } else {
            None
        };
        let admin = config.as_ref().and_then(|c| c.admin.clone());
        let authority = match &cli.admin {
            Some(url) => {
                let uri: http::Uri = url.parse().context("--admin is not a URL")?;
                uri.authority()
                    .map(|a| a.to_string())
                    .ok_or_else(|| anyhow!("--admin has no host:port"))?
            }
            None => admin
                .as_ref()
                .map(|a| a.addr.to_string())
                .ok_or_else(|| anyhow!("the config has no [admin] section"))?,
        };
        let token_file = match &cli.token_file {
            Some(f) => f.clone(),
            None => admin
                .map(|a| a.token_file)
                .ok_or_else(|| anyhow!("the config has no [admin] section"))?,
        };
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("cannot read the admin token {}", token_file.display()))?
            .trim()
            .to_string();
        Ok(AdminClient { authority, token })
    }

    /// One request; returns the status and the body.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.authority))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", &self.authority)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}

/// The API's `{"error": ...}` message, or the status.
fn api_error(status: StatusCode, body: &[u8]) -> anyhow::Error {
    let msg = serde_json::from_slice::<ApiError>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| status.to_string());
    anyhow!("{msg}")
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Runs an admin command; prints its result on stdout.
pub async fn admin_command(cli: &Cli, command: &Command) -> anyhow::Result<()> {
    let client = AdminClient::from_cli(cli)?;
    match command {
        Command::Ban(a) | Command::Allow(a) => ban_or_allow(&client, command, a).await,
        Command::Unban { target, site } => remove(&client, command, target, site.as_deref()).await,
        Command::Disallow { target } => remove(&client, command, target, None).await,
        Command::List {
            block,
            allow,
            pass,
            json,
        } => list(&client, (*block, *allow, *pass), *json).await,
        Command::Challenge { site, mode } => challenge(&client, site, mode).await,
        Command::Lookup { ip, json } => lookup(&client, ip, *json).await,
        Command::Forget { ip } => forget(&client, ip).await,
        Command::Reload => reload(&client).await,
        Command::Upgrade => upgrade(&client).await,
        Command::Certs { json } => certs(&client, *json).await,
        Command::Run
        | Command::Check
        | Command::Jail(_)
        | Command::Schema
        | Command::Overview { .. } => Ok(()),
    }
}

async fn ban_or_allow(
    client: &AdminClient,
    command: &Command,
    a: &EntryArgs,
) -> anyhow::Result<()> {
    let action = if matches!(command, Command::Ban(_)) {
        Action::Block
    } else {
        Action::Allow
    };
    let body = serde_json::to_value(NewEntry {
        target: a.target.clone(),
        action,
        ttl: a.ttl.clone(),
        reason: a.reason.clone(),
        site: a.site.clone(),
    })?;
    let (status, bytes) = client.call(Method::POST, "/v1/entries", Some(body)).await?;
    if status != StatusCode::CREATED {
        return Err(api_error(status, &bytes));
    }
    let e: EntryView = serde_json::from_slice(&bytes)?;
    println!(
        "{} {} until {}",
        if action == Action::Block {
            "blocked"
        } else {
            "allowed"
        },
        e.target,
        e.expires_at.unwrap_or_default()
    );
    Ok(())
}

async fn remove(
    client: &AdminClient,
    command: &Command,
    target: &str,
    site: Option<&str>,
) -> anyhow::Result<()> {
    let action = if matches!(command, Command::Unban { .. }) {
        Action::Block
    } else {
        Action::Allow
    };
    let mut path = format!("/v1/entries?target={}&action={action}", encode(target));
    if let Some(site) = site {
        path.push_str(&format!("&site={}", encode(site)));
    }
    let (status, bytes) = client.call(Method::DELETE, &path, None).await?;
    match status {
        StatusCode::NO_CONTENT => {
            println!("removed the temporary {action} entry for {target}")
        }
        StatusCode::NOT_FOUND => bail!("no temporary {action} entry for {target}"),
        _ => return Err(api_error(status, &bytes)),
    }
    Ok(())
}

async fn list(
    client: &AdminClient,
    (block, allow, pass): (bool, bool, bool),
    json: bool,
) -> anyhow::Result<()> {
    let path = match (block, allow, pass) {
        (true, _, _) => "/v1/entries?list=block",
        (_, true, _) => "/v1/entries?list=allow",
        (_, _, true) => "/v1/entries?list=pass",
        _ => "/v1/entries",
    };
    let (status, bytes) = client.call(Method::GET, path, None).await?;
    if status != StatusCode::OK {
        return Err(api_error(status, &bytes));
    }
    if json {
        println!("{}", String::from_utf8_lossy(&bytes));
    } else {
        let entries: Vec<EntryView> = serde_json::from_slice(&bytes)?;
        print_entries(&entries);
    }
    Ok(())
}

async fn challenge(client: &AdminClient, site: &str, mode: &str) -> anyhow::Result<()> {
    let path = format!("/v1/sites/{}/challenge", encode(site));
    let body = serde_json::json!({ "mode": mode });
    let (status, bytes) = client.call(Method::PUT, &path, Some(body)).await?;
    if status != StatusCode::OK {
        return Err(api_error(status, &bytes));
    }
    let v: crate::admin::api::ChallengeView = serde_json::from_slice(&bytes)?;
    let how = match v.forced {
        Some(_) => format!("forced; the config says {}", v.configured.as_str()),
        None => "as configured".to_string(),
    };
    println!(
        "{}: challenge {} ({how}); {}",
        v.site,
        v.mode.as_str(),
        if v.challenging {
            "challenging every client without a pass now"
        } else {
            "not challenging now"
        }
    );
    Ok(())
}

async fn lookup(client: &AdminClient, ip: &str, json: bool) -> anyhow::Result<()> {
    let (status, bytes) = client
        .call(Method::GET, &format!("/v1/ips/{}", encode(ip)), None)
        .await?;
    if status != StatusCode::OK {
        return Err(api_error(status, &bytes));
    }
    if json {
        println!("{}", String::from_utf8_lossy(&bytes));
    } else {
        print_lookup(&serde_json::from_slice::<Lookup>(&bytes)?);
    }
    Ok(())
}

async fn forget(client: &AdminClient, ip: &str) -> anyhow::Result<()> {
    let (status, bytes) = client
        .call(Method::DELETE, &format!("/v1/ips/{}", encode(ip)), None)
        .await?;
    if status != StatusCode::OK {
        return Err(api_error(status, &bytes));
    }
    let f: Forgotten = serde_json::from_slice(&bytes)?;
    println!(
        "erased {} temporary entr{} for {ip}",
        f.erased.len(),
        if f.erased.len() == 1 { "y" } else { "ies" }
    );
    print_entries(&f.erased);
    if print_client_state(
        &f.erased_rate_limits,
        &f.erased_jail_counters,
        &f.erased_offenses,
    ) {
        println!("(the rate-limit, jail and offense data above was erased)");
    }
    let kept = [f.kept.entries, f.kept.config_entries].concat();
    if !kept.is_empty() {
        println!("kept (about a wider network, or configuration):");
        print_entries(&kept);
    }
    Ok(())
}

async fn certs(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let (status, bytes) = client.call(Method::GET, "/v1/certificates", None).await?;
    if status != StatusCode::OK {
        return Err(api_error(status, &bytes));
    }
    if json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let certs: Vec<crate::admin::api::CertificateView> = serde_json::from_slice(&bytes)?;
    println!(
        "{:<22} {:<11} {:<22} NAMES",
        "NOT AFTER", "SOURCE", "NEXT RENEWAL"
    );
    for c in certs {
        let source = serde_json::to_value(c.source)?;
        println!(
            "{:<22} {:<11} {:<22} {}{}",
            c.not_after,
            source.as_str().unwrap_or("?"),
            c.next_renewal.as_deref().unwrap_or("-"),
            c.names.join(","),
            c.file.map(|f| format!("  ({f})")).unwrap_or_default()
        );
    }
    Ok(())
}

async fn reload(client: &AdminClient) -> anyhow::Result<()> {
    let (status, bytes) = client.call(Method::POST, "/v1/reload", None).await?;
    if status == StatusCode::OK {
        let r: Reloaded = serde_json::from_slice(&bytes)?;
        let lists: Vec<String> = r.lists.iter().map(|(n, c)| format!("{n}={c}")).collect();
        println!("reloaded: {} site(s), lists {}", r.sites, lists.join(" "));
        if !r.restart_required.is_empty() {
            println!(
                "needs a restart to take effect: {}",
                r.restart_required.join(", ")
            );
        }
    } else if status == StatusCode::UNPROCESSABLE_ENTITY {
        let r: ReloadRefused = serde_json::from_slice(&bytes)?;
        for e in &r.errors {
            eprintln!("{}", e.text);
        }
        bail!(
            "reload refused ({} problem(s)); the running config stays in force",
            r.errors.len()
        );
    } else {
        return Err(api_error(status, &bytes));
    }
    Ok(())
}

async fn upgrade(client: &AdminClient) -> anyhow::Result<()> {
    let (status, bytes) = client.call(Method::POST, "/v1/upgrade", None).await?;
    if status != StatusCode::OK {
        return Err(
            api_error(status, &bytes).context("upgrade failed; the running process serves on")
        );
    }
    let done: serde_json::Value = serde_json::from_slice(&bytes)?;
    println!("upgraded: the new process (pid {}) serves", done["pid"]);
    Ok(())
}

fn print_entries(entries: &[EntryView]) {
    if entries.is_empty() {
        return;
    }
    println!(
        "{:<43} {:<6} {:<12} {:<10} {:<21} {:<16} REASON",
        "TARGET", "ACTION", "LIST", "SOURCE", "EXPIRES", "SCOPE"
    );
    for e in entries {
        println!(
            "{:<43} {:<6} {:<12} {:<10} {:<21} {:<16} {}",
            e.target,
            e.action,
            e.list,
            e.source,
            e.expires_at.as_deref().unwrap_or("-"),
            e.scope.as_deref().unwrap_or("everywhere"),
            e.reason.as_deref().unwrap_or("")
        );
    }
}

fn print_lookup(v: &Lookup) {
    let why = match &v.rule {
        Some(RuleView::Static { list, .. }) => {
            format!("static list {}", list.as_deref().unwrap_or("?"))
        }
        Some(RuleView::Temporary { entry }) => {
            format!("temporary entry {} ({})", entry.target, entry.source)
        }
        None => "no entry matches".to_string(),
    };
    println!("{}: {} ({why})", v.ip, v.decision);
    if v.asn.is_some() || v.country.is_some() {
        let asn = v.asn.map_or("unknown".into(), |a| format!("AS{a}"));
        let country = v.country.as_deref().unwrap_or("unknown");
        println!("network: {asn}, country {country}");
    }
    for g in &v.geo_rules {
        println!("  {} list {} holds it by {}", g.action, g.list, g.matched);
    }
    let mut held_state = print_client_state(&v.rate_limits, &v.jail_counters, &v.offenses);
    if let Some(n) = v.refused_last_hour {
        println!("refused in the last hour: {n} request(s) (kept an hour after the last)");
        held_state = true;
    }
    if !v.ban_records.is_empty() {
        println!("bans recorded here: {}", v.ban_records.join(", "));
        held_state = true;
    }
    if v.entries.is_empty() && v.config_entries.is_empty() && !held_state {
        println!("nothing is held about this address");
    } else {
        print_entries(&[v.entries.clone(), v.config_entries.clone()].concat());
    }
}

/// Prints rate-limit, jail and offense data from a lookup or forget answer; true when there
/// was any.
fn print_client_state(
    limits: &[LimitView],
    counters: &[CounterView],
    offenses: &[OffenseView],
) -> bool {
    for l in limits {
        println!("rate limit {}: a bucket is held", l.rule);
    }
    for j in counters {
        println!(
            "jail {}: {} matching response(s) since {}",
            j.jail, j.hits, j.window_started
        );
    }
    for o in offenses {
        println!(
            "offenses against jail {} by {}: {}",
            o.jail,
            o.target,
            o.at.join(", ")
        );
    }
    !(limits.is_empty() && counters.is_empty() && offenses.is_empty())
}
