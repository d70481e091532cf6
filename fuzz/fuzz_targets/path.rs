//! The path normalizer: a path it accepts is absolute, normal and stays as it is
//! when normalized again.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &str| {
    if let Ok(normal) = ipgate::normalize::path::normalize(path) {
        assert!(normal.starts_with('/'), "{normal:?}");
        assert!(!normal.contains("//"), "{normal:?}");
        assert!(
            !normal.split('/').any(|s| s == "." || s == ".."),
            "{normal:?}"
        );
        let again = ipgate::normalize::path::normalize(&normal).expect("a normal path is accepted");
        assert_eq!(again, normal);
    }
});
