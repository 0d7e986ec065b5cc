//! The datastore URL: `postgres://USER@HOST[:PORT]/DB[?sslmode=…&sslrootcert=PATH]`,
//! read into a driver configuration and a TLS connector.
//!
//! - No password in the URL, ever (it would end up in configs, process listings and
//!   logs): a URL with one is refused; the password comes from the caller
//!   (`password_file` or `ZTID_DATASTORE_PASSWORD`).
//! - `sslmode=verify-full&sslrootcert=PATH`: TLS, the server's certificate verified
//!   against the CA certificates in PATH (PEM) and its name or IP address against the
//!   host connected to. The only TLS mode: `require`, `verify-ca` and `prefer` do not
//!   check whom they talk to, and are refused.
//! - `sslmode=disable` (or no `sslmode`): only when every host is loopback or a Unix
//!   socket directory; refused for any other host.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{Error, Result};

/// Where and how to connect.
pub(super) struct Target {
    /// The driver's configuration, password and timeouts set.
    pub(super) pg: tokio_postgres::Config,
    /// The TLS connector (unused when TLS is off).
    pub(super) tls: MakeRustlsConnect,
    /// Whether connections use TLS.
    pub(super) tls_on: bool,
}

/// Settings that do not come from the URL.
pub(super) struct Settings<'a> {
    pub(super) password: Option<&'a str>,
    pub(super) application_name: &'a str,
    pub(super) connect_timeout: Duration,
    pub(super) statement_timeout: Duration,
}

const SHAPE: &str = "postgres://USER@HOST[:PORT]/DATABASE[?sslmode=verify-full&sslrootcert=CA.pem]";

fn config_error(msg: impl Into<String>) -> Error {
    Error::Config(format!("datastore URL: {}", msg.into()))
}

/// Decodes `%XX` escapes (a path in `sslrootcert`).
fn percent_decode(s: &str) -> Result<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: Vec<u8> = bytes.by_ref().take(2).collect();
            let text = std::str::from_utf8(&hex).unwrap_or_default();
            let v = u8::from_str_radix(text, 16)
                .map_err(|_| config_error(format!("bad escape in {s:?}")))?;
            out.push(v);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| config_error(format!("{s:?} is not UTF-8")))
}

/// Whether a host is this machine: a Unix socket directory, `localhost`, or a loopback
/// address.
fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || IpAddr::from_str(name.trim_start_matches('[').trim_end_matches(']'))
                    .is_ok_and(|a| a.is_loopback())
        }
    }
}

/// The root certificates in a PEM file (at least one).
fn load_roots(path: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| config_error(format!("sslrootcert {path}: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| config_error(format!("sslrootcert {path}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| config_error(format!("sslrootcert {path}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(config_error(format!(
            "sslrootcert {path} holds no certificate"
        )));
    }
    Ok(roots)
}

