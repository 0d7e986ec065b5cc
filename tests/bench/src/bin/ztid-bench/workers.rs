//! Worker processes: this benchmark's own binary run as a short-lived Workload API
//! client (`worker ENDPOINT`: fetch once and exit; `hold ENDPOINT`: fetch once, then
//! live until stdin closes), and the parent's side that spawns and reads them.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// Connects and fetches once: (connect → first response, of which the connect, SPIFFE ID).
fn fetch_once(endpoint: &str) -> Result<(Duration, Duration, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let t0 = Instant::now();
        let c = spiffe::WorkloadApiClient::connect_to(endpoint)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let connected = t0.elapsed();
        let svid = c
            .fetch_x509_svid()
            .await
            .map_err(|e| format!("fetch: {e}"))?;
        Ok((t0.elapsed(), connected, svid.spiffe_id().to_string()))
    })
}

/// `worker ENDPOINT`: one fetch, prints `ok <total ns> <connect ns> <spiffe id>`.
pub fn worker(endpoint: &str) -> ! {
    match fetch_once(endpoint) {
        Ok((d, c, id)) => {
            println!("ok {} {} {id}", d.as_nanos(), c.as_nanos());
            std::process::exit(0)
        }
        Err(e) => {
            println!("err {e}");
            std::process::exit(1)
        }
    }
}

/// `hold ENDPOINT`: one fetch, prints the result, then lives until stdin closes.
pub fn hold(endpoint: &str) -> ! {
    let r = fetch_once(endpoint);
    match &r {
        Ok((d, c, id)) => println!("ok {} {} {id}", d.as_nanos(), c.as_nanos()),
        Err(e) => println!("err {e}"),
    }
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 64];
    while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
    std::process::exit(if r.is_ok() { 0 } else { 1 })
}

/// (connect → first response, connect) from a worker's output line.
pub fn parse_worker_line(line: &str) -> Result<(Duration, Duration), String> {
    let mut it = line.split_whitespace();
    if it.next() != Some("ok") {
        return Err(line.trim().to_string());
    }
    let mut ns = || {
        it.next()
            .and_then(|n| n.parse::<u64>().ok())
            .map(Duration::from_nanos)
    };
    match (ns(), ns()) {
        (Some(total), Some(connect)) => Ok((total, connect)),
        _ => Err(format!("bad worker line {line:?}")),
    }
}

/// Starts this executable in `mode` (`worker` or `hold`) against `endpoint`.
pub fn spawn_worker(mode: &str, endpoint: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .arg(mode)
        .arg(endpoint)
        .stdin(if mode == "hold" {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn worker")
}

/// Live `hold` workers; any still running when this is dropped (a panic) are killed.
pub struct HeldProcs(pub Vec<(Child, Option<ChildStdin>)>);

impl Drop for HeldProcs {
    fn drop(&mut self) {
        for (c, stdin) in self.0.iter_mut() {
            drop(stdin.take());
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}
