//! `IssueAdminSvid` and `RevokeAdminCredentials`: the server side of `ztid-server admin
//! credential issue` and `revoke`. Served on the admin socket only
//! ([`super::authz::LOCAL_ONLY`]): the first signs the caller's CSR as
//! `spiffe://TD/ztid/admin/NAME`, the second revokes every such credential issued so far
//! (the remote admin API refuses them from then on: see `authz`).

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;

use super::grants::revocation_to_proto;
use super::{bound, bytes_bound, caller, AdminApi};
use crate::datastore::RevocationKind;
use crate::{limits, Error};

pub(super) async fn issue_admin_svid(
    api: &AdminApi,
    request: Request<pb::IssueAdminSvidRequest>,
) -> Result<Response<pb::IssueAdminSvidResponse>, Status> {
    audit!(api, request, "IssueAdminSvid");
    bound(
        "admin name (bytes)",
        &request.get_ref().name,
        limits::MAX_OBJECT_ID_BYTES,
    )?;
    bytes_bound("CSR (bytes)", &request.get_ref().csr, limits::MAX_CSR_BYTES)?;
    let r = request.get_ref();
    let (spiffe_id, leaf) =
        api.core
            .issue_admin_svid(&r.name, &r.csr, r.ttl_seconds, &caller(&request))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::IssueAdminSvidResponse {
        spiffe_id,
        cert_chain: leaf.chain,
        expires_at: leaf.not_after,
    }))
}

pub(super) async fn revoke_admin_credentials(
    api: &AdminApi,
    request: Request<pb::RevokeAdminCredentialsRequest>,
) -> Result<Response<pb::Revocation>, Status> {
    audit!(api, request, "RevokeAdminCredentials");
    let r = request.get_ref();
    bound("admin name (bytes)", &r.name, limits::MAX_OBJECT_ID_BYTES)?;
    bound(
        "reason (bytes)",
        &r.reason,
        crate::core::revocations::MAX_REASON_BYTES,
    )?;
    let id = ztid_spiffe::spiffe_id::admin_id(&api.core.trust_domain, &r.name)
        .map_err(|e| Error::InvalidInput(crate::csr_policy::reason(e)))?
        .to_string();
    let revocation = api
        .core
        .revoke(RevocationKind::Admin, &id, &r.reason, &caller(&request))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(revocation_to_proto(&revocation)))
}
