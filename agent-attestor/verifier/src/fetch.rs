//! Optional fetching of TEE collateral (AMD KDS for `sev-snp`, Intel PCS for `tdx`) and
//! the on-disk cache it fills.
//!
//! Off by default: nothing here runs unless an attestor's config turns fetching on (see
//! [`super::sev_snp`] and [`super::tdx`]). The client is small and blocking, because the
//! verifier API is synchronous: each request has a [`TIMEOUT`] and a response cap of
//! [`MAX_RESPONSE`] bytes. `https` is the default; plain `http` works only because the
//! base URL is explicit configuration (tests serve collateral on 127.0.0.1), and a
//! request to an `https` URL never follows a redirect to `http`. Every failure names the
//! URL and the reason.
//!
//! Attestation attempts are unauthenticated, so fetching is bounded per verifier (each
//! verifier has its own client), in budgets ([`Pool`]) that cannot drain each other:
//!
//! - [`Pool::Open`], for URLs that unauthenticated evidence can vary (the VCEK of a chip
//!   never seen to verify; the TCB info of a TDX platform never seen to verify, whose
//!   PCK certificate chain was first checked up to the pinned Intel SGX Root CA): at
//!   most [`MAX_REQUESTS_PER_MINUTE`] requests a minute and [`MAX_IN_FLIGHT`] at once;
//! - [`Pool::KnownChip`], for the VCEK of a chip that already passed a full
//!   verification (bounded per chip by the caller): at most
//!   [`MAX_KNOWN_CHIP_REQUESTS_PER_MINUTE`] a minute and [`MAX_KNOWN_CHIP_IN_FLIGHT`] at
//!   once;
//! - [`Pool::KnownPlatform`], the same for the TCB info of a TDX platform (FMSPC and PCK
//!   CA) whose quote already passed a full verification: at most
//!   [`MAX_KNOWN_PLATFORM_REQUESTS_PER_MINUTE`] a minute and
//!   [`MAX_KNOWN_PLATFORM_IN_FLIGHT`] at once;
//! - [`Pool::FixedUrl`], for the few fixed URLs every node shares (an AMD product's
//!   cert_chain and CRL; Intel's PCK CRL per CA, QE identity and root CA CRL): at most
//!   [`MAX_FIXED_URL_REQUESTS_PER_MINUTE`] a minute and [`MAX_FIXED_URL_IN_FLIGHT`] at
//!   once.
//!
//! A flood of evidence naming bogus chips or platforms therefore exhausts only the open
//! budget, and nothing an attacker sends can keep the CRLs from being refreshed. A URL
//! that failed is not asked again for [`FAILURE_MEMORY`]; one AMD KDS answered "not
//! found" (HTTP 404, or 400 as KDS answers a malformed chip ID or TCB) is not asked
//! again for [`NOT_FOUND_MEMORY`] (`Client::get_in`; Intel PCS collateral, which a
//! PCCS answers 404 until it has synced an FMSPC, only for [`FAILURE_MEMORY`]:
//! `Client::get_pcs`), remembered for at most [`MAX_NOT_FOUND_REMEMBERED`] URLs (the
//! oldest forgotten first), so a repeated bogus chip costs no request at all. Past those
//! bounds an attempt needing remote collateral is refused, naming why. Outbound requests
//! stay bounded by the sum of the budgets a client uses (three: SEV-SNP never uses the
//! known-platform budget, TDX never the known-chip one).
//!
//! Nothing fetched is trusted for what it is: each verifier checks fetched certificates,
//! CRLs and signed collateral exactly as it checks offline collateral, and stores in the
//! cache only what passed those checks. Cached files are used again, without a request,
//! while they are valid at the verification time.

#![cfg_attr(not(all(feature = "sev-snp", feature = "tdx")), allow(dead_code))] // some helpers serve one TEE only

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{blocking, Error};

/// Time limit of one request (connect, TLS, headers and body).
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read from one response body.
pub const MAX_RESPONSE: u64 = 1 << 20;
/// Redirects followed.
const MAX_REDIRECTS: u32 = 3;

