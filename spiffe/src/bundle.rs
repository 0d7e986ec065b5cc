//! A trust domain's bundle: its X.509 authorities and JWT authorities, with the
//! SPIFFE bundle JSON (a JWK Set with `spiffe_sequence` and `spiffe_refresh_hint`).

use base64::engine::general_purpose::{STANDARD as B64STD, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use serde_json::{json, Value};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::jwt::{JwtKey, SPKI_P256_PREFIX, SPKI_P384_PREFIX};
use crate::limits::at_most;
use crate::Error;
use crate::RefusalKind::{self, Malformed, TrustDomainMismatch};
use ring::agreement::{self, ECDH_P256, ECDH_P384};

/// A trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrustBundle {
    /// The trust domain name (`example.org`).
    pub trust_domain: String,
    /// DER CA certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT authorities.
    pub jwt_authorities: Vec<JwtKey>,
    /// `spiffe_sequence`: grows on every change.
    pub sequence: u64,
    /// `spiffe_refresh_hint` in seconds.
    pub refresh_hint_seconds: i64,
    /// Ids of tainted authorities (X.509: hex serial; JWT: kid), still trusted but to be
    /// replaced. Not part of the SPIFFE bundle JSON.
    pub tainted: Vec<String>,
}

/// JWK members `kty`, `crv`, `x`, `y` of an EC public key given as SPKI.
fn ec_jwk_members(spki: &[u8]) -> Result<serde_json::Map<String, Value>, Error> {
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|_| Error::InvalidSvid("public key does not parse".into()))?;
    let point = info.subject_public_key.data.as_ref();
    let (crv, n) = match point.len() {
        65 => ("P-256", 32),
        97 => ("P-384", 48),
        _ => return Err(Error::InvalidSvid("not a P-256 or P-384 key".into())),
    };
    // The point is 0x04 || x || y, each coordinate n bytes (the length was checked above).
    let (x, y) = point
        .get(1..)
        .and_then(|coords| coords.split_at_checked(n))
        .ok_or_else(|| Error::InvalidSvid("not a P-256 or P-384 key".into()))?;
    let mut m = serde_json::Map::new();
    m.insert("kty".into(), json!("EC"));
    m.insert("crv".into(), json!(crv));
    m.insert("x".into(), json!(B64URL.encode(x)));
    m.insert("y".into(), json!(B64URL.encode(y)));
    Ok(m)
}

impl TrustBundle {
    /// The `spiffe://TD` form used as the key of bundle maps.
    pub fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.trust_domain)
    }

    /// Concatenated DER of the X.509 authorities (the Workload API's bundle encoding).
    pub fn x509_der(&self) -> Vec<u8> {
        crate::svid::concat_der(self.x509_authorities.iter().map(Vec::as_slice))
    }

    fn jwt_keys_json(&self) -> Result<Vec<Value>, Error> {
        self.jwt_authorities
            .iter()
            .map(|k| {
                let mut m = ec_jwk_members(&k.spki)?;
                m.insert("kid".into(), json!(k.kid));
                m.insert("use".into(), json!("jwt-svid"));
                Ok(Value::Object(m))
            })
            .collect()
    }

    /// The JWT authorities as a JWK Set (what FetchJWTBundles carries).
    pub fn jwks_json(&self) -> Result<String, Error> {
        Ok(json!({"keys": self.jwt_keys_json()?}).to_string())
    }

    /// The whole bundle as SPIFFE bundle JSON.
    pub fn to_spiffe_json(&self) -> Result<String, Error> {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let (_, cert) = X509Certificate::from_der(der)
                .map_err(|_| Error::InvalidSvid("authority certificate does not parse".into()))?;
            let mut m = ec_jwk_members(cert.public_key().raw)?;
            m.insert("use".into(), json!("x509-svid"));
            m.insert("x5c".into(), json!([B64STD.encode(der)]));
            keys.push(Value::Object(m));
        }
        keys.extend(self.jwt_keys_json()?);
        let doc = json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint_seconds,
        });
        serde_json::to_string_pretty(&doc).map_err(|e| Error::Protocol(e.to_string()))
    }
}

