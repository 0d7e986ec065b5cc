//! SPIFFE IDs as ztid accepts them: one rule, in one place, for every entry point
//! (admin API, config, CSRs, JWT-SVID requests, certificates, federation, the agent).
//!
//! The rule is go-spiffe's: an ID is accepted only in its canonical spelling, and
//! anything else is refused, never rewritten. The `spiffe` crate's `SpiffeId::new`
//! is lenient (it accepts `SPIFFE://` and an uppercase trust domain and lowercases
//! them), so a lenient parse followed by a comparison of the input string let the
//! same identity be spelled two ways. Here the canonical form is the only form, so
//! comparing strings is comparing identities.
//!
//! Canonical means:
//! - the scheme is exactly `spiffe://` (lowercase);
//! - at most 2048 bytes;
//! - the trust domain is 1 to 255 bytes of `a-z 0-9 . - _` (lowercase, no port, no
//!   userinfo, no percent-encoding) and, stricter than the spec, has no empty label
//!   (`example.org.` would be a second spelling of `example.org`);
//! - the path is empty or `/segment/...`, each segment non-empty, not `.` or `..`,
//!   only `a-z A-Z 0-9 . - _` (no percent-encoding, no empty segment, no trailing
//!   slash, no query or fragment).
//!
//! It also holds ztid's reserved names: the first path segment `ztid` (in any letter
//! case, so that no relying party with a case-insensitive comparison can confuse
//! them) belongs to ztid's own identities (the server, agents, admins), which only
//! the server issues; and the exact form of a per-instance segment.

use spiffe::{SpiffeId, TrustDomain};

use crate::Error;

/// The only accepted scheme prefix.
pub const SCHEME_PREFIX: &str = "spiffe://";

/// The first path segment reserved for ztid's own identities.
pub const RESERVED_SEGMENT: &str = "ztid";

/// Bytes of randomness in a per-instance segment.
pub const INSTANCE_SEGMENT_BYTES: usize = 16;

/// Length of a per-instance segment: lowercase hex of [`INSTANCE_SEGMENT_BYTES`].
pub const INSTANCE_SEGMENT_LEN: usize = 2 * INSTANCE_SEGMENT_BYTES;

/// Longest admin name (the last segment of `spiffe://TD/ztid/admin/NAME`).
pub const MAX_ADMIN_NAME: usize = 64;

/// Longest trust domain name (the SPIFFE ID spec's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Longest SPIFFE ID: the spec's 2048 bytes, which every implementation must support
/// and none should exceed.
pub const MAX_ID_LEN: usize = 2048;

/// How much of a refused input a reason quotes (an input can be long).
const QUOTE_MAX: usize = 120;

fn quote(s: &str) -> String {
    if s.len() <= QUOTE_MAX {
        format!("{s:?}")
    } else {
        let mut end = QUOTE_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}... ({} bytes)", &s[..end], s.len())
    }
}

fn refuse(id: &str, why: &str) -> Error {
    Error::InvalidSpiffeId(format!("{} is not a canonical SPIFFE ID: {why}", quote(id)))
}

fn check_trust_domain_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the trust domain is empty");
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err("the trust domain is longer than 255 bytes");
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("the trust domain must be lowercase");
    }
    if name.contains('%') {
        return Err("percent-encoding is not allowed");
    }
    if !name
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
    {
        return Err("the trust domain may contain only a-z, 0-9, '.', '-' and '_'");
    }
    // `example.org.` names the same DNS domain as `example.org`: a second spelling of a
    // trust domain (its own, for a federation) that any name-normalising party confuses.
    if name.split('.').any(str::is_empty) {
        return Err("the trust domain has an empty label (a leading, trailing or doubled '.')");
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err("the path must start with '/'");
    };
    let segments: Vec<&str> = rest.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(if i + 1 == segments.len() {
                "the path has a trailing slash"
            } else {
                "the path has an empty segment"
            });
        }
        if *seg == "." || *seg == ".." {
            return Err("the path has a '.' or '..' segment");
        }
        if seg.contains('%') {
            return Err("percent-encoding is not allowed");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err("path segments may contain only a-z, A-Z, 0-9, '.', '-' and '_'");
        }
    }
    Ok(())
}

