//! Runs `ztid-server`: the node API on TLS, the admin API on its Unix socket, the
//! optional HTTPS endpoints (bundle endpoint, OIDC discovery, the token endpoint), and
//! the housekeeping loop (server SVID renewal). Every listener is bounded by
//! [`crate::listeners`] (timeouts, connection caps) and every gRPC service by a message
//! size cap ([`crate::limits`]).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, UnixListener};
use ztid_proto::admin::admin_server::AdminServer;
use ztid_proto::node::node_server::NodeServer;
use ztid_spiffe::tls::AgentCertVerifier;

use crate::api::admin::authz::{AdminAuthzLayer, AdminPolicy};
use crate::api::admin::AdminApi;
use crate::api::node::NodeApi;
use crate::core::CaCore;
use crate::limits::{
    LimitsConfig, ADMIN_API_MAX_MESSAGE_BYTES, MAX_HEADER_LIST_BYTES,
    MAX_LOCAL_ERROR_RESET_STREAMS, MAX_PENDING_ACCEPT_RESET_STREAMS, MAX_STREAMS_PER_CONNECTION,
    NODE_API_MAX_MESSAGE_BYTES,
};
use crate::listeners::{
    immunity, tls_incoming, unix_incoming, DescriptorBudget, Listener, Timeouts, TrackLayer,
    UidGate,
};
use crate::refusal_audit::RefusalAudit;
use crate::{Error, Result};

/// Connections of uids the admin socket does not admit, held apart from the admin uids'
/// (enough to tell them why; within the reserved descriptors).
const ADMIN_SOCKET_REFUSED_UID_CONNECTIONS: usize = 4;

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
#[allow(
    clippy::expect_used,
    reason = "the ring provider always supports TLS 1.3"
)]
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
    use std::os::unix::fs::DirBuilderExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    // Bound inside a fresh 0700 directory beside it, restricted to 0600 there, then
    // renamed into place (replacing a stale socket): at no moment can another user reach
    // the socket with the mode the umask gave it.
    let mut nonce = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| Error::Precondition("no randomness for the admin socket's staging".into()))?;
    let staging = dir.join(format!(".ztid-admin-{}", hex::encode(nonce)));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(Error::io(format!("creating {}", staging.display())))?;
    let staged = staging.join("admin.sock");
    let bound = UnixListener::bind(&staged)
        .map_err(Error::io(format!("binding {}", staged.display())))
        .and_then(|listener| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .map_err(Error::io(format!("restricting {}", staged.display())))?;
            std::fs::rename(&staged, path).map_err(Error::io(format!(
                "moving the admin socket to {}",
                path.display()
            )))?;
            Ok(listener)
        });
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    bound
}

/// A gRPC server with the HTTP/2 bounds every listener shares: a deadline for each
/// answer, few streams and small headers per connection, a cap on streams a client may
/// reset before they are accepted (HTTP/2 rapid reset) and on streams the server resets
/// for the client's errors, and keepalive pings that find dead peers.
fn grpc_server(limits: &LimitsConfig) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .timeout(limits.request_timeout())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        // Must be set: tonic otherwise passes `None` to hyper, which means no limit at
        // all (RUSTSEC-2024-0003), not hyper's default of 1,024.
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// The shutdown signal, after which `listener` closes its connections within the
/// shutdown grace (idle clients would otherwise hold the graceful shutdown).
async fn shutdown_of(listener: Arc<Listener>) {
    shutdown_signal().await;
    listener.shutdown();
}

