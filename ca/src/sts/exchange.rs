//! `POST /token`: RFC 8693 token exchange. Who is asking (mTLS X509-SVID, or a
//! JWT-SVID as `client_assertion` or `subject_token`), on whose behalf (a subject access
//! token and an actor), what a grant lets them obtain, what the policy says, and the
//! receipt. Every step that fails refuses with the RFC's code; nothing is issued and
//! nothing changes but the receipt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Map, Value};
use ztid_spiffe::jwt::JwtKey;

use super::chain::{covers, may_act_allows, narrow, ActChain};
use super::error::{OAuthError, OAuthErrorCode as Code};
use super::form::{token_request, TokenRequest, TokenType};
use super::scope::Scopes;
use super::token::{self, AccessToken, ACCESS_TOKEN_TYPE};
use crate::config::StsConfig;
use crate::core::{now, CaCore};
use crate::datastore::{AgentRecord, GrantRecord};
use crate::refusal_audit::RefusalAudit;

/// A successful exchange (RFC 8693 §2.2.1).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenResponse {
    /// The issued access token (RFC 9068 `at+jwt`).
    pub access_token: String,
    /// Always `urn:ietf:params:oauth:token-type:access_token`.
    pub issued_token_type: &'static str,
    /// Always `Bearer` (a bound token's binding is in its `cnf`).
    pub token_type: &'static str,
    /// Seconds until `exp`.
    pub expires_in: i64,
    /// The granted scopes, space-separated.
    pub scope: String,
}

impl TokenResponse {
    /// The JSON body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// How the party making the request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthMethod {
    /// Its X509-SVID as the TLS client certificate (RFC 8705 `tls_client_auth`).
    Mtls,
    /// Its JWT-SVID as an RFC 7523 client assertion.
    ClientAssertion,
    /// Its JWT-SVID as the subject token (no actor).
    SubjectToken,
    /// Its JWT-SVID as the actor token (delegation without mTLS).
    ActorToken,
}

impl AuthMethod {
    fn as_str(self) -> &'static str {
        match self {
            Self::Mtls => "tls_client_auth",
            Self::ClientAssertion => "client_assertion",
            Self::SubjectToken => "subject_token",
            Self::ActorToken => "actor_token",
        }
    }
}

/// The authenticated party making the request: for a direct exchange the subject, for
/// delegation the new actor.
#[derive(Debug, Clone)]
pub(super) struct Client {
    pub(super) spiffe_id: String,
    method: AuthMethod,
    /// When its credential expires: no token outlives it.
    credential_exp: i64,
    /// When its credential was issued (revocations of entries and nodes count by it).
    pub(super) issued_at: i64,
    /// `x5t#S256` of its certificate (mTLS only): the token is bound to it.
    x5t: Option<String>,
    /// Its node, when the credential says (mTLS: the SVID's subject names it).
    pub(super) node: Option<AgentRecord>,
}

/// What a refusal's receipt says about the request, as far as it was understood.
#[derive(Debug, Default)]
struct Seen {
    client: Option<String>,
    method: Option<&'static str>,
    subject: Option<String>,
    chain: Vec<String>,
    audience: Option<String>,
    scope: Option<String>,
    grant: Option<String>,
    node: Option<String>,
}

fn err(code: Code, description: impl Into<String>) -> OAuthError {
    OAuthError::new(code, description)
}

/// An internal failure: logged here in full, answered without its details (they are
/// the server's, not the client's).
pub(super) fn server_error(e: &crate::Error) -> OAuthError {
    tracing::error!(event = "sts_internal_error", error = %e, "token endpoint: internal error");
    match e {
        crate::Error::Store(crate::StoreError::Unreachable(_)) => err(
            Code::TemporarilyUnavailable,
            "the datastore is unreachable: retry later",
        ),
        _ => err(
            Code::ServerError,
            "internal error (the server's log has the details)",
        ),
    }
}