/// A response with status 200.
#[derive(Debug)]
pub(crate) struct Response {
    pub body: Vec<u8>,
    headers: Vec<(String, String)>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Most [`Pool::Open`] requests one client starts per minute. Attestation attempts are
/// unauthenticated, so without a bound a stream of garbage evidence naming ever-new chips
/// could make the CA hammer AMD or Intel (and tie up its threads); beyond it, requests are
/// refused.
pub const MAX_REQUESTS_PER_MINUTE: usize = 30;
/// Most [`Pool::Open`] requests one client has in flight at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// Most [`Pool::KnownChip`] requests one client starts per minute.
pub const MAX_KNOWN_CHIP_REQUESTS_PER_MINUTE: usize = 30;
/// Most [`Pool::KnownChip`] requests one client has in flight at once.
pub const MAX_KNOWN_CHIP_IN_FLIGHT: usize = 2;
/// Most [`Pool::KnownPlatform`] requests one client starts per minute.
pub const MAX_KNOWN_PLATFORM_REQUESTS_PER_MINUTE: usize = 30;
/// Most [`Pool::KnownPlatform`] requests one client has in flight at once.
pub const MAX_KNOWN_PLATFORM_IN_FLIGHT: usize = 2;
/// Most [`Pool::FixedUrl`] requests one client starts per minute.
pub const MAX_FIXED_URL_REQUESTS_PER_MINUTE: usize = 30;
/// Most [`Pool::FixedUrl`] requests one client has in flight at once.
pub const MAX_FIXED_URL_IN_FLIGHT: usize = 2;
/// How long a failed URL is not asked again.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(60);
/// How long a URL the server answered "not found" is not asked again: a chip ID and TCB
/// that KDS does not know stays unknown, so asking again soon only spends the budget.
pub const NOT_FOUND_MEMORY: Duration = Duration::from_secs(3600);
/// Most "not found" URLs remembered at once (the oldest is forgotten first): bounds the
/// memory a flood of bogus chip IDs can take.
pub const MAX_NOT_FOUND_REMEMBERED: usize = 4096;

/// Removes the entries of `map` that `at` dates oldest until fewer than `max` are left
/// (room for one more): the bound of every in-memory list a flood could grow.
pub(crate) fn make_room<K, V>(
    map: &mut std::collections::HashMap<K, V>,
    max: usize,
    at: impl Fn(&V) -> std::time::Instant,
) where
    K: std::hash::Hash + Eq + Clone,
{
    while map.len() >= max {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| at(v))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&oldest);
    }
}

/// An hour, the period of [`KnownSources`]' per-source quota.
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// Sources of evidence (an SEV-SNP chip, a TDX platform) that already passed a full
/// verification: their fetches draw on a budget of their own (`pool`), at most
/// `per_hour` requests each an hour, then the open one (so evidence forged with a known
/// source's name cannot spend that budget for the others); at most `max` are
/// remembered, the least recently verified forgotten first, in memory only.
pub(crate) struct KnownSources<K> {
    by_key: std::collections::HashMap<K, KnownSource>,
    pool: Pool,
    max: usize,
    per_hour: usize,
}

struct KnownSource {
    last_verified: std::time::Instant,
    /// Its requests from the known budget in the last hour, oldest first.
    budget_fetches: std::collections::VecDeque<std::time::Instant>,
}

impl<K: std::hash::Hash + Eq + Clone> KnownSources<K> {
    /// None known yet; fetches for known sources go to `pool`.
    pub(crate) fn new(pool: Pool, max: usize, per_hour: usize) -> Self {
        Self {
            by_key: std::collections::HashMap::new(),
            pool,
            max,
            per_hour,
        }
    }

