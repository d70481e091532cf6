//! The Prometheus registry and every metric ipgate exports. The registry belongs to the
//! application state, not to a global, so gateways in parallel tests never share counters.
//! No label ever holds a client address.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Outcomes of `ipgate_requests_total`.
pub mod outcome {
    pub const PROXIED: &str = "proxied";
    pub const BLOCKED: &str = "blocked";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const DENIED: &str = "denied";
    pub const UPSTREAM_ERROR: &str = "upstream_error";
    /// Malformed or ambiguous (400), or CONNECT (405).
    pub const BAD_REQUEST: &str = "bad_request";
    /// No site matches the Host (421).
    pub const MISDIRECTED: &str = "misdirected";
    /// Sent to HTTPS by a `redirect_https` listener (301 or 308).
    pub const REDIRECTED: &str = "redirected";
    /// An ACME HTTP-01 challenge answered by ipgate itself.
    pub const ACME: &str = "acme";
    /// Answered with the challenge page (or, for a request that cannot show a page, refused
    /// until the client passes it).
    pub const CHALLENGED: &str = "challenged";
    /// Answered with the security overview (`privacy.overview_path`).
    pub const OVERVIEW: &str = "overview";
}

/// `ipgate_connections_rejected_total` children, resolved once: floods hit these.
pub struct Rejections {
    pub blocked: IntCounter,
    pub max_connections: IntCounter,
    /// Over `limits.max_connections_per_client`.
    pub per_client: IntCounter,
    pub untrusted_proxy: IntCounter,
    pub proxy_header: IntCounter,
    /// `ipgate_tarpit_connections`: over-cap connections held unread (`serve::tarpit`).
    pub tarpit: IntGauge,
}

