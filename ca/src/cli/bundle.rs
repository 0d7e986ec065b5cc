//! `bundle`: this trust domain's bundle, and federated bundles exchanged out of band.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};
use ztid_proto::admin as pb;
use ztid_spiffe::svid::certs_to_pem;

use super::output::shown;
use super::{status, Client, Output};

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// PEM X.509 authorities.
    Pem,
    /// SPIFFE bundle JSON.
    Spiffe,
}

/// `bundle` verbs.
#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Show this trust domain's bundle.
    Show {
        /// Format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Store another trust domain's bundle exchanged out of band (never merged with
    /// this domain's); a lower spiffe_sequence than the stored one is refused.
    Set {
        /// The federated trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Bundle file.
        #[arg(long)]
        path: PathBuf,
        /// Format of the file.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// List the federated bundles.
    List {
        /// Format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Remove a federated bundle.
    Delete {
        /// The federated trust domain.
        #[arg(long)]
        trust_domain: String,
    },
}

/// Runs a `bundle` verb.
pub(super) async fn run(client: &mut Client, cmd: &BundleCmd, out: Output) -> Result<(), String> {
    match cmd {
        BundleCmd::Show { format } => {
            let r = client
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let b = r.bundle.unwrap_or_default();
            let pem = certs_to_pem(b.x509_authorities.iter().map(Vec::as_slice));
            match (out, format) {
                (Output::Json, BundleFormat::Pem) => println!(
                    "{}",
                    json!({"trust_domain": b.trust_domain, "sequence": b.sequence, "pem": pem})
                ),
                (_, BundleFormat::Spiffe) => println!("{}", r.spiffe_json),
                (Output::Text, BundleFormat::Pem) => print!("{pem}"),
            }
        }
        BundleCmd::Set {
            trust_domain,
            path,
            format,
        } => {
            let data = super::files::read_bounded(path, crate::limits::MAX_BUNDLE_BYTES as u64)?;
            let r = client
                .set_federated_bundle(pb::SetFederatedBundleRequest {
                    trust_domain: trust_domain.clone(),
                    format: match format {
                        BundleFormat::Pem => "pem",
                        BundleFormat::Spiffe => "spiffe",
                    }
                    .into(),
                    data,
                })
                .await
                .map_err(status)?
                .into_inner();
            let b = r.bundle.unwrap_or_default();
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"trust_domain": b.trust_domain, "sequence": b.sequence,
                        "x509_authorities": b.x509_authorities.len(),
                        "jwt_authorities": b.jwt_authorities.iter().map(|k| &k.kid).collect::<Vec<_>>()})
                ),
                Output::Text => println!(
                    "Bundle of {} stored (sequence {})",
                    shown(&b.trust_domain),
                    b.sequence
                ),
            }
        }
        BundleCmd::List { format } => {
            let r = client
                .list_federated_bundles(pb::ListFederatedBundlesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let items: Vec<Value> = r
                .bundles
                .iter()
                .map(|f| {
                    let b = f.bundle.clone().unwrap_or_default();
                    json!({"trust_domain": b.trust_domain, "sequence": b.sequence,
                        "refresh_hint": b.refresh_hint_seconds,
                        "pem": certs_to_pem(b.x509_authorities.iter().map(Vec::as_slice)),
                        "spiffe": serde_json::from_str::<Value>(&f.spiffe_json).unwrap_or(Value::Null)})
                })
                .collect();
            match (out, format) {
                (Output::Json, _) => println!("{}", json!({ "bundles": items })),
                (Output::Text, fmt) => {
                    for i in items {
                        // Fields of the objects built above; a missing one prints as null.
                        let field = |k: &str| i.get(k).unwrap_or(&Value::Null);
                        println!(
                            "# spiffe://{} (sequence {})",
                            shown(field("trust_domain").as_str().unwrap_or_default()),
                            field("sequence")
                        );
                        match fmt {
                            BundleFormat::Pem => {
                                print!("{}", field("pem").as_str().unwrap_or_default())
                            }
                            BundleFormat::Spiffe => println!("{}", field("spiffe")),
                        }
                    }
                }
            }
        }
        BundleCmd::Delete { trust_domain } => {
            client
                .delete_federated_bundle(pb::TrustDomainRef {
                    trust_domain: trust_domain.clone(),
                })
                .await
                .map_err(status)?;
            println!("Deleted the bundle of {}", shown(trust_domain));
        }
    }
    Ok(())
}
