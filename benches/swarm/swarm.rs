//! The swarm benchmark's one program (benches/swarm/README.md). `swarm upstream` stands in
//! for a PHP pool of fixed size behind the gateway. `swarm load` sends many clients, one
//! loopback address each, that never solve the challenge, and one visitor that browses and
//! solves it as a browser would, then prints one JSON line of what both saw.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest::{digest, SHA256};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout_at, Instant, Interval, MissedTickBehavior};

/// Longest wait for one request's answer, connect and body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The visitor's own address.
const VISITOR_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The swarm's addresses are counted up from here (the first is 127.1.0.1).
const SWARM_BASE: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 0);
/// Keeps the swarm's addresses inside 127.0.0.0/8 (the last is 127.4.x.y).
const MAX_CLIENTS: u32 = 250_000;
/// Keeps a tick's period above a nanosecond.
const MAX_RATE: f64 = 1000.0;
/// The page the stand-in upstream answers.
const PAGE: &str = "<!doctype html><title>page</title><p>served by the stand-in PHP worker</p>\n";
/// Marks the challenge page's puzzle: `<script type="application/json" id="ipgate-puzzle">`.
const PUZZLE_ID: &str = "id=\"ipgate-puzzle\"";
/// Where a solution is sent, `VERIFY_PATH?QUERY&n=NONCE`, unless the puzzle names its own.
const VERIFY_PATH: &str = "/.well-known/ipgate/challenge";

#[derive(Parser)]
#[command(about = "Swarm benchmark of ipgate's challenge (benches/swarm)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// An HTTP/1.1 server standing in for a pool of PHP workers.
    Upstream(UpstreamArgs),
    /// The swarm and the visitor against a target; prints one JSON line at the end.
    Load(LoadArgs),
}

#[derive(Args)]
struct UpstreamArgs {
    /// Address to listen on.
    #[arg(long)]
    addr: SocketAddr,
    /// Requests served at once; the others wait, as in PHP-FPM's backlog.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Time each request takes, in milliseconds.
    #[arg(long, default_value_t = 80)]
    service_ms: u64,
}

#[derive(Args)]
struct LoadArgs {
    /// The gateway or proxy to load: http://IPv4:PORT.
    #[arg(long)]
    target: Uri,
    /// Host header of every request.
    #[arg(long, default_value = "example.test")]
    host: String,
    /// Swarm clients, each from its own address (127.1.0.1 upward). 0: the visitor alone.
    #[arg(long, default_value_t = 500)]
    clients: u32,
    /// Lowest request rate of a swarm client, per second.
    #[arg(long, default_value_t = 2.0)]
    rate_min: f64,
    /// Highest request rate of a swarm client, per second.
    #[arg(long, default_value_t = 5.0)]
    rate_max: f64,
    /// Length of the counted window, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds of load before the window, not counted.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// The visitor's page views per second (0: no visitor).
    #[arg(long, default_value_t = 2.0)]
    visitor_rate: f64,
    /// The visitor solves challenge pages, as a browser with JavaScript does.
    #[arg(long)]
    visitor_solve: bool,
    /// A name for the run, copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Command::Upstream(args) => serve_upstream(args).await,
        Command::Load(args) => load(args).await,
    }
}

// The stand-in upstream.

/// The stand-in for a PHP pool: `workers` requests at once, each `service` long.
struct Pool {
    workers: Semaphore,
    service: Duration,
    served: AtomicU64,
}

/// Serves until SIGTERM or ctrl-c, then prints the requests served.
async fn serve_upstream(args: UpstreamArgs) {
    let listener = TcpListener::bind(args.addr).await.expect("bind --addr");
    let pool = Arc::new(Pool {
        workers: Semaphore::new(args.workers.max(1)),
        service: Duration::from_millis(args.service_ms),
        served: AtomicU64::new(0),
    });
    tokio::select! {
        () = accept(listener, pool.clone()) => {}
        () = stop_signal() => {}
    }
    eprintln!("upstream: {} served", pool.served.load(Relaxed));
}

