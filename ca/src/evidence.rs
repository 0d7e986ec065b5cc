//! `ztid-server evidence verify`: runs a method's offline verifier on captured
//! evidence, so operators can see why a node was refused.

use std::time::SystemTime;

use ztid_verifier::{sev_snp, tdx, tpm};

use crate::cli::{EvidenceVerifyArgs, Output};
use crate::config::ServerConfig;

/// Verifies and prints the claims; `Err` carries the first failed check.
pub fn verify(args: &EvidenceVerifyArgs, output: Output) -> Result<(), String> {
    let evidence = std::fs::read(&args.evidence)
        .map_err(|e| format!("reading {}: {e}", args.evidence.display()))?;
    let report_data = match &args.report_data {
        Some(h) => {
            Some(hex::decode(h.trim()).map_err(|e| format!("--report-data is not hex: {e}"))?)
        }
        None => None,
    };
    let at = match &args.at {
        Some(t) => {
            let dt = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("--at {t:?} is not RFC 3339: {e}"))?;
            SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(
                    u64::try_from(dt.unix_timestamp())
                        .map_err(|_| "--at before 1970".to_string())?,
                )
        }
        None => SystemTime::now(),
    };
    let config = match &args.config {
        Some(p) => ServerConfig::from_file(p).map_err(|e| e.to_string())?,
        None => ServerConfig::default(),
    };
    let table = |t: &Option<toml::Table>| t.clone().unwrap_or_default();
    let collateral = args.collateral.as_deref();
    let rd = report_data.as_deref();
    let claims = match args.kind.as_str() {
        "tpm" => tpm::verify_offline(&evidence, collateral, rd, at, &table(&config.attestors.tpm)),
        "sev-snp" => sev_snp::verify_offline(
            &evidence,
            collateral,
            rd,
            at,
            &table(&config.attestors.sev_snp),
        ),
        "tdx" => tdx::verify_offline(&evidence, collateral, rd, at, &table(&config.attestors.tdx)),
        other => return Err(format!("unknown evidence kind {other:?}")),
    }
    .map_err(|e| e.to_string())?;
    match output {
        Output::Json => println!("{claims}"),
        Output::Text => {
            println!("Evidence verified ({}).", args.kind);
            if let Some(obj) = claims.as_object() {
                // Claims quote the evidence (a TPM's manufacturer, an EK issuer's name).
                for (k, v) in obj {
                    let v = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    println!(
                        "{:<16}: {}",
                        ztid_human::shown_string(k),
                        ztid_human::shown(&v)
                    );
                }
            }
        }
    }
    Ok(())
}
