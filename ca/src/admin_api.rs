//! The admin API on the server's Unix socket. The socket is owner-only (0600) and,
//! behind that, every call is checked against the kernel's SO_PEERCRED: only the
//! configured uids (default: the server's own) get in. Deny by default. Every string
//! and byte field of a request is bounded ([`crate::limits`]) before it is used.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use ztid_proto::admin::{self as pb, admin_server::Admin};
use ztid_proto::node as npb;

use crate::authority::Kind;
use crate::core::CaCore;
use crate::datastore::AuthorityRecord;
use crate::datastore::{AgentRecord, EntryFilter};
use crate::entries::to_proto;
use crate::limits;
use crate::Error;

fn caller<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<crate::admin_authz::AdminCaller>()
        .map(|c| c.0.clone())
        .unwrap_or_else(|| "unknown".into())
}

fn agent_to_proto(a: &AgentRecord) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.clone(),
        attestation_method: a.method.clone(),
        selectors: a.selectors.iter().map(Into::into).collect(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        banned: a.banned,
        attested_at: a.attested_at,
        aliases: a.aliases.clone(),
    }
}

fn authority_to_proto(kind: Kind, a: &AuthorityRecord, backend: &str) -> pb::Authority {
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
    }
}

/// Refuses a string over its bound ([`crate::limits`]): `InvalidInput` and the bound.
fn bound(what: &'static str, value: &str, max: usize) -> crate::Result<()> {
    limits::check_len(what, value, max)
}

/// Refuses bytes over their bound.
fn bytes_bound(what: &'static str, value: &[u8], max: usize) -> crate::Result<()> {
    limits::at_most(what, value.len(), max).map_err(|e| Error::InvalidInput(e.to_string()))
}

fn trust_domain_ref(td: &str) -> crate::Result<()> {
    // `spiffe://` may precede the name.
    bound(
        "trust domain (bytes)",
        td,
        "spiffe://".len() + limits::MAX_TRUST_DOMAIN_BYTES,
    )
}