    /// Records a verified source, forgetting the least recently verified past the bound.
    pub(crate) fn remember<Q>(&mut self, key: &Q, now: std::time::Instant)
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(k) = self.by_key.get_mut(key) {
            k.last_verified = now;
            return;
        }
        make_room(&mut self.by_key, self.max, |k| k.last_verified);
        self.by_key.insert(
            key.to_owned(),
            KnownSource {
                last_verified: now,
                budget_fetches: std::collections::VecDeque::new(),
            },
        );
    }

    /// The pool a fetch for `key` is charged to: the known pool for a known source within
    /// its hourly quota, [`Pool::Open`] otherwise.
    pub(crate) fn pool_for<Q>(&mut self, key: &Q, now: std::time::Instant) -> Pool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let Some(k) = self.by_key.get_mut(key) else {
            return Pool::Open;
        };
        while k
            .budget_fetches
            .front()
            .is_some_and(|t| now.duration_since(*t) >= HOUR)
        {
            k.budget_fetches.pop_front();
        }
        if k.budget_fetches.len() >= self.per_hour {
            Pool::Open
        } else {
            self.pool
        }
    }

    /// Counts a request made for `key` from the known pool against its quota (requests
    /// the client did not make are not counted).
    pub(crate) fn count_fetch<Q>(&mut self, key: &Q, now: std::time::Instant)
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        if let Some(k) = self.by_key.get_mut(key) {
            k.budget_fetches.push_back(now);
            // Bounded even if concurrent fetches raced past the quota check.
            while k.budget_fetches.len() > self.per_hour {
                k.budget_fetches.pop_front();
            }
        }
    }

    /// Whether `key` is known.
    pub(crate) fn contains<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.by_key.contains_key(key)
    }

    /// How many are known.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// The request budget a fetch is charged to (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pool {
    /// URLs that unauthenticated evidence can vary at will.
    Open,
    /// The VCEK of a chip that already passed a full verification.
    KnownChip,
    /// The TCB info of a TDX platform (FMSPC, PCK CA) that already passed a full
    /// verification.
    KnownPlatform,
    /// The few fixed URLs every node shares (cert_chain, CRLs, QE identity).
    FixedUrl,
}

impl Pool {
    /// Requests per minute and in flight at once.
    fn limits(self) -> (usize, usize) {
        match self {
            Pool::Open => (MAX_REQUESTS_PER_MINUTE, MAX_IN_FLIGHT),
            Pool::KnownChip => (MAX_KNOWN_CHIP_REQUESTS_PER_MINUTE, MAX_KNOWN_CHIP_IN_FLIGHT),
            Pool::KnownPlatform => (
                MAX_KNOWN_PLATFORM_REQUESTS_PER_MINUTE,
                MAX_KNOWN_PLATFORM_IN_FLIGHT,
            ),
            Pool::FixedUrl => (MAX_FIXED_URL_REQUESTS_PER_MINUTE, MAX_FIXED_URL_IN_FLIGHT),
        }
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pool::Open => "open",
            Pool::KnownChip => "known-chip",
            Pool::KnownPlatform => "known-platform",
            Pool::FixedUrl => "fixed-URL",
        })
    }
}

/// Why a request was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotFetched {
    /// Neither `https://` nor `http://`.
    #[error("only https:// and http:// URLs are fetched")]
    Scheme,
    /// The URL failed less than [`FAILURE_MEMORY`] ago.
    #[error("failed {ago_secs} s ago ({why}); not asked again for {} s", FAILURE_MEMORY.as_secs())]
    RecentlyFailed {
        /// Seconds since the failure.
        ago_secs: u64,
        /// The failure.
        why: String,
    },
    /// The server answered "not found" less than [`NOT_FOUND_MEMORY`] ago.
    #[error("answered HTTP {status} {ago_secs} s ago; not asked again for {} s", NOT_FOUND_MEMORY.as_secs())]
    RecentlyNotFound {
        /// Seconds since the answer.
        ago_secs: u64,
        /// Its HTTP status.
        status: u16,
    },
    /// The pool's per-minute budget is spent.
    #[error("not fetched: this verifier already made {limit} {}requests in the last minute", pool_prefix(*pool))]
    Budget {
        /// The pool whose budget is spent.
        pool: Pool,
        /// Its requests per minute.
        limit: usize,
    },
    /// The pool's in-flight slots are taken.
    #[error("not fetched: {limit} {}requests already in flight", pool_prefix(*pool))]
    InFlight {
        /// The pool whose slots are taken.
        pool: Pool,
        /// Its requests in flight at once.
        limit: usize,
    },
    /// The accounting lock is poisoned (a thread panicked holding it).
    #[error("fetch accounting lock poisoned")]
    Poisoned,
}

/// `known-chip ` or `fixed-URL ` for those budgets; nothing for the open budget, which
/// keeps its original wording ("30 requests").
fn pool_prefix(pool: Pool) -> String {
    match pool {
        Pool::Open => String::new(),
        other => format!("{other} "),
    }
}

