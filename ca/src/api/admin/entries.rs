//! The registration entry RPCs of the admin API: `CreateEntry`, `UpdateEntry`,
//! `ListEntries` (by SPIFFE ID or parent, each filter in canonical spelling; in pages
//! ordered by entry id, each bounded in count and bytes), `CountEntries`, `GetEntry`,
//! `DeleteEntry`, and the batches `BatchCreateEntries` and `BatchDeleteEntries` (each
//! entry answered with its own status, as SPIRE does).

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;
use ztid_proto::node as npb;

use super::{bound, caller, AdminApi};
use crate::core::sync::{entry_wire_bytes, page_limit, page_token, DEFAULT_PAGE_SIZE, PAGE_BYTES};
use crate::datastore::{EntryFilter, EntryRecord};
use crate::entries::to_proto;
use crate::limits;
use crate::Error;

/// The token kind of a `ListEntries` page.
const ENTRIES_TOKEN: &str = "entries";

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
    // A token continues only the listing it came from: the same filters.
    let context = format!("{}\n{}", r.spiffe_id, r.parent_id);
    let after: Option<String> = if r.page_token.is_empty() {
        None
    } else {
        Some(page_token::decode(ENTRIES_TOKEN, &context, &r.page_token)?)
    };
    let limit = page_limit(r.page_size, DEFAULT_PAGE_SIZE);
    let page = api
        .core
        .store
        .list_entries_page(&filter, after.as_deref(), limit)?;
    let mut more = page.len() >= limit;
    let mut entries = Vec::with_capacity(page.len());
    let mut bytes = 0;
    for e in page {
        bytes += entry_wire_bytes(&e);
        entries.push(to_proto(&e));
        if bytes >= PAGE_BYTES {
            more = true;
            break;
        }
    }
    let next_page_token = match entries.last() {
        Some(last) if more => page_token::encode(ENTRIES_TOKEN, &context, &last.id)?,
        _ => String::new(),
    };
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::ListEntriesResponse {
        entries,
        next_page_token,
    }))
}

pub(super) async fn update_entry(
    api: &AdminApi,
    request: Request<npb::Entry>,
) -> Result<Response<npb::Entry>, Status> {
    audit!(api, request, "UpdateEntry");
    let e = api.core.update_entry(request.get_ref())?;
    api.core.audit_barrier().await?;
    Ok(Response::new(to_proto(&e)))
}

pub(super) async fn count_entries(
    api: &AdminApi,
    request: Request<pb::CountEntriesRequest>,
) -> Result<Response<pb::CountResponse>, Status> {
    audit!(api, request, "CountEntries");
    let count = api.core.store.count_entries()?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::CountResponse {
        count: count as u64,
    }))
}

/// One entry's outcome in a batch answer: the entry, or the status it was refused with.
fn entry_result(id: &str, r: crate::Result<EntryRecord>) -> pb::EntryResult {
    match r {
        Ok(e) => pb::EntryResult {
            code: 0,
            message: String::new(),
            id: e.id.clone(),
            entry: Some(to_proto(&e)),
        },
        Err(e) => {
            let s = Status::from(e);
            pb::EntryResult {
                code: s.code() as i32,
                message: s.message().to_string(),
                id: id.to_string(),
                entry: None,
            }
        }
    }
}

pub(super) async fn batch_create_entries(
    api: &AdminApi,
    request: Request<pb::BatchCreateEntriesRequest>,
) -> Result<Response<pb::BatchEntriesResponse>, Status> {
    audit!(api, request, "BatchCreateEntries");
    let results = api.core.create_entries(&request.get_ref().entries)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::BatchEntriesResponse {
        results: results.into_iter().map(|r| entry_result("", r)).collect(),
    }))
}

pub(super) async fn batch_delete_entries(
    api: &AdminApi,
    request: Request<pb::BatchDeleteEntriesRequest>,
) -> Result<Response<pb::BatchEntriesResponse>, Status> {
    audit!(api, request, "BatchDeleteEntries");
    let ids = &request.get_ref().ids;
    let results = api.core.delete_entries(ids)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::BatchEntriesResponse {
        results: ids
            .iter()
            .zip(results)
            .map(|(id, r)| entry_result(id, r))
            .collect(),
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