impl Rejections {
    fn new(reg: &Reg, v: &IntCounterVec) -> Rejections {
        Rejections {
            blocked: v.with_label_values(&["blocked"]),
            max_connections: v.with_label_values(&["max_connections"]),
            per_client: v.with_label_values(&["per_client"]),
            untrusted_proxy: v.with_label_values(&["untrusted_proxy"]),
            proxy_header: v.with_label_values(&["proxy_header"]),
            tarpit: reg.gauge(
                "ipgate_tarpit_connections",
                "Over-cap connections of clients that keep reconnecting, held unread until reset.",
            ),
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// `ipgate_connections_timed_out_total{reason}`: connections closed for holding a slot
    /// without using it (`first_request`, `http2_idle`, `upgrade_idle`).
    pub timed_out: IntCounterVec,
    pub rejected: Rejections,
    pub requests: IntCounterVec,
    pub connections_rejected: IntCounterVec,
    pub list_entries: IntGaugeVec,
    pub bans: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub tls_handshake_errors: IntCounter,
    pub config_reloads: IntCounterVec,
    pub tracked_clients: IntGauge,
    pub client_evictions: IntCounter,
    pub would_block: IntCounterVec,
    /// `ipgate_would_block_total{rule="rate_limit"}`, resolved once.
    pub would_block_rate_limit: IntCounter,
    /// `ipgate_store_errors_total`: writes (and reads) the store refused.
    pub store_errors: IntCounter,
    /// `ipgate_store_pending_writes`: entries enforced but not durable yet.
    pub store_pending: IntGauge,
    pub connections_open: IntGauge,
    pub access_log_dropped: IntCounter,
    pub fleet: FleetMetrics,
    /// `ipgate_certificate_expiry_timestamp_seconds{name}`: every certificate served.
    pub certificate_expiry: IntGaugeVec,
    /// `ipgate_log_lines_total{jail}`: lines a log jail has read.
    pub log_lines: IntCounterVec,
    /// `ipgate_firewall_elements{family,set}`: elements in the kernel's sets.
    pub firewall_elements: IntGaugeVec,
    /// `ipgate_firewall_errors_total`: updates nft refused (each retried as a rebuild).
    pub firewall_errors: IntCounter,
    pub challenge: ChallengeMetrics,
    pub feed: FeedMetrics,
    /// `ipgate_start_time_seconds`: when this process started (a restart shows as a step).
    pub start_time: IntGauge,
    /// `ipgate_upgrades_total{result}`: `ok` is counted by the process that took over,
    /// `failed` by the one that stayed.
    pub upgrades: IntCounterVec,
    /// `ipgate_quic_retries_total`: QUIC Initials answered with a Retry (the address
    /// checked before any state is kept).
    pub quic_retries: IntCounter,
}

/// The feeds' metrics, by list.
pub struct FeedMetrics {
    /// Seconds since the copy held was last confirmed by its feed.
    pub age: IntGaugeVec,
    pub refresh: IntGaugeVec,
    pub errors: IntCounterVec,
    pub fetches: IntCounterVec,
}

impl FeedMetrics {
    fn new(reg: &Reg) -> FeedMetrics {
        FeedMetrics {
            age: reg.gauge_vec(
                "ipgate_feed_age_seconds",
                "Seconds since the feed last confirmed the copy in force (a list taken, or a 304); \
                 with no copy yet, since the gateway started.",
                &["list"],
            ),
            refresh: reg.gauge_vec(
                "ipgate_feed_refresh_seconds",
                "The feed's refresh interval, seconds (for alerts on its age).",
                &["list"],
            ),
            errors: reg.counter_vec(
                "ipgate_feed_errors_total",
                "Feed fetches not taken, by reason: connect, timeout, tls, status, too_large, \
                 parse, empty, prefix, coverage, shrink, write.",
                &["list", "reason"],
            ),
            fetches: reg.counter_vec(
                "ipgate_feed_fetches_total",
                "Feed fetches by result: updated (a new copy in force), not_modified (a 304), \
                 refused (see ipgate_feed_errors_total).",
                &["list", "result"],
            ),
        }
    }

    /// Drops a list's series (its feed is gone from the config).
    pub fn forget(&self, list: &str) {
        let _ = self.age.remove_label_values(&[list]);
        let _ = self.refresh.remove_label_values(&[list]);
    }
}

/// The challenge's metrics.
pub struct ChallengeMetrics {
    pub challenges: IntCounterVec,
    /// Pass entries held.
    pub passes: IntGauge,
    /// 1 while a site challenges every client without a pass.
    pub mode: IntGaugeVec,
    pub solve: HistogramVec,
}

impl ChallengeMetrics {
    fn new(reg: &Reg) -> ChallengeMetrics {
        ChallengeMetrics {
            challenges: reg.counter_vec(
                "ipgate_challenges_total",
                "Challenges by site and result: issued (a page served), passed (solved, a pass \
                 made), failed (a solution refused).",
                &["site", "result"],
            ),
            passes: reg.gauge(
                "ipgate_passes",
                "Pass entries held (solved challenges, per client and site).",
            ),
            mode: reg.gauge_vec(
                "ipgate_challenge_mode",
                "1 while the site challenges every client without a pass (always, forced on, or \
                 auto mode under load), else 0.",
                &["site"],
            ),
            solve: reg.add(
                HistogramVec::new(
                    HistogramOpts::new(
                        "ipgate_challenge_solve_seconds",
                        "Time from a challenge page being served to its solution arriving, by site.",
                    )
                    .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 300.0]),
                    &["site"],
                )
                .expect("valid metric"),
            ),
        }
    }
}

pub struct FleetMetrics {
    /// `ipgate_fleet_connected`: 1 while the fleet's store is reachable.
    pub connected: IntGauge,
    /// `ipgate_fleet_changes_total{direction}` (`sent`, `applied`).
    pub sent: IntCounter,
    pub applied: IntCounter,
    /// `ipgate_fleet_outbox`: changes waiting to be sent.
    pub outbox: IntGauge,
}

impl FleetMetrics {
    fn new(reg: &Reg) -> FleetMetrics {
        let changes = reg.counter_vec(
            "ipgate_fleet_changes_total",
            "Changes to entries and offense history sent to the fleet, or applied from it.",
            &["direction"],
        );
        FleetMetrics {
            connected: reg.gauge(
                "ipgate_fleet_connected",
                "1 while the fleet's shared store (Redis or Valkey) is reachable; 0 without.",
            ),
            sent: changes.with_label_values(&["sent"]),
            applied: changes.with_label_values(&["applied"]),
            outbox: reg.gauge(
                "ipgate_fleet_outbox",
                "Changes made here and not yet sent to the fleet.",
            ),
        }
    }
}

