//! The token-exchange RPCs of the admin API (issue 14): grants (`CreateGrant`,
//! `ListGrants`, `GetGrant`, `DeleteGrant`) and the kill switch (`RevokeInstance`,
//! `ListRevocations`). See docs/token-exchange.md. The rules (validation, what a
//! revocation covers and for how long) are in `core/grants.rs` and
//! `core/revocations.rs`; this file bounds the request and translates.

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;

use super::{bound, caller, AdminApi};
use crate::core::grants::{
    MAX_AUDIENCE_BYTES, MAX_NODE_SELECTORS_PER_GRANT, MAX_NODE_SELECTOR_BYTES,
    MAX_SCOPES_PER_GRANT, MAX_SCOPE_BYTES,
};
use crate::datastore::{GrantRecord, RevocationKind, RevocationRecord};
use crate::limits;
use crate::Error;

/// A grant as the API shows it.
pub(super) fn grant_to_proto(g: &GrantRecord) -> pb::Grant {
    pb::Grant {
        id: g.id.clone(),
        spiffe_id: g.spiffe_id.clone(),
        audience: g.audience.clone(),
        scopes: g.scopes.clone(),
        ttl_seconds: g.ttl_seconds,
        max_per_minute: g.max_per_minute,
        node_selectors: g.node_selectors.clone(),
        may_delegate: g.may_delegate,
        created_at: g.created_at,
    }
}

/// A revocation as the API shows it.
pub(super) fn revocation_to_proto(r: &RevocationRecord) -> pb::Revocation {
    pb::Revocation {
        kind: r.kind.as_str().into(),
        target: r.target.clone(),
        spiffe_id: r.spiffe_id.clone(),
        revoked_at: r.revoked_at,
        expires_at: r.expires_at,
        reason: r.reason.clone(),
    }
}

/// Every count and length of a `CreateGrant` request, before anything else.
fn bound_grant(g: &pb::Grant) -> crate::Result<()> {
    bound(
        "spiffe_id (bytes)",
        &g.spiffe_id,
        limits::MAX_SPIFFE_ID_BYTES,
    )?;
    bound("audience (bytes)", &g.audience, MAX_AUDIENCE_BYTES)?;
    limits::check_count("scopes", g.scopes.len(), MAX_SCOPES_PER_GRANT)?;
    for s in &g.scopes {
        bound("scope (bytes)", s, MAX_SCOPE_BYTES)?;
    }
    limits::check_count(
        "node_selectors",
        g.node_selectors.len(),
        MAX_NODE_SELECTORS_PER_GRANT,
    )?;
    for s in &g.node_selectors {
        bound("node selector (bytes)", s, MAX_NODE_SELECTOR_BYTES)?;
    }
    Ok(())
}

pub(super) async fn create_grant(
    api: &AdminApi,
    request: Request<pb::Grant>,
) -> Result<Response<pb::Grant>, Status> {
    audit!(api, request, "CreateGrant");
    let who = caller(&request);
    let r = request.get_ref();
    bound_grant(r)?;
    let req = GrantRecord {
        id: String::new(),
        spiffe_id: r.spiffe_id.clone(),
        audience: r.audience.clone(),
        scopes: r.scopes.clone(),
        ttl_seconds: r.ttl_seconds,
        max_per_minute: r.max_per_minute,
        node_selectors: r.node_selectors.clone(),
        may_delegate: r.may_delegate,
        created_at: 0,
    };
    let grant = api.core.create_grant(&req, &who)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(grant_to_proto(&grant)))
}

pub(super) async fn list_grants(
    api: &AdminApi,
    request: Request<pb::ListGrantsRequest>,
) -> Result<Response<pb::ListGrantsResponse>, Status> {
    audit!(api, request, "ListGrants");
    let r = request.get_ref();
    bound(
        "spiffe_id (bytes)",
        &r.spiffe_id,
        limits::MAX_SPIFFE_ID_BYTES,
    )?;
    let filter = (!r.spiffe_id.is_empty()).then_some(r.spiffe_id.as_str());
    let grants = api.core.list_grants(filter)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::ListGrantsResponse {
        grants: grants.iter().map(grant_to_proto).collect(),
    }))
}

