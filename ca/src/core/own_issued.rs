//! The per-bundle memory of agent certificates this server's own authorities signed,
//! so authenticating an agent costs no chain check on every call.

use std::sync::Arc;

use ztid_spiffe::bundle::TrustBundle;

/// SHA-256s of agent certificates one of the cluster's X.509 authorities signed, valid
/// for one bundle: a chain check per node API call would cost a signature verification
/// on the mint path, and an agent presents the same certificate on every call. Any
/// authority change (prepare, activate, taint, revoke, on this server or, once its
/// notification is in, on any other) publishes a new bundle, which empties the cache,
/// so a revoked authority's certificates are checked again.
#[derive(Default)]
pub(super) struct OwnIssuedCache(std::sync::Mutex<Option<OwnIssued>>);

/// The bundle the cache is valid for, and the certificate digests it holds.
type OwnIssued = (Arc<TrustBundle>, std::collections::HashSet<[u8; 32]>);

/// Most certificates remembered before the cache starts over (a few per live agent).
const OWN_ISSUED_CACHE_MAX: usize = 16_384;

impl OwnIssuedCache {
    pub(super) fn contains(&self, bundle: &Arc<TrustBundle>, digest: &[u8; 32]) -> bool {
        self.0.lock().is_ok_and(|g| {
            g.as_ref()
                .is_some_and(|(b, set)| Arc::ptr_eq(b, bundle) && set.contains(digest))
        })
    }

    pub(super) fn insert(&self, bundle: Arc<TrustBundle>, digest: [u8; 32]) {
        if let Ok(mut g) = self.0.lock() {
            match g.as_mut() {
                Some((b, set)) if Arc::ptr_eq(b, &bundle) && set.len() < OWN_ISSUED_CACHE_MAX => {
                    set.insert(digest);
                }
                _ => *g = Some((bundle, std::iter::once(digest).collect())),
            }
        }
    }
}
