//! (a) X.509-SVIDs minted per second through the node API, for several shapes of load
//! (CSRs per call × calls in flight × TLS connections), with the CPU each side spent.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use ztid_proto::node::node_client::NodeClient;

use crate::measure::{log, us, CpuWindow, Lat};
use crate::node_api::{mint, MintRun};

/// (CSRs per call, calls in flight, TLS connections) of each measured load.
const LOADS: &[(usize, usize, usize)] =
    &[(1, 1, 1), (1, 16, 2), (10, 8, 2), (100, 2, 2), (100, 4, 2)];

pub struct Throughput {
    pub runs: Vec<MintRun>,
    /// The run with the highest rate.
    pub best_idx: usize,
}

impl Throughput {
    pub fn best(&self) -> &MintRun {
        &self.runs[self.best_idx]
    }
}

/// A warm-up of 500 ms, then one timed window of `dur` with the server's and agent's CPU.
#[allow(clippy::too_many_arguments)]
pub fn mint_run(
    rt: &tokio::runtime::Runtime,
    clients: &[NodeClient<Channel>],
    entry_id: &str,
    csrs: &Arc<Vec<Vec<u8>>>,
    batch: usize,
    conc: usize,
    dur: Duration,
    pids: (u32, u32),
) -> MintRun {
    // Warm-up (connections, caches), then the timed window.
    rt.block_on(mint(
        clients,
        entry_id,
        csrs,
        batch,
        conc,
        Duration::from_millis(500),
    ));
    let cpu = CpuWindow::start(pids.0, pids.1);
    let (ok, errors, secs, lats) = rt.block_on(mint(clients, entry_id, csrs, batch, conc, dur));
    MintRun {
        batch,
        conc,
        conns: clients.len(),
        ok,
        errors,
        secs,
        calls: Lat::of(lats),
        cpu: cpu.stop(),
    }
}

/// Every load of [`LOADS`] for `dur` each; `pids` are (server, agent).
pub fn throughput(
    rt: &tokio::runtime::Runtime,
    clients: &[NodeClient<Channel>],
    entry_id: &str,
    csrs: &Arc<Vec<Vec<u8>>>,
    dur: Duration,
    pids: (u32, u32),
) -> Throughput {
    log("(a) node API SignX509Svids throughput");
    let mut runs = Vec::new();
    for &(batch, conc, conns) in LOADS {
        let r = mint_run(
            rt,
            &clients[..conns],
            entry_id,
            csrs,
            batch,
            conc,
            dur,
            pids,
        );
        log(format!(
            "  batch {batch:>3} × {conc:>2} in flight over {conns} conn: {:>8.0} SVIDs/s (errors {}), call p50 {} p99 {}, server CPU {:.1} µs/SVID, bench CPU {:.1} µs/SVID",
            r.rate(),
            r.errors,
            us(r.calls.p50),
            us(r.calls.p99),
            r.cpu_us_per_svid(0),
            r.cpu_us_per_svid(2)
        ));
        runs.push(r);
    }
    let best_idx = (0..runs.len())
        .max_by(|&a, &b| runs[a].rate().partial_cmp(&runs[b].rate()).unwrap())
        .expect("a run");
    Throughput { runs, best_idx }
}
