//! Builds the key manager the config names; the rest of the server only sees the trait.
//!
//! `pkcs11`: the user PIN comes from `[pkcs11] pin_file` (`--pkcs11-pin-file`) when
//! set, else from the `ZTID_PKCS11_PIN` environment variable; never from the main
//! config, and it is never logged. Trailing line breaks in the file are ignored.
//! The PIN file must not be accessible to others (any `o` permission bit: the
//! server refuses to start, `chmod 600` or `640` fixes it); a group-readable file
//! is accepted with a warning, so a file shared with a dedicated group (as secret
//! mounts often are) still works. The PIN is wiped from memory once the token
//! has accepted the login.

use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;
use ztid_hsm::{KeyManager, Pkcs11KeyManager, SoftwareKeyManager, TpmKeyManager};

use crate::config::{Pkcs11Config, ServerConfig};
use crate::{Error, Result};

/// The environment variable that carries the PKCS#11 user PIN when no PIN file is set.
pub const PIN_ENV: &str = "ZTID_PKCS11_PIN";

/// The TCTI of `key_manager = "tpm"` when `tpm_tcti` is unset: the kernel's resource manager.
pub const DEFAULT_TPM_TCTI: &str = "device:/dev/tpmrm0";

/// The configured key manager.
pub fn key_manager(config: &ServerConfig) -> Result<Arc<dyn KeyManager>> {
    match config.key_manager.as_str() {
        "software" => Ok(Arc::new(SoftwareKeyManager::open(
            config.data_dir.join("keys"),
        )?)),
        "pkcs11" => {
            let p = config
                .pkcs11
                .as_ref()
                .ok_or_else(|| Error::Config("key_manager pkcs11 needs a [pkcs11] table".into()))?;
            if p.module.as_os_str().is_empty() {
                return Err(Error::Config(
                    "key_manager pkcs11 needs the module path (--pkcs11-module, [pkcs11] module)"
                        .into(),
                ));
            }
            if p.token_label.is_empty() {
                return Err(Error::Config(
                    "key_manager pkcs11 needs the token label (--pkcs11-token, [pkcs11] token_label)"
                        .into(),
                ));
            }
            let pin = read_pin(p)?;
            Ok(Arc::new(Pkcs11KeyManager::open(
                &p.module,
                &p.token_label,
                pin,
            )?))
        }
        "tpm" => {
            let tcti = config.tpm_tcti.as_deref().unwrap_or(DEFAULT_TPM_TCTI);
            Ok(Arc::new(TpmKeyManager::open(
                tcti,
                config.data_dir.join("tpm-keys"),
            )?))
        }
        other => Err(Error::Config(format!(
            "key_manager {other:?} is not available in this build"
        ))),
    }
}

/// The user PIN, from the PIN file or else the environment.
fn read_pin(p: &Pkcs11Config) -> Result<Zeroizing<String>> {
    let pin = match &p.pin_file {
        Some(file) => read_pin_file(file)?,
        None => match std::env::var(PIN_ENV) {
            Ok(v) => Zeroizing::new(v),
            Err(_) => {
                return Err(Error::Config(format!(
                    "key_manager pkcs11 needs the user PIN: set --pkcs11-pin-file ([pkcs11] pin_file) or {PIN_ENV}"
                )))
            }
        },
    };
    if pin.is_empty() {
        return Err(Error::Config("the PKCS#11 PIN is empty".into()));
    }
    Ok(pin)
}

fn read_pin_file(file: &Path) -> Result<Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let shown = file.display().to_string();
    let meta =
        std::fs::metadata(file).map_err(Error::io(format!("reading PKCS#11 PIN file {shown}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(Error::Config(format!(
            "PKCS#11 PIN file {shown} is accessible to others (mode {mode:03o}): run `chmod 600 {shown}` (owner-only, the server's user), then start the server again"
        )));
    }
    if mode & 0o070 != 0 {
        tracing::warn!(
            file = %shown,
            mode = %format!("{mode:03o}"),
            "PKCS#11 PIN file is readable by its group; prefer mode 600"
        );
    }
    let bytes = Zeroizing::new(
        std::fs::read(file).map_err(Error::io(format!("reading PKCS#11 PIN file {shown}")))?,
    );
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::Config(format!("PKCS#11 PIN file {shown} is not UTF-8")))?;
    Ok(Zeroizing::new(
        text.trim_end_matches(['\r', '\n']).to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(pin_file: Option<std::path::PathBuf>) -> Pkcs11Config {
        Pkcs11Config {
            module: "/nonexistent/module.so".into(),
            token_label: "t".into(),
            pin_file,
        }
    }

    #[test]
    fn pin_file_is_read_trimmed_and_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        std::fs::write(&f, "12 34\r\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_pin(&config(Some(f.clone()))).unwrap().as_str(),
            "12 34"
        );

        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            read_pin(&config(Some(f.clone()))).unwrap().as_str(),
            "12 34"
        );

        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_pin(&config(Some(f.clone()))).unwrap_err().to_string();
        assert!(
            e.contains("accessible to others") && e.contains("644"),
            "{e}"
        );
        assert!(!e.contains("12 34"), "no PIN in errors: {e}");

        std::fs::write(&f, "\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = read_pin(&config(Some(f))).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");

        let e = read_pin(&config(Some(dir.path().join("missing"))))
            .unwrap_err()
            .to_string();
        assert!(e.contains("PIN file"), "{e}");
    }

    #[test]
    fn pkcs11_needs_module_and_token() {
        let mut c = ServerConfig {
            key_manager: "pkcs11".into(),
            pkcs11: Some(Pkcs11Config {
                module: "".into(),
                token_label: "t".into(),
                pin_file: None,
            }),
            ..Default::default()
        };
        let e = key_manager(&c).err().unwrap().to_string();
        assert!(e.contains("module path"), "{e}");
        c.pkcs11 = Some(Pkcs11Config {
            module: "/x.so".into(),
            token_label: "".into(),
            pin_file: None,
        });
        let e = key_manager(&c).err().unwrap().to_string();
        assert!(e.contains("token label"), "{e}");
    }
}
