//! JWT-SVIDs: compact JWS with ES256, as the JWT-SVID spec requires. Minting takes a
//! signing callback (the CA's key stays in its key manager); validation checks the
//! token against the JWT authorities of the subject's own trust domain.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED};
use serde_json::{json, Map, Value};
use spiffe::{SpiffeId, TrustDomain};

use crate::Error;

/// Longest token we will look at: JWT-SVIDs are a few hundred bytes.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A JWT authority's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// The key id (`kid`).
    pub kid: String,
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
}

/// Mints a compact JWS with header `{"alg":"ES256","kid":…,"typ":"JWT"}`.
/// `sign` must return the fixed-width (r||s) ES256 signature of its input.
pub fn encode_es256<E>(
    kid: &str,
    claims: &Map<String, Value>,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E> {
    let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    let mut out = String::with_capacity(512);
    B64.encode_string(header.to_string(), &mut out);
    out.push('.');
    B64.encode_string(Value::Object(claims.clone()).to_string(), &mut out);
    let sig = sign(out.as_bytes())?;
    out.push('.');
    B64.encode_string(sig, &mut out);
    Ok(out)
}

/// The `kid` in a token's header, without validating anything (for bookkeeping only).
pub fn kid_of(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    decode_json(header, "header")
        .ok()?
        .get("kid")?
        .as_str()
        .map(str::to_string)
}

/// A token's claims, without validating anything: for a holder to check that a token
/// it was handed says what it asked for (what it may trust is for [`validate`] to say).
pub fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    decode_json(token.split('.').nth(1)?, "claims").ok()
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedJwt {
    /// The `sub` claim.
    pub spiffe_id: SpiffeId,
    /// Every claim of the token.
    pub claims: Map<String, Value>,
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, Error> {
    let bytes = B64
        .decode(part)
        .map_err(|_| Error::InvalidJwt(format!("{what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Error::InvalidJwt(format!("{what} is not a JSON object"))),
    }
}

/// DER SubjectPublicKeyInfo prefixes of uncompressed EC points: id-ecPublicKey with the
/// named curve P-256 (prime256v1) or P-384 (secp384r1), then the BIT STRING header.
pub const SPKI_P256_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// See [`SPKI_P256_PREFIX`].
pub const SPKI_P384_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

/// The JWS algorithm a P-256 or P-384 SubjectPublicKeyInfo verifies, and its uncompressed
/// point. The algorithm and curve OIDs are compared, not guessed from the point's length:
/// a key of another curve or type (secp256k1, brainpool, RSA) is no ES256 key, whatever
/// its length.
pub fn es_point(spki: &[u8]) -> Option<(&'static str, &[u8])> {
    let (alg, point) = if let Some(p) = spki.strip_prefix(SPKI_P256_PREFIX) {
        ("ES256", p)
    } else {
        ("ES384", spki.strip_prefix(SPKI_P384_PREFIX)?)
    };
    let len = if alg == "ES256" { 65 } else { 97 };
    (point.len() == len && point.first() == Some(&4)).then_some((alg, point))
}

/// Header parameters a JWT-SVID may carry: "Any header not described here, registered or
/// private, MUST NOT be included" (JWT-SVID §2). So `crit` (extensions we do not
/// understand, RFC 7515 §4.1.11) and key-carrying headers (`jwk`, `jku`, `x5u`, `x5c`)
/// are refused, not ignored.
const HEADER_PARAMETERS: [&str; 3] = ["alg", "kid", "typ"];

/// How far ahead of our clock a token's `iat` may be (the signer's clock skew), as
/// go-jose's default leeway; the token endpoint's access tokens use the same.
pub const MAX_IAT_SKEW_SECONDS: f64 = 60.0;

/// At most this much of a caller's string goes into an error message.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A NumericDate claim (RFC 7519 §2: a JSON number, possibly non-integer), `None` when
/// absent. Present in any other form, it is refused: a check it would have made is not
/// skipped.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, Error> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite())
            .map(Some)
            .ok_or_else(|| Error::InvalidJwt(format!("{name} claim is not a NumericDate"))),
    }
}

/// Validates a JWT-SVID for `audience` at `now` (Unix seconds). `keys_for` returns
/// the JWT authorities of a trust domain, `None` when no bundle is known for it.
pub fn validate(
    token: &str,
    audience: &str,
    now: i64,
    keys_for: impl Fn(&TrustDomain) -> Option<Vec<JwtKey>>,
) -> Result<ValidatedJwt, Error> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Error::InvalidJwt(format!(
            "token too long (more than {MAX_TOKEN_LEN} bytes)"
        )));
    }
    // Every token carries at least one audience, so an empty one would never be the
    // validator's own: refused rather than matched against an empty `aud` member.
    if audience.is_empty() {
        return Err(Error::InvalidJwt("audience to validate is empty".into()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::InvalidJwt(
            "not a compact JWS (three dot-separated parts)".into(),
        ));
    };
    let header = decode_json(h, "header")?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if !matches!(alg, "ES256" | "ES384") {
        return Err(Error::InvalidJwt(format!(
            "unsupported algorithm {:?}",
            shown(alg)
        )));
    }
    if let Some(other) = header
        .keys()
        .find(|k| !HEADER_PARAMETERS.contains(&k.as_str()))
    {
        return Err(Error::InvalidJwt(format!(
            "header parameter {:?} is not allowed in a JWT-SVID",
            shown(other)
        )));
    }
    if let Some(typ) = header.get("typ") {
        if !matches!(typ.as_str(), Some("JWT") | Some("JOSE")) {
            return Err(Error::InvalidJwt("typ must be JWT or JOSE".into()));
        }
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidJwt("header has no kid".into()))?;
    let claims = decode_json(c, "claims")?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidJwt("token has no sub claim".into()))?;
    let spiffe_id = crate::spiffe_id::parse(sub)
        .map_err(|e| Error::InvalidJwt(format!("sub is not a SPIFFE ID: {e}")))?;
    // Only the keys of the subject's own trust domain: a key of another domain, even one
    // with the same kid, never vouches for this subject.
    let td = spiffe_id.trust_domain();
    let keys = keys_for(td)
        .ok_or_else(|| Error::InvalidJwt(format!("no bundle for trust domain {td}")))?;
    let key = keys.iter().find(|k| k.kid == kid).ok_or_else(|| {
        Error::InvalidJwt(format!("key {:?} is not in the bundle of {td}", shown(kid)))
    })?;
    let (key_alg, point) = es_point(&key.spki).ok_or_else(|| {
        Error::InvalidJwt(format!(
            "bundle key {:?} of {td} is not a P-256 or P-384 key",
            shown(kid)
        ))
    })?;
    if key_alg != alg {
        return Err(Error::InvalidJwt(format!(
            "key {:?} is {key_alg}, token says {alg}",
            shown(kid)
        )));
    }
    let sig = B64
        .decode(s)
        .map_err(|_| Error::InvalidJwt("signature is not base64url".into()))?;
    let verify_alg = if alg == "ES256" {
        &ECDSA_P256_SHA256_FIXED
    } else {
        &ECDSA_P384_SHA384_FIXED
    };
    // The signing input `h.c` is a prefix of the token.
    let signed = token
        .get(..h.len() + 1 + c.len())
        .ok_or_else(|| Error::InvalidJwt("not a compact JWS".into()))?;
    UnparsedPublicKey::new(verify_alg, point)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| Error::InvalidJwt("signature does not verify".into()))?;

    let now_f = now as f64;
    let exp = numeric_date(&claims, "exp")?
        .ok_or_else(|| Error::InvalidJwt("token has no exp claim".into()))?;
    if now_f >= exp {
        return Err(Error::InvalidJwt("token has expired".into()));
    }
    if numeric_date(&claims, "nbf")?.is_some_and(|nbf| now_f < nbf) {
        return Err(Error::InvalidJwt("token is not yet valid".into()));
    }
    if numeric_date(&claims, "iat")?.is_some_and(|iat| iat > now_f + MAX_IAT_SKEW_SECONDS) {
        return Err(Error::InvalidJwt(format!(
            "token is issued in the future (iat more than {MAX_IAT_SKEW_SECONDS} s ahead)"
        )));
    }
    // `aud`: one string, or an array of strings with at least one (JWT-SVID §3.2).
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list
            .iter()
            .map(Value::as_str)
            .collect::<Option<_>>()
            .ok_or_else(|| Error::InvalidJwt("aud has a member that is not a string".into()))?,
        Some(_) => {
            return Err(Error::InvalidJwt(
                "aud is neither a string nor an array of strings".into(),
            ))
        }
        None => return Err(Error::InvalidJwt("token has no aud claim".into())),
    };
    if audiences.is_empty() {
        return Err(Error::InvalidJwt("token has an empty aud claim".into()));
    }
    if !audiences.contains(&audience) {
        return Err(Error::InvalidJwt(format!(
            "audience {:?} is not in the token's aud",
            shown(audience)
        )));
    }
    Ok(ValidatedJwt { spiffe_id, claims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair};

    fn key() -> (EcdsaKeyPair, JwtKey) {
        let rng = SystemRandom::new();
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            doc.as_ref(),
            &rng,
        )
        .unwrap();
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(kp.public_key().as_ref());
        (
            kp,
            JwtKey {
                kid: "k1".into(),
                spki,
            },
        )
    }

    fn mint(kp: &EcdsaKeyPair, claims: Value) -> String {
        let Value::Object(m) = claims else { panic!() };
        encode_es256::<()>("k1", &m, |msg| {
            Ok(kp
                .sign(&SystemRandom::new(), msg)
                .unwrap()
                .as_ref()
                .to_vec())
        })
        .unwrap()
    }

    #[test]
    fn validates_and_refuses_with_reasons() {
        let (kp, jk) = key();
        let keys = |td: &TrustDomain| (td.as_str() == "example.org").then(|| vec![jk.clone()]);
        let good = mint(
            &kp,
            json!({"sub": "spiffe://example.org/w", "aud": ["db"], "exp": 2000, "iat": 1000}),
        );
        let v = validate(&good, "db", 1500, keys).unwrap();
        assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/w");
        assert_eq!(v.claims["iat"], 1000);

        let err =
            |t: &str, aud: &str, now: i64| validate(t, aud, now, keys).unwrap_err().to_string();
        assert!(err(&good, "web", 1500).contains("audience \"web\" is not in"));
        assert!(err(&good, "db", 2000).contains("expired"));
        let other_td = mint(
            &kp,
            json!({"sub": "spiffe://other.org/w", "aud": "db", "exp": 2000}),
        );
        assert!(err(&other_td, "db", 1500).contains("no bundle for trust domain other.org"));
        let no_exp = mint(&kp, json!({"sub": "spiffe://example.org/w", "aud": "db"}));
        assert!(err(&no_exp, "db", 1500).contains("no exp"));
        // Tampered claims: signature no longer verifies.
        let parts: Vec<_> = good.split('.').collect();
        let forged_claims = B64.encode(
            json!({"sub": "spiffe://example.org/admin", "aud": ["db"], "exp": 2000}).to_string(),
        );
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert!(err(&forged, "db", 1500).contains("signature does not verify"));
        // alg none / HS256 are refused before any key is looked at.
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none","kid":"k1"}"#),
            parts[1]
        );
        assert!(err(&none, "db", 1500).contains("unsupported algorithm \"none\""));
        assert!(err("a.b", "db", 1500).contains("three dot-separated parts"));
    }
}
