//! One workload instance's JWT-SVIDs: the tokens kept for reuse, and the record of its
//! mints of the last minute that the per-instance mint rate counts.
//!
//! The two are kept apart on purpose. When the cache also served as the mint record, a
//! token minted again for the same audience (past half its life) replaced the earlier
//! one and with it the record of that mint, and making room dropped expired tokens
//! minted seconds ago: with a short `--jwt-ttl` an instance minted without bound. And a
//! mint is recorded when it is allowed, before the server is asked, so fetches that
//! arrive together cannot all pass the check before any of them is recorded.

use std::collections::{HashMap, VecDeque};

use crate::limits::{MAX_JWT_CACHE_PER_INSTANCE, MAX_JWT_MINTS_PER_INSTANCE_PER_MINUTE};

/// A JWT-SVID handed out and kept for reuse until half its lifetime.
#[derive(Clone)]
pub struct CachedJwt {
    /// The token.
    pub token: String,
    /// Its `exp`.
    pub expires_at: i64,
    /// When it was minted.
    pub issued_at: i64,
    /// The key that signed it.
    pub kid: Option<String>,
}

/// (SPIFFE ID, normalised audiences): what a token is cached under.
pub type JwtKey = (String, Vec<String>);

/// An instance's cached JWT-SVIDs and its recent mints.
#[derive(Default)]
pub struct JwtCache {
    tokens: HashMap<JwtKey, CachedJwt>,
    /// When each mint allowed in the last minute was allowed, oldest first; at most
    /// [`MAX_JWT_MINTS_PER_INSTANCE_PER_MINUTE`].
    mints: VecDeque<i64>,
}

/// A mint the rate refuses: how many the instance had in the last minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateExceeded {
    /// Mints allowed in the last minute.
    pub recent: usize,
}

impl JwtCache {
    /// The cached token for `key`, while less than half its life has passed at `now`.
    pub fn reusable(&self, key: &JwtKey, now: i64) -> Option<&CachedJwt> {
        self.tokens
            .get(key)
            .filter(|j| now < j.issued_at + (j.expires_at - j.issued_at) / 2)
    }

    /// Allows `n` mints at `now` if the instance stays within its rate, and records them
    /// at once (a mint the server then refuses still counts: erring on refusing).
    pub fn allow_mints(&mut self, n: usize, now: i64) -> Result<(), RateExceeded> {
        while self.mints.front().is_some_and(|t| *t <= now - 60) {
            self.mints.pop_front();
        }
        let recent = self.mints.len();
        if recent + n > MAX_JWT_MINTS_PER_INSTANCE_PER_MINUTE {
            return Err(RateExceeded { recent });
        }
        self.mints.extend(std::iter::repeat_n(now, n));
        Ok(())
    }

    /// Keeps a token just minted; at most [`MAX_JWT_CACHE_PER_INSTANCE`], making room by
    /// dropping expired tokens, then the oldest.
    pub fn remember(&mut self, key: JwtKey, jwt: CachedJwt, now: i64) {
        if !self.tokens.contains_key(&key) && self.tokens.len() >= MAX_JWT_CACHE_PER_INSTANCE {
            self.tokens.retain(|_, j| j.expires_at > now);
            if self.tokens.len() >= MAX_JWT_CACHE_PER_INSTANCE {
                let oldest = self
                    .tokens
                    .iter()
                    .min_by_key(|(_, j)| j.issued_at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.tokens.remove(&k);
                }
            }
        }
        self.tokens.insert(key, jwt);
    }

    /// Drops the tokens `keep` refuses (revoked identities, tainted keys); the record of
    /// mints stays.
    pub fn retain(&mut self, mut keep: impl FnMut(&JwtKey, &CachedJwt) -> bool) {
        self.tokens.retain(|k, j| keep(k, j));
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(issued_at: i64, expires_at: i64) -> CachedJwt {
        CachedJwt {
            token: String::new(),
            expires_at,
            issued_at,
            kid: None,
        }
    }

    #[test]
    fn the_rate_counts_every_allowed_mint_for_a_minute() {
        let mut c = JwtCache::default();
        c.allow_mints(59, 1_000).unwrap();
        assert_eq!(c.allow_mints(2, 1_030), Err(RateExceeded { recent: 59 }));
        c.allow_mints(1, 1_030).unwrap();
        assert_eq!(c.allow_mints(1, 1_059), Err(RateExceeded { recent: 60 }));
        // A minute after the first 59, only the last one still counts.
        c.allow_mints(59, 1_060).unwrap();
        assert_eq!(c.allow_mints(1, 1_060), Err(RateExceeded { recent: 60 }));
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_no_mint() {
        let mut c = JwtCache::default();
        c.allow_mints(10, 1_000).unwrap();
        for i in 0..MAX_JWT_CACHE_PER_INSTANCE + 10 {
            // Short-lived tokens: expired at once, replaced, evicted.
            c.remember(
                ("id".into(), vec![format!("a{i}")]),
                jwt(1_000, 1_001),
                1_002,
            );
            c.remember(("id".into(), vec!["same".into()]), jwt(1_000, 1_001), 1_002);
        }
        assert!(c.len() <= MAX_JWT_CACHE_PER_INSTANCE);
        assert_eq!(c.allow_mints(51, 1_002), Err(RateExceeded { recent: 10 }));
        assert!(c
            .reusable(&("id".into(), vec!["same".into()]), 1_002)
            .is_none());
        c.remember(("id".into(), vec!["long".into()]), jwt(1_002, 1_302), 1_002);
        assert!(c
            .reusable(&("id".into(), vec!["long".into()]), 1_151)
            .is_some());
        assert!(c
            .reusable(&("id".into(), vec!["long".into()]), 1_152)
            .is_none());
        c.retain(|_, j| j.expires_at > 1_200);
        assert_eq!(c.len(), 1);
    }
}
