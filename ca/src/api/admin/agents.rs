//! The agent RPCs of the admin API: `CreateJoinToken` (how a new agent is admitted),
//! `ListAgents` (in pages ordered by SPIFFE ID), `CountAgents`, `GetAgent`, `EvictAgent`
//! and `BanAgent`, and the agent record as the API shows it.

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;

use super::{bound, caller, AdminApi};
use crate::core::sync::{page_limit, page_token, DEFAULT_PAGE_SIZE, PAGE_BYTES};
use crate::datastore::AgentRecord;
use crate::limits;
use crate::Error;

/// The token kind of a `ListAgents` page.
const AGENTS_TOKEN: &str = "agents";

/// An upper bound of an agent's size in a `ListAgents` answer.
fn agent_wire_bytes(a: &AgentRecord) -> usize {
    const FIELD: usize = 6;
    [&a.spiffe_id, &a.method, &a.serial]
        .iter()
        .map(|s| s.len() + FIELD)
        .sum::<usize>()
        + a.selectors
            .iter()
            .map(|s| s.kind().len() + s.value().len() + 3 * FIELD)
            .sum::<usize>()
        + a.aliases.iter().map(|s| s.len() + FIELD).sum::<usize>()
        + 64
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
    let r = request.get_ref();
    let after: Option<String> = if r.page_token.is_empty() {
        None
    } else {
        Some(page_token::decode(AGENTS_TOKEN, "", &r.page_token)?)
    };
    let limit = page_limit(r.page_size, DEFAULT_PAGE_SIZE);
    let page = api.core.store.list_agents_page(after.as_deref(), limit)?;
    let mut more = page.len() >= limit;
    let mut agents = Vec::with_capacity(page.len());
    let mut bytes = 0;
    for a in &page {
        bytes += agent_wire_bytes(a);
        agents.push(agent_to_proto(a));
        if bytes >= PAGE_BYTES {
            more = true;
            break;
        }
    }
    let next_page_token = match agents.last() {
        Some(last) if more => page_token::encode(AGENTS_TOKEN, "", &last.spiffe_id)?,
        _ => String::new(),
    };
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::ListAgentsResponse {
        agents,
        next_page_token,
    }))
}

pub(super) async fn count_agents(
    api: &AdminApi,
    request: Request<pb::CountAgentsRequest>,
) -> Result<Response<pb::CountResponse>, Status> {
    audit!(api, request, "CountAgents");
    let count = api.core.store.count_agents()?;
    api.core.audit_barrier().await?;
    Ok(Response::new(pb::CountResponse {
        count: count as u64,
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