/// Parses `id`, accepting only its canonical spelling (see the module docs).
pub fn parse(id: &str) -> Result<SpiffeId, Error> {
    if id.is_empty() {
        return Err(refuse(id, "it is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(refuse(id, "it is longer than 2048 bytes"));
    }
    let Some(rest) = id.strip_prefix(SCHEME_PREFIX) else {
        let lenient = id
            .split_once("://")
            .is_some_and(|(s, _)| s.eq_ignore_ascii_case("spiffe"));
        return Err(refuse(
            id,
            if lenient {
                "the scheme must be lowercase \"spiffe://\""
            } else {
                "it does not start with \"spiffe://\""
            },
        ));
    };
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    check_trust_domain_name(td).map_err(|why| refuse(id, why))?;
    check_path(path).map_err(|why| refuse(id, why))?;
    let parsed = SpiffeId::new(id).map_err(|e| refuse(id, &e.to_string()))?;
    // The checks above are stricter than the crate's; the two must agree on the spelling.
    if parsed.to_string() != id {
        return Err(refuse(id, "it is not in canonical form"));
    }
    Ok(parsed)
}

/// Parses a trust domain given as a name (`example.org`) or as its ID
/// (`spiffe://example.org`), accepting only the canonical spelling.
pub fn parse_trust_domain(name_or_id: &str) -> Result<TrustDomain, Error> {
    let name = if name_or_id.contains("://") {
        let id = parse(name_or_id)?;
        if !id.path().is_empty() {
            return Err(Error::InvalidSpiffeId(format!(
                "{} names a trust domain with a path; give the trust domain alone",
                quote(name_or_id)
            )));
        }
        return Ok(id.trust_domain().clone());
    } else {
        name_or_id
    };
    check_trust_domain_name(name).map_err(|why| {
        Error::InvalidSpiffeId(format!(
            "{} is not a canonical trust domain name: {why}",
            quote(name)
        ))
    })?;
    let td = TrustDomain::new(name)
        .map_err(|e| Error::InvalidSpiffeId(format!("trust domain {}: {e}", quote(name))))?;
    if td.as_str() != name {
        return Err(Error::InvalidSpiffeId(format!(
            "{} is not a canonical trust domain name",
            quote(name)
        )));
    }
    Ok(td)
}

/// True if `id` is under ztid's reserved prefix, whatever the letter case of `ztid`.
pub fn is_reserved(id: &SpiffeId) -> bool {
    first_segment(id).eq_ignore_ascii_case(RESERVED_SEGMENT)
}

fn first_segment(id: &SpiffeId) -> &str {
    id.path()
        .strip_prefix('/')
        .and_then(|p| p.split('/').next())
        .unwrap_or_default()
}

fn reserved(td: &TrustDomain, tail: &[&str]) -> Result<SpiffeId, Error> {
    let mut segments = vec![RESERVED_SEGMENT];
    segments.extend_from_slice(tail);
    let id = SpiffeId::from_segments(td.clone(), &segments)
        .map_err(|e| Error::InvalidSpiffeId(format!("{segments:?}: {e}")))?;
    parse(&id.to_string())
}

/// The server's own ID, `spiffe://TD/ztid/server`. Only the server holds an SVID for it;
/// agents pin it.
#[allow(
    clippy::expect_used,
    reason = "constant valid segments under an already valid trust domain, far below the length limit"
)]
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    // Cannot fail: the segments are valid constants and a trust domain (at most 255
    // bytes) keeps the ID far below the 2048-byte limit.
    SpiffeId::from_segments(td.clone(), &[RESERVED_SEGMENT, "server"])
        .expect("constant segments under a valid trust domain")
}

/// True for exactly `spiffe://TD/ztid/server`.
pub fn is_server_id(td: &TrustDomain, id: &SpiffeId) -> bool {
    *id == server_id(td)
}

/// The ztid server ID for a trust domain given by name, refusing a non-canonical name.
pub fn server_id_of(trust_domain: &str) -> Result<String, Error> {
    Ok(server_id(&parse_trust_domain(trust_domain)?).to_string())
}

/// An agent's ID, `spiffe://TD/ztid/agent/<method>/<node id>`.
pub fn agent_id(td: &TrustDomain, method: &str, node_id: &str) -> Result<SpiffeId, Error> {
    for (what, s) in [("method", method), ("node id", node_id)] {
        if !is_name_segment(s) {
            return Err(Error::InvalidSpiffeId(format!(
                "agent {what} {} is not a lowercase name segment",
                quote(s)
            )));
        }
    }
    reserved(td, &["agent", method, node_id])
}

