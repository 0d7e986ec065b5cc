//! SPIFFE trust bundle JSON (`ztid_spiffe::bundle::TrustBundle::from_spiffe_json`) and
//! PEM bundles (`from_pem`): never panic; a bundle that parses and encodes again
//! (`to_spiffe_json`, `jwks_json`) parses back to the same authorities.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztid_spiffe::bundle::TrustBundle;

const TD: &str = "example.org";

fuzz_target!(|data: &[u8]| {
    let _ = TrustBundle::from_pem(TD, data, 1);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(bundle) = TrustBundle::from_spiffe_json(TD, text) else {
        return;
    };
    let _ = bundle.x509_der();
    let _ = bundle.jwks_json();
    // Encoding refuses what it cannot express (an RSA authority, say); what it does
    // encode must read back as the same bundle.
    if let Ok(json) = bundle.to_spiffe_json() {
        let again = TrustBundle::from_spiffe_json(TD, &json).expect("an encoded bundle parses");
        assert_eq!(again.x509_authorities, bundle.x509_authorities);
        assert_eq!(again.jwt_authorities, bundle.jwt_authorities);
        assert_eq!(again.sequence, bundle.sequence);
        assert_eq!(again.refresh_hint_seconds, bundle.refresh_hint_seconds);
    }
});