/// A failed GET; every message starts with `GET {url}: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No request was made.
    #[error("GET {url}: {why}")]
    NotMade {
        /// The URL.
        url: String,
        /// Why not.
        why: NotFetched,
    },
    /// The server answered "not found" (404, or 400 for a malformed chip ID or TCB).
    #[error("GET {url}: HTTP {status}{}", canonical_reason(*status))]
    NotFound {
        /// The URL.
        url: String,
        /// 404 or 400.
        status: u16,
    },
    /// Transport failure, another status, or an unreadable body.
    #[error("GET {url}: {detail}")]
    Failed {
        /// The URL.
        url: String,
        /// What failed.
        detail: String,
    },
}

impl FetchError {
    /// True if no request was made because a budget or its in-flight slots were spent.
    pub fn is_over_budget(&self) -> bool {
        matches!(
            self,
            FetchError::NotMade {
                why: NotFetched::Budget { .. } | NotFetched::InFlight { .. },
                ..
            }
        )
    }
}

/// ` Not Found` for 404: the reason phrase, with its leading space, or nothing.
fn canonical_reason(status: u16) -> String {
    ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| format!(" {r}"))
        .unwrap_or_default()
}

/// Statuses taken as "this URL names nothing": KDS answers 404 for an unknown chip or TCB
/// and 400 for a malformed one; neither changes by asking again soon.
fn is_not_found(status: u16) -> bool {
    status == 404 || status == 400
}

/// The blocking HTTP client (one per verifier; agents are made on first use).
#[derive(Default)]
pub(crate) struct Client {
    https: OnceLock<ureq::Agent>,
    plain: OnceLock<ureq::Agent>,
    limits: std::sync::Mutex<Limits>,
}

/// One pool's accounting: recent starts and requests in flight.
#[derive(Default)]
struct PoolLimits {
    started: std::collections::VecDeque<std::time::Instant>,
    in_flight: usize,
}

/// Request accounting: each pool's, recent failures and "not found" answers by URL.
#[derive(Default)]
struct Limits {
    open: PoolLimits,
    known_chip: PoolLimits,
    known_platform: PoolLimits,
    fixed_url: PoolLimits,
    failed: std::collections::HashMap<String, (std::time::Instant, String)>,
    not_found: std::collections::HashMap<String, (std::time::Instant, u16)>,
}

impl Limits {
    fn pool(&mut self, pool: Pool) -> &mut PoolLimits {
        match pool {
            Pool::Open => &mut self.open,
            Pool::KnownChip => &mut self.known_chip,
            Pool::KnownPlatform => &mut self.known_platform,
            Pool::FixedUrl => &mut self.fixed_url,
        }
    }

    /// Remembers a "not found" answer, forgetting the oldest past the bound.
    fn remember_not_found(&mut self, url: &str, status: u16, now: std::time::Instant) {
        self.not_found
            .retain(|_, (at, _)| now.duration_since(*at) < NOT_FOUND_MEMORY);
        make_room(&mut self.not_found, MAX_NOT_FOUND_REMEMBERED, |(at, _)| *at);
        self.not_found.insert(url.to_string(), (now, status));
    }
}

/// Releases an in-flight slot of its pool when a request ends, however it ends.
struct Slot<'a>(&'a std::sync::Mutex<Limits>, Pool);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut l) = self.0.lock() {
            let p = l.pool(self.1);
            p.in_flight = p.in_flight.saturating_sub(1);
        }
    }
}

