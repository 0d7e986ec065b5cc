//! `ztid-agent`.
#![forbid(unsafe_code)]

use clap::Parser;
use ztid_agent::cli::{client_verb, run_config, Cli, Command};

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

/// How much less CPU priority the runtime's threads get than the Workload API's own
/// thread (a nice(2) increment): syncs, renewals and refilling the SVID pool are
/// background work and yield the CPU to answering a workload. The kernel still gives a
/// niced thread its share under contention, so background work is slowed, not starved.
const BACKGROUND_NICE: i32 = 10;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Set, not added: a blocking thread started by a worker inherits the worker's value.
    let background = rustix::process::getpriority_process(None)
        .map(|base| (base + BACKGROUND_NICE).min(19))
        .ok();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || {
            // Lowering one's own priority needs no privilege; if it fails, the thread
            // runs at the agent's priority, as before.
            if let Some(nice) = background {
                let _ = rustix::process::setpriority_process(None, nice);
            }
        })
        .build()
    {
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
                let config = run_config(args).map_err(|e| e.to_string())?;
                init_logging(&config.log_format);
                ztid_agent::keep_memory_private().map_err(|e| e.to_string())?;
                ztid_agent::run(config).await.map_err(|e| e.to_string())
            }
            _ => client_verb(&cli).await,
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
