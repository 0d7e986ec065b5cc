//! `completions SHELL` and `man DIR`: shell completions and man pages generated from
//! this command line's own clap definitions, so they never drift from `--help`.
//! Packaging runs both at build time (deploy/container/Containerfile,
//! deploy/install.sh); no server is needed.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// The binary's name, as completions must know it.
const BIN: &str = "ztid-server";

/// Writes the completion script for `shell` to stdout.
pub(super) fn completions(shell: Shell) -> Result<(), String> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, BIN, &mut std::io::stdout());
    Ok(())
}

/// Writes `ztid-server.1` and one page per verb (`ztid-server-entry-create.1`, …) into
/// `dir`, creating it; prints how many.
pub(super) fn man(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // Every page's header names the version, not only the top one's.
    let cmd = Cli::command().propagate_version(true);
    let pages = pages(&cmd);
    clap_mangen::generate_to(cmd, dir)
        .map_err(|e| format!("writing man pages into {}: {e}", dir.display()))?;
    println!("Wrote {pages} man pages to {}", dir.display());
    Ok(())
}

/// How many pages `clap_mangen::generate_to` writes for `cmd`: its own and one per
/// visible subcommand, at every depth (`help` is not one).
fn pages(cmd: &clap::Command) -> usize {
    1 + cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .map(pages)
        .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verb_has_a_man_page_and_completions_name_the_verbs() {
        let dir = tempfile::tempdir().unwrap();
        man(dir.path()).unwrap();
        for page in [
            "ztid-server.1",
            "ztid-server-entry-create.1",
            "ztid-server-token-generate.1",
            "ztid-server-completions.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(text.contains(".TH"), "{page} is a man page");
        }
        let written = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(written, pages(&Cli::command()));
        let mut cmd = Cli::command();
        let mut script = Vec::new();
        clap_complete::generate(Shell::Bash, &mut cmd, BIN, &mut script);
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("entry") && script.contains("--spiffe-id"));
    }
}
