//! Requests by site and outcome over the last hour, for the console's charts: a sample of
//! `ipgate_requests_total` each minute, 61 kept (a minute's figure is the difference of two
//! samples). Bounded by sites × outcomes; it holds no client address.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::observe::metrics::Metrics;

/// Samples kept: an hour of minutes, and the one before the first.
const KEPT: usize = 61;

/// One sample: when (ms), and every (site, outcome, total) of `ipgate_requests_total`.
type Sample = (u64, Vec<(String, String, u64)>);

#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Takes a sample now (the sweeper calls it once a minute).
    pub fn sample(&self, metrics: &Metrics, now_ms: u64) {
        let sample = (now_ms, totals(metrics));
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() == KEPT {
            s.pop_front();
        }
        s.push_back(sample);
    }

    /// Per site: for each minute (oldest first, ending now), the requests of each outcome.
    pub fn per_minute(&self, metrics: &Metrics, now_ms: u64) -> Vec<(String, Vec<Minute>)> {
        let mut samples: Vec<Sample> = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        samples.push((now_ms, totals(metrics)));
        let mut sites: Vec<String> = samples
            .iter()
            .flat_map(|(_, t)| t.iter().map(|(s, _, _)| s.clone()))
            .collect();
        sites.sort();
        sites.dedup();
        sites
            .into_iter()
            .map(|site| {
                let minutes = samples
                    .windows(2)
                    .map(|w| {
                        let of = |t: &[(String, String, u64)], o: &str| {
                            t.iter()
                                .filter(|(s, oc, _)| *s == site && oc == o)
                                .map(|(_, _, v)| *v)
                                .sum::<u64>()
                        };
                        let outcomes =
                            ["proxied", "blocked", "denied", "rate_limited", "challenged"];
                        let mut m = Minute::default();
                        for (i, o) in outcomes.iter().enumerate() {
                            m.counts[i] = of(&w[1].1, o).saturating_sub(of(&w[0].1, o));
                        }
                        m
                    })
                    .collect();
                (site, minutes)
            })
            .collect()
    }
}

/// A minute's requests: proxied, blocked, denied, rate limited, challenged.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Minute {
    pub counts: [u64; 5],
}

fn totals(metrics: &Metrics) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for family in metrics.gather() {
        if family.name() != "ipgate_requests_total" {
            continue;
        }
        for m in family.get_metric() {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            out.push((
                label("site"),
                label("outcome"),
                m.get_counter().get_value() as u64,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_are_differences_of_samples_and_an_hour_is_kept() {
        let m = Metrics::new();
        let h = History::default();
        let proxied = m.requests.with_label_values(&["shop", "proxied"]);
        let blocked = m.requests.with_label_values(&["shop", "blocked"]);
        h.sample(&m, 0);
        proxied.inc_by(7);
        h.sample(&m, 60_000);
        proxied.inc_by(2);
        blocked.inc_by(3);
        let sites = h.per_minute(&m, 120_000);
        assert_eq!(sites.len(), 1);
        let (site, minutes) = &sites[0];
        assert_eq!(site, "shop");
        assert_eq!(minutes[0].counts, [7, 0, 0, 0, 0]);
        assert_eq!(minutes[1].counts, [2, 3, 0, 0, 0]);
        for i in 0..100 {
            h.sample(&m, 180_000 + i * 60_000);
        }
        assert_eq!(h.per_minute(&m, 0)[0].1.len(), KEPT);
    }
}
