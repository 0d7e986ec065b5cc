//! The node API as the agent: a mutual-TLS client with the real agent's SVID, timed
//! `SignX509Svids` loads, and `SyncEntries` calls. Shared by scenarios (a) and (c).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use ztid_agent::node_client::{self, AgentSvid};
use ztid_proto::node::{self as pb, node_client::NodeClient};
use ztid_tests::{wait_for, Agent, Server};

use crate::measure::Lat;
use crate::TD;

/// A node API client presenting `agent`'s SVID (read from its data directory).
pub fn agent_client(server: &Server, agent: &Agent) -> NodeClient<Channel> {
    let data = agent.data_dir();
    let pem = std::fs::read_to_string(data.join("agent_svid.pem")).expect("agent_svid.pem");
    let chain = ztid_spiffe::svid::certs_from_pem(&pem).expect("agent chain");
    let key = std::fs::read(data.join("agent_key.pk8")).expect("agent_key.pk8");
    let svid = AgentSvid::from_parts(chain, key).expect("agent SVID");
    assert_eq!(svid.spiffe_id, agent.spiffe_id);
    let roots_pem = std::fs::read_to_string(server.bundle_file()).expect("bundle");
    let roots = ztid_spiffe::svid::certs_from_pem(&roots_pem).expect("bundle certs");
    let verifier = Arc::new(ztid_spiffe::tls::ServerSvidVerifier::new(
        ztid_spiffe::tls::shared_roots(roots),
        format!("spiffe://{TD}/ztid/server"),
    ));
    let addr: SocketAddr = server.addr().parse().unwrap();
    node_client::connect(
        addr,
        verifier,
        Some(svid.certified_key().expect("agent key")),
    )
    .expect("node client")
}

pub fn server_pid_of(server: &Server) -> u32 {
    server.proc.as_ref().expect("server running").child.id()
}

/// One timed `SignX509Svids` load: its shape, its counts, call latencies and CPU.
#[derive(Default)]
pub struct MintRun {
    pub batch: usize,
    pub conc: usize,
    pub conns: usize,
    pub ok: u64,
    pub errors: u64,
    pub secs: f64,
    pub calls: Lat,
    /// (server, agent, bench) CPU seconds.
    pub cpu: [f64; 3],
}

impl MintRun {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    pub fn cpu_us_per_svid(&self, i: usize) -> f64 {
        self.cpu[i] * 1e6 / self.ok.max(1) as f64
    }
}

/// `conc` concurrent callers, each sending `batch` CSRs per call until `dur` has passed:
/// (SVIDs, errors, seconds, call latencies).
pub async fn mint(
    clients: &[NodeClient<Channel>],
    entry_id: &str,
    csrs: &Arc<Vec<Vec<u8>>>,
    batch: usize,
    conc: usize,
    dur: Duration,
) -> (u64, u64, f64, Vec<Duration>) {
    let start = Instant::now();
    let deadline = start + dur;
    let mut handles = Vec::new();
    for t in 0..conc {
        let mut c = clients[t % clients.len()].clone();
        let csrs = csrs.clone();
        let entry = entry_id.to_string();
        handles.push(tokio::spawn(async move {
            let (mut ok, mut err) = (0u64, 0u64);
            let mut lats = Vec::new();
            let mut i = t * 7919;
            while Instant::now() < deadline {
                let requests = (0..batch)
                    .map(|_| {
                        i += 1;
                        pb::SvidRequest {
                            entry_id: entry.clone(),
                            csr: csrs[i % csrs.len()].clone(),
                        }
                    })
                    .collect();
                let t0 = Instant::now();
                match c
                    .sign_x509_svids(pb::SignX509SvidsRequest { requests })
                    .await
                {
                    Ok(r) => {
                        lats.push(t0.elapsed());
                        for res in r.into_inner().results {
                            match res.result {
                                Some(pb::svid_result::Result::Svid(_)) => ok += 1,
                                _ => err += 1,
                            }
                        }
                    }
                    Err(_) => err += batch as u64,
                }
            }
            (ok, err, lats)
        }));
    }
    let (mut ok, mut err, mut lats) = (0, 0, Vec::new());
    for h in handles {
        let (o, e, l) = h.await.expect("mint task");
        ok += o;
        err += e;
        lats.extend(l);
    }
    (ok, err, start.elapsed().as_secs_f64(), lats)
}

/// Calls until the server answers again (after a restart the channel reconnects).
pub fn wait_node_api(
    rt: &tokio::runtime::Runtime,
    c: &NodeClient<Channel>,
    entry_id: &str,
    csr: &[u8],
) {
    wait_for(
        "the node API to answer as the agent",
        Duration::from_secs(120),
        || {
            let mut c = c.clone();
            let r = rt.block_on(c.sign_x509_svids(pb::SignX509SvidsRequest {
                requests: vec![pb::SvidRequest {
                    entry_id: entry_id.to_string(),
                    csr: csr.to_vec(),
                }],
            }));
            match r {
                Ok(r) => matches!(
                    r.into_inner()
                        .results
                        .first()
                        .and_then(|x| x.result.as_ref()),
                    Some(pb::svid_result::Result::Svid(_))
                )
                .then_some(()),
                Err(_) => None,
            }
        },
    );
}

/// One `SyncEntries` call since `since`, timed.
pub fn timed_sync(
    rt: &tokio::runtime::Runtime,
    c: &NodeClient<Channel>,
    since: u64,
) -> (Duration, pb::SyncEntriesResponse) {
    let mut c = c.clone();
    let t0 = Instant::now();
    let r = rt
        .block_on(c.sync_entries(pb::SyncEntriesRequest {
            since_revision: since,
            bundle_sequence: u64::MAX,
            ..Default::default()
        }))
        .expect("SyncEntries")
        .into_inner();
    (t0.elapsed(), r)
}
