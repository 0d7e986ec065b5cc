//! Client-side transport helpers shared by the CLIs and tests.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A gRPC channel to a Unix socket. The `:authority` sent is `localhost`.
pub async fn unix_channel(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// The socket path named by `SPIFFE_ENDPOINT_SOCKET`-style addresses: `unix:///path`
/// or `unix:/path`. TCP endpoints are not served by ztid.
pub fn parse_unix_endpoint(addr: &str) -> Option<PathBuf> {
    let path = addr
        .strip_prefix("unix://")
        .or_else(|| addr.strip_prefix("unix:"))?;
    path.starts_with('/').then(|| PathBuf::from(path))
}
