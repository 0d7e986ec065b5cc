//! Client-side transport helpers shared by the CLIs and tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A gRPC channel to a Unix socket. The `:authority` sent is `localhost`.
pub async fn unix_channel(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(connect_waiting(&path).await?)) }
        }))
        .await
}

/// How long a connect waits for room in a full listen backlog.
const BACKLOG_WAIT: Duration = Duration::from_secs(3);

/// Connects, waiting a little while the socket's listen backlog is full: a non-blocking
/// connect fails at once with `EAGAIN` there (a blocking one would wait), so a local
/// flood of connections would otherwise turn away an operator it cannot out-slot.
async fn connect_waiting(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + BACKLOG_WAIT;
    loop {
        match UnixStream::connect(path).await {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            r => return r,
        }
    }
}

/// The socket path named by `SPIFFE_ENDPOINT_SOCKET`-style addresses: `unix:///path`
/// or `unix:/path`. TCP endpoints are not served by ztid.
pub fn parse_unix_endpoint(addr: &str) -> Option<PathBuf> {
    let path = addr
        .strip_prefix("unix://")
        .or_else(|| addr.strip_prefix("unix:"))?;
    path.starts_with('/').then(|| PathBuf::from(path))
}
