//! The servers the agent talks to, and failing over between them.
//!
//! `--server` (config `server`) is a comma-separated list of `HOST:PORT`; a HOST that is
//! a name may resolve to several addresses, each of them a server. The agent keeps one
//! ordered candidate list (the configured order, then the resolver's), and every call to
//! the node API goes to the current candidate. When that server does not answer (a
//! transport failure, `Unavailable`, `DeadlineExceeded`, a connect or TLS-handshake
//! timeout) the agent moves to the next candidate, round-robin, after a short bounded
//! backoff, and tries the call again there, at most once per candidate and within a
//! bounded time: a black-holed server never holds up workloads for long.
//!
//! A server's refusal (`PermissionDenied`, `Unauthenticated`, `InvalidArgument`, ...) is
//! an answer, not an outage: it is returned as it is and never asked again elsewhere, so
//! an eviction or a ban through one server cannot be dodged by asking another.
//!
//! Names are resolved again at every failover (and whenever no address is known), so a
//! DNS change is followed; a name that does not resolve at that moment keeps the
//! addresses it had. Each server keeps one lazily connecting channel per client identity
//! ([`NodeConnections`]); every server is verified exactly as one server was: its SVID
//! must chain to the trust bundle and name the trust domain's server ID.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::ServerCertVerifier;
use rustls::sign::CertifiedKey;
use tonic::transport::Channel;
use tonic::{Code, Status};
use ztid_proto::node::node_client::NodeClient;

use crate::Error;

/// Most entries in a `--server` list, and most addresses the list may resolve to (the
/// rest are ignored, with a warning).
pub const MAX_SERVERS: usize = 16;
/// Longest `HOST:PORT` entry accepted (a DNS name is at most 253 bytes).
const MAX_ENTRY_LEN: usize = 300;
/// Time to open a TCP connection and finish the TLS handshake with one server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time one attempt of a unary call (renewal, minting) may take on one server.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Time one attempt of an entry sync may take (its answer may be large).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Time one attestation may take on one server: longer than the server's own bound on
/// an attestation (120 s), so that bound, not the agent, decides.
pub const ATTEST_TIMEOUT: Duration = Duration::from_secs(130);
/// No new attempt starts once a call has been trying for this long.
pub const CALL_BUDGET: Duration = Duration::from_secs(30);
/// Longest pause between two attempts of one call.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait for one name to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One entry of the `--server` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// An IP address or a DNS name (IPv6 without its brackets).
    pub host: String,
    /// The node API port.
    pub port: u16,
}

impl fmt::Display for ServerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn list_error(list: &str, why: impl fmt::Display) -> Error {
    Error::Config(format!(
        "--server {list:?}: {why} (expected HOST:PORT[,HOST:PORT...], at most {MAX_SERVERS}; IPv6 as [ADDR]:PORT)"
    ))
}

/// A DNS name as the resolver would take it: labels of letters, digits, `-` and `_`.
fn is_dns_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn parse_entry(list: &str, entry: &str) -> Result<ServerSpec, Error> {
    if entry.len() > MAX_ENTRY_LEN {
        return Err(list_error(
            list,
            format!("an address is longer than {MAX_ENTRY_LEN} bytes"),
        ));
    }
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (addr, port) = rest
            .split_once("]:")
            .ok_or_else(|| list_error(list, format!("{entry:?} has no port after ]")))?;
        let ip: Ipv6Addr = addr
            .parse()
            .map_err(|_| list_error(list, format!("{addr:?} is not an IPv6 address")))?;
        (ip.to_string(), port)
    } else {
        let (host, port) = entry
            .rsplit_once(':')
            .ok_or_else(|| list_error(list, format!("{entry:?} has no :PORT")))?;
        if host.contains(':') {
            return Err(list_error(
                list,
                format!("{entry:?}: write an IPv6 address in brackets, [ADDR]:PORT"),
            ));
        }
        if host.parse::<IpAddr>().is_err() && !is_dns_name(host) {
            return Err(list_error(
                list,
                format!("{host:?} is neither an IP address nor a DNS name"),
            ));
        }
        (host.to_ascii_lowercase(), port)
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| list_error(list, format!("{port:?} is not a port (1-65535)")))?;
    Ok(ServerSpec { host, port })
}

