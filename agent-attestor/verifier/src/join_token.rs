//! Join tokens: a one-time secret the operator hands to a node out of band.
//!
//! The CA stores only the SHA-256 of each token; redeeming removes the record
//! atomically, so a token attests exactly one node, once, before it expires.
//! The token never appears in logs or error messages, and the node's id is a
//! random id minted with the token, not the token itself.

use subtle::ConstantTimeEq;

pub use ztid_attestation::join_token::{token_hash, METHOD};
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{Malformed, TokenExpired, TokenUnknown};
use ztid_spiffe::Selector;

use crate::{AttestationContext, AttestedNode, NodeVerifier, VerifierStep};

/// A token as the CA stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenGrant {
    /// SHA-256 of the token.
    pub hash: [u8; 32],
    /// Random id of the token, used as the node id.
    pub id: String,
    /// Unix seconds after which the token is void.
    pub expires_at: i64,
    /// Optional node alias the redeeming agent becomes a child of.
    pub alias: Option<String>,
}

/// Where the CA keeps tokens; implemented by its datastore.
pub trait JoinTokenStore: Send + Sync {
    /// Removes and returns the token with this hash, in one atomic step, so a
    /// second redemption (even a concurrent one) finds nothing.
    fn take_join_token(&self, hash: &[u8; 32]) -> Result<Option<JoinTokenGrant>, Error>;
}

/// CA side: redeems the token.
pub struct JoinTokenVerifier<S> {
    store: S,
}

/// The refusal of a token this server does not hold (never issued, already redeemed, or
/// expired and then removed), with the way on.
const SPENT: &str = "join token is unknown or was already used (a token attests one agent, once): make a new one with `ztid-server token generate` and start the agent with it";

/// The refusal of an expired token, with the way on.
const EXPIRED: &str = "join token has expired: make a new one with `ztid-server token generate` (--ttl SECONDS for a longer life) and start the agent with it";

impl<S: JoinTokenStore> JoinTokenVerifier<S> {
    /// A verifier redeeming tokens from `store`.
    pub fn new(store: S) -> Self {
        Self { store }
    }
}

impl<S: JoinTokenStore> NodeVerifier for JoinTokenVerifier<S> {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn start(&self, evidence: &[u8], ctx: &AttestationContext<'_>) -> Result<VerifierStep, Error> {
        let token = std::str::from_utf8(evidence)
            .map_err(|_| Error::refused(Malformed, "join token is not UTF-8"))?;
        if token.is_empty() || token.len() > 256 {
            return Err(Error::refused(Malformed, "join token is empty or too long"));
        }
        let hash = token_hash(token);
        let grant = self
            .store
            .take_join_token(&hash)?
            .ok_or_else(|| Error::refused(TokenUnknown, SPENT))?;
        // The lookup was by hash; comparing again in constant time costs nothing and keeps
        // the check independent of how a store implements its lookup.
        if !bool::from(grant.hash.ct_eq(&hash)) {
            return Err(Error::refused(TokenUnknown, SPENT));
        }
        let now = ctx
            .now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if now >= grant.expires_at {
            return Err(Error::refused(TokenExpired, EXPIRED));
        }
        let mut selectors = vec![Selector::new("join-token", "used")?];
        selectors.push(Selector::new("join-token", &format!("id:{}", grant.id))?);
        Ok(VerifierStep::Attested(AttestedNode {
            method: METHOD,
            node_id: grant.id.clone(),
            selectors,
            aliases: grant.alias.into_iter().collect(),
            evidence_digest: hash,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, UNIX_EPOCH};
    use ztid_attestation::RefusalKind;

    #[derive(Default)]
    struct MemStore(Mutex<HashMap<[u8; 32], JoinTokenGrant>>);
    impl JoinTokenStore for &MemStore {
        fn take_join_token(&self, hash: &[u8; 32]) -> Result<Option<JoinTokenGrant>, Error> {
            Ok(self.0.lock().unwrap().remove(hash))
        }
    }

    fn ctx(now: i64) -> AttestationContext<'static> {
        AttestationContext {
            agent_public_key: &[],
            now: UNIX_EPOCH + Duration::from_secs(now as u64),
        }
    }

    /// The detail of a refusal of `kind`.
    fn refusal(kind: RefusalKind, step: Result<VerifierStep, Error>) -> String {
        match step {
            Err(Error::Refused(r)) => {
                assert_eq!(r.kind, kind, "{}", r.detail);
                r.detail
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("expected a refusal"),
        }
    }

    #[test]
    fn single_use_and_expiry() {
        let store = MemStore::default();
        for (tok, id, exp) in [("tok-a", "id-a", 100), ("tok-b", "id-b", 50)] {
            store.0.lock().unwrap().insert(
                token_hash(tok),
                JoinTokenGrant {
                    hash: token_hash(tok),
                    id: id.into(),
                    expires_at: exp,
                    alias: None,
                },
            );
        }
        let v = JoinTokenVerifier::new(&store);
        match v.start(b"tok-a", &ctx(10)).unwrap() {
            VerifierStep::Attested(n) => {
                assert_eq!(n.node_id, "id-a");
                assert_eq!(n.method, "join-token");
                assert!(n
                    .selectors
                    .contains(&Selector::parse("join-token:used").unwrap()));
            }
            VerifierStep::Challenge(..) => panic!("no challenge expected"),
        }
        assert_eq!(refusal(TokenUnknown, v.start(b"tok-a", &ctx(10))), SPENT);
        assert_eq!(refusal(TokenExpired, v.start(b"tok-b", &ctx(60))), EXPIRED);
        // An expired token is consumed too: it cannot be retried.
        assert_eq!(refusal(TokenUnknown, v.start(b"tok-b", &ctx(10))), SPENT);
        assert!(SPENT.starts_with("join token is unknown or was already used"));
        assert!(EXPIRED.starts_with("join token has expired"));
        assert!(SPENT.contains("ztid-server token generate"));
        assert_eq!(
            refusal(Malformed, v.start(b"", &ctx(10))),
            "join token is empty or too long"
        );
        assert_eq!(
            refusal(Malformed, v.start(&[0xff, 0xfe], &ctx(10))),
            "join token is not UTF-8"
        );
    }
}
