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
//! Attestation attempts are unauthenticated, so fetching is bounded per verifier: at most
//! [`MAX_REQUESTS_PER_MINUTE`] requests a minute and [`MAX_IN_FLIGHT`] at once, and a URL
//! that failed is not asked again for [`FAILURE_MEMORY`]. Past those bounds an attempt
//! needing remote collateral is refused, naming why.
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

/// Most requests one client starts per minute. Attestation attempts are unauthenticated,
/// so without a bound a stream of garbage evidence naming ever-new chips could make the
/// CA hammer AMD or Intel (and tie up its threads); beyond it, requests are refused.
pub const MAX_REQUESTS_PER_MINUTE: usize = 30;
/// Most requests one client has in flight at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// How long a failed URL is not asked again.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(60);

/// The blocking HTTP client (one per verifier; agents are made on first use).
#[derive(Default)]
pub(crate) struct Client {
    https: OnceLock<ureq::Agent>,
    plain: OnceLock<ureq::Agent>,
    limits: std::sync::Mutex<Limits>,
}

/// Request accounting: recent starts, requests in flight, recent failures by URL.
#[derive(Default)]
struct Limits {
    started: std::collections::VecDeque<std::time::Instant>,
    in_flight: usize,
    failed: std::collections::HashMap<String, (std::time::Instant, String)>,
}

/// Releases an in-flight slot when a request ends, however it ends.
struct Slot<'a>(&'a std::sync::Mutex<Limits>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut l) = self.0.lock() {
            l.in_flight = l.in_flight.saturating_sub(1);
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
    /// GETs `url`: the body of a 200 response, or why not (the message names the URL).
    pub(crate) fn get(&self, url: &str) -> Result<Response, String> {
        let fail = |why: String| format!("GET {url}: {why}");
        let agent = if url.starts_with("https://") {
            self.https.get_or_init(|| agent(true))
        } else if url.starts_with("http://") {
            self.plain.get_or_init(|| agent(false))
        } else {
            return Err(fail("only https:// and http:// URLs are fetched".into()));
        };
        let slot = self.admit(url).map_err(fail)?;
        let result = blocking(|| {
            let mut resp = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
            let status = resp.status();
            if status != 200 {
                return Err(fail(format!(
                    "HTTP {}{}",
                    status.as_u16(),
                    status
                        .canonical_reason()
                        .map(|r| format!(" {r}"))
                        .unwrap_or_default()
                )));
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
                        fail(format!("response is larger than {MAX_RESPONSE} bytes"))
                    }
                    e => fail(format!("reading the response: {e}")),
                })?;
            Ok(Response { body, headers })
        });
        drop(slot);
        if let (Err(e), Ok(mut l)) = (&result, self.limits.lock()) {
            l.failed
                .insert(url.to_string(), (std::time::Instant::now(), e.clone()));
        }
        result
    }

    /// Takes an in-flight slot for `url`, or says why the request is not made.
    fn admit(&self, url: &str) -> Result<Slot<'_>, String> {
        let now = std::time::Instant::now();
        let mut l = self
            .limits
            .lock()
            .map_err(|_| "fetch accounting lock poisoned".to_string())?;
        l.failed
            .retain(|_, (at, _)| now.duration_since(*at) < FAILURE_MEMORY);
        if let Some((at, why)) = l.failed.get(url) {
            return Err(format!(
                "failed {} s ago ({why}); not asked again for {} s",
                now.duration_since(*at).as_secs(),
                FAILURE_MEMORY.as_secs()
            ));
        }
        while l
            .started
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            l.started.pop_front();
        }
        if l.started.len() >= MAX_REQUESTS_PER_MINUTE {
            return Err(format!(
                "not fetched: this verifier already made {MAX_REQUESTS_PER_MINUTE} requests in the last minute"
            ));
        }
        if l.in_flight >= MAX_IN_FLIGHT {
            return Err(format!(
                "not fetched: {MAX_IN_FLIGHT} requests already in flight"
            ));
        }
        l.started.push_back(now);
        l.in_flight += 1;
        Ok(Slot(&self.limits))
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.limits.lock().unwrap().in_flight, 0, "slots are released");
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
