//! JWT-SVID validation against the attacks a validator must refuse (the rev-jwt review):
//! algorithm confusion, header parameters the JWT-SVID spec forbids, `kid`s of another
//! trust domain, `aud` in every shape, time claims in every shape, oversize tokens, and
//! bundle keys that are not what their length suggests. Each refusal is checked for its
//! kind (`Error::InvalidJwt`) first, then its reason.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "integration test: a panic is a failed test"
)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
};
use serde_json::{json, Value};
use spiffe::TrustDomain;
use ztid_spiffe::jwt::{validate, JwtKey, ValidatedJwt};
use ztid_spiffe::Error;

const NOW: i64 = 1_500;

/// SubjectPublicKeyInfo prefixes of uncompressed P-256 and P-384 points.
const SPKI_P256_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const SPKI_P384_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

fn pair(alg: &'static ring::signature::EcdsaSigningAlgorithm) -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).unwrap()
}

fn spki(prefix: &[u8], kp: &EcdsaKeyPair) -> Vec<u8> {
    let mut s = prefix.to_vec();
    s.extend_from_slice(kp.public_key().as_ref());
    s
}

/// A compact JWS with exactly this header and these claims, signed by `kp`.
fn sign(kp: &EcdsaKeyPair, header: Value, claims: Value) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = kp.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

fn es256(kid: &str) -> Value {
    json!({"alg": "ES256", "kid": kid, "typ": "JWT"})
}

fn claims(aud: Value) -> Value {
    json!({"sub": "spiffe://example.org/w", "aud": aud, "exp": 2_000, "iat": 1_000})
}

struct Domains {
    local: EcdsaKeyPair,
    other: EcdsaKeyPair,
    p384: EcdsaKeyPair,
}

impl Domains {
    fn new() -> Self {
        Self {
            local: pair(&ECDSA_P256_SHA256_FIXED_SIGNING),
            other: pair(&ECDSA_P256_SHA256_FIXED_SIGNING),
            p384: pair(&ECDSA_P384_SHA384_FIXED_SIGNING),
        }
    }

    /// example.org: `k1` (P-256) and `k384` (P-384); other.org: its own `k1` and `o1`,
    /// so the kid `k1` names a key in both domains.
    fn keys(&self, td: &TrustDomain) -> Option<Vec<JwtKey>> {
        let key = |kid: &str, spki: Vec<u8>| JwtKey {
            kid: kid.into(),
            spki,
        };
        match td.as_str() {
            "example.org" => Some(vec![
                key("k1", spki(SPKI_P256_PREFIX, &self.local)),
                key("k384", spki(SPKI_P384_PREFIX, &self.p384)),
            ]),
            "other.org" => Some(vec![
                key("k1", spki(SPKI_P256_PREFIX, &self.other)),
                key("o1", spki(SPKI_P256_PREFIX, &self.other)),
            ]),
            _ => None,
        }
    }

    fn check(&self, token: &str, audience: &str) -> Result<ValidatedJwt, Error> {
        validate(token, audience, NOW, |td| self.keys(td))
    }

    /// The reason of a refusal, which must be of the JWT kind.
    fn refused(&self, token: &str, audience: &str) -> String {
        match self.check(token, audience) {
            Err(Error::InvalidJwt(reason)) => reason,
            other => panic!("expected an InvalidJwt refusal, got {other:?}"),
        }
    }
}

#[test]
fn algorithm_confusion_is_refused() {
    let d = Domains::new();
    let good = sign(&d.local, es256("k1"), claims(json!(["db"])));
    d.check(&good, "db").expect("the honest token validates");
    let parts: Vec<&str> = good.split('.').collect();
    let with_header = |h: Value, sig: &[u8]| {
        format!(
            "{}.{}.{}",
            B64.encode(h.to_string()),
            parts[1],
            B64.encode(sig)
        )
    };
    // `none`, and HS256 keyed with the public key (the classic confusion): refused on the
    // algorithm, before any key is used.
    let none = with_header(json!({"alg": "none", "kid": "k1", "typ": "JWT"}), b"");
    assert_eq!(d.refused(&none, "db"), r#"unsupported algorithm "none""#);
    let hs_header = json!({"alg": "HS256", "kid": "k1", "typ": "JWT"});
    let input = format!("{}.{}", B64.encode(hs_header.to_string()), parts[1]);
    let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &spki(SPKI_P256_PREFIX, &d.local));
    let mac = ring::hmac::sign(&secret, input.as_bytes());
    let hs = format!("{input}.{}", B64.encode(mac.as_ref()));
    assert_eq!(d.refused(&hs, "db"), r#"unsupported algorithm "HS256""#);
    for alg in ["RS256", "PS256", "ES512", "es256", "EdDSA"] {
        let t = with_header(json!({"alg": alg, "kid": "k1"}), &[0; 64]);
        assert_eq!(
            d.refused(&t, "db"),
            format!("unsupported algorithm {alg:?}")
        );
    }
    let t = with_header(json!({"kid": "k1"}), &[0; 64]);
    assert_eq!(d.refused(&t, "db"), r#"unsupported algorithm """#);
    // ES384 named on a P-256 key, and ES256 on a P-384 key.
    let t = with_header(json!({"alg": "ES384", "kid": "k1"}), &[0; 96]);
    assert_eq!(
        d.refused(&t, "db"),
        r#"key "k1" is ES256, token says ES384"#
    );
    let t = sign(&d.p384, es256("k384"), claims(json!("db")));
    assert_eq!(
        d.refused(&t, "db"),
        r#"key "k384" is ES384, token says ES256"#
    );
    let t = sign(
        &d.p384,
        json!({"alg": "ES384", "kid": "k384"}),
        claims(json!("db")),
    );
    d.check(&t, "db")
        .expect("ES384 with its P-384 key validates");
    // typ of another kind of token (the token endpoint's access tokens).
    let t = sign(
        &d.local,
        json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}),
        claims(json!("db")),
    );
    assert_eq!(d.refused(&t, "db"), "typ must be JWT or JOSE");
}