fn sts_config(core: &CaCore) -> Result<&StsConfig, OAuthError> {
    core.config
        .sts
        .as_ref()
        .ok_or_else(|| err(Code::ServerError, "the token endpoint is not configured"))
}

/// This trust domain's JWT authorities (a token of any other trust domain is refused).
fn own_jwt_keys(core: &CaCore) -> Vec<JwtKey> {
    core.bundle().jwt_authorities.clone()
}

/// Handles one token request: `peer` is the TLS client certificate (leaf DER) when the
/// caller sent one, `body` the form-encoded request body (already bounded).
pub async fn token(
    core: &Arc<CaCore>,
    peer: Option<&[u8]>,
    body: &[u8],
) -> Result<TokenResponse, OAuthError> {
    let mut seen = Seen::default();
    let decided = decide(core, peer, body, &mut seen);
    match decided {
        Ok((response, receipt)) => {
            core.record(receipt).map_err(|e| server_error(&e))?;
            // No token leaves before its receipt is durable.
            core.audit_barrier().await.map_err(|e| server_error(&e))?;
            if let Some(node) = &seen.node {
                crate::metrics::svid_issued("access_token", node);
            }
            Ok(response)
        }
        Err(e) => {
            refused(core, &seen, &e);
            Err(e)
        }
    }
}

/// Bounded receipts of refusals (per caller, per interval, with a summary), so a flood
/// of bad requests cannot become a flood of synced audit records.
fn refusal_audit(core: &Arc<CaCore>) -> &'static Arc<RefusalAudit> {
    static AUDIT: OnceLock<Arc<RefusalAudit>> = OnceLock::new();
    AUDIT.get_or_init(|| {
        let audit = Arc::new(RefusalAudit::from_config(&core.config.limits));
        audit.spawn_flusher(core);
        audit
    })
}

fn refused(core: &Arc<CaCore>, seen: &Seen, e: &OAuthError) {
    tracing::info!(event = "token_refused", error = e.code.as_str(), reason = %e.description,
        client = seen.client.as_deref().unwrap_or("-"), audience = seen.audience.as_deref().unwrap_or("-"),
        "token exchange refused");
    let key = seen.client.as_deref().unwrap_or("unauthenticated");
    let receipt = json!({"type": "token_refused", "error": e.code.as_str(), "reason": e.description,
        "client": seen.client, "auth": seen.method, "subject": seen.subject, "chain": seen.chain,
        "audience": seen.audience, "scope": seen.scope, "grant": seen.grant, "node": seen.node});
    refusal_audit(core).record(core.as_ref(), key, None, e.code.as_str(), receipt);
}

/// Validates a JWT-SVID of this trust domain whose `aud` names the issuer.
fn jwt_svid(
    core: &CaCore,
    jwt: &str,
    issuer: &str,
    t: i64,
    role: &str,
    code: Code,
) -> Result<ztid_spiffe::jwt::ValidatedJwt, OAuthError> {
    let keys = own_jwt_keys(core);
    let own = core.trust_domain.clone();
    ztid_spiffe::jwt::validate(jwt, issuer, t, |td| (*td == own).then(|| keys.clone())).map_err(
        |e| {
            err(
                code,
                format!("the {role} is not a valid JWT-SVID for {issuer}: {e}"),
            )
        },
    )
}

fn jwt_client(
    core: &CaCore,
    jwt: &str,
    issuer: &str,
    t: i64,
    method: AuthMethod,
    code: Code,
) -> Result<Client, OAuthError> {
    let role = match method {
        AuthMethod::ClientAssertion => "client_assertion",
        AuthMethod::ActorToken => "actor_token",
        _ => "subject_token",
    };
    let v = jwt_svid(core, jwt, issuer, t, role, code)?;
    // Both bound what the client obtains (its lifetime; which revocations count), so
    // neither is assumed: a credential without them is refused.
    let time = |name: &str| {
        v.claims
            .get(name)
            .and_then(Value::as_i64)
            .ok_or_else(|| err(code, format!("the {role} has no integer {name} claim")))
    };
    let exp = time("exp")?;
    let iat = time("iat")?;
    Ok(Client {
        spiffe_id: v.spiffe_id.to_string(),
        method,
        credential_exp: exp,
        issued_at: iat,
        x5t: None,
        node: None,
    })
}

