//! Delegation (RFC 8693 §4.1, §4.4): `act` chains, `may_act`, which identities a grant
//! covers, and how scopes narrow along a chain. Pure: no I/O, no clock.
//!
//! Uses only `super::{error, scope, chain, token}` and external crates, never `crate::`:
//! fuzz/fuzz_targets/sts_request.rs includes these files by path.

use serde_json::{Map, Value};

use super::error::{OAuthError, OAuthErrorCode};
use super::scope::Scopes;

/// Longest SPIFFE ID accepted in `act` and `may_act` (the SPIFFE spec's URI bound).
pub const MAX_ACTOR_ID_LEN: usize = 2048;

fn invalid_grant(description: impl Into<String>) -> OAuthError {
    OAuthError::new(OAuthErrorCode::InvalidGrant, description)
}

fn invalid_scope(description: impl Into<String>) -> OAuthError {
    OAuthError::new(OAuthErrorCode::InvalidScope, description)
}

/// Whether a grant (or `may_act`) naming `grant_id` covers `spiffe_id`: the ID itself,
/// or one of its instances: the ID plus exactly one per-instance segment, in the one
/// form agents mint (32 lowercase hex characters,
/// [`ztid_spiffe::spiffe_id::is_instance_segment`]). Any other ID below it (another
/// entry, such as `<ID>/reports`) is not covered.
pub fn covers(grant_id: &str, spiffe_id: &str) -> bool {
    ztid_spiffe::spiffe_id::is_id_or_instance_of(grant_id, spiffe_id)
}

/// The actors of a delegated token, newest first (the outermost `act` first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActChain(Vec<String>);

/// A `sub` of `act` or `may_act`: a SPIFFE ID, bounded.
fn actor_id<'a>(object: &'a Map<String, Value>, what: &str) -> Result<&'a str, OAuthError> {
    let sub = object
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_grant(format!("{what} has no sub string")))?;
    if sub.len() > MAX_ACTOR_ID_LEN {
        return Err(invalid_grant(format!(
            "{what} sub is longer than {MAX_ACTOR_ID_LEN} bytes"
        )));
    }
    if !sub.starts_with("spiffe://") {
        return Err(invalid_grant(format!("{what} sub is not a SPIFFE ID")));
    }
    Ok(sub)
}

impl ActChain {
    /// No actors: the token was issued to its subject itself.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Reads an `act` claim (`{"sub": newest, "act": {"sub": previous, …}}`). `None` is
    /// the empty chain. More than `max_depth` actors, or anything malformed, is
    /// `invalid_grant`. Iterative, so no nesting can exhaust the stack.
    pub fn from_claim(act: Option<&Value>, max_depth: usize) -> Result<ActChain, OAuthError> {
        let mut actors = Vec::new();
        let mut next = act;
        while let Some(value) = next {
            let Value::Object(object) = value else {
                return Err(invalid_grant("act claim is not a JSON object"));
            };
            if actors.len() >= max_depth {
                return Err(invalid_grant(format!(
                    "act chain is deeper than {max_depth} actors"
                )));
            }
            actors.push(actor_id(object, "act")?.to_string());
            next = object.get("act");
        }
        Ok(ActChain(actors))
    }

    /// The `act` claim, newest actor outermost; `None` when there are no actors.
    pub fn to_claim(&self) -> Option<Value> {
        // Built from the oldest actor outwards, so each newer one wraps the rest.
        self.0.iter().rev().fold(None, |inner, actor| {
            let mut object = Map::new();
            object.insert("sub".into(), Value::String(actor.clone()));
            if let Some(inner) = inner {
                object.insert("act".into(), inner);
            }
            Some(Value::Object(object))
        })
    }

    /// This chain with `actor` as its newest actor.
    pub fn with_newest(&self, actor: &str) -> ActChain {
        let mut actors = Vec::with_capacity(self.0.len() + 1);
        actors.push(actor.to_string());
        actors.extend(self.0.iter().cloned());
        ActChain(actors)
    }

    /// How many actors.
    pub fn depth(&self) -> usize {
        self.0.len()
    }

    /// Whether `spiffe_id` is one of the actors.
    pub fn contains(&self, spiffe_id: &str) -> bool {
        self.0.iter().any(|a| a == spiffe_id)
    }

    /// The actors, newest first.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(String::as_str)
    }

    /// The newest actor (the party that made the request), if any.
    pub fn newest(&self) -> Option<&str> {
        self.0.first().map(String::as_str)
    }
}

