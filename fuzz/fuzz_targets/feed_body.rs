//! A feed's body (Spamhaus DROP JSON, CIDR lines, FireHOL netsets, or anything a server
//! sends with 200): taken whole or refused, never a panic; what is taken holds nothing the
//! checks refuse.
#![no_main]
use libfuzzer_sys::fuzz_target;

use ipgate::background::feed::parse::{checked, entries};

fuzz_target!(|body: &[u8]| {
    let Ok(found) = entries(body, None) else {
        return;
    };
    assert!(!found.is_empty());
    let feed = ipgate::config::Feed {
        url: http::Uri::from_static("https://feeds.test/list"),
        refresh: std::time::Duration::from_secs(3600),
        ca_file: None,
        max_shrink: 0.5,
        max_prefix: (8, 16),
        max_coverage: 4,
        except: vec!["10.0.0.0/8".parse().unwrap(), "fc00::/7".parse().unwrap()],
        copy: "/nonexistent".into(),
    };
    let previous = found.len();
    if let Ok(kept) = checked(found, &feed, Some(previous)) {
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
        for net in &kept {
            assert!(!feed.except.iter().any(|x| x.contains(net)), "{net} is excepted");
            let max = if net.addr().is_ipv4() { 8 } else { 16 };
            assert!(net.prefix_len() >= max, "{net} is wider than allowed");
        }
    }
});
