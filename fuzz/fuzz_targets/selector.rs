//! Selector parsing (`ztid_spiffe::Selector::parse`, and its serde form): never panics,
//! and a selector that parses prints back to text that parses to the same selector.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztid_spiffe::selector::{satisfies, Selector};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Selector>(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parsed = Vec::new();
    for line in text.lines() {
        if let Ok(s) = Selector::parse(line) {
            let again = Selector::parse(&s.to_string()).expect("a selector's text parses");
            assert_eq!(again, s);
            assert_eq!(format!("{}:{}", s.kind(), s.value()), s.to_string());
            let _ = s.is_node_selector();
            parsed.push(s);
        }
    }
    if !parsed.is_empty() {
        assert!(satisfies(&parsed, &parsed));
    }
});
