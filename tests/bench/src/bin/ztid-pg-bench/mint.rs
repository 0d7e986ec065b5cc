//! `SignX509Svids` through the node API, as the real agent of each server, against
//! several servers in alternating rounds: whatever else runs on the machine hits every
//! server alike.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use ztid_proto::node::node_client::NodeClient;

use crate::cpu::{Cpu, Groups, Window};
use crate::measure::Lat;
use crate::node_api::mint;

/// A server under test: its node API clients (as its agent), the entry, its pid.
pub struct Target {
    pub label: String,
    pub clients: Vec<NodeClient<Channel>>,
    pub entry_id: String,
    pub pid: u32,
    /// The PostgreSQL postmaster (0 for sled).
    pub postmaster: u32,
}

/// One load on one server, over all its rounds.
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub batch: usize,
    pub conc: usize,
    pub ok: u64,
    pub errors: u64,
    pub secs: f64,
    pub calls: Lat,
    pub cpu: Cpu,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }
    pub fn us_per_svid(&self, cpu_secs: f64) -> f64 {
        cpu_secs * 1e6 / self.ok.max(1) as f64
    }
}

/// `batch` CSRs per call, `conc` calls in flight (over up to 2 connections), `rounds`
/// rounds of `per_round` against each target in turn (the first target alternates),
/// after a 500 ms warm-up each. One [`Run`] per target.
pub fn alternate(
    rt: &tokio::runtime::Runtime,
    targets: &[&Target],
    csrs: &Arc<Vec<Vec<u8>>>,
    (batch, conc): (usize, usize),
    rounds: usize,
    per_round: Duration,
) -> Vec<Run> {
    let conns = |t: &Target| t.clients[..t.clients.len().min(conc).max(1)].to_vec();
    for t in targets {
        rt.block_on(mint(
            &conns(t),
            &t.entry_id,
            csrs,
            batch,
            conc,
            Duration::from_millis(500),
        ));
    }
    let mut out: Vec<Run> = targets
        .iter()
        .map(|_| Run {
            batch,
            conc,
            ..Default::default()
        })
        .collect();
    let mut lats: Vec<Vec<Duration>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let t = targets[i];
            let w = Window::start(&Groups {
                servers: vec![t.pid],
                postmaster: t.postmaster,
            });
            let (ok, errors, secs, l) =
                rt.block_on(mint(&conns(t), &t.entry_id, csrs, batch, conc, per_round));
            let c = w.stop();
            let r = &mut out[i];
            r.ok += ok;
            r.errors += errors;
            r.secs += secs;
            r.cpu.add(&c);
            lats[i].extend(l);
        }
    }
    for (r, l) in out.iter_mut().zip(lats) {
        r.calls = Lat::of(l);
    }
    out
}
