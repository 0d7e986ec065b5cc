//! Opening the datastore the config names: sled in `DATA_DIR/datastore` (the default,
//! one server) or PostgreSQL (several servers on one database), with this server's
//! stable id and the database password.
//!
//! - The server id is generated once (16 random bytes, hex) and kept in
//!   `DATA_DIR/server-id` (mode 0600): it names this server's CA state and audit anchor
//!   in a shared database, so it must survive restarts, and a data directory is what
//!   already identifies one server (its keys and audit log live there). It is created
//!   with `O_EXCL`, so two processes starting on one directory agree on it. The sled
//!   store keeps its fixed default id: one server owns a sled directory, and sled
//!   deployments made before server ids existed stay readable as they are.
//! - The password comes from `[datastore] password_file` or else
//!   `ZTID_DATASTORE_PASSWORD`, never from the URL (the PostgreSQL store refuses one
//!   there) or the command line, where any local user could read it in `/proc`. The
//!   file follows the PKCS#11 PIN file's rule (`crate::keys`): refused when others may
//!   read it, accepted with a warning when only its group may (secret mounts are often
//!   shared with a dedicated group).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::config::{DatastoreKind, ServerConfig};
use crate::datastore::{DataStore, PgOptions, PgStore, SledStore};
use crate::{Error, Result};

/// The environment variable that carries the datastore password when no
/// `password_file` is set.
pub const PASSWORD_ENV: &str = "ZTID_DATASTORE_PASSWORD";

/// The file in the data directory that holds this server's id.
pub const SERVER_ID_FILE: &str = "server-id";

/// Longest server id accepted from `DATA_DIR/server-id`.
const MAX_SERVER_ID_BYTES: usize = 64;

/// This server's id, from `DATA_DIR/server-id`, created (16 random bytes, hex, mode
/// 0600) if absent. An id an operator wrote there is kept if it is 1 to 64 characters
/// of `[A-Za-z0-9._-]`.
pub fn server_id(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(SERVER_ID_FILE);
    let shown = path.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(text) => return checked_server_id(text.trim_end_matches(['\r', '\n']), &shown),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {shown}"))(e)),
    }
    let id = crate::authority::random_hex(16)?;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path);
    match created {
        Ok(mut f) => {
            f.write_all(format!("{id}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(Error::io(format!("writing {shown}")))?;
            tracing::info!(server_id = %id, file = %shown, "generated this server's id");
            Ok(id)
        }
        // Another process created it first: its id is the one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text =
                std::fs::read_to_string(&path).map_err(Error::io(format!("reading {shown}")))?;
            checked_server_id(text.trim_end_matches(['\r', '\n']), &shown)
        }
        Err(e) => Err(Error::io(format!("creating {shown}"))(e)),
    }
}

fn checked_server_id(id: &str, shown: &str) -> Result<String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SERVER_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(id.to_string())
    } else {
        Err(Error::Config(format!(
            "{shown} must hold 1 to {MAX_SERVER_ID_BYTES} characters of A-Z a-z 0-9 . _ - \
             (delete it to have a new id generated)"
        )))
    }
}

/// The datastore password: `password_file`, else `ZTID_DATASTORE_PASSWORD`, else none
/// (a Unix socket with peer authentication, or a role without a password).
fn password(config: &ServerConfig) -> Result<Option<Zeroizing<String>>> {
    let pw = match &config.datastore.password_file {
        Some(file) => read_password_file(file)?,
        None => match std::env::var(PASSWORD_ENV) {
            Ok(v) => Zeroizing::new(v),
            Err(_) => return Ok(None),
        },
    };
    if pw.is_empty() {
        return Err(Error::Config("the datastore password is empty".into()));
    }
    Ok(Some(pw))
}

fn read_password_file(file: &Path) -> Result<Zeroizing<String>> {
    let shown = file.display().to_string();
    let meta = std::fs::metadata(file).map_err(Error::io(format!(
        "reading datastore password file {shown}"
    )))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(Error::Config(format!(
            "datastore password file {shown} is accessible to others (mode {mode:03o}): run `chmod 600 {shown}` (owner-only, the server's user), then start the server again"
        )));
    }
    if mode & 0o070 != 0 {
        tracing::warn!(
            file = %shown,
            mode = %format!("{mode:03o}"),
            "datastore password file is readable by its group; prefer mode 600"
        );
    }
    let bytes = Zeroizing::new(std::fs::read(file).map_err(Error::io(format!(
        "reading datastore password file {shown}"
    )))?);
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::Config(format!("datastore password file {shown} is not UTF-8")))?;
    Ok(Zeroizing::new(
        text.trim_end_matches(['\r', '\n']).to_string(),
    ))
}

/// Opens the datastore `config` names (checked by `ServerConfig::validate`). The data
/// directory must exist.
pub fn open_datastore(config: &ServerConfig) -> Result<Arc<dyn DataStore>> {
    config.datastore.validate()?;
    Ok(match config.datastore.kind {
        DatastoreKind::Sled => Arc::new(SledStore::open(&config.data_dir.join("datastore"))?),
        DatastoreKind::Postgres => {
            let url = config.datastore.url.clone().unwrap_or_default();
            let mut options = PgOptions::new(url, None, server_id(&config.data_dir)?);
            options.password = password(config)?;
            Arc::new(PgStore::connect(options)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_id_is_generated_once_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let a = server_id(dir.path()).unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(server_id(dir.path()).unwrap(), a, "stable across calls");
        let mode = std::fs::metadata(dir.path().join(SERVER_ID_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(SERVER_ID_FILE), "eu-1\n").unwrap();
        assert_eq!(server_id(dir.path()).unwrap(), "eu-1");
        std::fs::write(dir.path().join(SERVER_ID_FILE), "a b").unwrap();
        let e = server_id(dir.path()).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
    }

    #[test]
    fn password_file_must_be_private_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let mut c = ServerConfig::default();
        c.datastore.password_file = Some(f.clone());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(password(&c).unwrap().unwrap().as_str(), "s3cret");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(password(&c).unwrap().unwrap().as_str(), "s3cret");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o604)).unwrap();
        let e = password(&c).unwrap_err().to_string();
        assert!(
            e.contains("accessible to others") && !e.contains("s3cret"),
            "{e}"
        );
        std::fs::write(&f, "\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(password(&c).unwrap_err().to_string().contains("empty"));
    }
}