/// Accepts connections for ever, each served by a task of its own.
async fn accept(listener: TcpListener, pool: Arc<Pool>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors, most likely: wait rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let pool = pool.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(pool.clone(), req));
            // A peer that hangs up mid-request is no error for a stand-in.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `/__stats` at once, outside the pool; anything else once a worker is free and the
/// service time has passed.
async fn answer(
    pool: Arc<Pool>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/__stats" {
        let body = serde_json::json!({ "served": pool.served.load(Relaxed) }).to_string();
        return Ok(reply("application/json", Bytes::from(body)));
    }
    // The semaphore is never closed; were it, the request would go on without a worker.
    let _worker = pool.workers.acquire().await.ok();
    tokio::time::sleep(pool.service).await;
    pool.served.fetch_add(1, Relaxed);
    let page = Bytes::from_static(PAGE.as_bytes());
    Ok(reply("text/html; charset=utf-8", page))
}

/// A 200 with `body`.
fn reply(content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    let value = HeaderValue::from_static(content_type);
    resp.headers_mut().insert(header::CONTENT_TYPE, value);
    resp
}

/// Resolves on SIGTERM or ctrl-c.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

// The client side: one keep-alive connection per source address.

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one GET came back with.
struct Answer {
    status: StatusCode,
    location: Option<String>,
    body: Bytes,
}

/// Why a GET, or a page view, failed.
enum Failure {
    /// No whole answer within REQUEST_TIMEOUT, or before the run's hard end.
    Timeout,
    /// Refused, reset, or a broken answer.
    Transport,
    /// A page view's last answer was not the one it needed.
    Status,
}

/// One keep-alive connection; the task that drives it stops when this is dropped.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// An HTTP/1.1 client from one source address, on one keep-alive connection that it opens
/// again whenever the server has closed it.
struct Client {
    source: Ipv4Addr,
    plan: Arc<Plan>,
    conn: Option<Conn>,
}

impl Client {
    fn new(source: Ipv4Addr, plan: Arc<Plan>) -> Self {
        Client {
            source,
            plan,
            conn: None,
        }
    }

    /// GETs `path`, within REQUEST_TIMEOUT and before the run's hard end.
    async fn get(&mut self, path: &str) -> Result<Answer, Failure> {
        let deadline = (Instant::now() + REQUEST_TIMEOUT).min(self.plan.hard_end);
        let failure = match timeout_at(deadline, self.exchange(path)).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(_)) => Failure::Transport,
            Err(_) => Failure::Timeout,
        };
        // The connection's state is unknown now: the next request opens a new one.
        self.conn = None;
        Err(failure)
    }

    async fn exchange(&mut self, path: &str) -> Result<Answer, BoxError> {
        let conn = match self.conn.take() {
            Some(conn) if !conn.sender.is_closed() => conn,
            _ => connect(self.source, self.plan.target).await?,
        };
        let conn = self.conn.insert(conn);
        conn.sender.ready().await?;
        let req = Request::get(path)
            .header(header::HOST, self.plan.host.as_str())
            .header(header::ACCEPT, "text/html")
            .body(Empty::<Bytes>::new())?;
        let (parts, body) = conn.sender.send_request(req).await?.into_parts();
        // Read to the end, so that the connection can carry the next request.
        let body = body.collect().await?.to_bytes();
        let location = parts.headers.get(header::LOCATION);
        let location = location.and_then(|v| v.to_str().ok()).map(str::to_owned);
        let status = parts.status;
        Ok(Answer {
            status,
            location,
            body,
        })
    }
}

/// Opens a connection from `source` (any port) to `target` and starts its driver.
async fn connect(source: Ipv4Addr, target: SocketAddr) -> Result<Conn, BoxError> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    let (sender, connection) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io).await?;
    let driver = tokio::spawn(async move {
        // Its end shows in the sender's is_closed; nothing more to do here.
        let _ = connection.await;
    });
    Ok(Conn { sender, driver })
}

// The load: the swarm and the visitor.

/// The run's target and phases, shared by every task.
struct Plan {
    target: SocketAddr,
    host: String,
    /// Counting starts here, after the warm-up.
    window_start: Instant,
    /// No request starts from here on.
    window_end: Instant,
    /// Every request has ended by here: the window's end plus one request timeout.
    hard_end: Instant,
}

