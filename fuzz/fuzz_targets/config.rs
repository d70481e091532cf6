//! The config file: any text is either a config or a list of problems, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    // A directory that does not exist: certificate, list and token paths in the text stay
    // relative to it, so the target reads no real file of this machine's.
    let path = std::path::Path::new("/nonexistent/ipgate-fuzz/ipgate.toml");
    match ipgate::config::Config::parse(path, text) {
        Ok(config) => {
            // What a reload computes from two configs.
            let _ = config.restart_changes(&config);
        }
        Err(errors) => {
            // Every problem can be shown.
            let _ = errors.to_string();
        }
    }
});
