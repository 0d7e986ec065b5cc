//! Registration entries: checking what an operator asks for before it is stored.
//! A malformed entry is refused with the reason and stores nothing.

use spiffe::{SpiffeId, TrustDomain};
use ztid_agent_attestor::Selector;
use ztid_proto::node as pb;

use crate::authority::random_hex;
use crate::csr_policy::MAX_INSTANCE_SEGMENT;
use crate::datastore::EntryRecord;
use crate::{Error, Result};

/// Path prefix reserved for ztid's own identities (agents, the server); no entry may claim it.
pub const RESERVED_PREFIX: &str = "/ztid/";

/// The server's own SPIFFE ID.
pub fn server_id(td: &TrustDomain) -> String {
    format!("spiffe://{td}/ztid/server")
}

/// True for an agent SPIFFE ID of this trust domain.
pub fn is_agent_id(td: &TrustDomain, id: &str) -> bool {
    id.strip_prefix(&format!("spiffe://{td}/ztid/agent/"))
        .is_some_and(|rest| !rest.is_empty())
}

fn parse_id(td: &TrustDomain, what: &str, id: &str) -> Result<SpiffeId> {
    let parsed = SpiffeId::new(id).map_err(|e| {
        Error::InvalidArgument(format!("{what} {id:?} is not a valid SPIFFE ID: {e}"))
    })?;
    if parsed.trust_domain() != td {
        return Err(Error::InvalidArgument(format!(
            "{what} {id} is not in trust domain {td}"
        )));
    }
    Ok(parsed)
}

fn valid_dns_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Validates an entry request and turns it into a record (id and time assigned).
pub fn validate_new_entry(
    td: &TrustDomain,
    req: &pb::Entry,
    max_ttl: i64,
    now: i64,
) -> Result<EntryRecord> {
    let spiffe_id = parse_id(td, "spiffe_id", &req.spiffe_id)?;
    if spiffe_id.path().is_empty() {
        return Err(Error::InvalidArgument("spiffe_id must have a path".into()));
    }
    if spiffe_id.path().starts_with(RESERVED_PREFIX) {
        return Err(Error::InvalidArgument(format!(
            "spiffe_id {} is under {RESERVED_PREFIX}, which is reserved for ztid's own identities",
            req.spiffe_id
        )));
    }
    if !req.shared && !req.node && req.spiffe_id.len() + 1 + MAX_INSTANCE_SEGMENT > 2048 {
        return Err(Error::InvalidArgument(
            "spiffe_id too long for per-instance IDs".into(),
        ));
    }
    let parent_id = if req.node {
        let server = server_id(td);
        if !req.parent_id.is_empty() && req.parent_id != server {
            return Err(Error::InvalidArgument(format!(
                "a node alias's parent must be the server, {server}"
            )));
        }
        server
    } else {
        let parent = parse_id(td, "parent_id", &req.parent_id)?;
        // A parent is an agent or a node alias. Aliases may be named before any agent
        // joins them (a join token's --spiffe-id), so any non-reserved ID is accepted;
        // under the reserved prefix only agent IDs are.
        if parent.path().starts_with(RESERVED_PREFIX) && !is_agent_id(td, &req.parent_id) {
            return Err(Error::InvalidArgument(format!(
                "parent_id {} is reserved and not an agent ID (spiffe://{td}/ztid/agent/...)",
                req.parent_id
            )));
        }
        if parent.path().is_empty() {
            return Err(Error::InvalidArgument("parent_id must have a path".into()));
        }
        req.parent_id.clone()
    };
    if req.selectors.is_empty() {
        return Err(Error::InvalidArgument(
            "an entry needs at least one selector".into(),
        ));
    }
    let mut selectors = Vec::with_capacity(req.selectors.len());
    for s in &req.selectors {
        let sel = Selector::try_from(s).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if req.node != sel.is_node_selector() {
            return Err(Error::InvalidArgument(format!(
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
            return Err(Error::InvalidArgument(format!(
                "{name} must be between 0 (default) and {max_ttl} seconds"
            )));
        }
    }
    for d in &req.dns_names {
        if !valid_dns_name(d) {
            return Err(Error::InvalidArgument(format!(
                "{d:?} is not a valid DNS name"
            )));
        }
    }
    let mut federates_with = Vec::new();
    for f in &req.federates_with {
        let name = f.strip_prefix("spiffe://").unwrap_or(f);
        let ftd = TrustDomain::new(name)
            .map_err(|e| Error::InvalidArgument(format!("federates_with {f:?}: {e}")))?;
        if ftd == *td {
            return Err(Error::InvalidArgument(
                "an entry cannot federate with its own trust domain".into(),
            ));
        }
        federates_with.push(ftd.to_string());
    }
    Ok(EntryRecord {
        id: random_hex(16)?,
        spiffe_id: req.spiffe_id.clone(),
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