fn agent(https_only: bool) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .http_status_as_error(false)
        .https_only(https_only)
        .max_redirects(MAX_REDIRECTS)
        .user_agent(concat!("ztid/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

impl Client {
    /// [`Client::get_pcs`] charged to [`Pool::Open`], the error as its message.
    #[cfg(test)]
    pub(crate) fn get(&self, url: &str) -> Result<Response, String> {
        self.get_pcs(url, Pool::Open).map_err(|e| e.to_string())
    }

    /// GETs `url`, charged to `pool`: the body of a 200 response, or why not (the
    /// message names the URL).
    ///
    /// A "not found" answer is remembered only for [`FAILURE_MEMORY`]: Intel's PCS (and
    /// a PCCS, which answers 404 for an FMSPC it has not synced yet) is fetched this way,
    /// and a real platform must not wait an hour for its collateral; so is the VCEK of a
    /// known-good chip (see `sev_snp/kds.rs`).
    pub(crate) fn get_pcs(&self, url: &str, pool: Pool) -> Result<Response, FetchError> {
        self.fetch(url, pool, false)
    }

    /// GETs `url`, charged to `pool`: the body of a 200 response, or why not. A "not
    /// found" answer is remembered for [`NOT_FOUND_MEMORY`] (AMD KDS: a chip ID and TCB
    /// it does not know stays unknown).
    pub(crate) fn get_in(&self, url: &str, pool: Pool) -> Result<Response, FetchError> {
        self.fetch(url, pool, true)
    }

    /// GETs `url`, charged to `pool`; a "not found" answer is remembered for
    /// [`NOT_FOUND_MEMORY`] when `long_not_found`, else as any failure.
    fn fetch(&self, url: &str, pool: Pool, long_not_found: bool) -> Result<Response, FetchError> {
        let not_made = |why: NotFetched| FetchError::NotMade {
            url: url.to_string(),
            why,
        };
        let failed = |detail: String| FetchError::Failed {
            url: url.to_string(),
            detail,
        };
        let agent = if url.starts_with("https://") {
            self.https.get_or_init(|| agent(true))
        } else if url.starts_with("http://") {
            self.plain.get_or_init(|| agent(false))
        } else {
            return Err(not_made(NotFetched::Scheme));
        };
        let slot = self.admit(url, pool).map_err(not_made)?;
        let result = blocking(|| {
            let mut resp = agent.get(url).call().map_err(|e| failed(e.to_string()))?;
            let status = resp.status().as_u16();
            if is_not_found(status) {
                return Err(FetchError::NotFound {
                    url: url.to_string(),
                    status,
                });
            }
            if status != 200 {
                return Err(failed(format!("HTTP {status}{}", canonical_reason(status))));
            }
            let headers = resp
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
            let body = resp
                .body_mut()
                .with_config()
                .limit(MAX_RESPONSE)
                .read_to_vec()
                .map_err(|e| match e {
                    ureq::Error::BodyExceedsLimit(_) => {
                        failed(format!("response is larger than {MAX_RESPONSE} bytes"))
                    }
                    e => failed(format!("reading the response: {e}")),
                })?;
            Ok(Response { body, headers })
        });
        drop(slot);
        if let (Err(e), Ok(mut l)) = (&result, self.limits.lock()) {
            let now = std::time::Instant::now();
            match e {
                FetchError::NotFound { status, .. } if long_not_found => {
                    l.remember_not_found(url, *status, now)
                }
                e => {
                    l.failed.insert(url.to_string(), (now, e.to_string()));
                }
            }
        }
        result
    }

    /// Takes an in-flight slot of `pool` for `url`, or says why the request is not made.
    fn admit(&self, url: &str, pool: Pool) -> Result<Slot<'_>, NotFetched> {
        let now = std::time::Instant::now();
        let mut l = self.limits.lock().map_err(|_| NotFetched::Poisoned)?;
        l.failed
            .retain(|_, (at, _)| now.duration_since(*at) < FAILURE_MEMORY);
        if let Some((at, why)) = l.failed.get(url) {
            return Err(NotFetched::RecentlyFailed {
                ago_secs: now.duration_since(*at).as_secs(),
                why: why.clone(),
            });
        }
        if let Some((at, status)) = l.not_found.get(url) {
            let ago = now.duration_since(*at);
            if ago < NOT_FOUND_MEMORY {
                return Err(NotFetched::RecentlyNotFound {
                    ago_secs: ago.as_secs(),
                    status: *status,
                });
            }
        }
        let (per_minute, in_flight) = pool.limits();
        let p = l.pool(pool);
        while p
            .started
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            p.started.pop_front();
        }
        if p.started.len() >= per_minute {
            return Err(NotFetched::Budget {
                pool,
                limit: per_minute,
            });
        }
        if p.in_flight >= in_flight {
            return Err(NotFetched::InFlight {
                pool,
                limit: in_flight,
            });
        }
        p.started.push_back(now);
        p.in_flight += 1;
        Ok(Slot(&self.limits, pool))
    }
}

