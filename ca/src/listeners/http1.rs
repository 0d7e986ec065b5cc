//! [`serve_http1`]: the HTTP/1.1 listeners (bundle endpoint, OIDC discovery), each
//! connection guarded and each request counted in flight while its handler runs; and
//! [`serve_http1_async`], for handlers that read the request body and know the TLS
//! client certificate (the token endpoint).

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
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

/// Serves an HTTPS (HTTP/1.1) listener with `handler`, an async function of the TLS
/// client's leaf certificate (DER; `None` when it sent none) and the request, body
/// unread: the handler reads (and bounds) it. The request counts as in flight, under
/// the request timeout, until the handler's answer is ready, so a client trickling its
/// body is cut off by that timeout.
pub fn serve_http1_async<H, F>(
    tcp: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    listener: Arc<Listener>,
    handler: H,
) where
    H: Fn(Option<Bytes>, http::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let (stream, peer, conn) = accept_admitted(&tcp, &listener).await;
            let handler = handler.clone();
            let tls = tls.clone();
            let listener = listener.clone();
            let timeouts = listener.timeouts;
            let what = listener.name;
            tokio::spawn(async move {
                let state = conn.state.clone();
                let guarded = Guarded::new(stream, conn);
                let mut stream = match tokio::time::timeout(timeouts.handshake, tls.accept(guarded))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(event = "tls_refused", listener = what, %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(event = "tls_refused", listener = what, %peer, "TLS handshake timed out");
                        return;
                    }
                };
                // The verifier accepted the chain, or the client sent none.
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|cert| Bytes::copy_from_slice(cert.as_ref()));
                if let Some(leaf) = &leaf {
                    listener.authenticate(&state, leaf);
                }
                let svc = hyper::service::service_fn(move |req| {
                    let in_flight = state.request_started();
                    let answer = handler(leaf.clone(), req);
                    async move {
                        let resp = answer.await;
                        drop(in_flight);
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeouts.header)
                    .max_buf_size(crate::limits::MAX_HTTP1_HEAD_BYTES)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(&mut stream), svc)
                    .await;
                // hyper shuts a connection it ends cleanly down itself; this covers the
                // others. Either way `Guarded` lingers, so an answer sent before the
                // body was read (413) reaches the client.
                let _ = stream.shutdown().await;
            });
        }
    });
}
