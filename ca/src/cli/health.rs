//! `healthcheck`: exit 0 if the server answers on its admin socket.

use serde_json::json;
use ztid_proto::admin as pb;

use super::{status, Client, Output};

/// Runs `healthcheck`.
pub(super) async fn run(client: &mut Client, out: Output) -> Result<(), String> {
    let h = client
        .health(pb::HealthRequest {})
        .await
        .map_err(status)?
        .into_inner();
    match out {
        Output::Json => println!(
            "{}",
            json!({"status": h.status, "trust_domain": h.trust_domain})
        ),
        Output::Text => println!(
            "Server is healthy ({}, trust domain {})",
            h.status, h.trust_domain
        ),
    }
    Ok(())
}