/// Makes metrics and registers them; names are unique constants in this file, so
/// registration cannot collide.
struct Reg(Registry);

impl Reg {
    fn add<T: prometheus::core::Collector + Clone + 'static>(&self, m: T) -> T {
        self.0
            .register(Box::new(m.clone()))
            .expect("metric names are unique");
        m
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
}

/// Request latency buckets, seconds: sub-millisecond proxying up to slow upstreams.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let reg = Reg(Registry::new());
        let connections_rejected = connections_rejected(&reg);
        let would_block = would_block(&reg);
        Metrics {
            timed_out: reg.counter_vec(
                "ipgate_connections_timed_out_total",
                "Connections closed for silence: no request head in time (first_request), an \
                 HTTP/2 connection without a stream (http2_idle), an idle upgrade (upgrade_idle).",
                &["reason"],
            ),
            would_block_rate_limit: would_block.with_label_values(&["rate_limit"]),
            would_block,
            rejected: Rejections::new(&reg, &connections_rejected),
            connections_rejected,
            requests: reg.counter_vec(
                "ipgate_requests_total",
                "Requests answered, by site and outcome.",
                &["site", "outcome"],
            ),
            list_entries: reg.gauge_vec(
                "ipgate_list_entries",
                "Entries in each block or allow list, static or temporary.",
                &["list", "kind"],
            ),
            bans: reg.counter_vec(
                "ipgate_bans_total",
                "Temporary block entries created, by source (api or a jail's name).",
                &["source"],
            ),
            request_duration: reg.add(request_duration()),
            upstream_errors: reg.counter_vec(
                "ipgate_upstream_errors_total",
                "Failed upstream requests, by site and kind (connect, timeout, protocol).",
                &["site", "kind"],
            ),
            store_errors: reg.counter(
                "ipgate_store_errors_total",
                "State store operations that failed (a write the disk refused, say).",
            ),
            tls_handshake_errors: reg.counter(
                "ipgate_tls_handshake_errors_total",
                "TLS handshakes that failed or timed out.",
            ),
            config_reloads: reg.counter_vec(
                "ipgate_config_reloads_total",
                "Config reloads, by result (success, failure).",
                &["result"],
            ),
            store_pending: reg.gauge(
                "ipgate_store_pending_writes",
                "Temporary entries enforced but not yet written (the disk refused them).",
            ),
            tracked_clients: reg.gauge(
                "ipgate_tracked_clients",
                "Clients (IPv6: prefixes) with rate-limit or jail state in memory.",
            ),
            client_evictions: reg.counter(
                "ipgate_client_evictions_total",
                "Client states dropped to stay within the tracking cap.",
            ),
            connections_open: reg.gauge(
                "ipgate_connections_open",
                "Client connections currently open.",
            ),
            access_log_dropped: reg.counter(
                "ipgate_access_log_dropped_total",
                "Access log lines dropped because the writer fell behind.",
            ),
            fleet: FleetMetrics::new(&reg),
            certificate_expiry: reg.gauge_vec(
                "ipgate_certificate_expiry_timestamp_seconds",
                "When each certificate served expires (notAfter, Unix seconds), by its first name.",
                &["name"],
            ),
            firewall_elements: reg.gauge_vec(
                "ipgate_firewall_elements",
                "Elements in the nftables sets, by family (ipv4, ipv6) and set (block, allow).",
                &["family", "set"],
            ),
            firewall_errors: reg.counter(
                "ipgate_firewall_errors_total",
                "nftables updates that failed (each is retried as a rebuild of the table).",
            ),
            log_lines: reg.counter_vec(
                "ipgate_log_lines_total",
                "Lines read from the files of each log jail.",
                &["jail"],
            ),
            challenge: ChallengeMetrics::new(&reg),
            feed: FeedMetrics::new(&reg),
            start_time: start_time(&reg),
            upgrades: upgrades(&reg),
            quic_retries: quic_retries(&reg),
            registry: reg.0,
        }
    }

    /// Every metric family, as the registry holds them now.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

