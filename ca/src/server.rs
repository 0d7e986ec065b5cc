//! Runs `ztid-server`: the node API on TLS, the admin API on its Unix socket, and the
//! housekeeping loop (server SVID renewal).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use ztid_agent_attestor::tls::AgentCertVerifier;
use ztid_proto::admin::admin_server::AdminServer;
use ztid_proto::node::node_server::NodeServer;

use crate::admin_api::AdminApi;
use crate::admin_authz::{AdminAuthzLayer, AdminPolicy};
use crate::core::CaCore;
use crate::node_api::NodeApi;
use crate::{Error, Result};

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the server's current SVID on every handshake, so renewal needs no restart.
#[derive(Debug)]
struct CurrentSvid(Arc<CaCore>);

impl std::fmt::Debug for CaCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaCore")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.server_svid())
    }
}

/// TLS for the node API (client certificate optional: `Attest` comes first) or the
/// remote admin API (client certificate required).
fn tls_config(core: &Arc<CaCore>, client_cert_required: bool) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = if client_cert_required {
        AgentCertVerifier::mandatory(core.roots())
    } else {
        AgentCertVerifier::new(core.roots())
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(CurrentSvid(core.clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Binds the admin socket owner-only, replacing a stale one.
fn bind_admin_socket(path: &std::path::Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing stale {}", path.display()))(e)),
    }
    let listener =
        UnixListener::bind(path).map_err(Error::io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("restricting {}", path.display())))?;
    Ok(listener)
}

/// Accepts TLS connections: each handshake runs in its own task, so one slow or
/// hostile client cannot hold up the others.
fn tls_incoming(
    tcp: TcpListener,
    config: Arc<rustls::ServerConfig>,
    what: &'static str,
) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match tcp.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = conn_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(event = "tls_refused", listener = what, %peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => {
                        tracing::warn!(event = "tls_refused", listener = what, %peer, "TLS handshake timed out")
                    }
                }
            });
        }
    });
    ReceiverStream::new(conn_rx)
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(core: Arc<CaCore>) -> Result<()> {
    let tcp = TcpListener::bind(core.config.bind)
        .await
        .map_err(Error::io(format!(
            "binding node API on {}",
            core.config.bind
        )))?;
    let admin_path = core.config.admin_socket_path();
    let admin_listener = bind_admin_socket(&admin_path)?;
    let mut allowed = core.config.admin_uids.clone();
    if allowed.is_empty() {
        allowed.push(nix::unistd::getuid().as_raw());
    }
    let policy = Arc::new(AdminPolicy::new(
        allowed.clone(),
        core.config.remote_admin_roles()?,
        core.audit.clone(),
    ));
    crate::metrics::spawn(&core).await?;
    core.apply_configured_federations()?;
    crate::federation::spawn_bundle_endpoint(core.clone()).await?;
    crate::federation::spawn_oidc(core.clone()).await?;
    crate::federation::spawn_poller(core.clone());

    let node_incoming = tls_incoming(tcp, tls_config(&core, false), "node API");
    let policy_core = core.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            policy_core.reload_policy();
        }
    });
    let housekeeping_core = core.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Err(e) = housekeeping_core.housekeeping() {
                tracing::error!(error = %e, "housekeeping (authority rotation, server SVID) failed");
            }
        }
    });

    let node = tonic::transport::Server::builder()
        .layer(crate::metrics::node_api_layer())
        .add_service(NodeServer::new(NodeApi::new(core.clone())))
        .serve_with_incoming_shutdown(node_incoming, shutdown_signal());
    let admin = tonic::transport::Server::builder()
        .layer(AdminAuthzLayer(policy.clone()))
        .add_service(AdminServer::new(AdminApi::new(core.clone())))
        .serve_with_incoming_shutdown(UnixListenerStream::new(admin_listener), shutdown_signal());
    // The remote admin API: mutual TLS, callers admitted by SPIFFE ID and role only.
    if let Some(remote) = &core.config.remote_admin {
        let tcp = TcpListener::bind(remote.bind)
            .await
            .map_err(Error::io(format!(
                "binding remote admin API on {}",
                remote.bind
            )))?;
        let incoming = tls_incoming(tcp, tls_config(&core, true), "remote admin API");
        let server = tonic::transport::Server::builder()
            .layer(AdminAuthzLayer(policy.clone()))
            .add_service(AdminServer::new(AdminApi::new(core.clone())))
            .serve_with_incoming_shutdown(incoming, shutdown_signal());
        tracing::info!(remote_admin = %remote.bind, "remote admin API (mTLS) serving");
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "remote admin API stopped");
            }
        });
    }
    tracing::info!(
        trust_domain = %core.trust_domain,
        node_api = %core.config.bind,
        admin_socket = %admin_path.display(),
        admin_uids = ?allowed,
        "ztid-server ready"
    );
    crate::metrics::set_serving(true);
    let (a, b) = tokio::join!(node, admin);
    crate::metrics::set_serving(false);
    if let Some(audit) = &core.audit {
        audit.close().await?; // the last batch sealed and anchored before exit
    }
    core.store.flush()?;
    let _ = std::fs::remove_file(&admin_path);
    a.map_err(|e| Error::Config(format!("node API: {e}")))?;
    b.map_err(|e| Error::Config(format!("admin API: {e}")))?;
    tracing::info!("ztid-server stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
