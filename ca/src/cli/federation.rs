//! `federation`: relationships with other trust domains' bundle endpoints.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;
use ztid_proto::admin as pb;

use super::output::{shown, when};
use super::{status, Client, Output};

/// `federation` verbs.
#[derive(Debug, Subcommand)]
pub enum FederationCmd {
    /// Create (or replace) a relationship; it is polled at once and then per its refresh hint.
    Create {
        /// The federated trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Its bundle endpoint (https).
        #[arg(long)]
        bundle_endpoint_url: String,
        /// Endpoint profile.
        #[arg(long, value_parser = ["https_web", "https_spiffe"])]
        profile: String,
        /// https_spiffe: the SPIFFE ID the endpoint must present.
        #[arg(long)]
        endpoint_spiffe_id: Option<String>,
        /// https_spiffe: the domain's bundle (SPIFFE JSON or PEM) for the first fetch.
        #[arg(long)]
        trust_bundle: Option<PathBuf>,
    },
    /// List relationships.
    List,
    /// Show one relationship.
    Show {
        /// The federated trust domain.
        trust_domain: String,
    },
    /// Delete a relationship.
    Delete {
        /// The federated trust domain.
        trust_domain: String,
    },
    /// Fetch the endpoint now.
    Refresh {
        /// The federated trust domain.
        trust_domain: String,
    },
}

/// Runs a `federation` verb.
pub(super) async fn run(
    client: &mut Client,
    cmd: &FederationCmd,
    out: Output,
) -> Result<(), String> {
    let fed_json = |f: &pb::Federation| {
        json!({"trust_domain": f.trust_domain, "bundle_endpoint_url": f.bundle_endpoint_url,
                    "profile": f.profile, "endpoint_spiffe_id": f.endpoint_spiffe_id,
                    "last_refresh_at": f.last_refresh_at, "last_error": f.last_error,
                    "bundle_sequence": f.bundle_sequence})
    };
    let print_fed = |f: &pb::Federation| match out {
        Output::Json => println!("{}", fed_json(f)),
        Output::Text => println!(
            "{}\t{}\t{}\t{}\tsequence {}\t{}\t{}",
            shown(&f.trust_domain),
            shown(&f.profile),
            shown(&f.bundle_endpoint_url),
            shown(&f.endpoint_spiffe_id),
            f.bundle_sequence,
            if f.last_refresh_at == 0 {
                "never refreshed".to_string()
            } else {
                format!("refreshed {}", when(f.last_refresh_at))
            },
            // The peer's answer may be quoted in it.
            if f.last_error.is_empty() {
                "ok".to_string()
            } else {
                shown(&f.last_error).to_string()
            }
        ),
    };
    let td_ref = |td: &String| pb::TrustDomainRef {
        trust_domain: td.clone(),
    };
    match cmd {
        FederationCmd::Create {
            trust_domain,
            bundle_endpoint_url,
            profile,
            endpoint_spiffe_id,
            trust_bundle,
        } => {
            let trust_bundle = match trust_bundle {
                Some(p) => super::files::read_bounded(p, crate::limits::MAX_BUNDLE_BYTES as u64)?,
                None => Vec::new(),
            };
            let f = client
                .create_federation(pb::Federation {
                    trust_domain: trust_domain.clone(),
                    bundle_endpoint_url: bundle_endpoint_url.clone(),
                    profile: profile.clone(),
                    endpoint_spiffe_id: endpoint_spiffe_id.clone().unwrap_or_default(),
                    trust_bundle,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            print_fed(&f);
        }
        FederationCmd::List => {
            let r = client
                .list_federations(pb::ListFederationsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"federations": r.federations.iter().map(fed_json).collect::<Vec<_>>()})
                ),
                Output::Text => r.federations.iter().for_each(print_fed),
            }
        }
        FederationCmd::Show { trust_domain } => {
            let f = client
                .get_federation(td_ref(trust_domain))
                .await
                .map_err(status)?
                .into_inner();
            print_fed(&f);
        }
        FederationCmd::Delete { trust_domain } => {
            let f = client
                .delete_federation(td_ref(trust_domain))
                .await
                .map_err(status)?
                .into_inner();
            print_fed(&f);
        }
        FederationCmd::Refresh { trust_domain } => {
            let r = client
                .refresh_federation(td_ref(trust_domain))
                .await
                .map_err(status)?
                .into_inner();
            let b = r.bundle.unwrap_or_default();
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"trust_domain": b.trust_domain, "sequence": b.sequence})
                ),
                Output::Text => {
                    println!(
                        "Bundle of {} at sequence {}",
                        shown(&b.trust_domain),
                        b.sequence
                    )
                }
            }
        }
    }
    Ok(())
}