/// Parses `--server`: `HOST:PORT[,HOST:PORT...]`, spaces around entries allowed, at most
/// [`MAX_SERVERS`] entries; HOST is an IPv4 address, `[IPv6]`, or a DNS name.
pub fn parse_server_list(list: &str) -> Result<Vec<ServerSpec>, Error> {
    if list.trim().is_empty() {
        return Err(list_error(list, "no server address"));
    }
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    if entries.len() > MAX_SERVERS {
        return Err(list_error(
            list,
            format!("{} addresses, more than {MAX_SERVERS}", entries.len()),
        ));
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if e.is_empty() {
                Err(list_error(
                    list,
                    format!("address {} of {} is empty", i + 1, entries.len()),
                ))
            } else {
                parse_entry(list, e)
            }
        })
        .collect()
}

/// Whether a failed call is worth asking the next server: the server did not answer
/// (unreachable, gone mid-call, too slow), as opposed to answering with a refusal.
///
/// Fails over: `Unavailable` and `DeadlineExceeded` whoever produced them, and any
/// status this process made from a transport error (it carries that error as its
/// source; statuses a server sent never do). Never fails over: every other status a
/// server sent, refusals first (`PermissionDenied`, `Unauthenticated`,
/// `InvalidArgument`, `ResourceExhausted`, `FailedPrecondition`, `NotFound`, ...).
pub fn fails_over(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded => true,
        Code::Unknown | Code::Internal | Code::Cancelled => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// Pause before attempt `failures + 1` of a call: 100 ms, doubling, at most 1 s.
fn backoff(failures: usize) -> Duration {
    let shift = failures.saturating_sub(1).min(4) as u32;
    Duration::from_millis(100u64 << shift).min(MAX_BACKOFF)
}

/// Shortest pause before the change stream is opened again after a failure.
pub const WATCH_MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest such pause.
pub const WATCH_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The pause before the change stream is opened again after `failures` failures in a
/// row: doubling from [`WATCH_MIN_BACKOFF`] up to [`WATCH_MAX_BACKOFF`], then a random
/// half to all of it, so agents cut off together (a server restart) do not come back
/// together.
pub fn watch_backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(8);
    let full = WATCH_MIN_BACKOFF
        .saturating_mul(1u32 << shift)
        .min(WATCH_MAX_BACKOFF);
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    // half + half * byte/255: between half and all of `full`.
    full / 2 + (full / 2).mul_f64(f64::from(byte[0]) / 255.0)
}

/// Resolves one entry (bounded in time), in the resolver's order.
async fn resolve(spec: &ServerSpec) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = spec.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, spec.port)]);
    }
    let lookup = tokio::net::lookup_host((spec.host.as_str(), spec.port));
    match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Err(_) => Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err("no address".into())
            } else {
                Ok(addrs)
            }
        }
    }
}

/// The candidate list: each entry's addresses, and which address is current.
#[derive(Debug, Default)]
struct Candidates {
    /// Addresses of each entry of the list, as last resolved.
    by_entry: Vec<Vec<SocketAddr>>,
    /// The flattened, deduplicated, bounded list.
    addrs: Vec<SocketAddr>,
    /// Index into `addrs`.
    current: usize,
}

impl Candidates {
    fn current(&self) -> Option<SocketAddr> {
        self.addrs.get(self.current).copied()
    }

