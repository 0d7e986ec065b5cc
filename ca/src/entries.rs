//! Registration entries: checking what an operator asks for before it is stored.
//! A malformed entry is refused with the reason and stores nothing.

use spiffe::{SpiffeId, TrustDomain};
use ztid_proto::node as pb;
use ztid_spiffe::spiffe_id::{self, INSTANCE_SEGMENT_LEN};
use ztid_spiffe::Selector;

use crate::authority::random_hex;
use crate::csr_policy::reason;
use crate::datastore::EntryRecord;
use crate::{Error, Result};

/// The server's own SPIFFE ID, `spiffe://TD/ztid/server`.
pub fn server_id(td: &TrustDomain) -> String {
    spiffe_id::server_id(td).to_string()
}

/// Parses an ID given to the admin API: canonical spelling only (one rule, see
/// [`ztid_spiffe::spiffe_id`]), in trust domain `td`.
pub fn parse_id(td: &TrustDomain, what: &str, id: &str) -> Result<SpiffeId> {
    let parsed =
        spiffe_id::parse(id).map_err(|e| Error::InvalidInput(format!("{what} {}", reason(e))))?;
    if parsed.trust_domain() != td {
        return Err(Error::InvalidInput(format!(
            "{what} {id} is not in trust domain {td}"
        )));
    }
    Ok(parsed)
}

/// Refuses an ID under ztid's reserved prefix (`/ztid`, in any letter case).
fn refuse_reserved(what: &str, id: &SpiffeId) -> Result<()> {
    if spiffe_id::is_reserved(id) {
        return Err(Error::InvalidInput(format!(
            "{what} {id} is under spiffe://{}/{}, which is reserved for ztid's own identities (the server, agents, admins)",
            id.trust_domain(),
            spiffe_id::RESERVED_SEGMENT
        )));
    }
    Ok(())
}

/// Checks an ID an operator may name for workloads or node aliases: canonical, in
/// `td`, with a path, and not reserved.
pub fn parse_claimable_id(td: &TrustDomain, what: &str, id: &str) -> Result<SpiffeId> {
    let parsed = parse_id(td, what, id)?;
    if parsed.path().is_empty() {
        return Err(Error::InvalidInput(format!("{what} must have a path")));
    }
    refuse_reserved(what, &parsed)?;
    // Every agent entitled to a per-instance entry `X` may mint `X/<instance segment>`,
    // choosing the segment; an ID of that form claimed by any entry could be minted by
    // the agents of `X`. So the form belongs to instances alone.
    if parsed
        .path()
        .rsplit('/')
        .next()
        .is_some_and(spiffe_id::is_instance_segment)
    {
        return Err(Error::InvalidInput(format!(
            "{what} {parsed} ends in a per-instance segment ({INSTANCE_SEGMENT_LEN} lowercase hex characters), \
             the form agents mint for each instance of an entry: it could be another entry's instance"
        )));
    }
    Ok(parsed)
}

/// Why a stored entry can mint nothing, if it cannot: entries stored before IDs had one
/// spelling and the reserved names were closed may name a non-canonical or reserved ID
/// or parent, and entries stored before DNS names were checked (or before the server's
/// config gave it one of theirs) may name one no entry may ([`dns_name_refusal`]). They
/// stay stored (deleting is the operator's call), but every CSR and JWT-SVID request
/// under them is refused.
pub fn unusable_reason(
    td: &TrustDomain,
    e: &EntryRecord,
    server_dns_names: &[String],
) -> Option<String> {
    let check = || -> Result<()> {
        parse_claimable_id(td, "spiffe_id", &e.spiffe_id)?;
        if !e.node {
            let parent = parse_id(td, "parent_id", &e.parent_id)?;
            if spiffe_id::is_reserved(&parent) && !spiffe_id::is_agent_id(td, &parent) {
                return Err(Error::InvalidInput(format!(
                    "parent_id {} is reserved and not an agent ID",
                    e.parent_id
                )));
            }
        }
        if let Some(why) = e
            .dns_names
            .iter()
            .find_map(|d| dns_name_refusal(d, server_dns_names))
        {
            return Err(Error::InvalidInput(why));
        }
        Ok(())
    };
    check().err().map(|e| e.to_string())
}