/// Keeps the server's memory to itself: it holds the authorities' keys (software key
/// manager), the audit log's session key and what admins send. No core dump is written
/// (not dumpable, `RLIMIT_CORE` 0), and no process of the server's uid without
/// `CAP_SYS_PTRACE` may read it through ptrace or `/proc/PID/mem` (an admin verb run as
/// the service user, say). Called before any key is loaded.
pub fn keep_memory_private() -> Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    nix::sys::prctl::set_dumpable(false).map_err(|e| {
        Error::Config(format!(
            "making the process non-dumpable (PR_SET_DUMPABLE): {e}"
        ))
    })?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| Error::Config(format!("setting RLIMIT_CORE to 0: {e}")))
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(core: Arc<CaCore>) -> Result<()> {
    let limits = core.config.limits.clone();
    limits.validate()?;
    crate::listeners::raise_nofile_limit();
    let budget = Arc::new(DescriptorBudget::default());
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
    let admin_refusals = Arc::new(RefusalAudit::from_config(&limits));
    if let Some(audit) = &core.audit {
        admin_refusals.spawn_flusher(audit);
    }
    let policy = Arc::new(AdminPolicy::new(
        allowed.clone(),
        core.config.remote_admin_roles()?,
        crate::api::admin::authz::own_issuers(&core),
        crate::api::admin::authz::own_revocations(&core),
        core.audit.clone(),
        admin_refusals,
    ));
    crate::probe::spawn(&core).await?;
    core.apply_configured_federations()?;
    crate::federation::spawn_bundle_endpoint(core.clone(), &budget).await?;
    crate::federation::spawn_oidc(core.clone(), &budget).await?;
    crate::sts::listener::spawn_sts(core.clone(), &budget).await?;
    crate::federation::spawn_poller(core.clone());
    crate::maintenance::spawn(core.clone());

    let node_listener = Listener::with_immunity(
        "node API",
        limits.node_api_max_connections,
        Timeouts::grpc(&limits),
        Some(budget.clone()),
        Some(immunity::agents(core.trust_domain.clone())),
    );
    let node_incoming = tls_incoming(tcp, tls_config(&core, false), node_listener.clone());
    // Within the reserved descriptors: a flood on a TCP listener cannot reach it.
    let admin_socket_listener = Listener::new(
        "admin socket",
        limits.admin_socket_max_connections,
        Timeouts::grpc(&limits),
        None,
    );
    // Uids the socket does not admit get slots of their own (see `UidGate`).
    let refused_uids_listener = Listener::new(
        "admin socket (uids not admitted)",
        ADMIN_SOCKET_REFUSED_UID_CONNECTIONS,
        Timeouts::grpc(&limits),
        None,
    );
    tokio::spawn(shutdown_of(refused_uids_listener.clone()));
    let admin_uid_gate = UidGate {
        admits: Box::new({
            let policy = policy.clone();
            move |uid| policy.admits_uid(uid)
        }),
        others: refused_uids_listener,
    };
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

    let node = grpc_server(&limits)
        .layer(TrackLayer(node_listener.clone()))
        .layer(crate::metrics::node_api_layer())
        .add_service(
            NodeServer::new(NodeApi::new(core.clone()))
                .max_decoding_message_size(NODE_API_MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(node_incoming, shutdown_of(node_listener));
    let admin = grpc_server(&limits)
        .layer(TrackLayer(admin_socket_listener.clone()))
        .layer(AdminAuthzLayer(policy.clone()))
        .add_service(
            AdminServer::new(AdminApi::new(core.clone()))
                .max_decoding_message_size(ADMIN_API_MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            unix_incoming(
                admin_listener,
                admin_socket_listener.clone(),
                admin_uid_gate,
            ),
            shutdown_of(admin_socket_listener),
        );
    // The remote admin API: mutual TLS, callers admitted by SPIFFE ID and role only.
    if let Some(remote) = &core.config.remote_admin {
        let tcp = TcpListener::bind(remote.bind)
            .await
            .map_err(Error::io(format!(
                "binding remote admin API on {}",
                remote.bind
            )))?;
        let remote_listener = Listener::with_immunity(
            "remote admin API",
            limits.remote_admin_max_connections,
            Timeouts::grpc(&limits),
            Some(budget.clone()),
            Some(immunity::admins(core.trust_domain.clone())),
        );
        let incoming = tls_incoming(tcp, tls_config(&core, true), remote_listener.clone());
        let server = grpc_server(&limits)
            .layer(TrackLayer(remote_listener.clone()))
            .layer(AdminAuthzLayer(policy.clone()))
            .add_service(
                AdminServer::new(AdminApi::new(core.clone()))
                    .max_decoding_message_size(ADMIN_API_MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, shutdown_of(remote_listener));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's memory is its own: not dumpable, no core file.
    #[test]
    fn the_servers_memory_is_kept_private() {
        super::keep_memory_private().unwrap();
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
        assert_eq!(
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CORE).unwrap(),
            (0, 0)
        );
    }

    #[tokio::test]
    async fn the_admin_socket_appears_restricted_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("admin.sock");
        let first = bind_admin_socket(&path).unwrap();
        drop(first);
        // A stale socket from a run that ended is replaced in place.
        let _listener = bind_admin_socket(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Nothing of the staging is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("admin.sock")]);
        tokio::net::UnixStream::connect(&path).await.unwrap();
    }
}
