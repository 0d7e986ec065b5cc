//! Admin roles and the admin RPCs each one grants. A leaf: it names no other part of the
//! server, so the config can parse roles without reaching the admin policy.

/// An admin role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read-only: list and show.
    Viewer,
    /// Viewer, plus tokens, entries and agents.
    Operator,
    /// Viewer, plus the authority lifecycle and federation (what the domain trusts).
    AuthorityAdmin,
}

impl Role {
    /// Parses `viewer`, `operator` or `authority-admin`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "authority-admin" => Some(Role::AuthorityAdmin),
            _ => None,
        }
    }

    /// Whether this role may call the admin RPC `method` (deny by default).
    pub(crate) fn allows(self, method: &str) -> bool {
        const READ: &[&str] = &[
            "ListEntries",
            "GetEntry",
            "ListAgents",
            "GetAgent",
            "CountEntries",
            "CountAgents",
            "GetBundle",
            "Health",
            "ListAuthorities",
            "ListFederatedBundles",
            "ListFederations",
            "GetFederation",
            // Token exchange (issue 14).
            "ListGrants",
            "GetGrant",
            "ListRevocations",
        ];
        const OPERATE: &[&str] = &[
            "CreateJoinToken",
            "CreateEntry",
            "DeleteEntry",
            "UpdateEntry",
            "BatchCreateEntries",
            "BatchDeleteEntries",
            "EvictAgent",
            "BanAgent",
            "RefreshFederation",
            // Token exchange (issue 14): who may obtain what, and the kill switch (a node
            // revocation bans the agent, as BanAgent does).
            "CreateGrant",
            "DeleteGrant",
            "RevokeInstance",
        ];
        const AUTHORITY: &[&str] = &[
            "PrepareAuthority",
            "ActivateAuthority",
            "TaintAuthority",
            "RevokeAuthority",
            "RetireServer",
            // These change what the trust domain trusts, so they sit with the authorities.
            "SetFederatedBundle",
            "DeleteFederatedBundle",
            "CreateFederation",
            "DeleteFederation",
        ];
        READ.contains(&method)
            || match self {
                Role::Viewer => false,
                Role::Operator => OPERATE.contains(&method),
                Role::AuthorityAdmin => AUTHORITY.contains(&method),
            }
    }
}
