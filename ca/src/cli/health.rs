//! `healthcheck`: exit 0 if the server answers on its admin socket; with `--wait`,
//! once it does (a readiness wait for scripts that start the server in the background).

use std::path::Path;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use ztid_proto::admin as pb;
use ztid_proto::admin::admin_client::AdminClient;

use super::{admin, status, Output};

/// The upper bound of `--wait`: a readiness wait is seconds, not hours.
const MAX_WAIT_SECONDS: u64 = 600;

/// How often `--wait` tries again.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// Flags of `healthcheck`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Keep trying for up to SECONDS (at most 600) while the server is not answering
    /// yet, e.g. right after `ztid-server run ... &`; 0, the default, tries once.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_SECONDS)
    )]
    pub wait: u64,
}

/// Why one try failed, and whether trying again may succeed.
struct Failure {
    transient: bool,
    message: String,
}

/// One try: connect to `path` and ask for the server's health.
async fn once(path: &Path) -> Result<pb::HealthResponse, Failure> {
    let channel = ztid_proto::transport::unix_channel(path)
        .await
        .map_err(|e| Failure {
            // Not there yet, or a stale socket of a previous run: the server may be
            // starting. Anything else (permissions) will not change by waiting.
            transient: matches!(
                admin::io_kind(&e),
                Some(std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused)
            ),
            message: admin::unreachable_socket(path, &e),
        })?;
    AdminClient::new(channel)
        .health(pb::HealthRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| Failure {
            transient: s.code() == tonic::Code::Unavailable,
            message: status(s),
        })
}

/// Runs `healthcheck` against the admin socket at `path`.
pub(super) async fn run(path: &Path, args: &HealthArgs, out: Output) -> Result<(), String> {
    let h = if args.wait == 0 {
        once(path).await.map_err(|f| f.message)?
    } else {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait);
        loop {
            let last = match tokio::time::timeout_at(deadline, once(path)).await {
                Ok(Ok(h)) => break h,
                Ok(Err(f)) if !f.transient => return Err(f.message),
                Ok(Err(f)) => f.message,
                Err(_) => "no answer".to_string(),
            };
            if tokio::time::Instant::now() + RETRY_EVERY >= deadline {
                return Err(format!(
                    "the server did not answer within {} s (--wait): {last}",
                    args.wait
                ));
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    };
    match out {
        Output::Json => println!(
            "{}",
            json!({"status": h.status, "trust_domain": h.trust_domain})
        ),
        Output::Text => println!(
            "Server is healthy ({}, trust domain {})",
            super::output::shown(&h.status),
            super::output::shown(&h.trust_domain)
        ),
    }
    Ok(())
}
