//! The agent's connection to the server's node API: TLS 1.3 with the server's SPIFFE
//! ID checked, and the agent's SVID as client certificate once it has one.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use ztid_proto::node::node_client::NodeClient;

use crate::agent_key::AgentKey;
use crate::Error;

/// The agent's own SVID: chain and key, kept so it can be presented and persisted.
pub struct AgentSvid {
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The key the leaf certifies.
    pub key: AgentKey,
    /// The agent's SPIFFE ID.
    pub spiffe_id: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl AgentSvid {
    /// A workload's or agent's identity from its DER chain and PKCS#8 key.
    pub fn from_parts(chain: Vec<Vec<u8>>, key: Vec<u8>) -> Result<Self, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::InvalidSvid("empty chain".into()))?;
        Ok(Self {
            spiffe_id: crate::svid::spiffe_id_of_leaf(leaf)?.to_string(),
            not_after: crate::svid::not_after(leaf)?,
            chain,
            key: AgentKey::from_pkcs8(key),
        })
    }

    /// The rustls identity.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, Error> {
        let signer = self.key.rustls_key()?;
        let chain = self
            .chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect();
        Ok(Arc::new(CertifiedKey::new(chain, signer)))
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A lazily connecting node API client.
pub fn connect(
    server: SocketAddr,
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Option<Arc<CertifiedKey>>,
) -> Result<NodeClient<Channel>, Error> {
    Ok(NodeClient::new(mtls_channel(
        server,
        verifier,
        client_cert,
    )?))
}

/// A lazily connecting gRPC channel over TLS 1.3, verifying the server with
/// `verifier` and presenting `client_cert` when given.
pub fn mtls_channel(
    server: SocketAddr,
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Option<Arc<CertifiedKey>>,
) -> Result<Channel, Error> {
    mtls_channel_with_timeout(
        server,
        verifier,
        client_cert,
        std::time::Duration::from_secs(10),
    )
}

/// Like [`mtls_channel`], with a bound on opening the TCP connection and finishing the
/// TLS handshake together: past it the call fails as `Unavailable` (a server that
/// accepts connections and never answers is as good as down).
pub fn mtls_channel_with_timeout(
    server: SocketAddr,
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Option<Arc<CertifiedKey>>,
    connect_timeout: std::time::Duration,
) -> Result<Channel, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_cert {
        Some(ck) => builder.with_client_cert_resolver(Arc::new(FixedClientCert(ck))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let endpoint = Endpoint::from_shared(format!("http://{server}"))
        .map_err(|e| Error::Config(format!("server address: {e}")))?
        .http2_keep_alive_interval(std::time::Duration::from_secs(30));
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let handshake = async move {
            let tcp = TcpStream::connect(server).await?;
            tcp.set_nodelay(true)?;
            // The name is not checked (the verifier checks the SPIFFE ID instead).
            let name = ServerName::try_from("ztid-server").map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        };
        async move {
            tokio::time::timeout(connect_timeout, handshake)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no TLS connection to {server} within {connect_timeout:?}"),
                    ))
                })
        }
    }));
    Ok(channel)
}