fn authority_ref(r: &pb::AuthorityRef) -> crate::Result<()> {
    bound("authority kind (bytes)", &r.kind, limits::MAX_KEYWORD_BYTES)?;
    bound("authority id (bytes)", &r.id, limits::MAX_OBJECT_ID_BYTES)
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
    ($self:ident, $req:expr, $what:expr) => {{
        let who = caller(&$req);
        tracing::info!(event = "admin_call", caller = %who, call = $what, "admin call");
        $self.core.record(serde_json::json!({"type": "admin_call", "caller": who, "call": $what}))?;
    }};
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        audit!(self, request, "CreateJoinToken");
        bound(
            "alias_spiffe_id (bytes)",
            &request.get_ref().alias_spiffe_id,
            limits::MAX_SPIFFE_ID_BYTES,
        )?;
        let r = request.get_ref();
        let alias = (!r.alias_spiffe_id.is_empty()).then(|| r.alias_spiffe_id.clone());
        let (token, expires_at) = self.core.create_join_token(r.ttl_seconds, alias)?;
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            expires_at,
        }))
    }

    async fn create_entry(
        &self,
        request: Request<npb::Entry>,
    ) -> Result<Response<npb::Entry>, Status> {
        audit!(self, request, "CreateEntry");
        let e = self.core.create_entry(request.get_ref())?;
        self.core.audit_barrier().await?;
        Ok(Response::new(to_proto(&e)))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        audit!(self, request, "ListEntries");
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
                crate::entries::parse_id(&self.core.trust_domain, what, id)?;
            }
        }
        let filter = EntryFilter {
            spiffe_id: (!r.spiffe_id.is_empty()).then(|| r.spiffe_id.clone()),
            parent_id: (!r.parent_id.is_empty()).then(|| r.parent_id.clone()),
        };
        let entries = self.core.store.list_entries(&filter)?;
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(to_proto).collect(),
        }))
    }

    async fn get_entry(
        &self,
        request: Request<pb::EntryId>,
    ) -> Result<Response<npb::Entry>, Status> {
        audit!(self, request, "GetEntry");
        bound(
            "entry id (bytes)",
            &request.get_ref().id,
            limits::MAX_OBJECT_ID_BYTES,
        )?;
        let id = &request.get_ref().id;
        let e = self
            .core
            .store
            .get_entry(id)?
            .ok_or_else(|| Error::NotFound(format!("entry {id} does not exist")))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(to_proto(&e)))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::EntryId>,
    ) -> Result<Response<npb::Entry>, Status> {
        audit!(self, request, "DeleteEntry");
        bound(
            "entry id (bytes)",
            &request.get_ref().id,
            limits::MAX_OBJECT_ID_BYTES,
        )?;
        let e = self.core.delete_entry(&request.get_ref().id)?;
        self.core.audit_barrier().await?;
        Ok(Response::new(to_proto(&e)))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        audit!(self, request, "ListAgents");
        let agents = self.core.store.list_agents()?;
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(agent_to_proto).collect(),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::AgentId>,
    ) -> Result<Response<pb::Agent>, Status> {
        audit!(self, request, "GetAgent");
        bound(
            "agent id (bytes)",
            &request.get_ref().id,
            limits::MAX_SPIFFE_ID_BYTES,
        )?;
        let id = &request.get_ref().id;
        crate::entries::parse_id(&self.core.trust_domain, "agent", id)?;
        let a = self
            .core
            .store
            .get_agent(id)?
            .ok_or_else(|| Error::NotFound(format!("agent {id} does not exist")))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(agent_to_proto(&a)))
    }

    async fn evict_agent(
        &self,
        request: Request<pb::AgentId>,
    ) -> Result<Response<pb::Agent>, Status> {
        audit!(self, request, "EvictAgent");
        bound(
            "agent id (bytes)",
            &request.get_ref().id,
            limits::MAX_SPIFFE_ID_BYTES,
        )?;
        let a = self.core.evict_agent(&request.get_ref().id)?;
        self.core.audit_barrier().await?;
        Ok(Response::new(agent_to_proto(&a)))
    }

    async fn ban_agent(
        &self,
        request: Request<pb::AgentId>,
    ) -> Result<Response<pb::Agent>, Status> {
        audit!(self, request, "BanAgent");
        bound(
            "agent id (bytes)",
            &request.get_ref().id,
            limits::MAX_SPIFFE_ID_BYTES,
        )?;
        let a = self.core.ban_agent(&request.get_ref().id)?;
        self.core.audit_barrier().await?;
        Ok(Response::new(agent_to_proto(&a)))
    }

    async fn get_bundle(
        &self,
        request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        audit!(self, request, "GetBundle");
        let b = self.core.bundle();
        let spiffe_json = b
            .to_spiffe_json()
            .map_err(|e| Error::Internal(e.to_string()))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::GetBundleResponse {
            bundle: Some(b.as_ref().into()),
            spiffe_json,
        }))
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
        audit!(self, request, "ListAuthorities");
        bound(
            "authority kind (bytes)",
            &request.get_ref().kind,
            limits::MAX_KEYWORD_BYTES,
        )?;
        let kind = Kind::parse(&request.get_ref().kind)?;
        let backend = self.core.authorities.key_backend();
        let list = self.core.list_authorities(kind)?;
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::Authorities {
            authorities: list
                .iter()
                .map(|a| authority_to_proto(kind, a, backend))
                .collect(),
        }))
    }

    async fn prepare_authority(
        &self,
        request: Request<pb::AuthorityKind>,
    ) -> Result<Response<pb::Authority>, Status> {
        audit!(self, request, "PrepareAuthority");
        bound(
            "authority kind (bytes)",
            &request.get_ref().kind,
            limits::MAX_KEYWORD_BYTES,
        )?;
        let kind = Kind::parse(&request.get_ref().kind)?;
        let a = self.core.prepare_authority(kind, &caller(&request))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(authority_to_proto(
            kind,
            &a,
            self.core.authorities.key_backend(),
        )))
    }

    async fn activate_authority(
        &self,
        request: Request<pb::AuthorityKind>,
    ) -> Result<Response<pb::Authority>, Status> {
        audit!(self, request, "ActivateAuthority");
        bound(
            "authority kind (bytes)",
            &request.get_ref().kind,
            limits::MAX_KEYWORD_BYTES,
        )?;
        let kind = Kind::parse(&request.get_ref().kind)?;
        let a = self.core.activate_authority(kind, &caller(&request))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(authority_to_proto(
            kind,
            &a,
            self.core.authorities.key_backend(),
        )))
    }

    async fn taint_authority(
        &self,
        request: Request<pb::AuthorityRef>,
    ) -> Result<Response<pb::Authority>, Status> {
        audit!(self, request, "TaintAuthority");
        authority_ref(request.get_ref())?;
        let kind = Kind::parse(&request.get_ref().kind)?;
        let a = self
            .core
            .taint_authority(kind, &request.get_ref().id, &caller(&request))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(authority_to_proto(
            kind,
            &a,
            self.core.authorities.key_backend(),
        )))
    }

    async fn revoke_authority(
        &self,
        request: Request<pb::AuthorityRef>,
    ) -> Result<Response<pb::Authority>, Status> {
        audit!(self, request, "RevokeAuthority");
        authority_ref(request.get_ref())?;
        let kind = Kind::parse(&request.get_ref().kind)?;
        let a = self
            .core
            .revoke_authority(kind, &request.get_ref().id, &caller(&request))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(authority_to_proto(
            kind,
            &a,
            self.core.authorities.key_backend(),
        )))
    }

    async fn set_federated_bundle(
        &self,
        request: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        audit!(self, request, "SetFederatedBundle");
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
        let result = self.core.set_federated_bundle_from(
            &r.trust_domain,
            format,
            &r.data,
            &caller(&request),
        );
        // Refusals are audited too: make them durable before answering either way.
        self.core.audit_barrier().await?;
        let (b, _) = result?;
        Ok(Response::new(federated_to_proto(&b)?))
    }

    async fn list_federated_bundles(
        &self,
        request: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        audit!(self, request, "ListFederatedBundles");
        let bundles = self
            .core
            .federated_bundles()?
            .iter()
            .map(federated_to_proto)
            .collect::<Result<_, _>>()?;
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::ListFederatedBundlesResponse { bundles }))
    }

    async fn delete_federated_bundle(
        &self,
        request: Request<pb::TrustDomainRef>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        audit!(self, request, "DeleteFederatedBundle");
        trust_domain_ref(&request.get_ref().trust_domain)?;
        let b = self
            .core
            .delete_federated_bundle(&request.get_ref().trust_domain, &caller(&request))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(federated_to_proto(&b)?))
    }

    async fn create_federation(
        &self,
        request: Request<pb::Federation>,
    ) -> Result<Response<pb::Federation>, Status> {
        audit!(self, request, "CreateFederation");
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
        let f = self.core.create_federation(rec, &caller(&request))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(federation_to_proto(&self.core, &f)))
    }

    async fn list_federations(
        &self,
        request: Request<pb::ListFederationsRequest>,
    ) -> Result<Response<pb::ListFederationsResponse>, Status> {
        audit!(self, request, "ListFederations");
        let federations = self
            .core
            .federations()?
            .iter()
            .map(|f| federation_to_proto(&self.core, f))
            .collect();
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::ListFederationsResponse { federations }))
    }

    async fn get_federation(
        &self,
        request: Request<pb::TrustDomainRef>,
    ) -> Result<Response<pb::Federation>, Status> {
        audit!(self, request, "GetFederation");
        trust_domain_ref(&request.get_ref().trust_domain)?;
        let f = self.core.federation(&request.get_ref().trust_domain)?;
        self.core.audit_barrier().await?;
        Ok(Response::new(federation_to_proto(&self.core, &f)))
    }

    async fn delete_federation(
        &self,
        request: Request<pb::TrustDomainRef>,
    ) -> Result<Response<pb::Federation>, Status> {
        audit!(self, request, "DeleteFederation");
        trust_domain_ref(&request.get_ref().trust_domain)?;
        let f = self
            .core
            .delete_federation(&request.get_ref().trust_domain, &caller(&request))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(federation_to_proto(&self.core, &f)))
    }

    async fn refresh_federation(
        &self,
        request: Request<pb::TrustDomainRef>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        audit!(self, request, "RefreshFederation");
        trust_domain_ref(&request.get_ref().trust_domain)?;
        let result = self
            .core
            .refresh_federation(&request.get_ref().trust_domain)
            .await;
        self.core.audit_barrier().await?;
        let (b, _) = result?;
        Ok(Response::new(federated_to_proto(&b)?))
    }

    async fn issue_admin_svid(
        &self,
        request: Request<pb::IssueAdminSvidRequest>,
    ) -> Result<Response<pb::IssueAdminSvidResponse>, Status> {
        audit!(self, request, "IssueAdminSvid");
        bound(
            "admin name (bytes)",
            &request.get_ref().name,
            limits::MAX_OBJECT_ID_BYTES,
        )?;
        bytes_bound("CSR (bytes)", &request.get_ref().csr, limits::MAX_CSR_BYTES)?;
        let r = request.get_ref();
        let (spiffe_id, leaf) =
            self.core
                .issue_admin_svid(&r.name, &r.csr, r.ttl_seconds, &caller(&request))?;
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::IssueAdminSvidResponse {
            spiffe_id,
            cert_chain: leaf.chain,
            expires_at: leaf.not_after,
        }))
    }
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
