//! The authority RPCs of the admin API: `ListAuthorities`, `PrepareAuthority`,
//! `ActivateAuthority`, `TaintAuthority`, `RevokeAuthority` (the lifecycle in
//! [`crate::authority`]), and `GetBundle`, the trust bundle built from them.

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;

use super::{bound, caller, AdminApi};
use crate::authority::Kind;
use crate::datastore::AuthorityRecord;
use crate::limits;
use crate::Error;

/// `server_id` owns `a`; `backend` is its key manager's name, empty when another
/// server owns it (this server does not know that server's backend).
fn authority_to_proto(
    kind: Kind,
    a: &AuthorityRecord,
    backend: &str,
    server_id: &str,
) -> pb::Authority {
    pb::Authority {
        kind: kind.as_str().into(),
        id: a.id.clone(),
        state: match a.state {
            crate::datastore::AuthorityState::Prepared => "prepared",
            crate::datastore::AuthorityState::Active => "active",
            crate::datastore::AuthorityState::Old => "old",
        }
        .into(),
        tainted: a.tainted,
        not_before: a.not_before,
        not_after: a.not_after,
        key_id: a.key_id.clone(),
        key_backend: backend.into(),
        public_key_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, &a.public_key)),
        tainted_at: a.tainted_at,
        server_id: server_id.into(),
        server_retired_at: 0,
    }
}

/// One of this server's own authorities.
fn own_to_proto(api: &AdminApi, kind: Kind, a: &AuthorityRecord) -> pb::Authority {
    authority_to_proto(
        kind,
        a,
        api.core.authorities.key_backend(),
        api.core.server_id(),
    )
}

fn authority_ref(r: &pb::AuthorityRef) -> crate::Result<()> {
    bound("authority kind (bytes)", &r.kind, limits::MAX_KEYWORD_BYTES)?;
    bound("authority id (bytes)", &r.id, limits::MAX_OBJECT_ID_BYTES)
}

pub(super) async fn get_bundle(
    api: &AdminApi,
    request: Request<pb::GetBundleRequest>,
) -> Result<Response<pb::GetBundleResponse>, Status> {
    audit!(api, request, "GetBundle");
    let b = api.core.bundle();
    let spiffe_json = b
        .to_spiffe_json()
        .map_err(|e| Error::Internal(e.to_string()))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::GetBundleResponse {
        bundle: Some(b.as_ref().into()),
        spiffe_json,
    }))
}

pub(super) async fn list_authorities(
    api: &AdminApi,
    request: Request<pb::AuthorityKind>,
) -> Result<Response<pb::Authorities>, Status> {
    audit!(api, request, "ListAuthorities");
    bound(
        "authority kind (bytes)",
        &request.get_ref().kind,
        limits::MAX_KEYWORD_BYTES,
    )?;
    let kind = Kind::parse(&request.get_ref().kind)?;
    let backend = api.core.authorities.key_backend();
    let own = api.core.server_id();
    // Every server's authorities, each with its owner.
    let list = api.core.list_cluster_authorities(kind)?;
    let retired = api.core.authorities.retired_servers()?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::Authorities {
        authorities: list
            .iter()
            .map(|(server, a)| {
                let backend = if server == own { backend } else { "" };
                let mut p = authority_to_proto(kind, a, backend, server);
                p.server_retired_at = retired
                    .iter()
                    .find_map(|(id, at)| (id == server).then_some(*at))
                    .unwrap_or_default();
                p
            })
            .collect(),
    }))
}

pub(super) async fn prepare_authority(
    api: &AdminApi,
    request: Request<pb::AuthorityKind>,
) -> Result<Response<pb::Authority>, Status> {
    audit!(api, request, "PrepareAuthority");
    bound(
        "authority kind (bytes)",
        &request.get_ref().kind,
        limits::MAX_KEYWORD_BYTES,
    )?;
    let kind = Kind::parse(&request.get_ref().kind)?;
    let a = api.core.prepare_authority(kind, &caller(&request))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(own_to_proto(api, kind, &a)))
}

pub(super) async fn activate_authority(
    api: &AdminApi,
    request: Request<pb::AuthorityKind>,
) -> Result<Response<pb::Authority>, Status> {
    audit!(api, request, "ActivateAuthority");
    bound(
        "authority kind (bytes)",
        &request.get_ref().kind,
        limits::MAX_KEYWORD_BYTES,
    )?;
    let kind = Kind::parse(&request.get_ref().kind)?;
    let a = api.core.activate_authority(kind, &caller(&request))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(own_to_proto(api, kind, &a)))
}

pub(super) async fn taint_authority(
    api: &AdminApi,
    request: Request<pb::AuthorityRef>,
) -> Result<Response<pb::Authority>, Status> {
    audit!(api, request, "TaintAuthority");
    authority_ref(request.get_ref())?;
    let kind = Kind::parse(&request.get_ref().kind)?;
    let a = api
        .core
        .taint_authority(kind, &request.get_ref().id, &caller(&request))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(own_to_proto(api, kind, &a)))
}

pub(super) async fn revoke_authority(
    api: &AdminApi,
    request: Request<pb::AuthorityRef>,
) -> Result<Response<pb::Authority>, Status> {
    audit!(api, request, "RevokeAuthority");
    authority_ref(request.get_ref())?;
    let kind = Kind::parse(&request.get_ref().kind)?;
    let id = &request.get_ref().id;
    // A retired server's authority is revoked through any server: name its owner.
    let owner = api
        .core
        .authorities
        .cluster_list(kind)?
        .into_iter()
        .find_map(|(server, a)| (a.id == *id).then_some(server));
    let a = api.core.revoke_authority(kind, id, &caller(&request))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(match owner {
        Some(server) if server != api.core.server_id() => authority_to_proto(kind, &a, "", &server),
        _ => own_to_proto(api, kind, &a),
    }))
}

pub(super) async fn retire_server(
    api: &AdminApi,
    request: Request<pb::ServerRef>,
) -> Result<Response<pb::Authorities>, Status> {
    audit!(api, request, "RetireServer");
    let server = &request.get_ref().server_id;
    bound("server id (bytes)", server, limits::MAX_OBJECT_ID_BYTES)?;
    if server.is_empty() {
        return Err(Error::InvalidInput("a server id is required".into()).into());
    }
    let list = api.core.retire_server(server, &caller(&request))?;
    api.core.audit_barrier().await?;
    let retired_at = api
        .core
        .authorities
        .retired_servers()?
        .into_iter()
        .find_map(|(id, at)| (id == *server).then_some(at))
        .unwrap_or_default();
    Ok(Response::new(pb::Authorities {
        authorities: list
            .iter()
            .map(|(kind, a)| {
                let mut p = authority_to_proto(*kind, a, "", server);
                p.server_retired_at = retired_at;
                p
            })
            .collect(),
    }))
}