/// Runs the swarm and the visitor, then prints one JSON line.
async fn load(args: LoadArgs) {
    let target = socket_addr_of(&args.target).expect("--target must be http://IPv4:PORT");
    let rates_ok =
        0.0 < args.rate_min && args.rate_min <= args.rate_max && args.rate_max <= MAX_RATE;
    assert!(rates_ok, "need 0 < --rate-min <= --rate-max <= {MAX_RATE}");
    let visitor_ok = (0.0..=MAX_RATE).contains(&args.visitor_rate);
    assert!(visitor_ok, "need 0 <= --visitor-rate <= {MAX_RATE}");
    assert!(args.clients <= MAX_CLIENTS, "--clients > {MAX_CLIENTS}");

    let start = Instant::now();
    let window_start = start + Duration::from_secs(args.warmup);
    let window_end = window_start + Duration::from_secs(args.seconds);
    let hard_end = window_end + REQUEST_TIMEOUT;
    let host = args.host.clone();
    let plan = Arc::new(Plan {
        target,
        host,
        window_start,
        window_end,
        hard_end,
    });
    // Every wait below ends by hard_end; this is the net under them.
    tokio::spawn(async move {
        sleep_until(hard_end + Duration::from_secs(5)).await;
        eprintln!("swarm: still running past the hard end; exiting");
        std::process::exit(2);
    });

    let swarm: Vec<_> = (0..args.clients)
        .map(|i| {
            let rate = args.rate_min + (args.rate_max - args.rate_min) * fraction(u64::from(i));
            tokio::spawn(swarm_client(i, rate, plan.clone()))
        })
        .collect();
    let visitor = tokio::spawn(visit(args.visitor_rate, args.visitor_solve, plan.clone()));
    let mut tally = SwarmTally::default();
    for client in swarm {
        if let Ok(one) = client.await {
            tally.add(one);
        }
    }
    let seen = visitor.await.unwrap_or_default();
    println!("{}", report(&args, &tally, &seen, start.elapsed()));
}

/// What the swarm saw in the window.
#[derive(Default)]
struct SwarmTally {
    sent: u64,
    /// Answers by status code, and "timeout" and "error" for none.
    statuses: BTreeMap<String, u64>,
    /// Answers that were challenge pages.
    challenged: u64,
}

impl SwarmTally {
    fn add(&mut self, other: SwarmTally) {
        self.sent += other.sent;
        self.challenged += other.challenged;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
    }
}

/// One swarm client: GETs /page-N at its own steady rate, never solving a challenge.
async fn swarm_client(index: u32, rate: f64, plan: Arc<Plan>) -> SwarmTally {
    // Spread the first requests over one period, so that the clients do not start at once.
    let phase = Duration::from_secs_f64(fraction(u64::from(index) ^ 0x5eed) / rate);
    let mut tick = ticker(Instant::now() + phase, rate);
    let mut client = Client::new(swarm_address(index), plan.clone());
    let mut tally = SwarmTally::default();
    let mut page = 0u64;
    while let Some(sent_at) = next_tick(&mut tick, &plan).await {
        let answer = client.get(&format!("/page-{page}")).await;
        page += 1;
        if sent_at < plan.window_start {
            continue;
        }
        tally.sent += 1;
        let status = match answer {
            Ok(answer) => {
                tally.challenged += u64::from(puzzle_of(&answer.body).is_some());
                answer.status.as_str().to_owned()
            }
            Err(Failure::Timeout) => "timeout".to_owned(),
            Err(_) => "error".to_owned(),
        };
        *tally.statuses.entry(status).or_default() += 1;
    }
    tally
}

/// What the visitor saw: one latency per page view in the window.
#[derive(Default)]
struct VisitorTally {
    latencies_ms: Vec<f64>,
    errors: u64,
    solved: u64,
    solve_ms: f64,
    /// Challenges solved during the warm-up, not counted in the window.
    solved_in_warmup: u64,
}

