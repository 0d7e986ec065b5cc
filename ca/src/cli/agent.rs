//! `agent`: attested agents.

use clap::Subcommand;
use serde_json::{json, Value};
use ztid_proto::admin as pb;

use super::output::{expiry, print_list, when};
use super::{status, Client, Output};

/// `agent` verbs.
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// List agents (every page).
    List,
    /// How many agents there are.
    Count,
    /// Show one agent.
    Show {
        /// Agent SPIFFE ID.
        agent_id: String,
    },
    /// Evict: the agent's next call fails; it must attest again.
    Evict {
        /// Agent SPIFFE ID.
        agent_id: String,
    },
    /// Ban: the agent's next call fails and it can never attest again.
    Ban {
        /// Agent SPIFFE ID.
        agent_id: String,
    },
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "spiffe_id": a.spiffe_id, "attestation_method": a.attestation_method,
        "selectors": a.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "serial": a.serial, "expires_at": a.expires_at, "banned": a.banned,
        "attested_at": a.attested_at, "aliases": a.aliases,
    })
}

fn print_agent(a: &pb::Agent, out: Output) {
    match out {
        Output::Json => println!("{}", agent_json(a)),
        Output::Text => {
            println!("Agent ID      : {}", a.spiffe_id);
            println!("Attestation   : {}", a.attestation_method);
            for s in &a.selectors {
                println!("Selector      : {}:{}", s.r#type, s.value);
            }
            for al in &a.aliases {
                println!("Alias         : {al}");
            }
            println!("SVID serial   : {}", a.serial);
            if a.attested_at != 0 {
                println!("Attested at   : {}", when(a.attested_at));
            }
            println!("SVID expires  : {}", expiry(a.expires_at));
            println!("Banned        : {}", a.banned);
            println!();
        }
    }
}

/// Runs an `agent` verb.
pub(super) async fn run(client: &mut Client, cmd: &AgentCmd, out: Output) -> Result<(), String> {
    match cmd {
        AgentCmd::List => {
            let mut agents = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = client
                    .list_agents(pb::ListAgentsRequest {
                        page_size: 1000,
                        page_token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                agents.extend(r.agents);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            print_list(&agents, "agents", agent_json, print_agent, out);
        }
        AgentCmd::Count => {
            let r = client
                .count_agents(pb::CountAgentsRequest::default())
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", json!({"count": r.count})),
                Output::Text => println!("{}", r.count),
            }
        }
        AgentCmd::Show { agent_id } => {
            let a = client
                .get_agent(pb::AgentId {
                    id: agent_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_agent(&a, out);
        }
        AgentCmd::Evict { agent_id } => {
            let a = client
                .evict_agent(pb::AgentId {
                    id: agent_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", agent_json(&a)),
                Output::Text => println!("Evicted agent {}", a.spiffe_id),
            }
        }
        AgentCmd::Ban { agent_id } => {
            let a = client
                .ban_agent(pb::AgentId {
                    id: agent_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", agent_json(&a)),
                Output::Text => println!("Banned agent {}", a.spiffe_id),
            }
        }
    }
    Ok(())
}