fn tls_connector(roots: Option<rustls::RootCertStore>) -> Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("datastore TLS: {e}")))?;
    let config = match roots {
        Some(roots) => builder.with_root_certificates(roots),
        // TLS off: a connector that trusts nothing, never used.
        None => builder.with_root_certificates(rustls::RootCertStore::empty()),
    }
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Reads `url` into a connection target.
pub(super) fn parse(url: &str, settings: &Settings<'_>) -> Result<Target> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(config_error(format!("expected {SHAPE}")));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut sslmode: Option<String> = None;
    let mut sslrootcert: Option<String> = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => sslmode = Some(percent_decode(v)?),
            "sslrootcert" => sslrootcert = Some(percent_decode(v)?),
            "password" => {
                return Err(config_error(
                    "it carries a password: give it in password_file or ZTID_DATASTORE_PASSWORD, never in the URL",
                ))
            }
            _ => rest.push(pair),
        }
    }
    let driver_url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut pg = tokio_postgres::Config::from_str(&driver_url)
        .map_err(|e| config_error(format!("{e} (expected {SHAPE})")))?;
    if pg.get_password().is_some() {
        return Err(config_error(
            "it carries a password: give it in password_file or ZTID_DATASTORE_PASSWORD, never in the URL",
        ));
    }
    if pg.get_user().is_none() {
        return Err(config_error(format!("no user (expected {SHAPE})")));
    }
    if pg.get_hosts().is_empty() {
        return Err(config_error(format!("no host (expected {SHAPE})")));
    }
    let local =
        pg.get_hosts().iter().all(is_local) && pg.get_hostaddrs().iter().all(|a| a.is_loopback());
    let (tls_on, roots) = match sslmode.as_deref() {
        Some("verify-full") => {
            let path = sslrootcert.as_deref().ok_or_else(|| {
                config_error("sslmode=verify-full needs sslrootcert=PATH (the CA certificates, PEM)")
            })?;
            (true, Some(load_roots(path)?))
        }
        Some("disable") | None if local => (false, None),
        Some("disable") | None => {
            return Err(config_error(
                "a database that is not on this machine needs TLS: add sslmode=verify-full&sslrootcert=PATH \
                 (sslmode=disable is for loopback and Unix sockets only)",
            ))
        }
        Some(other) => {
            return Err(config_error(format!(
                "sslmode={other} does not verify the server: use sslmode=verify-full&sslrootcert=PATH \
                 (or sslmode=disable on loopback)"
            )))
        }
    };
    if sslrootcert.is_some() && !tls_on {
        return Err(config_error(
            "sslrootcert is only used with sslmode=verify-full",
        ));
    }
    pg.ssl_mode(if tls_on {
        SslMode::Require
    } else {
        SslMode::Disable
    });
    if let Some(p) = settings.password {
        pg.password(p);
    }
    let statement_ms = settings.statement_timeout.as_millis();
    pg.application_name(settings.application_name)
        .connect_timeout(settings.connect_timeout)
        // A peer that vanished (no FIN, no RST) is noticed within about half a minute.
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30))
        .options(format!(
            "-c statement_timeout={statement_ms} -c lock_timeout={statement_ms} \
             -c idle_in_transaction_session_timeout={}",
            statement_ms.saturating_mul(2)
        ));
    Ok(Target {
        pg,
        tls: tls_connector(roots)?,
        tls_on,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(password: Option<&str>) -> Settings<'_> {
        Settings {
            password,
            application_name: "ztid-test",
            connect_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(1),
        }
    }

    fn refused(url: &str) -> String {
        match parse(url, &settings(None)) {
            Err(Error::Config(m)) => m,
            Err(e) => panic!("{url}: not a config error: {e}"),
            Ok(_) => panic!("{url}: accepted"),
        }
    }

    #[test]
    fn passwords_never_in_the_url() {
        assert!(refused("postgres://ztid:secret@127.0.0.1/ztid").contains("password_file"));
        assert!(refused("postgres://ztid@127.0.0.1/ztid?password=secret").contains("password"));
        let t = parse("postgres://ztid@127.0.0.1:5432/ztid", &settings(Some("pw"))).unwrap();
        assert_eq!(t.pg.get_password(), Some(&b"pw"[..]));
    }

    #[test]
    fn plaintext_only_on_this_machine() {
        for ok in [
            "postgres://ztid@127.0.0.1:5432/ztid?sslmode=disable",
            "postgres://ztid@localhost/ztid",
            "postgres://ztid@[::1]:5432/ztid?sslmode=disable",
            "postgres://ztid@%2Frun%2Fpostgresql/ztid",
        ] {
            let t = parse(ok, &settings(None)).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(!t.tls_on);
        }
        assert!(refused("postgres://ztid@db.example/ztid?sslmode=disable").contains("needs TLS"));
        assert!(refused("postgres://ztid@10.0.0.5/ztid").contains("needs TLS"));
        assert!(refused("postgres://ztid@db.example/ztid?sslmode=require").contains("verify-full"));
        assert!(
            refused("postgres://ztid@db.example/ztid?sslmode=verify-full").contains("sslrootcert")
        );
        assert!(refused(
            "postgres://ztid@db.example/ztid?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
        )
        .contains("/nonexistent/ca.pem"));
        assert!(refused("mysql://ztid@127.0.0.1/ztid").contains("expected"));
        assert!(refused("postgres://127.0.0.1/ztid").contains("no user"));
    }

    #[test]
    fn escaped_ca_paths() {
        assert_eq!(
            percent_decode("%2Ftmp%2Fa%20b.pem").unwrap(),
            "/tmp/a b.pem"
        );
        assert!(percent_decode("%zz").is_err());
    }
}
