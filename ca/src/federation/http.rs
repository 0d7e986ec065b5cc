//! What the two HTTP/1 endpoints (bundle endpoint, OIDC discovery) share: responses,
//! the GET-only rule, and their connection limits.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;

use crate::core::CaCore;

pub(super) type Body = Full<Bytes>;

#[allow(
    clippy::expect_used,
    reason = "every caller passes a constant status and content type, which the builder accepts"
)]
pub(super) fn respond(status: http::StatusCode, ctype: &str, body: String) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

/// Both HTTP/1 endpoints answer GET only.
pub(super) fn refuse_unless_get(
    req: &http::Request<hyper::body::Incoming>,
) -> Option<http::Response<Body>> {
    (req.method() != http::Method::GET).then(|| {
        respond(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        )
    })
}

pub(super) fn not_found() -> http::Response<Body> {
    respond(
        http::StatusCode::NOT_FOUND,
        "text/plain",
        "not found\n".into(),
    )
}

pub(super) fn internal_error(e: &dyn std::fmt::Display) -> http::Response<Body> {
    respond(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        format!("{e}\n"),
    )
}

/// The connection limits of one of the HTTP/1 endpoints, sharing the TCP listeners'
/// descriptor `budget`.
pub(super) fn http1_listener(
    name: &'static str,
    max_connections: usize,
    core: &CaCore,
    budget: &Arc<crate::listeners::DescriptorBudget>,
) -> Arc<crate::listeners::Listener> {
    let limits = &core.config.limits;
    crate::listeners::Listener::new(
        name,
        max_connections,
        crate::listeners::Timeouts::http1(limits),
        Some(budget.clone()),
    )
}
