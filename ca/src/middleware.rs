//! One tower layer shape for the gRPC servers' per-request checks ([`crate::listeners::TrackLayer`],
//! [`crate::api::admin::authz::AdminAuthzLayer`]): the tower plumbing is written once here, and
//! each check says only what it does with a request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a gRPC service answers.
pub type GrpcResponse = http::Response<tonic::body::Body>;

/// The answer of a [`PerRequest`] check, boxed so that each check may answer its own way.
pub type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<GrpcResponse, E>> + Send>>;

/// A check run on each gRPC request before (or instead of) the inner service.
pub trait PerRequest: Clone + Send + 'static {
    /// Handles `req`: `ready` is the inner service, already polled ready, to call or to
    /// drop (answering without it).
    fn handle<S, B>(&self, ready: S, req: http::Request<B>) -> ResponseFuture<S::Error>
    where
        S: tower::Service<http::Request<B>, Response = GrpcResponse> + Send + 'static,
        S::Future: Send,
        B: Send + 'static;
}

/// The service a [`PerRequest`] check's layer wraps around the inner service.
#[derive(Clone)]
pub struct Checked<C, S> {
    check: C,
    inner: S,
}

impl<C, S> Checked<C, S> {
    /// `inner` behind `check`.
    pub fn new(check: C, inner: S) -> Self {
        Checked { check, inner }
    }
}

impl<C, S, B> tower::Service<http::Request<B>> for Checked<C, S>
where
    C: PerRequest,
    S: tower::Service<http::Request<B>, Response = GrpcResponse> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one to call; a fresh clone waits for the
        // next poll_ready.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        self.check.handle(ready, req)
    }
}