/// The SPIFFE ID a `may_act` claim (`{"sub": ID}`) names; malformed is `invalid_grant`.
pub fn may_act_id(may_act: &Value) -> Result<&str, OAuthError> {
    let Value::Object(object) = may_act else {
        return Err(invalid_grant("may_act claim is not a JSON object"));
    };
    actor_id(object, "may_act")
}

/// Whether the subject token's `may_act` claim lets `actor` act for it (RFC 8693 §4.4).
/// No claim: anyone may. `{"sub": ID}`: only identities `ID` covers. Anything else, or
/// an actor it does not name, is `invalid_grant`.
pub fn may_act_allows(may_act: Option<&Value>, actor: &str) -> Result<(), OAuthError> {
    let Some(value) = may_act else {
        return Ok(());
    };
    let allowed = may_act_id(value)?;
    if covers(allowed, actor) {
        Ok(())
    } else {
        Err(invalid_grant(format!(
            "the subject token's may_act does not name {actor}"
        )))
    }
}

/// The scopes a request obtains. `granted` is what the caller's grant allows for the
/// target; `subject` the subject token's scopes when there is one (delegation: scopes
/// only narrow). No `requested`: everything allowed, which must not be empty. Otherwise
/// every requested scope must be allowed, and the answer is exactly the request.
pub fn narrow(
    requested: Option<&Scopes>,
    subject: Option<&Scopes>,
    granted: &Scopes,
) -> Result<Scopes, OAuthError> {
    let Some(requested) = requested else {
        let allowed = match subject {
            Some(subject) => granted.intersection(subject),
            None => granted.clone(),
        };
        if allowed.is_empty() {
            return Err(invalid_scope(if subject.is_some() {
                "no scope is both granted and in the subject token"
            } else {
                "the grant allows no scope"
            }));
        }
        return Ok(allowed);
    };
    if requested.is_empty() {
        return Err(invalid_scope("no scope requested"));
    }
    for scope in requested.iter() {
        if !granted.contains(scope) {
            return Err(invalid_scope(format!("scope {scope} is not granted")));
        }
        if subject.is_some_and(|s| !s.contains(scope)) {
            return Err(invalid_scope(format!(
                "scope {scope} is wider than the subject token"
            )));
        }
    }
    Ok(requested.clone())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const W: &str = "spiffe://example.org/agent";
    /// An instance of `W`: one per-instance segment (32 lowercase hex characters).
    const W1: &str = "spiffe://example.org/agent/0123456789abcdef0123456789abcdef";

    #[test]
    fn covers_the_id_and_its_instances_only() {
        assert!(covers(W, W));
        assert!(covers(W, W1));
        assert!(!covers(W, "spiffe://example.org/agent/"));
        assert!(!covers(W, &format!("{W1}/x")));
        assert!(!covers(W, "spiffe://example.org/agentx"));
        assert!(!covers(W, "spiffe://example.org/agentx/i"));
        assert!(!covers(W, "spiffe://example.org"));
        assert!(!covers(W1, W));
    }

    #[test]
    fn covers_no_other_entry_below_the_id() {
        // A segment not in the instance form names another entry, not an instance.
        for other in [
            "spiffe://example.org/agent/i-1",
            "spiffe://example.org/agent/reports",
            // Upper-case hex, one character short or long: not what agents mint.
            "spiffe://example.org/agent/0123456789ABCDEF0123456789ABCDEF",
            "spiffe://example.org/agent/0123456789abcdef0123456789abcde",
            "spiffe://example.org/agent/0123456789abcdef0123456789abcdef0",
        ] {
            assert!(!covers(W, other), "{other}");
        }
    }

    #[test]
    fn chain_round_trips_newest_outermost() {
        let chain = ActChain::empty()
            .with_newest("spiffe://t/a")
            .with_newest("spiffe://t/b");
        assert_eq!(chain.depth(), 2);
        assert_eq!(chain.newest(), Some("spiffe://t/b"));
        assert!(chain.contains("spiffe://t/a"));
        assert!(!chain.contains("spiffe://t/c"));
        assert_eq!(
            chain.iter().collect::<Vec<_>>(),
            vec!["spiffe://t/b", "spiffe://t/a"]
        );
        let claim = chain.to_claim().unwrap();
        assert_eq!(
            claim,
            json!({"sub": "spiffe://t/b", "act": {"sub": "spiffe://t/a"}})
        );
        assert_eq!(ActChain::from_claim(Some(&claim), 2).unwrap(), chain);
        assert_eq!(ActChain::empty().to_claim(), None);
        assert_eq!(ActChain::from_claim(None, 0).unwrap(), ActChain::empty());
        assert_eq!(ActChain::empty().newest(), None);
    }

    #[test]
    fn from_claim_refuses_deep_or_malformed_chains() {
        let two = json!({"sub": "spiffe://t/b", "act": {"sub": "spiffe://t/a"}});
        let e = ActChain::from_claim(Some(&two), 1).unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidGrant);
        assert!(e.description.contains("deeper than 1"));
        let cases = [
            (json!("spiffe://t/a"), "not a JSON object"),
            (json!({"act": {"sub": "spiffe://t/a"}}), "no sub"),
            (json!({"sub": 7}), "no sub"),
            (json!({"sub": "https://t/a"}), "not a SPIFFE ID"),
            (
                json!({"sub": "spiffe://t/b", "act": null}),
                "not a JSON object",
            ),
            (json!({"sub": "spiffe://t/b", "act": {"sub": 1}}), "no sub"),
            (
                json!({"sub": format!("spiffe://t/{}", "x".repeat(2048))}),
                "longer than 2048",
            ),
        ];
        for (claim, phrase) in cases {
            let e = ActChain::from_claim(Some(&claim), 8).unwrap_err();
            assert_eq!(e.code, OAuthErrorCode::InvalidGrant, "{claim}");
            assert!(e.description.contains(phrase), "{claim}: {}", e.description);
        }
        // A deep nesting is refused at the cap, iteratively.
        let mut deep = json!({"sub": "spiffe://t/0"});
        for i in 1..100 {
            deep = json!({"sub": format!("spiffe://t/{i}"), "act": deep});
        }
        let e = ActChain::from_claim(Some(&deep), 3).unwrap_err();
        assert!(e.description.contains("deeper than 3"));
        assert_eq!(ActChain::from_claim(Some(&deep), 100).unwrap().depth(), 100);
    }

    #[test]
    fn may_act_names_who_may_act() {
        assert!(may_act_allows(None, W).is_ok());
        let claim = json!({"sub": W});
        assert!(may_act_allows(Some(&claim), W).is_ok());
        assert!(may_act_allows(Some(&claim), W1).is_ok());
        // Another entry below the named ID is not one of its instances.
        let e = may_act_allows(Some(&claim), "spiffe://example.org/agent/i-9").unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidGrant);
        assert!(e.description.contains("may_act does not name"));
        let e = may_act_allows(Some(&claim), "spiffe://example.org/other").unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidGrant);
        assert!(e
            .description
            .contains("may_act does not name spiffe://example.org/other"));
        for bad in [json!(W), json!({}), json!({"sub": 1}), json!({"sub": "x"})] {
            let e = may_act_allows(Some(&bad), W).unwrap_err();
            assert_eq!(e.code, OAuthErrorCode::InvalidGrant, "{bad}");
        }
    }

    #[test]
    fn scopes_only_narrow() {
        let s = |t: &str| Scopes::parse(t).unwrap();
        let granted = s("a b c");
        // No subject token: the grant alone.
        assert_eq!(narrow(None, None, &granted).unwrap(), granted);
        assert_eq!(narrow(Some(&s("a")), None, &granted).unwrap(), s("a"));
        // With a subject token: the intersection.
        assert_eq!(narrow(None, Some(&s("b c d")), &granted).unwrap(), s("b c"));
        assert_eq!(
            narrow(Some(&s("c")), Some(&s("b c d")), &granted).unwrap(),
            s("c")
        );
        let e = narrow(Some(&s("a d")), None, &granted).unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidScope);
        assert!(e.description.contains("scope d is not granted"));
        let e = narrow(Some(&s("a b")), Some(&s("b")), &granted).unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidScope);
        assert!(e
            .description
            .contains("scope a is wider than the subject token"));
        let e = narrow(None, Some(&s("x")), &granted).unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidScope);
        assert!(e
            .description
            .contains("both granted and in the subject token"));
        let e = narrow(None, None, &Scopes::new()).unwrap_err();
        assert!(e.description.contains("allows no scope"));
        let e = narrow(Some(&Scopes::new()), None, &granted).unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidScope);
        assert!(e.description.contains("no scope requested"));
    }
}
