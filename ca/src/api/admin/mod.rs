//! The admin API: the `ztid.admin.v1.Admin` service, served on the server's Unix socket
//! and, when configured, on the remote admin listener (mutual TLS). The socket is
//! owner-only (0600) and, behind that, every call is checked against the kernel's
//! SO_PEERCRED: only the configured uids (default: the server's own) get in; remote
//! callers get only the roles bound to their admin identity. Deny by default
//! ([`authz`]). Every string and byte field of a request is bounded ([`crate::limits`])
//! before it is used, and every call is audited.
//!
//! This file holds the service, what every call shares (the caller, the bounds, the
//! `audit!` record) and the `Admin` trait impl, which routes each RPC to the file of
//! its resource: `entries.rs`, `agents.rs` (join tokens and agents), `authorities.rs`
//! (the authorities and the bundle), `federation.rs`, `admin_svid.rs`
//! (`IssueAdminSvid`). [`authz`] decides who may call what. The client that obtains
//! an admin identity (`ztid-server admin credential issue`) is in `cli/credential.rs`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use ztid_proto::admin::{self as pb, admin_server::Admin};
use ztid_proto::node as npb;

use crate::core::CaCore;
use crate::limits;
use crate::Error;

fn caller<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<authz::AdminCaller>()
        .map(|c| c.0.clone())
        .unwrap_or_else(|| "unknown".into())
}

/// Refuses a string over its bound ([`crate::limits`]): `InvalidInput` and the bound.
fn bound(what: &'static str, value: &str, max: usize) -> crate::Result<()> {
    limits::check_len(what, value, max)
}

/// Refuses bytes over their bound.
fn bytes_bound(what: &'static str, value: &[u8], max: usize) -> crate::Result<()> {
    limits::at_most(what, value.len(), max).map_err(|e| Error::InvalidInput(e.to_string()))
}

/// The admin service.
pub struct AdminApi {
    core: Arc<CaCore>,
}

impl AdminApi {
    /// A service over `core`.
    pub fn new(core: Arc<CaCore>) -> Self {
        Self { core }
    }
}

macro_rules! audit {
    ($api:ident, $req:expr, $what:expr) => {{
        let who = caller(&$req);
        tracing::info!(event = "admin_call", caller = %who, call = $what, "admin call");
        $api.core.record(serde_json::json!({"type": "admin_call", "caller": who, "call": $what}))?;
    }};
}

mod admin_svid;
mod agents;
mod authorities;
mod entries;
mod federation;
mod grants;