/// The node an X509-SVID names in its subject (`OU=node=<agent ID>`), if any.
fn node_of_leaf(leaf: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).ok()?;
    let ou = cert.subject().iter_organizational_unit().next()?;
    ou.as_str()
        .ok()?
        .strip_prefix(crate::authority::NODE_OU_PREFIX)
        .map(str::to_string)
}

/// The caller over mutual TLS (also the introspection endpoint's caller): an X509-SVID
/// this trust domain's authorities signed, unexpired, on a node still attested.
pub(super) fn mtls_client(core: &CaCore, leaf: &[u8], t: i64) -> Result<Client, OAuthError> {
    let bad = |why: String| err(Code::InvalidClient, why);
    // TLS accepted any chain to the bundle (under an upstream root, any CA under the
    // organisation's root): only an SVID this cluster's authorities signed is a caller.
    if !core.issued_by_own_authority(leaf) {
        return Err(bad(
            "the client certificate is not an X509-SVID this trust domain's authorities signed"
                .into(),
        ));
    }
    // A tainted authority's key may be in other hands, which could sign any workload's
    // ID: its SVIDs authenticate no caller (agents rotate them once they see the taint).
    if core.issued_by_tainted_authority(leaf) {
        return Err(bad(
            "the client certificate was signed by a tainted X.509 authority; use an X509-SVID \
             the active authority signed"
                .into(),
        ));
    }
    let id = ztid_spiffe::svid::spiffe_id_of_leaf(leaf)
        .map_err(|e| bad(format!("client certificate: {e}")))?
        .to_string();
    let exp =
        ztid_spiffe::svid::not_after(leaf).map_err(|e| bad(format!("client certificate: {e}")))?;
    // TLS checked validity at the handshake; a kept-alive connection can outlive it.
    if t >= exp {
        return Err(bad(format!("the X509-SVID of {id} has expired")));
    }
    let node = match node_of_leaf(leaf) {
        Some(agent) => {
            let record = core.store.get_agent(&agent).map_err(|e| server_error(&e))?;
            match record {
                Some(r) if r.banned => {
                    return Err(err(
                        Code::UnauthorizedClient,
                        format!("the node of {id}, {agent}, is banned"),
                    ))
                }
                Some(r) => Some(r),
                None => {
                    return Err(err(
                        Code::UnauthorizedClient,
                        format!("the node of {id}, {agent}, is no longer attested (evicted)"),
                    ))
                }
            }
        }
        None => None,
    };
    Ok(Client {
        spiffe_id: id,
        method: AuthMethod::Mtls,
        credential_exp: exp,
        issued_at: crate::authority::leaf_issued_at(leaf).unwrap_or(t),
        x5t: Some(token::x5t_s256(leaf)),
        node,
    })
}

/// An identity under the reserved `/ztid/` prefix (agents, servers, admins) never
/// exchanges nor acts: those credentials exist to run ztid, not to call tools.
pub(super) fn refuse_reserved(core: &CaCore, id: &str) -> Result<(), OAuthError> {
    let reserved = format!("spiffe://{}/ztid/", core.trust_domain);
    if id.starts_with(&reserved) {
        return Err(err(
            Code::UnauthorizedClient,
            format!(
                "{id} is a ztid identity (agent, server or admin) and obtains no access tokens"
            ),
        ));
    }
    Ok(())
}

