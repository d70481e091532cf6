//! List files (Spamhaus DROP, FireHOL netsets, hand-written): every line is an entry, a
//! comment or a reported problem.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let path = std::path::Path::new("/etc/ipgate/list.txt");
    let mut report = ipgate::config::Report::new(path, "");
    let mut out = Vec::new();
    ipgate::decide::policy::parse_list(text, path, "lists.fuzz.files", &mut out, &mut report);
    // Every entry parsed is a valid network that matches its own address.
    for net in &out {
        assert!(net.contains(&net.addr()), "{net}");
    }
    let table = ipgate::decide::policy::table::CidrTable::new(out.clone());
    for net in &out {
        assert!(table.contains(net.addr()), "{net}");
    }
});
