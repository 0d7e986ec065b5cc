//! `ztid-server`.
#![forbid(unsafe_code)]

use clap::Parser;
use ztid_ca::cli::{admin_verb, run_config, Cli, Command};

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZTID_LOG")
        // tss-esapi logs every context open and close at info.
        .unwrap_or_else(|_| "info,tss_esapi=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file or journald gets no escape sequence
        // of ours, so any in a log line is an anomaly (values from elsewhere are escaped).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        // Log fields quote what agents, workloads and peers sent: escaped, so they can
        // neither forge a log line nor drive the terminal of whoever reads it.
        builder.fmt_fields(ztid_human::logs::EscapedFields).init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let runtime = match ztid_ca::audit::lead_on_runtime_idle(&mut builder).build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if !matches!(cli.command, Command::Run(_)) {
        ztid_human::quiet_on_closed_stdout();
    }
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Run(args) => {
                let config =
                    run_config(args, cli.admin_socket.clone()).map_err(|e| e.to_string())?;
                init_logging(&config.log_format);
                ztid_ca::server::keep_memory_private().map_err(|e| e.to_string())?;
                let core = ztid_ca::core::CaCore::open(config).map_err(|e| e.to_string())?;
                ztid_ca::server::run(core).await.map_err(|e| e.to_string())
            }
            Command::Evidence(ztid_ca::cli::EvidenceCmd::Verify(args)) => {
                ztid_ca::evidence::verify(args, cli.output)
            }
            Command::Audit(cmd) => ztid_ca::cli::audit_verb(cmd, cli.output).await,
            _ => admin_verb(&cli).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, escaped: a refusal may quote what an agent, a workload, a peer
            // or another admin sent.
            eprintln!("error: {}", ztid_human::shown(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