/// True for an agent ID of `td`: exactly `spiffe://TD/ztid/agent/<method>/<node id>`.
pub fn is_agent_id(td: &TrustDomain, id: &SpiffeId) -> bool {
    id.trust_domain() == td
        && matches!(
            id.path().strip_prefix("/ztid/agent/").map(|r| r.split('/').collect::<Vec<_>>()),
            Some(v) if v.len() == 2 && v.iter().all(|s| is_name_segment(s))
        )
}

/// An admin identity, `spiffe://TD/ztid/admin/<name>`: issued only by the server, on
/// its owner-only admin socket, so no admin role is reachable through an entry.
pub fn admin_id(td: &TrustDomain, name: &str) -> Result<SpiffeId, Error> {
    if !is_name_segment(name) || name.len() > MAX_ADMIN_NAME {
        return Err(Error::InvalidSpiffeId(format!(
            "admin name {} must be 1 to {MAX_ADMIN_NAME} of a-z, 0-9, '.', '-', '_' (not '.' or '..')",
            quote(name)
        )));
    }
    reserved(td, &["admin", name])
}

/// True for an admin ID of `td`: exactly `spiffe://TD/ztid/admin/<name>`.
pub fn is_admin_id(td: &TrustDomain, id: &SpiffeId) -> bool {
    id.trust_domain() == td
        && id
            .path()
            .strip_prefix("/ztid/admin/")
            .is_some_and(|name| is_name_segment(name) && name.len() <= MAX_ADMIN_NAME)
}

/// A lowercase name segment: non-empty, `a-z 0-9 . - _`, not `.` or `..`.
fn is_name_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
}