/// Refuses a `what` holding a C0 or C1 control character or DEL, naming the character
/// escaped (never echoing the value).
fn refuse_control(what: &str, value: &str) -> Result<()> {
    match ztid_human::first_control(value) {
        None => Ok(()),
        Some(c) => Err(Error::InvalidInput(format!(
            "{what} holds a control character ({}); none may be stored",
            ztid_human::shown(c.encode_utf8(&mut [0; 4]))
        ))),
    }
}

/// Why `n` may not be a DNS name of an entry's SVIDs, if it may not. `server_names`: the
/// DNS names of the server's own certificate ([`crate::config::ServerConfig::server_dns_names`]).
///
/// A DNS SAN is what HTTPS clients trusting the bundle check, so an entry's names are
/// what its workloads can pass for: one spelling (lowercase: names compare without
/// case), only host names (no wildcard, no IP address spelt as a name, which some
/// clients match against a dotted address), and never a name of the server itself nor
/// `localhost` (which names whatever listens on the client's own host).
pub fn dns_name_refusal(n: &str, server_names: &[String]) -> Option<String> {
    let syntax = !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !syntax {
        return Some(format!(
            "{n:?} is not a valid DNS name (labels of a-z, 0-9 and '-'; no wildcard)"
        ));
    }
    if n.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(format!(
            "DNS name {n:?} has uppercase letters: give it in lowercase (names compare without letter case)"
        ));
    }
    // RFC 1123 2.1: a host name's top-level label is never all digits; one that is
    // is an IP address (127.0.0.1, 0x7f.1) spelt as a name.
    if n.rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some(format!("DNS name {n:?} is an IP address, not a host name"));
    }
    let reserved_by_default = crate::config::ALWAYS_SERVER_DNS_NAMES
        .iter()
        .any(|r| n == *r || n.strip_suffix(r).is_some_and(|p| p.ends_with('.')));
    if reserved_by_default || server_names.iter().any(|r| r.eq_ignore_ascii_case(n)) {
        return Some(format!(
            "DNS name {n:?} is a name of the server's own certificate (localhost, \
             [sts] dns_names, the issuer's host): a workload holding it could pass for the \
             server to HTTPS clients that trust the bundle"
        ));
    }
    None
}

