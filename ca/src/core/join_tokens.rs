//! Join-token redemption against the datastore, for the join-token verifier.

use std::sync::Arc;

use ztid_verifier::join_token::{JoinTokenGrant, JoinTokenStore};

use crate::datastore::DataStore;

/// Join-token redemption backed by the datastore.
pub(super) struct StoreTokens(pub(super) Arc<dyn DataStore>);

/// The verifier's view of a datastore error: out of reach stays out of reach (the
/// caller is told `Unavailable` and an agent tries another server).
fn store_error(e: crate::Error) -> ztid_attestation::Error {
    match e {
        crate::Error::Store(crate::StoreError::Unreachable(m)) => {
            ztid_attestation::Error::StoreUnavailable(format!("datastore: {m}"))
        }
        e => ztid_attestation::Error::Store(e.to_string()),
    }
}

impl JoinTokenStore for StoreTokens {
    fn take_join_token(
        &self,
        hash: &[u8; 32],
    ) -> std::result::Result<Option<JoinTokenGrant>, ztid_attestation::Error> {
        let rec = self.0.take_join_token(hash).map_err(store_error)?;
        // Redeeming must survive a crash: a token that was used must stay used. An
        // unknown token changed nothing, so a flood of them costs no sync.
        if rec.is_some() {
            self.0.flush().map_err(store_error)?;
        }
        Ok(rec.map(|r| JoinTokenGrant {
            hash: *hash,
            id: r.id,
            expires_at: r.expires_at,
            alias: r.alias,
        }))
    }
}