/// True for a per-instance segment exactly as agents generate it: 32 lowercase hex
/// characters (128 random bits), so an agent cannot choose a meaningful path.
pub fn is_instance_segment(s: &str) -> bool {
    s.len() == INSTANCE_SEGMENT_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// True when `spiffe_id` is `id` itself or one of its instances: `id` plus exactly one
/// per-instance segment ([`is_instance_segment`]); never another ID below it (another
/// entry, such as `<id>/reports`). What a grant or a `may_act` naming `id` reaches.
pub fn is_id_or_instance_of(id: &str, spiffe_id: &str) -> bool {
    spiffe_id == id
        || spiffe_id
            .strip_prefix(id)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(is_instance_segment)
}

/// A fresh per-instance segment (see [`is_instance_segment`]).
pub fn new_instance_segment() -> Result<String, Error> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; INSTANCE_SEGMENT_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Config("no randomness".into()))?;
    Ok(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_canonical_spelling_parses() {
        for ok in [
            "spiffe://example.org",
            "spiffe://example.org/w",
            "spiffe://example.org/A/b-c/d_e/f.g",
            "spiffe://a_b-c.0/x",
            &format!("spiffe://{}.org/w", "a".repeat(251)),
            &format!("spiffe://example.org/{}", "a".repeat(2027)),
        ] {
            assert_eq!(parse(ok).unwrap().to_string(), ok);
        }
        for (bad, why) in [
            ("", "empty"),
            ("SPIFFE://example.org/w", "scheme must be lowercase"),
            ("Spiffe://example.org/w", "scheme must be lowercase"),
            ("spiffe://EXAMPLE.org/w", "trust domain must be lowercase"),
            ("spiffe://Example.Org", "trust domain must be lowercase"),
            ("spiffe://example.org/%61dmin", "percent-encoding"),
            ("spiffe://example%2eorg/w", "percent-encoding"),
            ("spiffe://example.org/w/", "trailing slash"),
            ("spiffe://example.org/", "trailing slash"),
            ("spiffe://example.org//w", "empty segment"),
            ("spiffe://example.org/./w", "'.' or '..'"),
            ("spiffe://example.org/w/..", "'.' or '..'"),
            ("spiffe://example.org/w?x=1", "may contain only"),
            ("spiffe://example.org/w#f", "may contain only"),
            (
                "spiffe://user@example.org/w",
                "trust domain may contain only",
            ),
            (
                "spiffe://example.org:443/w",
                "trust domain may contain only",
            ),
            ("spiffe:///w", "trust domain is empty"),
            ("http://example.org/w", "does not start with"),
            ("spiffe:/example.org/w", "does not start with"),
            ("spiffe://exämple.org/w", "trust domain may contain only"),
            ("spiffe://example.org./w", "empty label"),
            ("spiffe://.example.org/w", "empty label"),
            ("spiffe://example..org/w", "empty label"),
            ("spiffe://./w", "empty label"),
            (
                &format!("spiffe://{}.org/w", "a".repeat(252)),
                "longer than 255 bytes",
            ),
            (
                &format!("spiffe://example.org/{}", "a".repeat(2028)),
                "longer than 2048 bytes",
            ),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("not a canonical SPIFFE ID") && e.contains(why),
                "{bad}: {e}"
            );
        }
        let long = format!("spiffe://example.org/{}/", "a".repeat(10_000));
        let e = parse(&long).unwrap_err().to_string();
        assert!(e.len() < 400, "a long input is quoted short: {e}");
    }

    #[test]
    fn trust_domains_are_canonical_names_or_ids() {
        assert_eq!(
            parse_trust_domain("other.org").unwrap().as_str(),
            "other.org"
        );
        assert_eq!(
            parse_trust_domain("spiffe://other.org").unwrap().as_str(),
            "other.org"
        );
        for bad in [
            "Other.org",
            "SPIFFE://other.org",
            "spiffe://other.org/x",
            "",
            "a b",
            "other.org.",
            "spiffe://other.org.",
        ] {
            assert!(parse_trust_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reserved_names_in_every_case() {
        let td = TrustDomain::new("example.org").unwrap();
        for id in [
            "spiffe://example.org/ztid",
            "spiffe://example.org/ztid/server",
            "spiffe://example.org/ZTID/server",
            "spiffe://example.org/Ztid",
            "spiffe://example.org/ztid/admin/x",
        ] {
            assert!(is_reserved(&parse(id).unwrap()), "{id}");
        }
        for id in [
            "spiffe://example.org/ztidx",
            "spiffe://example.org/w/ztid",
            "spiffe://example.org",
        ] {
            assert!(!is_reserved(&parse(id).unwrap()), "{id}");
        }
        assert_eq!(
            server_id(&td).to_string(),
            "spiffe://example.org/ztid/server"
        );
        assert!(is_server_id(
            &td,
            &parse("spiffe://example.org/ztid/server").unwrap()
        ));
        let a = agent_id(&td, "tpm", "ab12").unwrap();
        assert_eq!(a.to_string(), "spiffe://example.org/ztid/agent/tpm/ab12");
        assert!(is_agent_id(&td, &a));
        for not_agent in [
            "spiffe://example.org/ztid/agent/tpm",
            "spiffe://example.org/ztid/agent/tpm/ab/x",
            "spiffe://example.org/ztid/agent/TPM/ab",
            "spiffe://example.org/ZTID/agent/tpm/ab",
            "spiffe://other.org/ztid/agent/tpm/ab",
        ] {
            assert!(!is_agent_id(&td, &parse(not_agent).unwrap()), "{not_agent}");
        }
        assert!(agent_id(&td, "tpm", "AB").is_err());
        let adm = admin_id(&td, "ops").unwrap();
        assert_eq!(adm.to_string(), "spiffe://example.org/ztid/admin/ops");
        assert!(is_admin_id(&td, &adm));
        assert!(!is_admin_id(
            &td,
            &parse("spiffe://example.org/ztid/admin/a/b").unwrap()
        ));
        assert!(!is_admin_id(
            &td,
            &parse("spiffe://example.org/ztid/admin/Ops").unwrap()
        ));
        assert!(!is_admin_id(
            &td,
            &parse("spiffe://example.org/ops").unwrap()
        ));
        for bad in ["", ".", "..", "Ops", "a/b", "a%20"] {
            assert!(admin_id(&td, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn instance_segments_are_exactly_what_agents_generate() {
        let s = new_instance_segment().unwrap();
        assert!(is_instance_segment(&s), "{s}");
        assert_ne!(s, new_instance_segment().unwrap());
        for bad in [
            "admin",
            "server",
            &"a".repeat(31),
            &"a".repeat(33),
            &"A".repeat(32),
            &"g".repeat(32),
            "",
        ] {
            assert!(!is_instance_segment(bad), "{bad}");
        }
    }
}
