//! The federation RPCs of the admin API: federated bundles set by hand
//! (`SetFederatedBundle`, `ListFederatedBundles`, `DeleteFederatedBundle`) and
//! federation relationships polled from a bundle endpoint (`CreateFederation`,
//! `ListFederations`, `GetFederation`, `DeleteFederation`, `RefreshFederation`), with
//! their bounds and their API shapes.

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;

use super::{bound, bytes_bound, caller, AdminApi};
use crate::core::CaCore;
use crate::limits;
use crate::Error;

fn trust_domain_ref(td: &str) -> crate::Result<()> {
    // `spiffe://` may precede the name.
    bound(
        "trust domain (bytes)",
        td,
        "spiffe://".len() + limits::MAX_TRUST_DOMAIN_BYTES,
    )
}

fn federation_bounds(r: &pb::Federation) -> crate::Result<()> {
    trust_domain_ref(&r.trust_domain)?;
    bound(
        "bundle endpoint URL (bytes)",
        &r.bundle_endpoint_url,
        limits::MAX_URL_BYTES,
    )?;
    bound("profile (bytes)", &r.profile, limits::MAX_KEYWORD_BYTES)?;
    bound(
        "endpoint SPIFFE ID (bytes)",
        &r.endpoint_spiffe_id,
        limits::MAX_SPIFFE_ID_BYTES,
    )?;
    bytes_bound(
        "trust bundle (bytes)",
        &r.trust_bundle,
        limits::MAX_BUNDLE_BYTES,
    )
}

pub(super) async fn set_federated_bundle(
    api: &AdminApi,
    request: Request<pb::SetFederatedBundleRequest>,
) -> Result<Response<pb::FederatedBundle>, Status> {
    audit!(api, request, "SetFederatedBundle");
    trust_domain_ref(&request.get_ref().trust_domain)?;
    bound(
        "bundle format (bytes)",
        &request.get_ref().format,
        limits::MAX_KEYWORD_BYTES,
    )?;
    bytes_bound(
        "bundle (bytes)",
        &request.get_ref().data,
        limits::MAX_BUNDLE_BYTES,
    )?;
    let r = request.get_ref();
    let format = if r.format.is_empty() {
        "pem"
    } else {
        r.format.as_str()
    };
    let result =
        api.core
            .set_federated_bundle_from(&r.trust_domain, format, &r.data, &caller(&request));
    // Refusals are audited too: make them durable before answering either way.
    api.core.audit_barrier().await?;
    let (b, _) = result?;
    Ok(Response::new(federated_to_proto(&b)?))
}

pub(super) async fn list_federated_bundles(
    api: &AdminApi,
    request: Request<pb::ListFederatedBundlesRequest>,
) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
    audit!(api, request, "ListFederatedBundles");
    let bundles = api
        .core
        .federated_bundles()?
        .iter()
        .map(federated_to_proto)
        .collect::<Result<_, _>>()?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::ListFederatedBundlesResponse { bundles }))
}

pub(super) async fn delete_federated_bundle(
    api: &AdminApi,
    request: Request<pb::TrustDomainRef>,
) -> Result<Response<pb::FederatedBundle>, Status> {
    audit!(api, request, "DeleteFederatedBundle");
    trust_domain_ref(&request.get_ref().trust_domain)?;
    let b = api
        .core
        .delete_federated_bundle(&request.get_ref().trust_domain, &caller(&request))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(federated_to_proto(&b)?))
}

pub(super) async fn create_federation(
    api: &AdminApi,
    request: Request<pb::Federation>,
) -> Result<Response<pb::Federation>, Status> {
    audit!(api, request, "CreateFederation");
    federation_bounds(request.get_ref())?;
    let r = request.get_ref();
    let rec = crate::federation::FederationRecord {
        trust_domain: r.trust_domain.clone(),
        bundle_endpoint_url: r.bundle_endpoint_url.clone(),
        profile: r.profile.clone(),
        endpoint_spiffe_id: r.endpoint_spiffe_id.clone(),
        trust_bundle: String::from_utf8(r.trust_bundle.clone())
            .map_err(|_| Error::InvalidInput("trust bundle is not UTF-8".into()))?,
        ..Default::default()
    };
    let f = api.core.create_federation(rec, &caller(&request))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(federation_to_proto(&api.core, &f)))
}

pub(super) async fn list_federations(
    api: &AdminApi,
    request: Request<pb::ListFederationsRequest>,
) -> Result<Response<pb::ListFederationsResponse>, Status> {
    audit!(api, request, "ListFederations");
    let federations = api
        .core
        .federations()?
        .iter()
        .map(|f| federation_to_proto(&api.core, f))
        .collect();
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::ListFederationsResponse { federations }))
}

pub(super) async fn get_federation(
    api: &AdminApi,
    request: Request<pb::TrustDomainRef>,
) -> Result<Response<pb::Federation>, Status> {
    audit!(api, request, "GetFederation");
    trust_domain_ref(&request.get_ref().trust_domain)?;
    let f = api.core.federation(&request.get_ref().trust_domain)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(federation_to_proto(&api.core, &f)))
}

pub(super) async fn delete_federation(
    api: &AdminApi,
    request: Request<pb::TrustDomainRef>,
) -> Result<Response<pb::Federation>, Status> {
    audit!(api, request, "DeleteFederation");
    trust_domain_ref(&request.get_ref().trust_domain)?;
    let f = api
        .core
        .delete_federation(&request.get_ref().trust_domain, &caller(&request))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(federation_to_proto(&api.core, &f)))
}

pub(super) async fn refresh_federation(
    api: &AdminApi,
    request: Request<pb::TrustDomainRef>,
) -> Result<Response<pb::FederatedBundle>, Status> {
    audit!(api, request, "RefreshFederation");
    trust_domain_ref(&request.get_ref().trust_domain)?;
    let result = api
        .core
        .refresh_federation(&request.get_ref().trust_domain)
        .await;
    api.core.audit_barrier().await?;
    let (b, _) = result?;
    Ok(Response::new(federated_to_proto(&b)?))
}

fn federated_to_proto(b: &ztid_spiffe::bundle::TrustBundle) -> crate::Result<pb::FederatedBundle> {
    Ok(pb::FederatedBundle {
        bundle: Some(b.into()),
        spiffe_json: b
            .to_spiffe_json()
            .map_err(|e| Error::Internal(e.to_string()))?,
    })
}

fn federation_to_proto(core: &CaCore, f: &crate::federation::FederationRecord) -> pb::Federation {
    pb::Federation {
        trust_domain: f.trust_domain.clone(),
        bundle_endpoint_url: f.bundle_endpoint_url.clone(),
        profile: f.profile.clone(),
        endpoint_spiffe_id: f.endpoint_spiffe_id.clone(),
        trust_bundle: Vec::new(),
        last_refresh_at: f.last_refresh_at,
        last_error: f.last_error.clone(),
        bundle_sequence: core
            .federated_bundle(&f.trust_domain)
            .ok()
            .flatten()
            .map_or(0, |b| b.sequence),
    }
}