pub mod authz;

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_grant(
        &self,
        request: Request<pb::Grant>,
    ) -> Result<Response<pb::Grant>, Status> {
        grants::create_grant(self, request).await
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        grants::list_grants(self, request).await
    }

    async fn get_grant(
        &self,
        request: Request<pb::GrantRef>,
    ) -> Result<Response<pb::Grant>, Status> {
        grants::get_grant(self, request).await
    }

    async fn delete_grant(
        &self,
        request: Request<pb::GrantRef>,
    ) -> Result<Response<pb::Grant>, Status> {
        grants::delete_grant(self, request).await
    }

    async fn revoke_instance(
        &self,
        request: Request<pb::Revocation>,
    ) -> Result<Response<pb::Revocation>, Status> {
        grants::revoke_instance(self, request).await
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        grants::list_revocations(self, request).await
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        agents::create_join_token(self, request).await
    }

    async fn create_entry(
        &self,
        request: Request<npb::Entry>,
    ) -> Result<Response<npb::Entry>, Status> {
        entries::create_entry(self, request).await
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        entries::list_entries(self, request).await
    }

    async fn get_entry(
        &self,
        request: Request<pb::EntryId>,
    ) -> Result<Response<npb::Entry>, Status> {
        entries::get_entry(self, request).await
    }

    async fn delete_entry(
        &self,
        request: Request<pb::EntryId>,
    ) -> Result<Response<npb::Entry>, Status> {
        entries::delete_entry(self, request).await
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        agents::list_agents(self, request).await
    }

    async fn get_agent(
        &self,
        request: Request<pb::AgentId>,
    ) -> Result<Response<pb::Agent>, Status> {
        agents::get_agent(self, request).await
    }

    async fn evict_agent(
        &self,
        request: Request<pb::AgentId>,
    ) -> Result<Response<pb::Agent>, Status> {
        agents::evict_agent(self, request).await
    }

    async fn ban_agent(
        &self,
        request: Request<pb::AgentId>,
    ) -> Result<Response<pb::Agent>, Status> {
        agents::ban_agent(self, request).await
    }

    async fn get_bundle(
        &self,
        request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        authorities::get_bundle(self, request).await
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::HealthResponse {
            status: "SERVING".into(),
            trust_domain: self.core.trust_domain.to_string(),
        }))
    }

    async fn list_authorities(
        &self,
        request: Request<pb::AuthorityKind>,
    ) -> Result<Response<pb::Authorities>, Status> {
        authorities::list_authorities(self, request).await
    }

    async fn prepare_authority(
        &self,
        request: Request<pb::AuthorityKind>,
    ) -> Result<Response<pb::Authority>, Status> {
        authorities::prepare_authority(self, request).await
    }

    async fn activate_authority(
        &self,
        request: Request<pb::AuthorityKind>,
    ) -> Result<Response<pb::Authority>, Status> {
        authorities::activate_authority(self, request).await
    }

    async fn taint_authority(
        &self,
        request: Request<pb::AuthorityRef>,
    ) -> Result<Response<pb::Authority>, Status> {
        authorities::taint_authority(self, request).await
    }

    async fn revoke_authority(
        &self,
        request: Request<pb::AuthorityRef>,
    ) -> Result<Response<pb::Authority>, Status> {
        authorities::revoke_authority(self, request).await
    }

    async fn retire_server(
        &self,
        request: Request<pb::ServerRef>,
    ) -> Result<Response<pb::Authorities>, Status> {
        authorities::retire_server(self, request).await
    }

    async fn set_federated_bundle(
        &self,
        request: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        federation::set_federated_bundle(self, request).await
    }

    async fn list_federated_bundles(
        &self,
        request: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        federation::list_federated_bundles(self, request).await
    }

    async fn delete_federated_bundle(
        &self,
        request: Request<pb::TrustDomainRef>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        federation::delete_federated_bundle(self, request).await
    }

    async fn create_federation(
        &self,
        request: Request<pb::Federation>,
    ) -> Result<Response<pb::Federation>, Status> {
        federation::create_federation(self, request).await
    }

    async fn list_federations(
        &self,
        request: Request<pb::ListFederationsRequest>,
    ) -> Result<Response<pb::ListFederationsResponse>, Status> {
        federation::list_federations(self, request).await
    }

    async fn get_federation(
        &self,
        request: Request<pb::TrustDomainRef>,
    ) -> Result<Response<pb::Federation>, Status> {
        federation::get_federation(self, request).await
    }

    async fn delete_federation(
        &self,
        request: Request<pb::TrustDomainRef>,
    ) -> Result<Response<pb::Federation>, Status> {
        federation::delete_federation(self, request).await
    }

    async fn refresh_federation(
        &self,
        request: Request<pb::TrustDomainRef>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        federation::refresh_federation(self, request).await
    }

    async fn issue_admin_svid(
        &self,
        request: Request<pb::IssueAdminSvidRequest>,
    ) -> Result<Response<pb::IssueAdminSvidResponse>, Status> {
        admin_svid::issue_admin_svid(self, request).await
    }

    async fn revoke_admin_credentials(
        &self,
        request: Request<pb::RevokeAdminCredentialsRequest>,
    ) -> Result<Response<pb::Revocation>, Status> {
        admin_svid::revoke_admin_credentials(self, request).await
    }

    async fn update_entry(
        &self,
        request: Request<npb::Entry>,
    ) -> Result<Response<npb::Entry>, Status> {
        entries::update_entry(self, request).await
    }

    async fn count_entries(
        &self,
        request: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        entries::count_entries(self, request).await
    }

    async fn count_agents(
        &self,
        request: Request<pb::CountAgentsRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        agents::count_agents(self, request).await
    }

    async fn batch_create_entries(
        &self,
        request: Request<pb::BatchCreateEntriesRequest>,
    ) -> Result<Response<pb::BatchEntriesResponse>, Status> {
        entries::batch_create_entries(self, request).await
    }

    async fn batch_delete_entries(
        &self,
        request: Request<pb::BatchDeleteEntriesRequest>,
    ) -> Result<Response<pb::BatchEntriesResponse>, Status> {
        entries::batch_delete_entries(self, request).await
    }
}