#[test]
fn header_parameters_the_spec_forbids_are_refused() {
    let d = Domains::new();
    // Signed by the real key: only the header parameter is wrong. `crit` names an
    // extension the validator does not understand (RFC 7515 §4.1.11: must be refused).
    let t = sign(
        &d.local,
        json!({"alg": "ES256", "kid": "k1", "typ": "JWT", "crit": ["exp"]}),
        claims(json!("db")),
    );
    assert_eq!(
        d.refused(&t, "db"),
        r#"header parameter "crit" is not allowed in a JWT-SVID"#
    );
    // A key carried in the token itself is never the key that verifies it.
    let attacker = pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
    for (name, value) in [
        (
            "jwk",
            json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
        ),
        ("jku", json!("https://attacker.example/keys")),
        ("x5u", json!("https://attacker.example/cert")),
    ] {
        let mut h = es256("k1");
        h[name] = value;
        let t = sign(&attacker, h.clone(), claims(json!("db")));
        assert_eq!(
            d.refused(&t, "db"),
            format!("header parameter {name:?} is not allowed in a JWT-SVID")
        );
        let t = sign(&d.local, h, claims(json!("db")));
        assert_eq!(
            d.refused(&t, "db"),
            format!("header parameter {name:?} is not allowed in a JWT-SVID")
        );
    }
}

#[test]
fn a_kid_verifies_only_for_its_own_trust_domain() {
    let d = Domains::new();
    let t = sign(
        &d.local,
        json!({"alg": "ES256", "typ": "JWT"}),
        claims(json!("db")),
    );
    assert_eq!(d.refused(&t, "db"), "header has no kid");
    // A kid of another trust domain's key, for a subject of this one.
    let t = sign(&d.other, es256("o1"), claims(json!("db")));
    assert_eq!(
        d.refused(&t, "db"),
        r#"key "o1" is not in the bundle of example.org"#
    );
    // The same kid in both domains: other.org's key does not vouch for example.org.
    let t = sign(&d.other, es256("k1"), claims(json!("db")));
    assert_eq!(d.refused(&t, "db"), "signature does not verify");
    // For its own subjects it does; and a domain without a bundle validates nothing.
    let mut c = claims(json!("db"));
    c["sub"] = json!("spiffe://other.org/w");
    let t = sign(&d.other, es256("k1"), c.clone());
    assert_eq!(
        d.check(&t, "db").unwrap().spiffe_id.to_string(),
        "spiffe://other.org/w"
    );
    let t = sign(&d.local, es256("k1"), c);
    assert_eq!(d.refused(&t, "db"), "signature does not verify");
    let mut c = claims(json!("db"));
    c["sub"] = json!("spiffe://third.org/w");
    let t = sign(&d.local, es256("k1"), c);
    assert_eq!(d.refused(&t, "db"), "no bundle for trust domain third.org");
    let mut c = claims(json!("db"));
    c["sub"] = json!("https://example.org/w");
    let t = sign(&d.local, es256("k1"), c);
    assert!(d.refused(&t, "db").starts_with("sub is not a SPIFFE ID"));
}

