//! The registration entry RPCs of the admin API: `CreateEntry`, `ListEntries` (by
//! SPIFFE ID or parent, each filter in canonical spelling), `GetEntry`, `DeleteEntry`.

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;
use ztid_proto::node as npb;

use super::{bound, caller, AdminApi};
use crate::datastore::EntryFilter;
use crate::entries::to_proto;
use crate::limits;
use crate::Error;

pub(super) async fn create_entry(
    api: &AdminApi,
    request: Request<npb::Entry>,
) -> Result<Response<npb::Entry>, Status> {
    audit!(api, request, "CreateEntry");
    let e = api.core.create_entry(request.get_ref())?;
    api.core.audit_barrier().await?;
    Ok(Response::new(to_proto(&e)))
}

pub(super) async fn list_entries(
    api: &AdminApi,
    request: Request<pb::ListEntriesRequest>,
) -> Result<Response<pb::ListEntriesResponse>, Status> {
    audit!(api, request, "ListEntries");
    bound(
        "spiffe_id filter (bytes)",
        &request.get_ref().spiffe_id,
        limits::MAX_SPIFFE_ID_BYTES,
    )?;
    bound(
        "parent_id filter (bytes)",
        &request.get_ref().parent_id,
        limits::MAX_SPIFFE_ID_BYTES,
    )?;
    let r = request.get_ref();
    // A filter spelled non-canonically would silently match nothing: refuse it.
    for (what, id) in [
        ("spiffe_id filter", &r.spiffe_id),
        ("parent_id filter", &r.parent_id),
    ] {
        if !id.is_empty() {
            crate::entries::parse_id(&api.core.trust_domain, what, id)?;
        }
    }
    let filter = EntryFilter {
        spiffe_id: (!r.spiffe_id.is_empty()).then(|| r.spiffe_id.clone()),
        parent_id: (!r.parent_id.is_empty()).then(|| r.parent_id.clone()),
    };
    let entries = api.core.store.list_entries(&filter)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::ListEntriesResponse {
        entries: entries.iter().map(to_proto).collect(),
    }))
}

pub(super) async fn get_entry(
    api: &AdminApi,
    request: Request<pb::EntryId>,
) -> Result<Response<npb::Entry>, Status> {
    audit!(api, request, "GetEntry");
    bound(
        "entry id (bytes)",
        &request.get_ref().id,
        limits::MAX_OBJECT_ID_BYTES,
    )?;
    let id = &request.get_ref().id;
    let e = api
        .core
        .store
        .get_entry(id)?
        .ok_or_else(|| Error::NotFound(format!("entry {id} does not exist")))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(to_proto(&e)))
}

pub(super) async fn delete_entry(
    api: &AdminApi,
    request: Request<pb::EntryId>,
) -> Result<Response<npb::Entry>, Status> {
    audit!(api, request, "DeleteEntry");
    bound(
        "entry id (bytes)",
        &request.get_ref().id,
        limits::MAX_OBJECT_ID_BYTES,
    )?;
    let e = api.core.delete_entry(&request.get_ref().id)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(to_proto(&e)))
}