/// The visitor: views `/` at `rate` per second from its own address.
async fn visit(rate: f64, solve: bool, plan: Arc<Plan>) -> VisitorTally {
    let mut tally = VisitorTally::default();
    if rate <= 0.0 {
        return tally;
    }
    let mut tick = ticker(Instant::now(), rate);
    let mut client = Client::new(VISITOR_ADDR, plan.clone());
    while let Some(started) = next_tick(&mut tick, &plan).await {
        let view = view_page(&mut client, "/", solve).await;
        if started < plan.window_start {
            tally.solved_in_warmup += u64::from(matches!(view, Ok(Some(_))));
            continue;
        }
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tally.latencies_ms.push(ms);
        match view {
            Ok(Some(took)) => {
                tally.solved += 1;
                tally.solve_ms += took.as_secs_f64() * 1e3;
            }
            Ok(None) => {}
            Err(_) => tally.errors += 1,
        }
    }
    tally
}

/// One page view as a browser makes it. Given a challenge page (403 or 429 with the puzzle)
/// and `solve`, it finds the nonce, sends it, and follows the 303 back to the page. Only a
/// final 200 is a success; Ok holds the time spent solving, if there was a challenge.
async fn view_page(
    client: &mut Client,
    path: &str,
    solve: bool,
) -> Result<Option<Duration>, Failure> {
    let first = client.get(path).await?;
    if first.status == StatusCode::OK {
        return Ok(None);
    }
    let challenge = [StatusCode::FORBIDDEN, StatusCode::TOO_MANY_REQUESTS].contains(&first.status);
    let puzzle = puzzle_of(&first.body).filter(|_| solve && challenge);
    let puzzle = puzzle.ok_or(Failure::Status)?;
    let started = Instant::now();
    let nonce = solve_blocking(puzzle.sig, puzzle.bits, client.plan.hard_end).await;
    let nonce = nonce.ok_or(Failure::Timeout)?;
    let took = started.elapsed();
    // QUERY is URL-encoded already and holds h= itself; only the nonce is added.
    let verify = format!("{}?{}&n={nonce}", puzzle.verify, puzzle.query);
    let verified = client.get(&verify).await?;
    if verified.status != StatusCode::SEE_OTHER {
        return Err(Failure::Status);
    }
    // The 303 leads back to the path first asked for; stay on this host whatever it says.
    let back = verified.location.as_deref();
    let back = back.filter(|l| l.starts_with('/') && !l.starts_with("//"));
    let last = client.get(back.unwrap_or(path)).await?;
    if last.status != StatusCode::OK {
        return Err(Failure::Status);
    }
    Ok(Some(took))
}

// The puzzle.

/// The puzzle a challenge page embeds as `{"c": QUERY, "h": HEXSIG, "d": BITS, "v": PATH}`.
struct Puzzle {
    /// Where the solution goes: `v`, as the page's script has it, or VERIFY_PATH.
    verify: String,
    /// The verify URL's query so far, URL-encoded.
    query: String,
    /// The signature the nonce is hashed with, in hex.
    sig: String,
    /// Leading zero bits the hash must have.
    bits: u32,
}

/// The puzzle of `<script type="application/json" id="ipgate-puzzle">{...}</script>`, if
/// the page holds one.
fn puzzle_of(page: &[u8]) -> Option<Puzzle> {
    let page = std::str::from_utf8(page).ok()?;
    let tag = page.find(PUZZLE_ID)?;
    let open = tag + page[tag..].find('>')? + 1;
    let close = open + page[open..].find("</script>")?;
    let json: serde_json::Value = serde_json::from_str(&page[open..close]).ok()?;
    let bits = u32::try_from(json["d"].as_u64()?).ok()?;
    let verify = json["v"].as_str().filter(|v| v.starts_with('/'));
    Some(Puzzle {
        verify: verify.unwrap_or(VERIFY_PATH).to_owned(),
        query: json["c"].as_str()?.to_owned(),
        sig: json["h"].as_str()?.to_owned(),
        // More than 40 bits would take hours: not a puzzle to try.
        bits: (bits <= 40).then_some(bits)?,
    })
}