pub(super) fn refuse_revoked(
    core: &CaCore,
    id: &str,
    node: Option<&str>,
    issued_at: i64,
    code: Code,
    role: &str,
) -> Result<(), OAuthError> {
    if let Some(r) = core
        .revocation_of(id, node, issued_at)
        .map_err(|e| server_error(&e))?
    {
        let why = if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        };
        return Err(err(
            code,
            format!(
                "{role} {id} was revoked by an operator ({} revocation of {}){why}",
                r.kind, r.target
            ),
        ));
    }
    Ok(())
}

/// The caller's node facts: `{agent, method, selectors}`.
fn node_facts(node: &AgentRecord) -> Value {
    json!({"agent": node.spiffe_id, "method": node.method,
        "selectors": node.selectors.iter().map(|s| s.to_string()).collect::<Vec<_>>()})
}

/// Per-grant, per-caller-instance token counts in the current minute (this server).
struct Rate {
    minute: i64,
    counts: HashMap<(String, String), u32>,
}

/// Most (grant, caller) pairs counted in one minute; beyond, new pairs are refused
/// rather than letting the map grow without bound.
const MAX_RATE_KEYS: usize = 100_000;

fn take_rate(grant: &GrantRecord, caller: &str, t: i64) -> Result<(), OAuthError> {
    if grant.max_per_minute == 0 {
        return Ok(());
    }
    static RATE: OnceLock<Mutex<Rate>> = OnceLock::new();
    let rate = RATE.get_or_init(|| {
        Mutex::new(Rate {
            minute: 0,
            counts: HashMap::new(),
        })
    });
    let mut r = rate
        .lock()
        .map_err(|_| err(Code::ServerError, "rate lock poisoned"))?;
    let minute = t.div_euclid(60);
    if r.minute != minute {
        r.minute = minute;
        r.counts.clear();
    }
    let key = (grant.id.clone(), caller.to_string());
    if !r.counts.contains_key(&key) && r.counts.len() >= MAX_RATE_KEYS {
        return Err(err(
            Code::TemporarilyUnavailable,
            "too many callers this minute; retry next minute",
        ));
    }
    let n = r.counts.entry(key).or_insert(0);
    if *n >= grant.max_per_minute {
        return Err(err(
            Code::UnauthorizedClient,
            format!(
                "grant {} allows {} tokens per minute per instance and {caller} has had them",
                grant.id, grant.max_per_minute
            ),
        ));
    }
    *n += 1;
    Ok(())
}

/// The grant that allows `actor` this request, and the scopes it gets.
fn choose_grant(
    core: &CaCore,
    actor: &Client,
    audience: &str,
    requested: Option<&Scopes>,
    subject_scopes: Option<&Scopes>,
    delegating: bool,
) -> Result<(GrantRecord, Scopes), OAuthError> {
    let grants = core
        .grants_for(&actor.spiffe_id, audience)
        .map_err(|e| server_error(&e))?;
    if grants.is_empty() {
        return Err(err(
            Code::InvalidTarget,
            format!(
                "no grant lets {} obtain tokens for {audience}",
                actor.spiffe_id
            ),
        ));
    }
    let node_selectors: Vec<String> = actor
        .node
        .iter()
        .flat_map(|n| n.selectors.iter().map(|s| s.to_string()))
        .collect();
    let mut first_refusal: Option<OAuthError> = None;
    for g in grants {
        let refusal = if delegating && !g.may_delegate {
            Some(err(
                Code::UnauthorizedClient,
                format!(
                    "grant {} does not let {} act for another (no --may-delegate)",
                    g.id, actor.spiffe_id
                ),
            ))
        } else if !g.node_selectors.is_empty() && actor.node.is_none() {
            Some(err(
                Code::UnauthorizedClient,
                format!("grant {} requires node selectors, and a JWT-SVID proves no node: authenticate with the X509-SVID over mutual TLS", g.id),
            ))
        } else if let Some(missing) = g
            .node_selectors
            .iter()
            .find(|s| !node_selectors.contains(s))
        {
            Some(err(
                Code::UnauthorizedClient,
                format!("grant {} requires the node selector {missing}, which the node of {} did not prove", g.id, actor.spiffe_id),
            ))
        } else {
            let granted = Scopes::from_iter(g.scopes.iter().cloned())?;
            match narrow(requested, subject_scopes, &granted) {
                Ok(s) => return Ok((g, s)),
                Err(e) => Some(e),
            }
        };
        if first_refusal.is_none() {
            first_refusal = refusal;
        }
    }
    Err(first_refusal.unwrap_or_else(|| err(Code::InvalidTarget, "no usable grant")))
}