fn grant_id(r: &pb::GrantRef) -> crate::Result<&str> {
    bound("grant id (bytes)", &r.id, limits::MAX_OBJECT_ID_BYTES)?;
    if r.id.is_empty() {
        return Err(Error::InvalidInput("grant id must not be empty".into()));
    }
    Ok(&r.id)
}

pub(super) async fn get_grant(
    api: &AdminApi,
    request: Request<pb::GrantRef>,
) -> Result<Response<pb::Grant>, Status> {
    audit!(api, request, "GetGrant");
    let grant = api.core.get_grant(grant_id(request.get_ref())?)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(grant_to_proto(&grant)))
}

pub(super) async fn delete_grant(
    api: &AdminApi,
    request: Request<pb::GrantRef>,
) -> Result<Response<pb::Grant>, Status> {
    audit!(api, request, "DeleteGrant");
    let who = caller(&request);
    let grant = api.core.delete_grant(grant_id(request.get_ref())?, &who)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(grant_to_proto(&grant)))
}

/// Refuses an instance revocation of one of ztid's own identities (under the reserved
/// `/ztid` prefix: the server, agents, admins). Only workload instances are checked
/// against instance revocations (at the mint, the token endpoint and the agents), so
/// one of these would be stored, synced to every agent and listed as in force while
/// revoking nothing: the operator would believe a server, agent or admin credential
/// dead that still works. The refusal names what does revoke it.
fn refuse_reserved_instance(td: &spiffe::TrustDomain, target: &str) -> crate::Result<()> {
    let id = crate::entries::parse_id(td, "target", target)?;
    if !ztid_spiffe::spiffe_id::is_reserved(&id) {
        return Ok(());
    }
    let instead = if ztid_spiffe::spiffe_id::is_agent_id(td, &id) {
        "revoke the node instead (kind node, `instance revoke --node`), which also bans \
         the agent"
    } else if ztid_spiffe::spiffe_id::is_admin_id(td, &id) {
        "an admin's credentials are revoked on the server's host (`ztid-server admin \
         credential revoke --name NAME`), its roles withdrawn by removing its ID from \
         [remote_admin.roles]"
    } else {
        "the server's credentials go with its authorities (authority taint and revoke) or \
         with the server (RetireServer, `server retire`)"
    };
    Err(Error::InvalidInput(format!(
        "target {target} is under spiffe://{td}/ztid, reserved for ztid's own identities \
         (the server, agents, admins), which an instance revocation does not reach: {instead}"
    )))
}

pub(super) async fn revoke_instance(
    api: &AdminApi,
    request: Request<pb::Revocation>,
) -> Result<Response<pb::Revocation>, Status> {
    audit!(api, request, "RevokeInstance");
    let who = caller(&request);
    let r = request.get_ref();
    bound("kind (bytes)", &r.kind, limits::MAX_KEYWORD_BYTES)?;
    bound("target (bytes)", &r.target, limits::MAX_SPIFFE_ID_BYTES)?;
    bound(
        "reason (bytes)",
        &r.reason,
        crate::core::revocations::MAX_REASON_BYTES,
    )?;
    let kind = RevocationKind::parse(&r.kind).ok_or_else(|| {
        Error::InvalidInput(format!(
            "kind {:?} is not one of instance, entry, node",
            r.kind
        ))
    })?;
    if r.target.is_empty() {
        return Err(Error::InvalidInput("target must not be empty".into()).into());
    }
    match kind {
        RevocationKind::Instance => refuse_reserved_instance(&api.core.trust_domain, &r.target)?,
        // Only the admin socket revokes admin credentials: a remote operator could
        // otherwise lock out the authority admins above it.
        RevocationKind::Admin => {
            return Err(Error::InvalidInput(
                "admin credentials are revoked only on the server's host, over the admin \
                 socket: `ztid-server admin credential revoke --name NAME`"
                    .into(),
            )
            .into())
        }
        RevocationKind::Entry | RevocationKind::Node => {}
    }
    let revocation = api.core.revoke(kind, &r.target, &r.reason, &who)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(revocation_to_proto(&revocation)))
}