impl From<&ztid_proto::node::Bundle> for TrustBundle {
    fn from(b: &ztid_proto::node::Bundle) -> Self {
        Self {
            trust_domain: b.trust_domain.clone(),
            x509_authorities: b.x509_authorities.clone(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| JwtKey {
                    kid: k.kid.clone(),
                    spki: k.public_key.clone(),
                })
                .collect(),
            sequence: b.sequence,
            refresh_hint_seconds: b.refresh_hint_seconds,
            tainted: b.tainted_authorities.clone(),
        }
    }
}

impl From<&TrustBundle> for ztid_proto::node::Bundle {
    fn from(b: &TrustBundle) -> Self {
        Self {
            trust_domain: b.trust_domain.clone(),
            x509_authorities: b.x509_authorities.clone(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| ztid_proto::node::JwtAuthority {
                    kid: k.kid.clone(),
                    public_key: k.spki.clone(),
                    expires_at: 0,
                })
                .collect(),
            sequence: b.sequence,
            refresh_hint_seconds: b.refresh_hint_seconds,
            tainted_authorities: b.tainted.clone(),
        }
    }
}

/// Longest JWT key id a bundle may carry, bytes (SPIRE's are 32 characters, ztid's 36).
/// A longer one is refused without being quoted: refusals name the key id, and each is
/// logged, audited and kept as a federation's last error, so a peer could otherwise make
/// every refusal it causes as large as its bundle (1 MiB).
pub const MAX_KID_BYTES: usize = 256;

/// Most JWT authorities one bundle may hold: a trust domain has a few (prepared, active,
/// old) per server; a peer's thousands would reach every workload's JWT bundle.
pub const MAX_JWT_AUTHORITIES: usize = 256;

/// Whether an uncompressed point is on the curve of `alg`: ring checks a peer's point
/// before any key agreement, and has no other call that checks one alone.
fn on_curve(alg: &'static agreement::Algorithm, point: &[u8]) -> Result<bool, Error> {
    let rng = ring::rand::SystemRandom::new();
    let ours = agreement::EphemeralPrivateKey::generate(alg, &rng)
        .map_err(|_| Error::Config("the system's random number generator failed".into()))?;
    Ok(
        agreement::agree_ephemeral(ours, &agreement::UnparsedPublicKey::new(alg, point), |_| ())
            .is_ok(),
    )
}

/// The trust domain named by a CA certificate's SPIFFE URI SAN, if any.
fn spiffe_trust_domain_of_cert(cert: &X509Certificate<'_>) -> Option<String> {
    use x509_parser::prelude::GeneralName;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => u.strip_prefix("spiffe://").map(|rest| {
            rest.split('/')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase()
        }),
        _ => None,
    })
}

fn refuse(kind: RefusalKind, reason: impl Into<String>) -> Error {
    Error::refused(kind, reason)
}

