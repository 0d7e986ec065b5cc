//! The agent RPCs of the admin API: `CreateJoinToken` (how a new agent is admitted),
//! `ListAgents`, `GetAgent`, `EvictAgent` and `BanAgent`, and the agent record as the
//! API shows it.

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;

use super::{bound, caller, AdminApi};
use crate::datastore::AgentRecord;
use crate::limits;
use crate::Error;

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

pub(super) async fn create_join_token(
    api: &AdminApi,
    request: Request<pb::CreateJoinTokenRequest>,
) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
    audit!(api, request, "CreateJoinToken");
    bound(
        "alias_spiffe_id (bytes)",
        &request.get_ref().alias_spiffe_id,
        limits::MAX_SPIFFE_ID_BYTES,
    )?;
    let r = request.get_ref();
    let alias = (!r.alias_spiffe_id.is_empty()).then(|| r.alias_spiffe_id.clone());
    let (token, expires_at) = api.core.create_join_token(r.ttl_seconds, alias)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::CreateJoinTokenResponse {
        token,
        expires_at,
    }))
}

pub(super) async fn list_agents(
    api: &AdminApi,
    request: Request<pb::ListAgentsRequest>,
) -> Result<Response<pb::ListAgentsResponse>, Status> {
    audit!(api, request, "ListAgents");
    let agents = api.core.store.list_agents()?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::ListAgentsResponse {
        agents: agents.iter().map(agent_to_proto).collect(),
    }))
}

pub(super) async fn get_agent(
    api: &AdminApi,
    request: Request<pb::AgentId>,
) -> Result<Response<pb::Agent>, Status> {
    audit!(api, request, "GetAgent");
    bound(
        "agent id (bytes)",
        &request.get_ref().id,
        limits::MAX_SPIFFE_ID_BYTES,
    )?;
    let id = &request.get_ref().id;
    crate::entries::parse_id(&api.core.trust_domain, "agent", id)?;
    let a = api
        .core
        .store
        .get_agent(id)?
        .ok_or_else(|| Error::NotFound(format!("agent {id} does not exist")))?;
    api.core.audit_barrier().await?;
    Ok(Response::new(agent_to_proto(&a)))
}

pub(super) async fn evict_agent(
    api: &AdminApi,
    request: Request<pb::AgentId>,
) -> Result<Response<pb::Agent>, Status> {
    audit!(api, request, "EvictAgent");
    bound(
        "agent id (bytes)",
        &request.get_ref().id,
        limits::MAX_SPIFFE_ID_BYTES,
    )?;
    let a = api.core.evict_agent(&request.get_ref().id)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(agent_to_proto(&a)))
}

pub(super) async fn ban_agent(
    api: &AdminApi,
    request: Request<pb::AgentId>,
) -> Result<Response<pb::Agent>, Status> {
    audit!(api, request, "BanAgent");
    bound(
        "agent id (bytes)",
        &request.get_ref().id,
        limits::MAX_SPIFFE_ID_BYTES,
    )?;
    let a = api.core.ban_agent(&request.get_ref().id)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(agent_to_proto(&a)))
}