/// `solve` on the blocking pool, so that the runtime's threads keep serving the swarm.
async fn solve_blocking(sig: String, bits: u32, hard_end: Instant) -> Option<u64> {
    let give_up = hard_end.into_std();
    let search = tokio::task::spawn_blocking(move || solve(&sig, bits, give_up));
    search.await.ok().flatten()
}

/// The smallest nonce n ≥ 0 such that SHA-256 of the ASCII text `SIG:n` (n in decimal)
/// starts with `bits` zero bits, as the page's script finds it; None once `give_up` passes.
fn solve(sig: &str, bits: u32, give_up: std::time::Instant) -> Option<u64> {
    let mut text = format!("{sig}:").into_bytes();
    let prefix = text.len();
    for n in 0u64.. {
        // A look at the clock every 4096 nonces.
        if (n & 0xfff) == 0 && std::time::Instant::now() >= give_up {
            return None;
        }
        text.truncate(prefix);
        // Writing into a Vec cannot fail.
        let _ = write!(text, "{n}");
        if leading_zero_bits(digest(&SHA256, &text).as_ref()) >= bits {
            return Some(n);
        }
    }
    None
}

fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut bits = 0;
    for &byte in hash {
        if byte != 0 {
            return bits + byte.leading_zeros();
        }
        bits += 8;
    }
    bits
}

// Small helpers.

/// A ticker at `rate` per second from `first`. A tick missed while an answer was awaited
/// comes at once, and the spacing starts again from there (a client has one request out).
fn ticker(first: Instant, rate: f64) -> Interval {
    let mut tick = tokio::time::interval_at(first, Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

/// Waits for the next tick and returns when it came; None once the window has closed.
async fn next_tick(tick: &mut Interval, plan: &Plan) -> Option<Instant> {
    timeout_at(plan.window_end, tick.tick()).await.ok()?;
    let now = Instant::now();
    (now < plan.window_end).then_some(now)
}

/// The swarm's `index`th address: 127.1.0.1 upward, skipping every .0 and .255.
fn swarm_address(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(SWARM_BASE) + index / 254 * 256 + index % 254 + 1)
}

/// A fixed fraction in [0, 1) for `seed` (splitmix64): every run spreads its clients' rates
/// and start times the same way.
fn fraction(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The `IPv4:PORT` of an `http://IPv4:PORT` URL; names are not resolved.
fn socket_addr_of(url: &Uri) -> Option<SocketAddr> {
    if url.scheme_str() != Some("http") {
        return None;
    }
    let addr: SocketAddr = url.authority()?.as_str().parse().ok()?;
    addr.is_ipv4().then_some(addr)
}

/// The nearest-rank percentile `p` (0 to 1) of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// Rounded to a tenth.
fn tenth(x: Option<f64>) -> Option<f64> {
    x.map(|x| (x * 10.0).round() / 10.0)
}

/// The run's one JSON line.
fn report(
    args: &LoadArgs,
    swarm: &SwarmTally,
    seen: &VisitorTally,
    wall: Duration,
) -> serde_json::Value {
    let mut ms = seen.latencies_ms.clone();
    ms.sort_by(f64::total_cmp);
    let views = ms.len() as u64;
    let error_rate = seen.errors as f64 / views.max(1) as f64;
    let solve_mean = (seen.solved > 0).then_some(seen.solve_ms / seen.solved.max(1) as f64);
    serde_json::json!({
        "label": args.label,
        "window_s": args.seconds,
        "wall_s": tenth(Some(wall.as_secs_f64())),
        "swarm_clients": args.clients,
        "swarm_sent": swarm.sent,
        "swarm_status": swarm.statuses,
        "swarm_challenged": swarm.challenged,
        "visitor_requests": views,
        "visitor_errors": seen.errors,
        "visitor_error_rate": error_rate,
        "visitor_solved": seen.solved,
        "visitor_solved_in_warmup": seen.solved_in_warmup,
        "visitor_solve_ms_mean": tenth(solve_mean),
        "visitor_p50_ms": tenth(percentile(&ms, 0.50)),
        "visitor_p99_ms": tenth(percentile(&ms, 0.99)),
        "visitor_max_ms": tenth(ms.last().copied()),
    })
}