impl TrustBundle {
    /// Parses SPIFFE bundle JSON (a JWK Set with `spiffe_sequence` and
    /// `spiffe_refresh_hint`) for trust domain `td`, per the SPIFFE Trust Domain and
    /// Bundle spec: `keys` is required (it may be empty), keys with an unknown `use` or
    /// `kty` are ignored, `x509-svid` keys take the first certificate of `x5c`,
    /// `jwt-svid` keys need a `kid`; duplicate and malformed keys refuse the whole
    /// document, as does an authority certificate naming another trust domain.
    /// Errors are [`Error::Refused`] with the reason.
    pub fn from_spiffe_json(td: &str, json: &str) -> Result<Self, Error> {
        let doc: Value = serde_json::from_str(json)
            .map_err(|e| refuse(Malformed, format!("bundle is not valid JSON: {e}")))?;
        let obj = doc
            .as_object()
            .ok_or_else(|| refuse(Malformed, "bundle is not a JSON object"))?;
        let keys = obj
            .get("keys")
            .ok_or_else(|| refuse(Malformed, "bundle has no keys member"))?
            .as_array()
            .ok_or_else(|| refuse(Malformed, "bundle keys member is not an array"))?;
        let sequence = match obj.get("spiffe_sequence") {
            None => 0,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| refuse(Malformed, "spiffe_sequence is not an unsigned integer"))?,
        };
        let refresh_hint_seconds = match obj.get("spiffe_refresh_hint") {
            None => 0,
            Some(v) => v.as_i64().filter(|h| *h >= 0).ok_or_else(|| {
                refuse(
                    Malformed,
                    "spiffe_refresh_hint is not a non-negative integer",
                )
            })?,
        };
        let mut out = TrustBundle {
            trust_domain: td.to_string(),
            sequence,
            refresh_hint_seconds,
            ..Default::default()
        };
        for (i, key) in keys.iter().enumerate() {
            let key = key.as_object().ok_or_else(|| {
                refuse(Malformed, format!("malformed key {i}: not a JSON object"))
            })?;
            let kty = key
                .get("kty")
                .and_then(Value::as_str)
                .ok_or_else(|| refuse(Malformed, format!("malformed key {i}: no kty")))?;
            let use_ = key
                .get("use")
                .and_then(Value::as_str)
                .ok_or_else(|| refuse(Malformed, format!("malformed key {i}: no use")))?;
            match use_ {
                "x509-svid" => {
                    let x5c = key
                        .get("x5c")
                        .and_then(Value::as_array)
                        .and_then(|a| a.first())
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            refuse(
                                Malformed,
                                format!("malformed x509-svid key {i}: no x5c certificate"),
                            )
                        })?;
                    let der = B64STD.decode(x5c).map_err(|_| {
                        refuse(
                            Malformed,
                            format!("malformed x509-svid key {i}: x5c is not base64"),
                        )
                    })?;
                    let (rest, cert) = X509Certificate::from_der(&der).map_err(|_| {
                        refuse(
                            Malformed,
                            format!("malformed x509-svid key {i}: x5c is not a certificate"),
                        )
                    })?;
                    if !rest.is_empty() {
                        return Err(refuse(
                            Malformed,
                            format!(
                                "malformed x509-svid key {i}: trailing data after the certificate"
                            ),
                        ));
                    }
                    if let Some(other) = spiffe_trust_domain_of_cert(&cert) {
                        if other != td {
                            return Err(refuse(
                                TrustDomainMismatch,
                                format!("x509-svid key {i} claims trust domain {other}, not {td}"),
                            ));
                        }
                    }
                    if out.x509_authorities.contains(&der) {
                        return Err(refuse(Malformed, format!("duplicate x509-svid key {i}")));
                    }
                    out.x509_authorities.push(der);
                }
                "jwt-svid" => {
                    let kid = match key.get("kid").and_then(Value::as_str) {
                        Some(k) if !k.is_empty() => k.to_string(),
                        _ => return Err(refuse(Malformed, "jwt-svid key without kid")),
                    };
                    if kid.len() > MAX_KID_BYTES {
                        return Err(refuse(
                            Malformed,
                            format!(
                                "jwt-svid key {i}: its kid is {} bytes, at most {MAX_KID_BYTES}",
                                kid.len()
                            ),
                        ));
                    }
                    if out.jwt_authorities.iter().any(|k| k.kid == kid) {
                        return Err(refuse(Malformed, format!("duplicate key id {kid}")));
                    }
                    if kty != "EC" {
                        tracing::warn!(kid, kty, "ignoring a jwt-svid key of an unsupported type");
                        continue;
                    }
                    let bad = || refuse(Malformed, format!("malformed jwt-svid key {kid}"));
                    let crv = key.get("crv").and_then(Value::as_str).ok_or_else(bad)?;
                    let coord = |name: &str| {
                        key.get(name)
                            .and_then(Value::as_str)
                            .and_then(|s| B64URL.decode(s).ok())
                            .ok_or_else(bad)
                    };
                    let (x, y) = (coord("x")?, coord("y")?);
                    let (prefix, n, alg, ecdh) = match crv {
                        "P-256" => (SPKI_P256_PREFIX, 32, "ES256", &ECDH_P256),
                        "P-384" => (SPKI_P384_PREFIX, 48, "ES384", &ECDH_P384),
                        _ => {
                            tracing::warn!(
                                kid,
                                crv,
                                "ignoring a jwt-svid key on an unsupported curve"
                            );
                            continue;
                        }
                    };
                    if x.len() != n || y.len() != n {
                        return Err(bad());
                    }
                    // A key meant for another algorithm is not one to verify ES tokens with.
                    if let Some(a) = key.get("alg").filter(|a| a.as_str() != Some(alg)) {
                        return Err(refuse(
                            Malformed,
                            format!(
                                "malformed jwt-svid key {kid}: alg {a} is not {alg}, the algorithm of curve {crv}"
                            ),
                        ));
                    }
                    at_most(
                        "jwt-svid keys in one bundle",
                        out.jwt_authorities.len() + 1,
                        MAX_JWT_AUTHORITIES,
                    )
                    .map_err(|e| refuse(Malformed, e.to_string()))?;
                    let mut spki = prefix.to_vec();
                    spki.push(4);
                    spki.extend_from_slice(&x);
                    spki.extend_from_slice(&y);
                    let point = spki.get(prefix.len()..).unwrap_or_default();
                    if !on_curve(ecdh, point)? {
                        return Err(refuse(
                            Malformed,
                            format!(
                                "malformed jwt-svid key {kid}: the point is not on curve {crv}"
                            ),
                        ));
                    }
                    out.jwt_authorities.push(JwtKey { kid, spki });
                }
                other => {
                    tracing::debug!(key = i, r#use = other, "ignoring a key with an unknown use");
                }
            }
        }
        Ok(out)
    }

    /// Parses PEM CA certificates (X.509 authorities only) for trust domain `td`.
    pub fn from_pem(td: &str, pem_text: &[u8], sequence: u64) -> Result<Self, Error> {
        let blocks = pem::parse_many(pem_text)
            .map_err(|e| refuse(Malformed, format!("malformed PEM: {e}")))?;
        let mut out = TrustBundle {
            trust_domain: td.to_string(),
            sequence,
            ..Default::default()
        };
        for (i, b) in blocks
            .into_iter()
            .filter(|b| b.tag() == "CERTIFICATE")
            .enumerate()
        {
            let der = b.into_contents();
            let (_, cert) = X509Certificate::from_der(&der)
                .map_err(|_| refuse(Malformed, format!("malformed certificate {i}")))?;
            if let Some(other) = spiffe_trust_domain_of_cert(&cert) {
                if other != td {
                    return Err(refuse(
                        TrustDomainMismatch,
                        format!("certificate {i} claims trust domain {other}, not {td}"),
                    ));
                }
            }
            if out.x509_authorities.contains(&der) {
                return Err(refuse(Malformed, format!("duplicate certificate {i}")));
            }
            out.x509_authorities.push(der);
        }
        if out.x509_authorities.is_empty() {
            return Err(refuse(Malformed, "no certificate in the PEM bundle"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod spiffe_json_tests {
    use super::*;

    /// A peer's key id is quoted in refusals (logged, audited, kept as the federation's
    /// last error): one longer than any real kid is refused without being quoted.
    #[test]
    fn a_huge_kid_is_refused_without_being_quoted() {
        let kid = "k".repeat(512 * 1024);
        let doc = serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC", "kid": kid}]});
        let err = TrustBundle::from_spiffe_json("example.org", &doc.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.len() < 200, "{} bytes: {}", err.len(), &err[..200]);
        assert!(
            err.contains(&format!(
                "its kid is {} bytes, at most {MAX_KID_BYTES}",
                kid.len()
            )),
            "{err}"
        );
        // At the bound, the key is judged on the rest (here: no curve).
        let kid = "k".repeat(MAX_KID_BYTES);
        let doc = serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC", "kid": kid}]});
        let err = TrustBundle::from_spiffe_json("example.org", &doc.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("malformed jwt-svid key"), "{err}");
    }

    fn ca(td: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(format!("spiffe://{td}")).unwrap(),
        )];
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn jwt_key(kid: &str) -> JwtKey {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        JwtKey {
            kid: kid.into(),
            spki: rcgen::PublicKeyData::subject_public_key_info(&key),
        }
    }

    /// The detail of a refusal of `kind`.
    fn refused(r: Result<TrustBundle, Error>, kind: RefusalKind) -> String {
        match r {
            Err(Error::Refused(r)) if r.kind == kind => r.detail,
            other => panic!("expected a {kind} refusal, got {other:?}"),
        }
    }

    #[test]
    fn round_trip() {
        let b = TrustBundle {
            trust_domain: "b.test".into(),
            x509_authorities: vec![ca("b.test"), ca("b.test")],
            jwt_authorities: vec![jwt_key("k1"), jwt_key("k2")],
            sequence: u64::MAX,
            refresh_hint_seconds: 5,
            tainted: vec![],
        };
        let parsed = TrustBundle::from_spiffe_json("b.test", &b.to_spiffe_json().unwrap()).unwrap();
        assert_eq!(parsed, b);
    }

    #[test]
    fn spec_rules() {
        assert!(
            refused(TrustBundle::from_spiffe_json("b.test", "{}"), Malformed).contains("no keys")
        );
        let empty = TrustBundle::from_spiffe_json("b.test", r#"{"keys":[]}"#).unwrap();
        assert!(empty.x509_authorities.is_empty() && empty.sequence == 0);
        // Unknown use and kty are ignored.
        let ok = TrustBundle::from_spiffe_json(
            "b.test",
            r#"{"keys":[{"kty":"EC","use":"wit-svid"},{"kty":"OKP","use":"jwt-svid","kid":"z"}],"spiffe_sequence":3}"#,
        )
        .unwrap();
        assert!(ok.jwt_authorities.is_empty() && ok.sequence == 3);
        assert_eq!(
            refused(
                TrustBundle::from_spiffe_json(
                    "b.test",
                    r#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-256","x":"AA","y":"AA"}]}"#
                ),
                Malformed
            ),
            "jwt-svid key without kid"
        );
        let b = TrustBundle {
            trust_domain: "b.test".into(),
            jwt_authorities: vec![jwt_key("k1")],
            ..Default::default()
        };
        let j = b.to_spiffe_json().unwrap();
        let mut v: Value = serde_json::from_str(&j).unwrap();
        let k = v["keys"][0].clone();
        v["keys"].as_array_mut().unwrap().push(k);
        assert!(refused(
            TrustBundle::from_spiffe_json("b.test", &v.to_string()),
            Malformed
        )
        .contains("duplicate key id k1"));
        v["keys"][1]["kid"] = json!("k2");
        v["keys"][1]["x"] = json!("AAAA");
        assert!(refused(
            TrustBundle::from_spiffe_json("b.test", &v.to_string()),
            Malformed
        )
        .contains("malformed jwt-svid key k2"));
        let other = TrustBundle {
            trust_domain: "c.test".into(),
            x509_authorities: vec![ca("c.test")],
            ..Default::default()
        };
        assert!(refused(
            TrustBundle::from_spiffe_json("b.test", &other.to_spiffe_json().unwrap()),
            TrustDomainMismatch
        )
        .contains("claims trust domain c.test"));
        assert!(refused(
            TrustBundle::from_spiffe_json(
                "b.test",
                r#"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["bm90IGEgY2VydA=="]}]}"#
            ),
            Malformed
        )
        .contains("malformed x509-svid key 0"));
        assert!(refused(
            TrustBundle::from_spiffe_json("b.test", r#"{"keys":[],"spiffe_sequence":-1}"#),
            Malformed
        )
        .contains("spiffe_sequence"));
    }

    /// A federation peer's JWT keys, as hostile as it likes: each either refuses the
    /// document (as malformed) or is ignored (a key type or curve ztid does not verify
    /// with), and nothing that can never verify a token is stored.
    #[test]
    fn hostile_jwt_keys() {
        let doc = |keys: Vec<Value>| json!({ "keys": keys }).to_string();
        let good = || {
            let b = TrustBundle {
                trust_domain: "b.test".into(),
                jwt_authorities: vec![jwt_key("k1")],
                ..Default::default()
            };
            let v: Value = serde_json::from_str(&b.jwks_json().unwrap()).unwrap();
            v["keys"][0].clone()
        };
        // RSA of any size or exponent, other curves, other uses: ignored, not stored.
        let huge_n = B64URL.encode(vec![0xff; 8192]);
        let ignored = TrustBundle::from_spiffe_json(
            "b.test",
            &doc(vec![
                json!({"kty": "RSA", "use": "jwt-svid", "kid": "big", "n": huge_n, "e": "AQAB"}),
                json!({"kty": "RSA", "use": "jwt-svid", "kid": "tiny", "n": "AQ", "e": "AQ"}),
                json!({"kty": "EC", "use": "jwt-svid", "kid": "k1p", "crv": "secp256k1", "x": "AA", "y": "AA"}),
                json!({"kty": "EC", "use": "jwt-svid", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"}),
                json!({"kty": "oct", "use": "jwt-svid", "kid": "hmac", "k": "c2VjcmV0"}),
                json!({"kty": "EC", "use": "enc", "kid": "enc", "crv": "P-256", "x": "AA", "y": "AA"}),
            ]),
        )
        .unwrap();
        assert!(ignored.jwt_authorities.is_empty());

        // A point that is not on its curve can never verify anything: malformed.
        let mut off_curve = good();
        let mut y = B64URL.decode(off_curve["y"].as_str().unwrap()).unwrap();
        y[31] ^= 1;
        off_curve["y"] = json!(B64URL.encode(&y));
        assert_eq!(
            refused(
                TrustBundle::from_spiffe_json("b.test", &doc(vec![off_curve])),
                Malformed
            ),
            "malformed jwt-svid key k1: the point is not on curve P-256"
        );
        // `alg`, when given, must be the curve's own.
        let mut wrong_alg = good();
        wrong_alg["alg"] = json!("RS256");
        assert_eq!(
            refused(
                TrustBundle::from_spiffe_json("b.test", &doc(vec![wrong_alg])),
                Malformed
            ),
            "malformed jwt-svid key k1: alg \"RS256\" is not ES256, the algorithm of curve P-256"
        );
        let mut right_alg = good();
        right_alg["alg"] = json!("ES256");
        TrustBundle::from_spiffe_json("b.test", &doc(vec![right_alg])).unwrap();
        // Bounded: the kid's length and the number of JWT authorities.
        let mut long_kid = good();
        long_kid["kid"] = json!("k".repeat(MAX_KID_BYTES + 1));
        assert_eq!(
            refused(
                TrustBundle::from_spiffe_json("b.test", &doc(vec![long_kid])),
                Malformed
            ),
            format!(
                "jwt-svid key 0: its kid is {} bytes, at most {MAX_KID_BYTES}",
                MAX_KID_BYTES + 1
            )
        );
        let many: Vec<Value> = (0..=MAX_JWT_AUTHORITIES)
            .map(|i| {
                let mut k = good();
                k["kid"] = json!(format!("k{i}"));
                k
            })
            .collect();
        assert_eq!(
            refused(
                TrustBundle::from_spiffe_json("b.test", &doc(many)),
                Malformed
            ),
            format!("jwt-svid keys in one bundle exceeds the limit: {} given, at most {MAX_JWT_AUTHORITIES} allowed", MAX_JWT_AUTHORITIES + 1)
        );
    }
}