/// Validates an entry request and turns it into a record (id and time assigned).
/// `server_dns_names`: the DNS names of the server's own certificate, which no entry may
/// name ([`dns_name_refusal`]).
pub fn validate_new_entry(
    td: &TrustDomain,
    req: &pb::Entry,
    max_ttl: i64,
    server_dns_names: &[String],
    now: i64,
) -> Result<EntryRecord> {
    crate::limits::check_entry(req)?;
    // The hint and selector values are free text that people read (`entry list`, logs,
    // a workload's SVID hint) and that is matched byte for byte: a control character has
    // no use in either, and could drive the terminal of whoever lists the entry.
    refuse_control("hint", &req.hint)?;
    for s in &req.selectors {
        refuse_control("selector", &format!("{}:{}", s.r#type, s.value))?;
    }
    let spiffe_id = parse_claimable_id(td, "spiffe_id", &req.spiffe_id)?;
    // A per-instance ID is the entry's plus one segment; it must stay within the
    // 2048 bytes SPIFFE implementations must support.
    if !req.shared && !req.node && req.spiffe_id.len() + 1 + INSTANCE_SEGMENT_LEN > 2048 {
        return Err(Error::InvalidInput(
            "spiffe_id too long for per-instance IDs".into(),
        ));
    }
    let parent_id = if req.node {
        let server = server_id(td);
        if !req.parent_id.is_empty() && req.parent_id != server {
            return Err(Error::InvalidInput(format!(
                "a node alias's parent must be the server, {server}"
            )));
        }
        server
    } else {
        let parent = parse_id(td, "parent_id", &req.parent_id)?;
        // A parent is an agent or a node alias. Aliases may be named before any agent
        // joins them (a join token's --spiffe-id), so any non-reserved ID is accepted;
        // under the reserved prefix only agent IDs are.
        if spiffe_id::is_reserved(&parent) && !spiffe_id::is_agent_id(td, &parent) {
            return Err(Error::InvalidInput(format!(
                "parent_id {} is reserved and not an agent ID (spiffe://{td}/ztid/agent/METHOD/NODE)",
                req.parent_id
            )));
        }
        if parent.path().is_empty() {
            return Err(Error::InvalidInput("parent_id must have a path".into()));
        }
        parent.to_string()
    };
    if req.selectors.is_empty() {
        return Err(Error::InvalidInput(
            "an entry needs at least one selector".into(),
        ));
    }
    let mut selectors = Vec::with_capacity(req.selectors.len());
    for s in &req.selectors {
        let sel = Selector::try_from(s).map_err(|e| Error::InvalidInput(e.to_string()))?;
        // Valid in form but spelled other than attestation spells it: the entry would be
        // stored and silently match nothing.
        if let Some(why) = sel.non_canonical() {
            return Err(Error::InvalidInput(format!("selector {sel}: {why}")));
        }
        if req.node != sel.is_node_selector() {
            return Err(Error::InvalidInput(format!(
                "selector {sel} cannot be used in a {} entry",
                if req.node { "node alias" } else { "workload" }
            )));
        }
        selectors.push(sel);
    }
    selectors.sort();
    selectors.dedup();
    for (name, ttl) in [
        ("x509 TTL", req.x509_ttl_seconds),
        ("JWT TTL", req.jwt_ttl_seconds),
    ] {
        if ttl < 0 || ttl > max_ttl {
            return Err(Error::InvalidInput(format!(
                "{name} must be between 0 (default) and {max_ttl} seconds"
            )));
        }
    }
    for d in &req.dns_names {
        if let Some(why) = dns_name_refusal(d, server_dns_names) {
            return Err(Error::InvalidInput(why));
        }
    }
    let mut federates_with = Vec::new();
    for f in &req.federates_with {
        let ftd = spiffe_id::parse_trust_domain(f)
            .map_err(|e| Error::InvalidInput(format!("federates_with {}", reason(e))))?;
        if ftd == *td {
            return Err(Error::InvalidInput(
                "an entry cannot federate with its own trust domain".into(),
            ));
        }
        federates_with.push(ftd.to_string());
    }
    Ok(EntryRecord {
        id: random_hex(16)?,
        spiffe_id: spiffe_id.to_string(),
        parent_id,
        selectors,
        x509_ttl: req.x509_ttl_seconds,
        jwt_ttl: req.jwt_ttl_seconds,
        shared: req.shared,
        dns_names: req.dns_names.clone(),
        federates_with,
        node: req.node,
        hint: req.hint.clone(),
        revision: 0,
        created_at: now,
    })
}

/// The wire form of a record.
pub fn to_proto(e: &EntryRecord) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.clone(),
        parent_id: e.parent_id.clone(),
        selectors: e.selectors.iter().map(Into::into).collect(),
        x509_ttl_seconds: e.x509_ttl,
        jwt_ttl_seconds: e.jwt_ttl,
        shared: e.shared,
        dns_names: e.dns_names.clone(),
        federates_with: e.federates_with.clone(),
        node: e.node,
        revision: e.revision,
        created_at: e.created_at,
        hint: e.hint.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "spiffe://example.org/ztid/agent/join-token/abcd";

    fn entry(spiffe_id: &str, parent_id: &str) -> pb::Entry {
        pb::Entry {
            spiffe_id: spiffe_id.into(),
            parent_id: parent_id.into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1".into(),
            }],
            ..Default::default()
        }
    }

    fn refused(req: &pb::Entry) -> String {
        let td = TrustDomain::new("example.org").unwrap();
        match validate_new_entry(&td, req, 3600, &[], 0) {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("{req:?}: expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn control_characters_in_hints_and_selectors_are_refused() {
        let td = TrustDomain::new("example.org").unwrap();
        let with = |hint: &str, sel: (&str, &str)| pb::Entry {
            hint: hint.into(),
            selectors: vec![pb::Selector {
                r#type: sel.0.into(),
                value: sel.1.into(),
            }],
            ..entry("spiffe://example.org/w", AGENT)
        };
        let why = refused(&with("a\x1b]52;c;ZXZpbA==\x07", ("unix", "uid:1")));
        assert!(
            why.starts_with("hint holds a control character (\\x1b)"),
            "{why}"
        );
        assert!(
            !why.contains('\x1b'),
            "the value is not echoed raw: {why:?}"
        );
        for value in ["path:/bin/a\nb", "path:/bin/\rx", "label:k:\u{9b}2J"] {
            let kind = if value.starts_with("label") {
                "container"
            } else {
                "unix"
            };
            let why = refused(&with("", (kind, value)));
            assert!(
                why.starts_with("selector holds a control character"),
                "{why}"
            );
        }
        // Other scripts, bidi and zero-width characters may be part of a real label or
        // path: stored, and shown escaped.
        let ok = validate_new_entry(
            &td,
            &with("לקוח \u{202e}", ("container", "label:note:a\u{200b}b")),
            3600,
            &[],
            0,
        )
        .unwrap();
        assert_eq!(ok.hint, "לקוח \u{202e}");
    }

    #[test]
    fn reserved_names_are_refused_in_every_spelling() {
        for id in [
            "spiffe://example.org/ztid",
            "spiffe://example.org/ztid/server",
            "spiffe://example.org/ztid/admin/root",
            "spiffe://example.org/ztid/agent/join-token/x",
            "spiffe://example.org/ZTID",
            "spiffe://example.org/Ztid/server",
        ] {
            assert!(
                refused(&entry(id, AGENT)).contains("reserved for ztid's own identities"),
                "{id}"
            );
        }
        for id in [
            "spiffe://example.org/ztid/",
            "spiffe://example.org//ztid",
            "spiffe://example.org/./ztid",
            "spiffe://example.org/%7atid",
            "spiffe://EXAMPLE.ORG/ztid",
            "SPIFFE://example.org/ztid",
        ] {
            assert!(
                refused(&entry(id, AGENT)).contains("not a canonical SPIFFE ID"),
                "{id}"
            );
        }
        let mut alias = entry("spiffe://example.org/ztid/x", "");
        alias.node = true;
        alias.selectors = vec![pb::Selector {
            r#type: "join-token".into(),
            value: "used".into(),
        }];
        assert!(refused(&alias).contains("reserved"));
    }

    #[test]
    fn parents_under_the_reserved_prefix_must_be_agents() {
        for parent in [
            "spiffe://example.org/ztid/server",
            "spiffe://example.org/ztid/admin/root",
            "spiffe://example.org/ztid",
            "spiffe://example.org/ZTID/agent/join-token/abcd",
            "spiffe://example.org/ztid/agent/join-token",
        ] {
            assert!(
                refused(&entry("spiffe://example.org/w", parent))
                    .contains("reserved and not an agent ID"),
                "{parent}"
            );
        }
        assert!(refused(&entry(
            "spiffe://example.org/w",
            "SPIFFE://example.org/ztid/agent/join-token/abcd"
        ))
        .contains("not a canonical SPIFFE ID"));
    }

    #[test]
    fn stored_entries_from_before_the_rule_are_named_at_start() {
        let td = TrustDomain::new("example.org").unwrap();
        let ok =
            validate_new_entry(&td, &entry("spiffe://example.org/w", AGENT), 3600, &[], 0).unwrap();
        assert_eq!(unusable_reason(&td, &ok, &[]), None);
        for (id, parent, why) in [
            ("spiffe://example.org/ztid", AGENT, "reserved"),
            ("SPIFFE://EXAMPLE.org/w", AGENT, "not a canonical SPIFFE ID"),
            (
                "spiffe://example.org/w",
                "spiffe://example.org/ztid/server",
                "reserved and not an agent ID",
            ),
        ] {
            let mut old = ok.clone();
            old.spiffe_id = id.into();
            old.parent_id = parent.into();
            let reason = unusable_reason(&td, &old, &[]).expect("unusable");
            assert!(reason.contains(why), "{id} {parent}: {reason}");
        }
    }

    #[test]
    fn dns_names_are_lowercase_host_names_the_server_does_not_hold() {
        let server = ["sts.example.org".to_string()];
        for ok in [
            "db.example.org",
            "a-b.c",
            "x1.example.org",
            "localhost.example.org",
            "mylocalhost",
            "1.2.3.example",
        ] {
            assert_eq!(dns_name_refusal(ok, &server), None, "{ok}");
        }
        for (bad, why) in [
            ("localhost", "server's own certificate"),
            ("a.b.localhost", "server's own certificate"),
            ("sts.example.org", "server's own certificate"),
            ("Db.example.org", "lowercase"),
            ("10.0.0.1", "IP address"),
            ("example.123", "IP address"),
            ("*.example.org", "not a valid DNS name"),
            ("db.example.org.", "not a valid DNS name"),
            ("", "not a valid DNS name"),
        ] {
            let refused = dns_name_refusal(bad, &server).unwrap_or_default();
            assert!(refused.contains(why), "{bad:?}: {refused}");
        }
    }

    #[test]
    fn hints_hold_no_control_characters() {
        let mut req = entry("spiffe://example.org/w", AGENT);
        for bad in [
            "a\nSPIFFE ID : spiffe://example.org/x",
            "\u{1b}]0;x\u{7}",
            "tab\there",
            "\u{85}",
        ] {
            req.hint = bad.into();
            let why = refused(&req);
            assert!(
                why.starts_with("hint holds a control character"),
                "{bad:?}: {why}"
            );
        }
        let td = TrustDomain::new("example.org").unwrap();
        req.hint = "internal — API ✓".into();
        assert_eq!(
            validate_new_entry(&td, &req, 3600, &[], 0).unwrap().hint,
            "internal — API ✓"
        );
    }

    #[test]
    fn canonical_entries_are_stored_as_given() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut req = entry("spiffe://example.org/w", AGENT);
        req.federates_with = vec!["spiffe://other.org".into(), "third.org".into()];
        let r = validate_new_entry(&td, &req, 3600, &[], 0).unwrap();
        assert_eq!(r.spiffe_id, "spiffe://example.org/w");
        assert_eq!(r.parent_id, AGENT);
        assert_eq!(r.federates_with, ["other.org", "third.org"]);
        for f in ["OTHER.org", "SPIFFE://other.org", "spiffe://other.org/x"] {
            req.federates_with = vec![f.into()];
            assert!(refused(&req).starts_with("federates_with"), "{f}");
        }
    }

    /// The agent spells a workload's selectors one way (`unix:uid:1000`, the path
    /// `/proc/PID/exe` gives): an entry requiring `unix:uid:01000` or
    /// `unix:path:/usr//bin/x` was stored and then matched no process, silently.
    #[test]
    fn selectors_spelled_other_than_attestation_spells_them_are_refused() {
        let with = |t: &str, v: &str| {
            let mut req = entry("spiffe://example.org/w", AGENT);
            req.selectors = vec![pb::Selector {
                r#type: t.into(),
                value: v.into(),
            }];
            req
        };
        for (t, v, says) in [
            ("unix", "uid:01002", "unix:uid:1002"),
            ("unix", "uid:00", "unix:uid:0"),
            ("unix", "gid:001002", "unix:gid:1002"),
            ("unix", "path:/usr//bin/sleep", "empty, '.' or '..' segment"),
            (
                "unix",
                "path:/usr/bin/./sleep",
                "empty, '.' or '..' segment",
            ),
            (
                "unix",
                "path:/usr/lib/../bin/sleep",
                "empty, '.' or '..' segment",
            ),
            ("unix", "path:/usr/bin/", "trailing slash"),
        ] {
            let why = refused(&with(t, v));
            assert!(why.starts_with(&format!("selector {t}:{v}")), "{v}: {why}");
            assert!(why.contains(says), "{v}: {why}");
        }
        let td = TrustDomain::new("example.org").unwrap();
        for (t, v) in [
            ("unix", "uid:0"),
            ("unix", "uid:1002"),
            ("unix", "path:/usr/bin/sleep"),
            ("unix", "path:/usr/bin/.hidden"),
            ("unix", "path:/"),
        ] {
            assert!(
                validate_new_entry(&td, &with(t, v), 3600, &[], 0).is_ok(),
                "{t}:{v}"
            );
        }
    }
}