    /// Takes freshly resolved addresses (`None`: that entry did not resolve now and keeps
    /// its old ones); the current server stays current if it is still listed.
    fn update(&mut self, fresh: Vec<Option<Vec<SocketAddr>>>) {
        let was = self.current();
        self.by_entry.resize(fresh.len(), Vec::new());
        for (slot, f) in self.by_entry.iter_mut().zip(fresh) {
            if let Some(f) = f {
                *slot = f;
            }
        }
        let mut addrs = Vec::new();
        for a in self.by_entry.iter().flatten() {
            if !addrs.contains(a) {
                addrs.push(*a);
            }
        }
        if addrs.len() > MAX_SERVERS {
            tracing::warn!(
                resolved = addrs.len(),
                kept = MAX_SERVERS,
                "the --server list resolves to too many addresses; using the first ones"
            );
            addrs.truncate(MAX_SERVERS);
        }
        self.current = was
            .and_then(|w| addrs.iter().position(|a| *a == w))
            .unwrap_or(0);
        self.addrs = addrs;
    }

    /// Moves on from `from` after it failed, unless another call already did: returns the
    /// new current server if it changed.
    fn advance_from(&mut self, from: SocketAddr) -> Option<SocketAddr> {
        let n = self.addrs.len();
        if n == 0 {
            return None;
        }
        if self.current() != Some(from) {
            return None;
        }
        self.current = (self.current + 1) % n;
        self.current().filter(|to| *to != from)
    }
}

/// The configured servers and which one is current, shared by every
/// [`NodeConnections`] of the agent.
#[derive(Debug)]
pub struct Servers {
    specs: Vec<ServerSpec>,
    state: Mutex<Candidates>,
}

impl Servers {
    /// The servers of a parsed `--server` list, resolved once now (a name that does not
    /// resolve yet is tried again at the first call).
    pub async fn new(specs: Vec<ServerSpec>) -> Arc<Self> {
        let s = Arc::new(Self {
            specs,
            state: Mutex::new(Candidates::default()),
        });
        s.refresh().await;
        s
    }

    /// The list as configured, for logs.
    pub fn describe(&self) -> String {
        self.specs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Candidates> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Resolves every entry again.
    async fn refresh(&self) {
        let mut fresh = Vec::with_capacity(self.specs.len());
        for spec in &self.specs {
            fresh.push(match resolve(spec).await {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(server = %spec, error = %e, "cannot resolve a server name; keeping its previous addresses");
                    None
                }
            });
        }
        self.lock().update(fresh);
    }

    /// The current server and the number of candidates; resolves again if none is known.
    async fn current(&self) -> Option<(SocketAddr, usize)> {
        let known = {
            let c = self.lock();
            c.current().map(|a| (a, c.addrs.len()))
        };
        if known.is_some() {
            return known;
        }
        self.refresh().await;
        let c = self.lock();
        c.current().map(|a| (a, c.addrs.len()))
    }

    /// After `from` did not answer: resolves again and moves to the next candidate
    /// (logged and counted when the current server changes).
    async fn fail_over(&self, from: SocketAddr, why: &Status) {
        if self.specs.iter().any(|s| s.host.parse::<IpAddr>().is_err()) {
            self.refresh().await;
        }
        let switched = self.lock().advance_from(from);
        if let Some(to) = switched {
            tracing::warn!(
                event = "server_failover",
                from = %from,
                to = %to,
                code = ?why.code(),
                error = %why.message(),
                "node API server did not answer; switching to the next server"
            );
            crate::metrics::server_failover();
        }
    }

    /// Addresses currently listed (channels to others are dropped).
    fn listed(&self) -> Vec<SocketAddr> {
        self.lock().addrs.clone()
    }
}

/// The agent's connections to its servers with one client identity (the agent SVID, or
/// none while attesting) and one server verifier: a lazily connecting channel per
/// server, made on first use.
pub struct NodeConnections {
    servers: Arc<Servers>,
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Option<Arc<CertifiedKey>>,
    channels: Mutex<HashMap<SocketAddr, Channel>>,
}

