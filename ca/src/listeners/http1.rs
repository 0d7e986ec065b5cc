//! [`serve_http1`]: the HTTP/1.1 listeners (bundle endpoint, OIDC discovery), each
//! connection guarded and each request counted in flight while its handler runs.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::accept::accept_admitted;
use super::connection::ConnState;
use super::guarded_io::Guarded;
use super::listener::Listener;
use super::timeouts::Timeouts;

/// Serves an HTTP/1.1 listener (the bundle endpoint over TLS, OIDC discovery in the
/// clear) with `handler`, a synchronous function of the request.
pub fn serve_http1<H>(
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: Arc<Listener>,
    handler: H,
) where
    H: Fn(&http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        loop {
            let (stream, peer, conn) = accept_admitted(&tcp, &listener).await;
            let handler = handler.clone();
            let tls = tls.clone();
            let timeouts = listener.timeouts;
            tokio::spawn(async move {
                let state = conn.state.clone();
                let guarded = Guarded::new(stream, conn);
                match tls {
                    None => serve_http1_conn(guarded, state, timeouts, handler).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(timeouts.handshake, acceptor.accept(guarded))
                            .await
                        {
                            Ok(Ok(tls)) => serve_http1_conn(tls, state, timeouts, handler).await,
                            _ => tracing::debug!(%peer, "bundle endpoint TLS handshake failed"),
                        }
                    }
                }
            });
        }
    });
}

async fn serve_http1_conn<IO, H>(io: IO, state: Arc<ConnState>, timeouts: Timeouts, handler: H)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(&http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>>
        + Send
        + Sync
        + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let _in_flight = state.request_started();
        let resp = handler(&req);
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .max_buf_size(crate::limits::MAX_HTTP1_HEAD_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .await;
}
