//! The token endpoint's parsers of untrusted bytes (issue 14): `ztid_ca::sts`'s pure
//! modules, included by path (they depend on nothing else in ztid-ca; building the
//! whole server instrumented for them would cost every fuzz run minutes).
//!
//! The first byte picks what the rest is fed to:
//! - 0: `form::token_request` (a `POST /token` body);
//! - 1: `form::introspect_request` (a `POST /introspect` body);
//! - 2: `token::verify` (as UTF-8) with no keys: framing and header checks;
//! - 3: JSON: `chain::ActChain::from_claim` (round trip through `to_claim`),
//!   `chain::may_act_allows`, and `token::AccessToken::from_claims` (round trip through
//!   `to_claims`);
//! - else: `scope::Scopes::parse` (as UTF-8), round trip through its text.
#![no_main]
#![allow(dead_code)]

#[path = "../../ca/src/sts/chain.rs"]
mod chain;
#[path = "../../ca/src/sts/error.rs"]
mod error;
#[path = "../../ca/src/sts/form.rs"]
mod form;
#[path = "../../ca/src/sts/scope.rs"]
mod scope;
#[path = "../../ca/src/sts/token.rs"]
mod token;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const MAX_DEPTH: usize = 3;
const ISSUER: &str = "https://127.0.0.1:8443";
const ACTOR: &str = "spiffe://example.org/agent/i-1";

fn token_request(body: &[u8]) {
    let Ok(r) = form::token_request(body) else {
        return;
    };
    // What passed is bounded as promised.
    assert!(r.target.as_str().len() <= form::MAX_RESOURCE_LEN);
    for (t, _) in r.subject_token.iter().chain(r.actor_token.iter()) {
        assert!(t.len() <= form::MAX_TOKEN_LEN);
    }
    assert!(r
        .client_assertion
        .as_ref()
        .is_none_or(|a| a.len() <= form::MAX_TOKEN_LEN));
    assert!(!(r.actor_token.is_some() && r.subject_token.is_none()));
    if let Some(s) = &r.scope {
        assert!(s.len() <= scope::MAX_SCOPES);
    }
}

fn claims(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Ok(chain) = chain::ActChain::from_claim(Some(&value), MAX_DEPTH) {
        assert!(chain.depth() <= MAX_DEPTH);
        let again = chain::ActChain::from_claim(chain.to_claim().as_ref(), MAX_DEPTH);
        assert_eq!(again.as_ref(), Ok(&chain));
    }
    let _ = chain::may_act_allows(Some(&value), ACTOR);
    if let Value::Object(map) = &value {
        if let Ok(access) = token::AccessToken::from_claims(map, MAX_DEPTH) {
            let again = token::AccessToken::from_claims(&access.to_claims(), MAX_DEPTH);
            assert_eq!(again.as_ref(), Ok(&access));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode {
        0 => token_request(rest),
        1 => {
            if let Ok(t) = form::introspect_request(rest) {
                assert!(t.len() <= form::MAX_TOKEN_LEN);
            }
        }
        2 => {
            if let Ok(t) = std::str::from_utf8(rest) {
                // No key: nothing can verify.
                assert!(token::verify(t, &[], ISSUER, 1_700_000_000, MAX_DEPTH).is_err());
            }
        }
        3 => claims(rest),
        _ => {
            if let Ok(s) = std::str::from_utf8(rest) {
                if let Ok(scopes) = scope::Scopes::parse(s) {
                    assert_eq!(scope::Scopes::parse(&scopes.to_string()), Ok(scopes));
                }
            }
        }
    }
});
