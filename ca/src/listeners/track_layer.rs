//! [`TrackLayer`]: the tower layer of the gRPC servers that keeps each request in
//! flight on its connection until its response body has been sent, through the
//! [`GuardedBody`] it wraps responses in.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::connection::RequestGuard;
use super::listener::Listener;
use crate::middleware::{Checked, GrpcResponse, PerRequest, ResponseFuture};

/// The tower layer that counts each gRPC request as in flight on its connection until
/// its answer has been sent. Put it outermost.
#[derive(Clone)]
pub struct TrackLayer(pub Arc<Listener>);

impl<S> tower::Layer<S> for TrackLayer {
    type Service = Checked<Self, S>;
    fn layer(&self, inner: S) -> Self::Service {
        Checked::new(self.clone(), inner)
    }
}

impl PerRequest for TrackLayer {
    fn handle<S, B>(&self, mut ready: S, mut req: http::Request<B>) -> ResponseFuture<S::Error>
    where
        S: tower::Service<http::Request<B>, Response = GrpcResponse> + Send + 'static,
        S::Future: Send,
        B: Send + 'static,
    {
        // Counted here, synchronously, so the connection is busy before its stream is
        // read again.
        let guard = self
            .0
            .conn_for(req.extensions_mut())
            .map(|c| c.request_started());
        Box::pin(async move {
            let resp = ready.call(req).await?;
            Ok(match guard {
                Some(g) => resp.map(|body| {
                    tonic::body::Body::new(GuardedBody {
                        inner: body,
                        _guard: g,
                    })
                }),
                None => resp,
            })
        })
    }
}

/// A response body that keeps its request in flight until it is sent (or dropped).
struct GuardedBody {
    inner: tonic::body::Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