impl NodeConnections {
    /// Connections to `servers`, verifying each with `verifier` and presenting
    /// `client_cert` when given. Nothing connects until the first call.
    pub fn new(
        servers: Arc<Servers>,
        verifier: Arc<dyn ServerCertVerifier>,
        client_cert: Option<Arc<CertifiedKey>>,
    ) -> Self {
        Self {
            servers,
            verifier,
            client_cert,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The servers these connections go to.
    pub fn servers(&self) -> &Arc<Servers> {
        &self.servers
    }

    fn client(&self, addr: SocketAddr) -> Result<NodeClient<Channel>, Status> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = channels.get(&addr) {
            return Ok(NodeClient::new(c.clone()));
        }
        let listed = self.servers.listed();
        channels.retain(|a, _| listed.contains(a));
        let channel = crate::node_client::mtls_channel_with_timeout(
            addr,
            self.verifier.clone(),
            self.client_cert.clone(),
            CONNECT_TIMEOUT,
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        channels.insert(addr, channel.clone());
        Ok(NodeClient::new(channel))
    }

    /// The server every call goes to now (the one the agent syncs with) and a client for
    /// it: where the change stream is kept open.
    pub async fn current_client(&self) -> Result<(SocketAddr, NodeClient<Channel>), Status> {
        self.tries().next().await
    }

    /// The current server's address, if one is known (no resolving).
    pub fn current_addr(&self) -> Option<SocketAddr> {
        self.servers.lock().current()
    }

    /// Tries of one call: see [`Tries`].
    pub fn tries(&self) -> Tries<'_> {
        Tries {
            conns: self,
            started: Instant::now(),
            failures: 0,
            limit: None,
        }
    }

    /// Makes one node API call on the current server, failing over as the module says;
    /// `f` makes the call on the client it is given (again for each attempt), and each
    /// attempt may take `timeout`.
    pub async fn call<T, F, Fut>(&self, rpc: &str, timeout: Duration, mut f: F) -> Result<T, Status>
    where
        F: FnMut(NodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut tries = self.tries();
        loop {
            let (addr, client) = tries.next().await?;
            let result = match tokio::time::timeout(timeout, f(client)).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "{rpc}: no answer from {addr} within {timeout:?}"
                ))),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(s) => tries.failed(addr, s).await?,
            }
        }
    }
}

/// The attempts of one call: at most one per candidate, none started after
/// [`CALL_BUDGET`], a short pause between two.
pub struct Tries<'a> {
    conns: &'a NodeConnections,
    started: Instant,
    failures: usize,
    /// Candidates when the call started.
    limit: Option<usize>,
}