fn connections_rejected(reg: &Reg) -> IntCounterVec {
    reg.counter_vec(
        "ipgate_connections_rejected_total",
        "Client connections closed right after accept, by reason.",
        &["reason"],
    )
}

fn quic_retries(reg: &Reg) -> IntCounter {
    reg.counter(
        "ipgate_quic_retries_total",
        "QUIC Initials answered with a Retry (http3_retry, or under load).",
    )
}

fn upgrades(reg: &Reg) -> IntCounterVec {
    reg.counter_vec(
        "ipgate_upgrades_total",
        "Binary upgrades (ipgate upgrade) by result: ok (counted by the new process) or \
         failed (counted by the process that kept serving).",
        &["result"],
    )
}

fn start_time(reg: &Reg) -> IntGauge {
    let g = reg.gauge(
        "ipgate_start_time_seconds",
        "When this ipgate process started, Unix seconds.",
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    g.set(now.map_or(0, |d| d.as_secs() as i64));
    g
}

fn would_block(reg: &Reg) -> IntCounterVec {
    reg.counter_vec(
        "ipgate_would_block_total",
        "Requests a dry-run rule would have refused, by rule.",
        &["rule"],
    )
}

fn request_duration() -> HistogramVec {
    let opts = HistogramOpts::new(
        "ipgate_request_duration_seconds",
        "Time from request head to response head, by site.",
    )
    .buckets(DURATION_BUCKETS.to_vec());
    HistogramVec::new(opts, &["site"]).expect("valid metric")
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The per-site children, resolved once per config so the request path does no label lookup.
#[derive(Clone)]
pub struct SiteMetrics {
    pub proxied: IntCounter,
    pub upstream_error: IntCounter,
    pub blocked: IntCounter,
    pub denied: IntCounter,
    pub rate_limited: IntCounter,
    /// Answered with a redirect to HTTPS (`redirect_https`).
    pub redirected: IntCounter,
    pub duration: Histogram,
    pub connect_errors: IntCounter,
    pub timeouts: IntCounter,
    pub protocol_errors: IntCounter,
    /// Requests answered 503 after waiting for one of `site.max_upstream_connections`.
    pub busy: IntCounter,
    pub challenged: IntCounter,
    pub overview: IntCounter,
    pub challenges_issued: IntCounter,
    pub challenges_passed: IntCounter,
    pub challenges_failed: IntCounter,
    pub challenge_mode: IntGauge,
    pub challenge_solve: Histogram,
}

impl SiteMetrics {
    pub fn new(m: &Metrics, site: &str) -> SiteMetrics {
        SiteMetrics {
            proxied: m.requests.with_label_values(&[site, outcome::PROXIED]),
            upstream_error: m
                .requests
                .with_label_values(&[site, outcome::UPSTREAM_ERROR]),
            blocked: m.requests.with_label_values(&[site, outcome::BLOCKED]),
            denied: m.requests.with_label_values(&[site, outcome::DENIED]),
            rate_limited: m.requests.with_label_values(&[site, outcome::RATE_LIMITED]),
            redirected: m.requests.with_label_values(&[site, outcome::REDIRECTED]),
            duration: m.request_duration.with_label_values(&[site]),
            connect_errors: m.upstream_errors.with_label_values(&[site, "connect"]),
            timeouts: m.upstream_errors.with_label_values(&[site, "timeout"]),
            protocol_errors: m.upstream_errors.with_label_values(&[site, "protocol"]),
            busy: m.upstream_errors.with_label_values(&[site, "busy"]),
            challenged: m.requests.with_label_values(&[site, outcome::CHALLENGED]),
            overview: m.requests.with_label_values(&[site, outcome::OVERVIEW]),
            challenges_issued: m.challenge.challenges.with_label_values(&[site, "issued"]),
            challenges_passed: m.challenge.challenges.with_label_values(&[site, "passed"]),
            challenges_failed: m.challenge.challenges.with_label_values(&[site, "failed"]),
            challenge_mode: m.challenge.mode.with_label_values(&[site]),
            challenge_solve: m.challenge.solve.with_label_values(&[site]),
        }
    }
}
