//! `POST /v1/entries` bodies, and every response body the CLI reads back.
#![no_main]
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let day = Duration::from_secs(86_400);
    if let Ok((_, _, ttl, reason)) =
        ipgate::admin::parse_new_entry(body, Duration::from_secs(3600), day)
    {
        assert!(ttl <= day && !ttl.is_zero());
        assert!(reason.is_none_or(|r| !r.is_empty() && r.len() <= 512));
    }
    let _ = serde_json::from_slice::<ipgate::admin::api::EntryView>(body);
    let _ = serde_json::from_slice::<ipgate::admin::api::Lookup>(body);
    let _ = serde_json::from_slice::<ipgate::admin::api::Forgotten>(body);
    let _ = serde_json::from_slice::<ipgate::admin::api::ReloadRefused>(body);
});