impl Tries<'_> {
    /// The server to try now and a client for it.
    pub async fn next(&mut self) -> Result<(SocketAddr, NodeClient<Channel>), Status> {
        let (addr, n) = self.conns.servers.current().await.ok_or_else(|| {
            Status::unavailable(format!(
                "no address for the server(s) {}",
                self.conns.servers.describe()
            ))
        })?;
        self.limit.get_or_insert(n);
        Ok((addr, self.conns.client(addr)?))
    }

    /// Records that the attempt on `from` failed with `status`: `Ok(())` to try again (on
    /// the next server, after a pause), or the status to give up with.
    pub async fn failed(&mut self, from: SocketAddr, status: Status) -> Result<(), Status> {
        if !fails_over(&status) {
            return Err(status);
        }
        self.failures += 1;
        self.conns.servers.fail_over(from, &status).await;
        let limit = self.limit.unwrap_or(1);
        if self.failures >= limit || self.started.elapsed() >= CALL_BUDGET {
            return Err(status);
        }
        tokio::time::sleep(backoff(self.failures)).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(host: &str, port: u16) -> ServerSpec {
        ServerSpec {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn one_address_as_before() {
        assert_eq!(
            parse_server_list("127.0.0.1:8081").unwrap(),
            vec![spec("127.0.0.1", 8081)]
        );
        assert_eq!(
            parse_server_list("ztid.example.org:8081").unwrap(),
            vec![spec("ztid.example.org", 8081)]
        );
    }

    #[test]
    fn comma_list_names_and_ipv6() {
        let l = parse_server_list(
            "127.0.0.1:1, [::1]:8081 ,Servers.Example.ORG:443,[2001:db8::1]:9,localhost:2",
        )
        .unwrap();
        assert_eq!(
            l,
            vec![
                spec("127.0.0.1", 1),
                spec("::1", 8081),
                spec("servers.example.org", 443),
                spec("2001:db8::1", 9),
                spec("localhost", 2),
            ]
        );
        assert_eq!(l[1].to_string(), "[::1]:8081");
        assert_eq!(l[2].to_string(), "servers.example.org:443");
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let err = |s: &str| parse_server_list(s).unwrap_err().to_string();
        assert!(err("").contains("no server address"), "{}", err(""));
        assert!(err("  ").contains("no server address"));
        assert!(err("a:1,,b:2").contains("address 2 of 3 is empty"));
        assert!(err("a:1,").contains("address 2 of 2 is empty"));
        let many = (1..=17)
            .map(|i| format!("10.0.0.{i}:8081"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(err(&many).contains("17 addresses, more than 16"));
        let sixteen = (1..=16)
            .map(|i| format!("10.0.0.{i}:8081"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse_server_list(&sixteen).unwrap().len(), 16);
        assert!(err("host").contains("has no :PORT"));
        assert!(err("host:0").contains("is not a port"));
        assert!(err("host:65536").contains("is not a port"));
        assert!(err("host:http").contains("is not a port"));
        assert!(err("::1:8081").contains("in brackets"));
        assert!(err("[::1]").contains("no port after ]"));
        assert!(err("[not-v6]:1").contains("is not an IPv6 address"));
        assert!(err("bad host:1").contains("neither an IP address nor a DNS name"));
        assert!(err("-a.example:1").contains("neither"));
        assert!(err(":8081").contains("neither"));
        assert!(err(&format!("{}:1", "a".repeat(400))).contains("longer than"));
        // Every refusal shows the expected form.
        assert!(err("x").contains("HOST:PORT[,HOST:PORT...]"));
    }

    #[test]
    fn only_an_unanswered_call_fails_over() {
        for code in [Code::Unavailable, Code::DeadlineExceeded] {
            assert!(fails_over(&Status::new(code, "x")), "{code:?}");
        }
        for code in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::AlreadyExists,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::DataLoss,
            Code::Ok,
            // As sent by a server: no local source.
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert!(!fails_over(&Status::new(code, "refused")), "{code:?}");
        }
        // A refusal with its reason, as the server sends it, stays a refusal.
        assert!(!fails_over(&Status::unauthenticated(
            "agent is banned: compromised node"
        )));
        // Made here from a transport error (the connection broke mid-call).
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "connection closed",
        )));
        assert_eq!(broken.code(), Code::Unknown);
        assert!(fails_over(&broken));
    }

    #[test]
    fn backoff_is_short_and_bounded() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(5), MAX_BACKOFF);
        assert_eq!(backoff(1000), MAX_BACKOFF);
    }

    #[test]
    fn watch_backoff_grows_is_bounded_and_jittered() {
        for failures in [1, 2, 3, 6, 100] {
            let full = WATCH_MIN_BACKOFF
                .saturating_mul(1 << (failures - 1).min(8))
                .min(WATCH_MAX_BACKOFF);
            let b = watch_backoff(failures);
            assert!(b >= full / 2 && b <= full, "{failures}: {b:?} of {full:?}");
        }
        assert!(watch_backoff(100) <= WATCH_MAX_BACKOFF);
        // Jittered: 64 draws are not all the same.
        let draws: std::collections::BTreeSet<Duration> =
            (0..64).map(|_| watch_backoff(5)).collect();
        assert!(draws.len() > 1);
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_moves_once_per_failure() {
        let mut c = Candidates::default();
        let (a, b, d) = (addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("[::1]:1"));
        c.update(vec![Some(vec![a]), Some(vec![b, a, d])]);
        assert_eq!(c.addrs, vec![a, b, d], "in order, without duplicates");
        assert_eq!(c.current(), Some(a));
        assert_eq!(c.advance_from(a), Some(b));
        // A second call that also failed on `a` does not skip `b`.
        assert_eq!(c.advance_from(a), None);
        assert_eq!(c.current(), Some(b));
        assert_eq!(c.advance_from(b), Some(d));
        assert_eq!(c.advance_from(d), Some(a), "round robin");
        // One server: nowhere to go.
        let mut one = Candidates::default();
        one.update(vec![Some(vec![a])]);
        assert_eq!(one.advance_from(a), None);
        assert_eq!(one.current(), Some(a));
    }

    #[test]
    fn resolving_again_keeps_the_current_server_and_failed_names() {
        let mut c = Candidates::default();
        let (a, b, d) = (addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1"));
        c.update(vec![Some(vec![a, b]), Some(vec![d])]);
        c.advance_from(a);
        assert_eq!(c.current(), Some(b));
        // The first name now resolves elsewhere; the second does not resolve at all.
        let e = addr("10.0.0.9:1");
        c.update(vec![Some(vec![e, b]), None]);
        assert_eq!(c.addrs, vec![e, b, d]);
        assert_eq!(c.current(), Some(b), "still current");
        c.update(vec![Some(vec![e]), None]);
        assert_eq!(c.current(), Some(e), "gone: back to the first");
        // Bounded.
        let many: Vec<SocketAddr> = (0..40)
            .map(|i| SocketAddr::new([10, 1, 0, i].into(), 1))
            .collect();
        c.update(vec![Some(many), None]);
        assert_eq!(c.addrs.len(), MAX_SERVERS);
    }

    #[tokio::test]
    async fn names_resolve_to_every_address() {
        let servers = Servers::new(parse_server_list("localhost:8081,127.0.0.2:9").unwrap()).await;
        let listed = servers.listed();
        assert!(listed.contains(&addr("127.0.0.1:8081")), "{listed:?}");
        assert_eq!(listed.last(), Some(&addr("127.0.0.2:9")));
        assert_eq!(servers.describe(), "localhost:8081,127.0.0.2:9");
    }

    /// A refused or black-holed server is skipped within the call; a refusal from a
    /// server is returned at once.
    #[tokio::test]
    async fn a_call_moves_past_dead_servers_and_stops_at_a_refusal() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let servers = Servers::new(
            parse_server_list(&format!("{dead_addr},127.0.0.1:9,127.0.0.2:9")).unwrap(),
        )
        .await;
        let conns = NodeConnections::new(
            servers.clone(),
            Arc::new(crate::tls::ServerSvidVerifier::insecure_bootstrap()),
            None,
        );
        // Unreachable everywhere: one attempt per candidate, then the last status.
        let mut seen = Vec::new();
        let r: Result<(), Status> = conns
            .call("Test", CALL_TIMEOUT, |_c| {
                let cur = servers.lock().current();
                seen.push(cur);
                async { Err(Status::unavailable("down")) }
            })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
        assert_eq!(seen.len(), 3, "{seen:?}");
        // A refusal is not asked again elsewhere.
        let mut calls = 0;
        let r: Result<(), Status> = conns
            .call("Test", CALL_TIMEOUT, |_c| {
                calls += 1;
                async { Err(Status::permission_denied("banned")) }
            })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::PermissionDenied);
        assert_eq!(calls, 1);
        // A server that does not answer in time counts as down.
        let mut calls = 0;
        let r: Result<u8, Status> = conns
            .call("Test", Duration::from_millis(50), |_c| {
                calls += 1;
                let first = calls == 1;
                async move {
                    if first {
                        std::future::pending::<()>().await;
                    }
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls, 2);
    }
}
