//! The agent RPCs of the admin API: `CreateJoinToken` (how a new agent is admitted),
//! `ListAgents` (in pages ordered by SPIFFE ID), `CountAgents`, `GetAgent`, `EvictAgent`
//! and `BanAgent`, and the agent record as the API shows it.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};
use ztid_proto::admin as pb;

use super::{bound, caller, AdminApi};
use crate::core::sync::{page_limit, page_token, DEFAULT_PAGE_SIZE, PAGE_BYTES};
use crate::datastore::AgentRecord;
use crate::limits;
use crate::Error;

/// The token kind of a `ListAgents` page.
const AGENTS_TOKEN: &str = "agents";

/// An upper bound of an agent's size in a `ListAgents` answer, with the hardware
/// identifiers recorded with its ban.
fn agent_wire_bytes(a: &AgentRecord, banned_hardware: &[String]) -> usize {
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
        + banned_hardware
            .iter()
            .map(|s| s.len() + FIELD)
            .sum::<usize>()
        + 64
}

/// The hardware identifiers recorded with the bans of the banned ones among `agents`,
/// by agent: one datastore read, none when no agent is banned.
fn banned_hardware_of(
    api: &AdminApi,
    agents: &[AgentRecord],
) -> Result<BTreeMap<String, Vec<String>>, Error> {
    let banned: Vec<String> = agents
        .iter()
        .filter(|a| a.banned)
        .map(|a| a.spiffe_id.clone())
        .collect();
    let mut by_agent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if banned.is_empty() {
        return Ok(by_agent);
    }
    for ban in api.core.store.hardware_bans_of_agents(&banned)? {
        by_agent.entry(ban.agent).or_default().push(ban.identifier);
    }
    Ok(by_agent)
}

fn agent_to_proto(a: &AgentRecord, banned_hardware: Vec<String>) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.clone(),
        attestation_method: a.method.clone(),
        selectors: a.selectors.iter().map(Into::into).collect(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        banned: a.banned,
        attested_at: a.attested_at,
        aliases: a.aliases.clone(),
        banned_hardware,
    }
}

/// One agent as the API shows it, with what its ban recorded (if banned).
fn shown_agent(api: &AdminApi, a: &AgentRecord) -> Result<pb::Agent, Error> {
    let mut hardware = banned_hardware_of(api, std::slice::from_ref(a))?;
    Ok(agent_to_proto(
        a,
        hardware.remove(&a.spiffe_id).unwrap_or_default(),
    ))
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
    let mut hardware = banned_hardware_of(api, &page)?;
    let mut agents = Vec::with_capacity(page.len());
    let mut bytes = 0;
    for a in &page {
        let banned_hardware = hardware.remove(&a.spiffe_id).unwrap_or_default();
        bytes += agent_wire_bytes(a, &banned_hardware);
        agents.push(agent_to_proto(a, banned_hardware));
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
    let shown = shown_agent(api, &a)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(shown))
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
    // Evicting lifts the ban and what it recorded: nothing is left to show.
    Ok(Response::new(agent_to_proto(&a, Vec::new())))
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
    let shown = shown_agent(api, &a)?;
    api.core.audit_barrier().await?;
    Ok(Response::new(shown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::{core_with_agent, fresh_csr};

    fn call<T>(message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.extensions_mut()
            .insert(super::super::authz::AdminCaller("uid:0 pid:1".into()));
        req
    }

    fn agent_id(id: &str) -> Request<pb::AgentId> {
        call(pb::AgentId { id: id.into() })
    }

    /// The hardware identifiers a ban recorded are in the `BanAgent`, `GetAgent` and
    /// `ListAgents` answers for that agent only; evicting lifts them.
    #[tokio::test]
    async fn a_banned_agent_is_shown_with_the_hardware_its_ban_recorded() {
        let (_dir, core, _, joined) = core_with_agent();
        let api = AdminApi::new(core.clone());
        let ek = "ab".repeat(32);
        let tpm = ztid_verifier::AttestedNode {
            method: "tpm",
            node_id: ek.clone(),
            selectors: vec![ztid_spiffe::Selector::parse(&format!("tpm:ek-hash:{ek}")).unwrap()],
            aliases: vec![],
            evidence_digest: [1; 32],
        };
        let (rec, _) = core.complete_attestation(&tpm, &fresh_csr()).unwrap();
        let want = vec![format!("tpm:ek-hash:{ek}")];

        // Not banned yet: nothing shown.
        let shown = get_agent(&api, agent_id(&rec.spiffe_id)).await.unwrap();
        assert!(shown.get_ref().banned_hardware.is_empty());

        let banned = ban_agent(&api, agent_id(&rec.spiffe_id)).await.unwrap();
        assert!(banned.get_ref().banned);
        assert_eq!(banned.get_ref().banned_hardware, want);
        let shown = get_agent(&api, agent_id(&rec.spiffe_id)).await.unwrap();
        assert_eq!(shown.get_ref().banned_hardware, want);

        // The join-token agent, banned too, recorded nothing; the list shows each its own.
        ban_agent(&api, agent_id(&joined.record.spiffe_id))
            .await
            .unwrap();
        let listed = list_agents(&api, call(pb::ListAgentsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .agents;
        assert_eq!(listed.len(), 2);
        for a in &listed {
            let expected: &[String] = if a.spiffe_id == rec.spiffe_id {
                &want
            } else {
                &[]
            };
            assert_eq!(a.banned_hardware, expected, "{}", a.spiffe_id);
        }

        let evicted = evict_agent(&api, agent_id(&rec.spiffe_id)).await.unwrap();
        assert!(evicted.get_ref().banned_hardware.is_empty());
        assert!(core
            .store
            .hardware_bans_of_agents(std::slice::from_ref(&rec.spiffe_id))
            .unwrap()
            .is_empty());
    }
}