/// Checks a configured base URL (`key` names the config key): `https://` or
/// `http://`, with a host. Returns it without trailing slashes.
pub(crate) fn base_url(key: &str, url: &str) -> Result<String, String> {
    let u = url.trim();
    let (scheme, rest) = if let Some(r) = u.strip_prefix("https://") {
        ("https://", r)
    } else if let Some(r) = u.strip_prefix("http://") {
        ("http://", r)
    } else {
        return Err(format!(
            "{key} {url:?} must start with https:// (or http://)"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{key} {url:?} has no host"));
    }
    if rest.contains(['?', '#', ' ']) {
        return Err(format!(
            "{key} {url:?} must be a base URL without query or fragment"
        ));
    }
    Ok(format!("{scheme}{rest}"))
}

/// Decodes `%XX` escapes (the PCS sends PEM issuer chains URL-encoded in headers).
pub(crate) fn percent_decode(s: &str) -> Result<String, String> {
    let mut rest = s.as_bytes();
    let mut out = Vec::with_capacity(rest.len());
    // Byte offset of `rest` in `s`, for errors.
    let mut i = 0;
    while let Some((&c, tail)) = rest.split_first() {
        if c == b'%' {
            let (h, after) = tail
                .split_at_checked(2)
                .and_then(|(h, after)| Some((std::str::from_utf8(h).ok()?, after)))
                .and_then(|(h, after)| Some((u8::from_str_radix(h, 16).ok()?, after)))
                .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
            out.push(h);
            rest = after;
            i += 3;
        } else {
            out.push(c);
            rest = tail;
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after percent-decoding".to_string())
}

/// A cache directory (created 0700 on first use; files 0600, written atomically).
#[derive(Debug, Clone)]
pub(crate) struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (and missing parents) with mode 0700.
    pub(crate) fn create(&self) -> Result<(), Error> {
        create_dir_0700(&self.dir)
    }

    /// The path of entry `rel` (a relative path made by the caller, never from input).
    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The bytes of entry `rel`, if present and readable.
    pub(crate) fn read(&self, rel: &str) -> Option<Vec<u8>> {
        let p = self.path(rel);
        let len = std::fs::metadata(&p).ok()?.len();
        if len > MAX_RESPONSE * 2 {
            return None;
        }
        std::fs::read(p).ok()
    }

    /// Stores `bytes` as entry `rel`.
    pub(crate) fn write(&self, rel: &str, bytes: &[u8]) -> Result<PathBuf, Error> {
        let p = self.path(rel);
        let parent = p.parent().unwrap_or(&self.dir).to_path_buf();
        create_dir_0700(&parent)?;
        // Unique per write: two threads filling the same entry must not share a file.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = parent.join(format!(
            ".{}.{}.{}.tmp",
            p.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id(),
            WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let ctx = format!("writing collateral cache {}", p.display());
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(Error::io(ctx.clone()))?;
            f.write_all(bytes).map_err(Error::io(ctx.clone()))?;
            f.sync_all().map_err(Error::io(ctx.clone()))?;
        }
        std::fs::rename(&tmp, &p).map_err(Error::io(ctx))?;
        Ok(p)
    }
}

fn create_dir_0700(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!(
            "creating collateral cache directory {}",
            dir.display()
        )))
}

/// A minimal HTTP server for unit tests: serves bodies by request target, answers 404
/// otherwise, and logs every target it was asked for.
#[cfg(test)]
pub(crate) mod test_server {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// Body and extra headers per target.
    type Routes = Arc<Mutex<HashMap<String, (Vec<u8>, Vec<(String, String)>)>>>;

