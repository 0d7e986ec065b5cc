//! JWT-SVID validation (`ztid_spiffe::jwt::validate`, and `kid_of`) with fixed keys.
//!
//! The first byte picks the mode:
//! - even: the rest is a token, validated as it is (parsing, header checks, key lookup,
//!   signature check);
//! - odd: the rest is `header ‖ 0x00 ‖ claims`; the harness base64url-encodes both and
//!   signs them with the fixed P-256 key, so the checks after the signature (exp, nbf,
//!   aud, sub) see arbitrary JSON too.
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use ztid_spiffe::jwt::{self, JwtKey};

/// A P-256 key made for this harness only (never trusted anywhere): scalar and point.
const P256_PRIVATE: &str = "17bd04d97c5f259f029a4a5336891d8fee2aa5f1d4e4b846c82ad1a38528dff6";
const P256_SPKI: &str = "3059301306072a8648ce3d020106082a8648ce3d03010703420004e72e2fa24e14ba9e1201ac62196502fc938b159fca34da5486bde0bdbca2521b17339e7a51c526eed0ae107d558395e9cd104134e9922783abc438ffb144804a";
/// A P-384 public key (a token signed "ES256" naming it must be refused).
const P384_SPKI: &str = "3076301006072a8648ce3d020106052b810400220362000433e99f873a85218169f4d16c2808319a6499dfc430a308859f554d5a354d8cbe8784581422c487c6dc183c8654052e05efc84c01de6072f8647d4d7960dc1eab57aec14b0f2183a9631831ba180268759a079404596374c546ded708d553a0a2";

const NOW: i64 = 1_700_000_000;
const AUDIENCE: &str = "spiffe://example.org/audience";

struct Fixture {
    signer: EcdsaKeyPair,
    keys: Vec<JwtKey>,
    rng: SystemRandom,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("constant hex"))
        .collect()
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rng = SystemRandom::new();
        let spki = unhex(P256_SPKI);
        let point = &spki[spki.len() - 65..];
        let signer = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &unhex(P256_PRIVATE),
            point,
            &rng,
        )
        .expect("constant key");
        let keys = vec![
            JwtKey {
                kid: "k256".into(),
                spki,
            },
            JwtKey {
                kid: "k384".into(),
                spki: unhex(P384_SPKI),
            },
            JwtKey {
                kid: "junk".into(),
                spki: b"not a key".to_vec(),
            },
        ];
        Fixture { signer, keys, rng }
    })
}

fn check(f: &Fixture, token: &str) {
    let _ = jwt::kid_of(token);
    let validated = jwt::validate(token, AUDIENCE, NOW, |td| {
        (td.to_string() == "example.org").then(|| f.keys.clone())
    });
    if let Ok(v) = validated {
        // What passed must be what the token says.
        assert_eq!(v.spiffe_id.trust_domain().to_string(), "example.org");
        // (A NumericDate: fractional and beyond i64 are valid.)
        assert!(v
            .claims
            .get("exp")
            .and_then(|e| e.as_f64())
            .is_some_and(|e| e > NOW as f64));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    if mode & 1 == 0 {
        if let Ok(token) = std::str::from_utf8(rest) {
            check(f, token);
        }
        return;
    }
    let (header, claims) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut token = B64.encode(header);
    token.push('.');
    B64.encode_string(claims, &mut token);
    let sig = f
        .signer
        .sign(&f.rng, token.as_bytes())
        .expect("signing with a valid key");
    token.push('.');
    B64.encode_string(sig.as_ref(), &mut token);
    check(f, &token);
});