fn decide(
    core: &Arc<CaCore>,
    peer: Option<&[u8]>,
    body: &[u8],
    seen: &mut Seen,
) -> Result<(TokenResponse, Value), OAuthError> {
    let cfg = sts_config(core)?;
    let issuer = cfg.issuer();
    let t = now();
    let req: TokenRequest = token_request(body)?;
    seen.audience = Some(req.target.as_str().to_string());
    seen.scope = req.scope.as_ref().map(|s| s.to_string());

    // 1. Who is making this request.
    let mtls = match peer {
        Some(leaf) => Some(mtls_client(core, leaf, t)?),
        None => None,
    };
    let assertion = match &req.client_assertion {
        Some(a) => Some(jwt_client(
            core,
            a,
            &issuer,
            t,
            AuthMethod::ClientAssertion,
            Code::InvalidClient,
        )?),
        None => None,
    };
    if let (Some(m), Some(a)) = (&mtls, &assertion) {
        if m.spiffe_id != a.spiffe_id {
            return Err(err(
                Code::InvalidClient,
                format!(
                    "the client certificate names {} and the client_assertion {}",
                    m.spiffe_id, a.spiffe_id
                ),
            ));
        }
    }
    let authenticated = mtls.or(assertion);

    // 2. Direct exchange or delegation.
    let delegation = matches!(req.subject_token, Some((_, TokenType::AccessToken)));
    let (client, subject): (Client, Option<AccessToken>) = if delegation {
        let Some((subject_token, _)) = &req.subject_token else {
            return Err(err(Code::InvalidRequest, "subject_token is required"));
        };
        let subject = token::verify(
            subject_token,
            &own_jwt_keys(core),
            &issuer,
            t,
            cfg.max_delegation_depth,
        )
        .map_err(|e| {
            err(
                Code::InvalidGrant,
                format!("subject_token: {}", e.description),
            )
        })?;
        seen.subject = Some(subject.sub.clone());
        seen.chain = subject.act.iter().map(str::to_string).collect();
        let actor = match (&req.actor_token, authenticated) {
            (Some((_, TokenType::AccessToken)), _) => {
                return Err(err(Code::InvalidRequest, "actor_token must be the actor's JWT-SVID (urn:ietf:params:oauth:token-type:jwt)"))
            }
            (Some((jwt, TokenType::Jwt)), authenticated) => {
                let a = jwt_client(core, jwt, &issuer, t, AuthMethod::ActorToken, Code::InvalidGrant)?;
                if let Some(c) = &authenticated {
                    if c.spiffe_id != a.spiffe_id {
                        return Err(err(Code::InvalidRequest, format!(
                            "the actor_token names {} but the client is {}", a.spiffe_id, c.spiffe_id)));
                    }
                    // The stronger credential (mTLS binds the token) is the client's.
                    c.clone()
                } else {
                    a
                }
            }
            (None, Some(c)) => c,
            (None, None) => {
                return Err(err(Code::InvalidClient, "delegation needs the actor's identity: an actor_token (its JWT-SVID), or its X509-SVID over mutual TLS"))
            }
        };
        (actor, Some(subject))
    } else {
        match (&req.subject_token, authenticated) {
            (Some((jwt, _)), authenticated) => {
                let s = jwt_client(core, jwt, &issuer, t, AuthMethod::SubjectToken, Code::InvalidClient)?;
                if req.actor_token.is_some() {
                    return Err(err(Code::InvalidRequest, "an actor_token acts for an access token: present the subject's access token (urn:ietf:params:oauth:token-type:access_token) as subject_token"));
                }
                match authenticated {
                    Some(c) if c.spiffe_id != s.spiffe_id => {
                        return Err(err(Code::InvalidRequest, format!(
                            "the subject_token names {} but the client is {}: to act for another, present its access token", s.spiffe_id, c.spiffe_id)))
                    }
                    Some(c) => (c, None),
                    None => (s, None),
                }
            }
            (None, Some(c)) => (c, None),
            (None, None) => {
                return Err(err(Code::InvalidClient, "no client authentication: present the X509-SVID over mutual TLS, or the JWT-SVID (aud: the issuer) as client_assertion or subject_token"))
            }
        }
    };
    seen.client = Some(client.spiffe_id.clone());
    seen.method = Some(client.method.as_str());
    seen.node = client.node.as_ref().map(|n| n.spiffe_id.clone());
    // RFC 6749 §3.2.1: a client_id sent must be the client that authenticated.
    if let Some(claimed) = &req.client_id {
        if *claimed != client.spiffe_id {
            return Err(err(
                Code::InvalidClient,
                format!(
                    "client_id names {claimed} but the client authenticated as {}",
                    client.spiffe_id
                ),
            ));
        }
    }

    // 3. Reserved and revoked identities.
    refuse_reserved(core, &client.spiffe_id)?;
    refuse_revoked(
        core,
        &client.spiffe_id,
        seen.node.as_deref(),
        client.issued_at,
        Code::UnauthorizedClient,
        "the client",
    )?;
    let mut chain = ActChain::empty();
    if let Some(s) = &subject {
        // The subject token must still be active, by the checks introspection makes
        // (its subject, client and actors not revoked; its grant not deleted): a token
        // a resource server would now refuse is not exchanged for a fresh one.
        if let Some(why) = super::introspect::inactive_reason(core, s)? {
            return Err(err(
                Code::InvalidGrant,
                format!("the subject token is no longer active: {why}"),
            ));
        }
        if s.sub == client.spiffe_id || s.act.contains(&client.spiffe_id) {
            return Err(err(Code::InvalidRequest, format!(
                "{} is already in the subject token's chain: an identity does not act for itself", client.spiffe_id)));
        }
        may_act_allows(
            s.may_act.as_ref().map(|m| json!({"sub": m})).as_ref(),
            &client.spiffe_id,
        )?;
        chain = s.act.with_newest(&client.spiffe_id);
        if chain.depth() > cfg.max_delegation_depth {
            return Err(err(Code::UnauthorizedClient, format!(
                "the chain would have {} actors; this server allows at most {} (max_delegation_depth)",
                chain.depth(), cfg.max_delegation_depth)));
        }
        seen.chain = chain.iter().map(str::to_string).collect();
    }
    if let Some(m) = &req.may_act {
        if !m.starts_with("spiffe://") || m.len() > 2048 {
            return Err(err(Code::InvalidRequest, "may_act must be a SPIFFE ID"));
        }
    }
    // Who may act next. A delegated token keeps its subject's restriction: a chain only
    // narrows, so a may_act asked for must lie within it (the same ID, or one of its
    // instances); without one, the request may add one.
    let inherited = subject.as_ref().and_then(|s| s.may_act.clone());
    let may_act = match (inherited, &req.may_act) {
        (Some(held), Some(asked)) if !covers(&held, asked) => {
            return Err(err(
                Code::InvalidRequest,
                format!(
                    "may_act {asked} is wider than the subject token's may_act {held}: a delegated token only narrows who may act"
                ),
            ))
        }
        (_, Some(asked)) => Some(asked.clone()),
        (held, None) => held,
    };

    // 4. What a grant allows, narrowed by the subject token.
    let audience = req.target.as_str().to_string();
    let subject_scopes = subject.as_ref().map(|s| &s.scope);
    let (grant, scopes) = choose_grant(
        core,
        &client,
        &audience,
        req.scope.as_ref(),
        subject_scopes,
        delegation,
    )?;
    seen.grant = Some(grant.id.clone());
    if let Some(s) = &subject {
        // The subject's token was for one audience; a delegate obtains a token for the
        // same target only: a deputy cannot turn a token for one tool into another's.
        if s.aud != audience {
            return Err(err(Code::InvalidTarget, format!(
                "the subject token is for {}, not {audience}: a delegated token keeps its audience", s.aud)));
        }
    }

    // 5. Lifetime: the grant's, never past the client's credential, the subject token
    // or the JWT authority.
    let ttl = if grant.ttl_seconds > 0 {
        grant.ttl_seconds
    } else {
        cfg.default_ttl_seconds
    };
    let ttl = ttl.min(cfg.max_ttl_seconds);
    let mut exp = (t + ttl).min(client.credential_exp);
    if let Some(s) = &subject {
        exp = exp.min(s.exp);
    }
    let jwt = core.authorities.jwt();
    exp = exp.min(jwt.record().not_after);
    if exp <= t {
        return Err(err(
            Code::InvalidGrant,
            "the credentials presented expire now: renew the SVID and ask again",
        ));
    }
    let sub = subject
        .as_ref()
        .map_or_else(|| client.spiffe_id.clone(), |s| s.sub.clone());
    seen.subject = Some(sub.clone());

    // 6. The issuance policy, when configured.
    let node_facts_value = client.node.as_ref().map(node_facts);
    if let Some(policy) = &core.policy {
        let mut extra = Map::new();
        extra.insert("audience".into(), json!(audience));
        extra.insert("scopes".into(), json!(scopes.to_vec()));
        extra.insert("client_id".into(), json!(client.spiffe_id));
        extra.insert("chain".into(), json!(chain.iter().collect::<Vec<_>>()));
        extra.insert("depth".into(), json!(chain.depth()));
        let agent = client
            .node
            .as_ref()
            .map_or("unknown", |n| n.spiffe_id.as_str());
        let method = client.node.as_ref().map_or("", |n| n.method.as_str());
        policy
            .authorize(
                crate::policy::Action::Exchange,
                &crate::policy::Facts {
                    agent,
                    method,
                    node_selectors: client
                        .node
                        .iter()
                        .flat_map(|n| n.selectors.iter().map(|s| s.to_string()))
                        .collect(),
                    spiffe_id: &sub,
                    ttl: exp - t,
                    entry: None,
                    now: t,
                    extra: Some(extra),
                },
            )
            .map_err(|e| err(Code::UnauthorizedClient, e.to_string()))?;
    }

    // 7. How often (least agency), then sign. Each party's node is recorded, whatever
    // node_claims says, so a node revocation follows its workloads through delegation.
    take_rate(&grant, &client.spiffe_id, t)?;
    let mut nodes = subject
        .as_ref()
        .map(|s| s.nodes.clone())
        .unwrap_or_default();
    if let Some(n) = &client.node {
        nodes.insert(client.spiffe_id.clone(), n.spiffe_id.clone());
    }
    let access = AccessToken {
        iss: issuer.clone(),
        sub: sub.clone(),
        aud: audience.clone(),
        client_id: client.spiffe_id.clone(),
        scope: scopes.clone(),
        jti: token::new_jti()?,
        iat: t,
        exp,
        cnf_x5t_s256: client.x5t.clone(),
        act: chain.clone(),
        may_act,
        grant: grant.id.clone(),
        node: if cfg.node_claims {
            node_facts_value
        } else {
            None
        },
        nodes,
    };
    let kid = jwt.record().id.clone();
    let signed = token::encode(&kid, &access, |msg| {
        jwt.sign_jws(msg, t).map_err(|e| server_error(&e))
    })?;
    let receipt = json!({"type": "token_exchanged", "jti": access.jti, "subject": sub,
        "client": client.spiffe_id, "auth": client.method.as_str(), "chain": seen.chain,
        "audience": audience, "scope": scopes.to_string(), "grant": grant.id,
        "node": seen.node, "policy": if core.policy.is_some() { "permit" } else { "none" },
        "bound": client.x5t.is_some(), "iat": t, "exp": exp, "authority": kid});
    tracing::info!(event = "token_exchanged", subject = %sub, client = %client.spiffe_id,
        audience = %audience, scope = %scopes, grant = %grant.id, depth = chain.depth(), exp,
        "access token issued");
    Ok((
        TokenResponse {
            access_token: signed,
            issued_token_type: ACCESS_TOKEN_TYPE,
            token_type: "Bearer",
            expires_in: exp - t,
            scope: scopes.to_string(),
        },
        receipt,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::chain::covers;
    use super::{mtls_client, server_error, Code};

    /// A workload SVID of a tainted authority authenticates no token endpoint caller:
    /// whoever holds that key could sign any workload's ID.
    #[test]
    fn a_workload_svid_of_a_tainted_authority_is_no_client() {
        let (_dir, core, _, agent) = crate::core::testing::core_with_agent();
        let entry = core
            .create_entry(&ztid_proto::node::Entry {
                spiffe_id: "spiffe://example.org/w".into(),
                parent_id: agent.record.spiffe_id.clone(),
                selectors: vec![ztid_proto::node::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                ..Default::default()
            })
            .unwrap()
            .id;
        let id = "spiffe://example.org/w/0123456789abcdef0123456789abcdef";
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().der().to_vec();
        let (_, signed) = core.sign_workload_svid(&agent, &entry, &csr).unwrap();
        let leaf = signed.chain.first().unwrap().clone();
        let t = crate::core::now();
        assert!(mtls_client(&core, &leaf, t).is_ok());
        let old = core.authorities.x509().record().id.clone();
        core.prepare_authority(crate::authority::Kind::X509, "test")
            .unwrap();
        core.activate_authority(crate::authority::Kind::X509, "test")
            .unwrap();
        assert!(mtls_client(&core, &leaf, t).is_ok(), "rotated, not tainted");
        core.taint_authority(crate::authority::Kind::X509, &old, "test")
            .unwrap();
        let Err(e) = mtls_client(&core, &leaf, t) else {
            panic!("a tainted authority's SVID was a client");
        };
        assert_eq!(e.code, Code::InvalidClient);
        assert!(e.description.contains("tainted"), "{e}");
    }

    #[test]
    fn internal_errors_reach_the_client_without_their_details() {
        let secret = "/var/lib/ztid/keys/jwt-1.pem: permission denied";
        let e = server_error(&crate::Error::Precondition(secret.into()));
        assert_eq!(e.code, Code::ServerError);
        assert!(!e.description.contains(secret), "{e}");
        assert!(e.description.contains("the server's log"), "{e}");
        let e = server_error(&crate::Error::Store(crate::StoreError::Unreachable(
            format!("postgres://ztid:{secret}@db"),
        )));
        assert_eq!(e.code, Code::TemporarilyUnavailable);
        assert!(!e.description.contains(secret), "{e}");
        assert_eq!(e.description, "the datastore is unreachable: retry later");
    }

    #[test]
    fn covers_is_the_grant_rule() {
        // The grant rule the exchange relies on (chain.rs owns it), the same as the
        // grants' own (core/grants.rs).
        let instance = "spiffe://td/app/0123456789abcdef0123456789abcdef";
        for id in [
            instance,
            "spiffe://td/app/abc",
            "spiffe://td/app/abc/def",
            "spiffe://td/apple",
        ] {
            assert_eq!(
                covers("spiffe://td/app", id),
                crate::core::grants::grant_covers("spiffe://td/app", id),
                "{id}"
            );
        }
        assert!(covers("spiffe://td/app", instance));
        assert!(!covers("spiffe://td/app", "spiffe://td/app/abc"));
    }
}
