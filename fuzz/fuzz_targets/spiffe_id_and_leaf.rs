//! SPIFFE IDs (`ztid_spiffe::spiffe_id::parse`, the one rule every entry point uses) and
//! the X509-SVID leaf readers the node API and the agent apply to a peer's certificate
//! (`ztid_spiffe::svid`): never panic; an ID that parses is canonical (it prints back
//! byte for byte, and holds only the allowed bytes); a leaf's facts agree with the
//! single-purpose readers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztid_spiffe::{spiffe_id, svid};

fn ids(text: &str) {
    for line in text.lines() {
        if let Ok(id) = spiffe_id::parse(line) {
            assert_eq!(id.to_string(), line, "a parsed ID is its canonical spelling");
            let rest = line.strip_prefix("spiffe://").expect("the canonical scheme");
            assert!(
                rest.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/')),
                "only the allowed bytes: {line:?}"
            );
            assert!(!line.ends_with('/') && !rest.contains("//"));
            assert!(!rest.split('/').skip(1).any(|s| s == "." || s == ".."));
            let td = spiffe_id::parse_trust_domain(id.trust_domain().as_str())
                .expect("an ID's trust domain parses alone");
            assert_eq!(&td, id.trust_domain());
            let _ = spiffe_id::is_reserved(&id);
        }
        if let Ok(td) = spiffe_id::parse_trust_domain(line) {
            let name = td.as_str();
            assert!(line == name || line == format!("spiffe://{name}"));
        }
    }
}

fn leaf(der: &[u8]) {
    let facts = svid::leaf_facts(der);
    let id = svid::spiffe_id_of_leaf(der);
    assert_eq!(facts.is_ok(), id.is_ok(), "leaf_facts and spiffe_id_of_leaf agree");
    if let (Ok(facts), Ok(id)) = (facts, id) {
        assert_eq!(facts.spiffe_id, id);
        assert_eq!(Some(&facts.serial_hex), svid::serial_hex(der).ok().as_ref());
        assert_eq!(Some(facts.not_after), svid::not_after(der).ok());
        assert_eq!(Some(&facts.key_sha256), svid::key_sha256(der).ok().as_ref());
        assert_eq!(spiffe_id::parse(&id.to_string()).ok(), Some(id));
    }
    let _ = svid::not_before(der);
}

fuzz_target!(|data: &[u8]| {
    // First byte: what the rest is (IDs as text lines, a DER leaf, or PEM).
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                ids(text);
            }
        }
        1 => leaf(rest),
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(certs) = svid::certs_from_pem(text) {
                    for der in &certs {
                        leaf(der);
                    }
                }
            }
        }
    }
});
