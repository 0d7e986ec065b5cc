//! SoftHSM2 for tests and benchmarks: where its PKCS#11 module is,
//! and a private token directory with initialised tokens.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`, so [`init_tokens`] must run
//! before anything in the process loads the module; child processes inherit it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where SoftHSM2's module is: `ZTID_PKCS11_MODULE`, else the Debian/Ubuntu paths.
pub fn module() -> PathBuf {
    if let Ok(m) = std::env::var("ZTID_PKCS11_MODULE") {
        return PathBuf::from(m);
    }
    let candidates = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "SoftHSM2's PKCS#11 module is missing (looked in {candidates:?}): \
                 run scripts/install-deps.sh (Debian package softhsm2) or set ZTID_PKCS11_MODULE"
            )
        })
}

/// Writes a SoftHSM2 config whose token directory is under `dir`, points this process
/// (and its children) at it through `SOFTHSM2_CONF`, and initialises one token per
/// label with `pin` and `so_pin`.
pub fn init_tokens(dir: &Path, labels: &[&str], pin: &str, so_pin: &str) {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).expect("token directory");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("softhsm2.conf");
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let _ = module();
    for label in labels {
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", pin, "--so-pin", so_pin])
            .output()
            .expect(
                "softhsm2-util must be installed: run scripts/install-deps.sh (Debian package softhsm2)",
            );
        assert!(
            out.status.success(),
            "softhsm2-util --init-token {label}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