    pub(crate) struct Server {
        /// `http://127.0.0.1:PORT`.
        pub addr: String,
        routes: Routes,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Server {
        /// Starts the server on a free port (its thread lives as long as the test process).
        pub(crate) fn start() -> Self {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = format!("http://{}", l.local_addr().unwrap());
            let routes: Routes = Arc::default();
            let log: Arc<Mutex<Vec<String>>> = Arc::default();
            let (r, g) = (routes.clone(), log.clone());
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    handle(s, &r, &g);
                }
            });
            Self { addr, routes, log }
        }

        /// Serves `body` with status 200 at `target` (path and query).
        pub(crate) fn serve(&self, target: &str, body: Vec<u8>) {
            self.serve_with(target, body, &[]);
        }

        /// Serves `body` with status 200 and `headers` at `target`.
        pub(crate) fn serve_with(&self, target: &str, body: Vec<u8>, headers: &[(&str, &str)]) {
            let headers = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            self.routes
                .lock()
                .unwrap()
                .insert(target.into(), (body, headers));
        }

        /// The targets asked for so far.
        pub(crate) fn requests(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    fn handle(mut s: TcpStream, routes: &Routes, log: &Mutex<Vec<String>>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let target = head
            .lines()
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("")
            .to_string();
        log.lock().unwrap().push(target.clone());
        let (status, body, headers) = match routes.lock().unwrap().get(&target) {
            Some((b, h)) => ("200 OK", b.clone(), h.clone()),
            None => ("404 Not Found", b"not found".to_vec(), Vec::new()),
        };
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let _ = write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(&body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_budget_cannot_drain_the_others() {
        // Nothing listens on port 1: every request fails at once, but counts.
        let c = Client::default();
        for i in 0..MAX_REQUESTS_PER_MINUTE {
            let e = c
                .get_in(&format!("http://127.0.0.1:1/open/{i}"), Pool::Open)
                .unwrap_err();
            assert!(matches!(e, FetchError::Failed { .. }), "{i}: {e}");
        }
        let over = c
            .get_in("http://127.0.0.1:1/open/more", Pool::Open)
            .unwrap_err();
        assert_eq!(
            over,
            FetchError::NotMade {
                url: "http://127.0.0.1:1/open/more".into(),
                why: NotFetched::Budget {
                    pool: Pool::Open,
                    limit: MAX_REQUESTS_PER_MINUTE
                }
            }
        );
        assert!(over.is_over_budget());
        // The open budget is spent, yet the other budgets are whole, each up to its own
        // bound.
        for (pool, limit) in [
            (Pool::KnownChip, MAX_KNOWN_CHIP_REQUESTS_PER_MINUTE),
            (Pool::KnownPlatform, MAX_KNOWN_PLATFORM_REQUESTS_PER_MINUTE),
            (Pool::FixedUrl, MAX_FIXED_URL_REQUESTS_PER_MINUTE),
        ] {
            for i in 0..limit {
                let e = c
                    .get_in(&format!("http://127.0.0.1:1/{pool}/{i}"), pool)
                    .unwrap_err();
                assert!(matches!(e, FetchError::Failed { .. }), "{pool} {i}: {e}");
            }
            let url = format!("http://127.0.0.1:1/{pool}/more");
            let over = c.get_in(&url, pool).unwrap_err();
            assert!(over.is_over_budget());
            assert_eq!(
                over.to_string(),
                format!("GET {url}: not fetched: this verifier already made {limit} {pool} requests in the last minute")
            );
        }
        let l = c.limits.lock().unwrap();
        assert_eq!(
            (
                l.open.in_flight,
                l.known_chip.in_flight,
                l.known_platform.in_flight,
                l.fixed_url.in_flight
            ),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn not_found_answers_are_remembered_and_bounded() {
        let server = test_server::Server::start();
        let c = Client::default();
        let url = format!("{}/vcek/v1/Milan/00ff", server.addr);
        let e = c.get_in(&url, Pool::Open).unwrap_err();
        assert_eq!(
            e,
            FetchError::NotFound {
                url: url.clone(),
                status: 404
            }
        );
        assert_eq!(e.to_string(), format!("GET {url}: HTTP 404 Not Found"));
        // Asked again: no request, whatever the pool, and said why.
        for pool in [Pool::Open, Pool::KnownChip, Pool::FixedUrl] {
            let again = c.get_in(&url, pool).unwrap_err();
            assert!(
                matches!(
                    &again,
                    FetchError::NotMade {
                        why: NotFetched::RecentlyNotFound { status: 404, .. },
                        ..
                    }
                ),
                "{again}"
            );
            assert!(
                again
                    .to_string()
                    .ends_with("answered HTTP 404 0 s ago; not asked again for 3600 s"),
                "{again}"
            );
        }
        assert_eq!(server.requests().len(), 1);
        // Not counted as a failure (those are forgotten after a minute).
        assert!(c.limits.lock().unwrap().failed.is_empty());

        // Fetched as PCS collateral is (`get`), a 404 is remembered only as a failure: a
        // PCCS answers 404 for an FMSPC it has not synced yet.
        let pcs = format!(
            "{}/sgx/certification/v4/tcb?fmspc=00a06f000000",
            server.addr
        );
        let first = c.get(&pcs).unwrap_err();
        assert!(first.ends_with("HTTP 404 Not Found"), "{first}");
        let again = c.get(&pcs).unwrap_err();
        assert!(again.contains("not asked again for 60 s"), "{again}");
        assert!(!c.limits.lock().unwrap().not_found.contains_key(&pcs));
        // The same from the fixed-URL budget (PCS's QE identity, CRLs), which the open
        // budget's use does not touch.
        let qe = format!("{}/tdx/certification/v4/qe/identity", server.addr);
        let first = c.get_pcs(&qe, Pool::FixedUrl).unwrap_err();
        assert!(
            matches!(first, FetchError::NotFound { status: 404, .. }),
            "{first}"
        );
        let again = c.get_pcs(&qe, Pool::FixedUrl).unwrap_err();
        assert!(
            matches!(
                &again,
                FetchError::NotMade {
                    why: NotFetched::RecentlyFailed { .. },
                    ..
                }
            ),
            "{again}"
        );
        assert!(!c.limits.lock().unwrap().not_found.contains_key(&qe));
        assert_eq!(c.limits.lock().unwrap().fixed_url.started.len(), 1);

        // The memory is bounded: past the bound the oldest answer is forgotten.
        let mut l = Limits::default();
        let t0 = std::time::Instant::now();
        for i in 0..=MAX_NOT_FOUND_REMEMBERED {
            l.remember_not_found(&format!("u{i}"), 404, t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(l.not_found.len(), MAX_NOT_FOUND_REMEMBERED);
        assert!(!l.not_found.contains_key("u0"));
        assert!(l
            .not_found
            .contains_key(&format!("u{MAX_NOT_FOUND_REMEMBERED}")));
    }

    #[test]
    fn failures_are_remembered_and_requests_are_bounded() {
        // Nothing listens on port 1: the connection is refused at once.
        let c = Client::default();
        let url = "http://127.0.0.1:1/vcek/v1/Milan/cert_chain";
        let first = c.get(url).unwrap_err();
        assert!(first.starts_with(&format!("GET {url}: ")), "{first}");
        let again = c.get(url).unwrap_err();
        assert!(
            again.contains("not asked again for 60 s"),
            "a failed URL is not retried at once: {again}"
        );
        // Every other URL counts against the per-minute budget, failures included.
        for i in 1..MAX_REQUESTS_PER_MINUTE {
            let e = c.get(&format!("http://127.0.0.1:1/{i}")).unwrap_err();
            assert!(!e.contains("not fetched"), "{i}: {e}");
        }
        let over = c.get("http://127.0.0.1:1/one-too-many").unwrap_err();
        assert!(
            over.ends_with(&format!(
                "not fetched: this verifier already made {MAX_REQUESTS_PER_MINUTE} requests in the last minute"
            )),
            "{over}"
        );
        assert_eq!(
            c.limits.lock().unwrap().open.in_flight,
            0,
            "slots are released"
        );
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("kds_url", "https://kdsintf.amd.com/").unwrap(),
            "https://kdsintf.amd.com"
        );
        assert_eq!(
            base_url("k", "http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(base_url("k", "ftp://x").unwrap_err().contains("https://"));
        assert!(base_url("k", "https://").unwrap_err().contains("no host"));
        assert!(base_url("k", "https://x/?a=b").is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("-----BEGIN%20CERTIFICATE-----%0AMII%2B").unwrap(),
            "-----BEGIN CERTIFICATE-----\nMII+"
        );
        assert!(percent_decode("%G0").is_err());
        assert!(percent_decode("%4").is_err());
    }

    #[test]
    fn cache_is_private_and_atomic() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let c = Cache::new(t.path().join("a/b"));
        c.create().unwrap();
        let mode = std::fs::metadata(c.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let p = c.write("Milan/x.der", b"abc").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(p.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert_eq!(c.read("Milan/x.der").unwrap(), b"abc");
        assert!(c.read("Milan/none").is_none());
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_other_schemes_without_a_request() {
        let e = Client::default().get("file:///etc/passwd").unwrap_err();
        assert_eq!(
            e,
            "GET file:///etc/passwd: only https:// and http:// URLs are fetched"
        );
    }
}
