//! `evidence`: offline evidence checks; [`crate::evidence`] runs them.

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// `evidence` verbs.
#[derive(Debug, Subcommand)]
pub enum EvidenceCmd {
    /// Verify captured evidence offline and print the verified claims.
    Verify(EvidenceVerifyArgs),
}

/// Flags of `evidence verify`.
#[derive(Debug, Args)]
pub struct EvidenceVerifyArgs {
    /// Evidence kind.
    #[arg(long, value_parser = ["tpm", "sev-snp", "tdx"])]
    pub kind: String,
    /// The evidence file (raw SNP report, raw TDX quote, TPM evidence).
    #[arg(long)]
    pub evidence: PathBuf,
    /// Collateral directory.
    #[arg(long)]
    pub collateral: Option<PathBuf>,
    /// Expected report_data, hex.
    #[arg(long)]
    pub report_data: Option<String>,
    /// Verification time, RFC 3339 (default: now).
    #[arg(long)]
    pub at: Option<String>,
    /// Server config whose `[attestors.*]` policy applies.
    #[arg(long)]
    pub config: Option<PathBuf>,
}