#[test]
fn audience_in_every_shape() {
    let d = Domains::new();
    let one = sign(&d.local, es256("k1"), claims(json!("db")));
    d.check(&one, "db").expect("aud as a string");
    let two = sign(&d.local, es256("k1"), claims(json!(["db", "cache"])));
    d.check(&two, "db").expect("aud [db, cache] for db");
    d.check(&two, "cache").expect("aud [db, cache] for cache");
    let other = sign(&d.local, es256("k1"), claims(json!(["cache"])));
    assert_eq!(
        d.refused(&other, "db"),
        r#"audience "db" is not in the token's aud"#
    );
    let t = sign(&d.local, es256("k1"), claims(json!([])));
    assert_eq!(d.refused(&t, "db"), "token has an empty aud claim");
    // Any non-string member makes the claim malformed, even next to the right audience.
    let t = sign(&d.local, es256("k1"), claims(json!([1, "db"])));
    assert_eq!(d.refused(&t, "db"), "aud has a member that is not a string");
    let t = sign(&d.local, es256("k1"), claims(json!({"db": true})));
    assert_eq!(
        d.refused(&t, "db"),
        "aud is neither a string nor an array of strings"
    );
    let mut c = claims(json!("db"));
    c.as_object_mut().unwrap().remove("aud");
    let t = sign(&d.local, es256("k1"), c);
    assert_eq!(d.refused(&t, "db"), "token has no aud claim");
    // An empty audience to validate matches nothing, not an empty `aud` member.
    let t = sign(&d.local, es256("k1"), claims(json!([""])));
    assert_eq!(d.refused(&t, ""), "audience to validate is empty");
}

#[test]
fn time_claims_in_every_shape() {
    let d = Domains::new();
    let with = |name: &str, v: Value| {
        let mut c = claims(json!("db"));
        c[name] = v;
        sign(&d.local, es256("k1"), c)
    };
    let mut c = claims(json!("db"));
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        d.refused(&sign(&d.local, es256("k1"), c), "db"),
        "token has no exp claim"
    );
    assert_eq!(
        d.refused(&with("exp", json!(NOW)), "db"),
        "token has expired"
    );
    assert_eq!(
        d.refused(&with("exp", json!("3000")), "db"),
        "exp claim is not a NumericDate"
    );
    // RFC 7519 NumericDates may be non-integer.
    d.check(&with("exp", json!(NOW as f64 + 0.5)), "db")
        .expect("a fractional exp in the future");
    assert_eq!(
        d.refused(&with("exp", json!(NOW as f64 - 0.5)), "db"),
        "token has expired"
    );
    // The spec sets no upper bound on exp.
    d.check(&with("exp", json!(32_503_680_000_i64)), "db")
        .expect("far-future exp");
    // nbf: a token not yet valid is refused in whatever form the nbf is written; one
    // that cannot be read is refused rather than skipped.
    assert_eq!(
        d.refused(&with("nbf", json!(NOW + 1)), "db"),
        "token is not yet valid"
    );
    assert_eq!(
        d.refused(&with("nbf", json!(NOW as f64 + 0.5)), "db"),
        "token is not yet valid"
    );
    assert_eq!(
        d.refused(&with("nbf", json!("9999999999")), "db"),
        "nbf claim is not a NumericDate"
    );
    d.check(&with("nbf", json!(NOW)), "db")
        .expect("valid from now on");
    // iat: the signer's clock may be a minute ahead, not more.
    d.check(&with("iat", json!(NOW + 60)), "db")
        .expect("iat within the skew");
    assert_eq!(
        d.refused(&with("iat", json!(NOW + 61)), "db"),
        "token is issued in the future (iat more than 60 s ahead)"
    );
    assert_eq!(
        d.refused(&with("iat", json!(null)), "db"),
        "iat claim is not a NumericDate"
    );
}

#[test]
fn oversize_tokens_are_refused_before_parsing() {
    let d = Domains::new();
    let huge = "a".repeat(10 * 1024 * 1024);
    assert_eq!(
        d.refused(&huge, "db"),
        "token too long (more than 16384 bytes)"
    );
    let just_over = format!("{}.{}.x", "a".repeat(8 * 1024), "b".repeat(8 * 1024));
    assert_eq!(
        d.refused(&just_over, "db"),
        "token too long (more than 16384 bytes)"
    );
}

#[test]
fn a_bundle_key_of_another_curve_or_type_is_no_es256_key() {
    let d = Domains::new();
    let token = sign(&d.local, es256("k1"), claims(json!("db")));
    // The very point of the signing key, but the SubjectPublicKeyInfo names secp256k1
    // (OID 1.3.132.0.10): the point's length alone must not make it a P-256 key.
    let secp256k1 = [
        0x30, 0x56, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05,
        0x2b, 0x81, 0x04, 0x00, 0x0a, 0x03, 0x42, 0x00,
    ];
    // And an rsaEncryption SPKI whose BIT STRING happens to be 65 bytes long.
    let rsa = [
        0x30, 0x53, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
        0x05, 0x00, 0x03, 0x42, 0x00,
    ];
    for prefix in [&secp256k1[..], &rsa[..]] {
        let keys = |_: &TrustDomain| {
            Some(vec![JwtKey {
                kid: "k1".into(),
                spki: spki(prefix, &d.local),
            }])
        };
        match validate(&token, "db", NOW, keys) {
            Err(Error::InvalidJwt(reason)) => assert_eq!(
                reason,
                r#"bundle key "k1" of example.org is not a P-256 or P-384 key"#
            ),
            other => panic!("expected an InvalidJwt refusal, got {other:?}"),
        }
    }
}
