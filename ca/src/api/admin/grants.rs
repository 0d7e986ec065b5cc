//! The token-exchange RPCs of the admin API (issue 14): grants (`CreateGrant`,
//! `ListGrants`, `GetGrant`, `DeleteGrant`) and the kill switch (`RevokeInstance`,
//! `ListRevocations`). See docs/token-exchange.md.

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;

use super::AdminApi;

fn not_yet() -> Status {
    Status::unimplemented("grants and revocations are being built (issue 14)")
}

pub(super) async fn create_grant(
    _api: &AdminApi,
    _request: Request<pb::Grant>,
) -> Result<Response<pb::Grant>, Status> {
    Err(not_yet())
}

pub(super) async fn list_grants(
    _api: &AdminApi,
    _request: Request<pb::ListGrantsRequest>,
) -> Result<Response<pb::ListGrantsResponse>, Status> {
    Err(not_yet())
}

pub(super) async fn get_grant(
    _api: &AdminApi,
    _request: Request<pb::GrantRef>,
) -> Result<Response<pb::Grant>, Status> {
    Err(not_yet())
}

pub(super) async fn delete_grant(
    _api: &AdminApi,
    _request: Request<pb::GrantRef>,
) -> Result<Response<pb::Grant>, Status> {
    Err(not_yet())
}

pub(super) async fn revoke_instance(
    _api: &AdminApi,
    _request: Request<pb::Revocation>,
) -> Result<Response<pb::Revocation>, Status> {
    Err(not_yet())
}

pub(super) async fn list_revocations(
    _api: &AdminApi,
    _request: Request<pb::ListRevocationsRequest>,
) -> Result<Response<pb::ListRevocationsResponse>, Status> {
    Err(not_yet())
}
