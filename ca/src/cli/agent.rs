//! `agent`: attested agents.

use clap::Subcommand;
use serde_json::{json, Value};
use ztid_proto::admin as pb;

use super::output::{expiry, print_list, shown, when};
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
        "banned_hardware": a.banned_hardware,
    })
}

/// An agent as `agent show` and `agent list` print it for people.
fn agent_text(a: &pb::Agent) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(t, "Agent ID      : {}", shown(&a.spiffe_id));
    let _ = writeln!(t, "Attestation   : {}", shown(&a.attestation_method));
    for s in &a.selectors {
        let _ = writeln!(
            t,
            "Selector      : {}:{}",
            shown(&s.r#type),
            shown(&s.value)
        );
    }
    for al in &a.aliases {
        let _ = writeln!(t, "Alias         : {}", shown(al));
    }
    let _ = writeln!(t, "SVID serial   : {}", shown(&a.serial));
    if a.attested_at != 0 {
        let _ = writeln!(t, "Attested at   : {}", when(a.attested_at));
    }
    let _ = writeln!(t, "SVID expires  : {}", expiry(a.expires_at));
    let _ = writeln!(t, "Banned        : {}", a.banned);
    for h in &a.banned_hardware {
        let _ = writeln!(t, "Banned hardware: {}", shown(h));
    }
    t
}

fn print_agent(a: &pb::Agent, out: Output) {
    match out {
        Output::Json => println!("{}", agent_json(a)),
        Output::Text => println!("{}", agent_text(a)),
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
                Output::Text => println!("Evicted agent {}", shown(&a.spiffe_id)),
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
                Output::Text => {
                    println!("Banned agent {}", shown(&a.spiffe_id));
                    // What else the ban refuses: a node proving it, under any agent ID.
                    for h in &a.banned_hardware {
                        println!("Banned hardware {}", shown(h));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn banned_tpm_agent() -> pb::Agent {
        pb::Agent {
            spiffe_id: "spiffe://example.org/ztid/agent/tpm/ab".into(),
            attestation_method: "tpm".into(),
            selectors: vec![ztid_proto::node::Selector {
                r#type: "tpm".into(),
                value: "ek-hash:ab".into(),
            }],
            banned: true,
            banned_hardware: vec!["tpm:ek-hash:ab".into(), "tpm:ek-hash:cd".into()],
            ..Default::default()
        }
    }

    /// `agent show` names each hardware identifier the ban recorded, in text and JSON.
    #[test]
    fn a_banned_agent_shows_its_banned_hardware() {
        let a = banned_tpm_agent();
        let text = agent_text(&a);
        assert!(text.contains("Banned        : true\n"), "{text}");
        assert!(
            text.ends_with("Banned hardware: tpm:ek-hash:ab\nBanned hardware: tpm:ek-hash:cd\n"),
            "{text}"
        );
        let json = agent_json(&a);
        assert_eq!(
            json["banned_hardware"],
            json!(["tpm:ek-hash:ab", "tpm:ek-hash:cd"])
        );
    }

    /// What a node's evidence put in its selectors (an EK certificate's issuer name, a
    /// TPM's manufacturer string) is shown escaped: it cannot forge a line, overwrite one
    /// or drive the terminal; JSON keeps it exact.
    #[test]
    fn evidence_values_are_shown_escaped_and_kept_exact_in_json() {
        let mut a = banned_tpm_agent();
        let issuer = "ek-issuer:CN=Vendor\x1b]8;;https://evil\x07\rBanned        : false\n\u{202e}";
        a.selectors.push(ztid_proto::node::Selector {
            r#type: "tpm".into(),
            value: issuer.into(),
        });
        let text = agent_text(&a);
        assert!(
            !text.contains(['\x1b', '\x07', '\r', '\u{202e}']),
            "raw control in {text:?}"
        );
        let banned_lines = text
            .lines()
            .filter(|l| l.starts_with("Banned        :"))
            .count();
        assert_eq!(banned_lines, 1, "{text}");
        assert!(
            text.contains(
                r"Selector      : tpm:ek-issuer:CN=Vendor\x1b]8;;https://evil\x07\rBanned        : false\n\u{202e}"
            ),
            "{text}"
        );
        let json = agent_json(&a);
        assert_eq!(json["selectors"][1], format!("tpm:{issuer}"));
    }

    /// Nothing recorded, no line (and an empty list in JSON).
    #[test]
    fn an_agent_without_banned_hardware_shows_no_such_line() {
        let mut a = banned_tpm_agent();
        a.banned_hardware.clear();
        let text = agent_text(&a);
        assert!(!text.contains("Banned hardware"), "{text}");
        assert_eq!(agent_json(&a)["banned_hardware"], json!([]));
    }
}
