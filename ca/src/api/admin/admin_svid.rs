//! `IssueAdminSvid`: the server side of `ztid-server admin credential issue`
//! ([`super::credential`]). Served on the admin socket only ([`super::authz::LOCAL_ONLY`]);
//! it signs the caller's CSR as `spiffe://TD/ztid/admin/NAME`.

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;

use super::{bound, bytes_bound, caller, AdminApi};
use crate::limits;

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