pub(super) async fn list_revocations(
    api: &AdminApi,
    request: Request<pb::ListRevocationsRequest>,
) -> Result<Response<pb::ListRevocationsResponse>, Status> {
    audit!(api, request, "ListRevocations");
    let revocations = api.core.list_revocations()?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::ListRevocationsResponse {
        revocations: revocations.iter().map(revocation_to_proto).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(kind: &str, target: &str) -> Request<pb::Revocation> {
        let mut req = Request::new(pb::Revocation {
            kind: kind.into(),
            target: target.into(),
            reason: "test".into(),
            ..Default::default()
        });
        req.extensions_mut()
            .insert(super::super::authz::AdminCaller("uid:0 pid:1".into()));
        req
    }

    #[tokio::test]
    async fn an_instance_revocation_of_a_ztid_identity_is_refused_and_names_what_revokes_it() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let api = AdminApi::new(core.clone());
        for (target, instead) in [
            ("spiffe://example.org/ztid/server", "RetireServer"),
            (
                "spiffe://example.org/ztid/admin/alice",
                "[remote_admin.roles]",
            ),
            ("spiffe://example.org/ztid/agent/join_token/n1", "kind node"),
            ("spiffe://example.org/ztid", "RetireServer"),
        ] {
            let status = revoke_instance(&api, revocation("instance", target))
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{target}");
            assert!(
                status
                    .message()
                    .contains("reserved for ztid's own identities")
                    && status.message().contains(instead),
                "{target}: {}",
                status.message()
            );
        }
        assert!(
            core.list_revocations().unwrap().is_empty(),
            "nothing stored"
        );
        // A workload instance is revoked as before, and the agent through its node.
        revoke_instance(&api, revocation("instance", "spiffe://example.org/w/x"))
            .await
            .unwrap();
        revoke_instance(
            &api,
            revocation("node", "spiffe://example.org/ztid/agent/join_token/n1"),
        )
        .await
        .unwrap();
        assert_eq!(core.list_revocations().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn admin_credentials_are_revoked_only_through_their_own_local_call() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let api = AdminApi::new(core.clone());
        // RevokeInstance is an operator's call: it must not reach admin credentials.
        let status = revoke_instance(
            &api,
            revocation("admin", "spiffe://example.org/ztid/admin/alice"),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("admin credential revoke"),
            "{}",
            status.message()
        );
        assert!(core.list_revocations().unwrap().is_empty());
        let mut bad = Request::new(pb::RevokeAdminCredentialsRequest {
            name: "Alice/x".into(),
            reason: String::new(),
        });
        bad.extensions_mut()
            .insert(super::super::authz::AdminCaller("uid:0 pid:1".into()));
        let status = super::super::admin_svid::revoke_admin_credentials(&api, bad)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(core.list_revocations().unwrap().is_empty());
        let mut good = Request::new(pb::RevokeAdminCredentialsRequest {
            name: "alice".into(),
            reason: "laptop stolen".into(),
        });
        good.extensions_mut()
            .insert(super::super::authz::AdminCaller("uid:0 pid:1".into()));
        let r = super::super::admin_svid::revoke_admin_credentials(&api, good)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.kind.as_str(), r.target.as_str(), r.reason.as_str()),
            (
                "admin",
                "spiffe://example.org/ztid/admin/alice",
                "laptop stolen"
            )
        );
        assert_eq!(core.list_revocations().unwrap().len(), 1);
    }
}
