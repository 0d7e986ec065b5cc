//! The token exchange's refusals, through `sts::exchange::token` and
//! `sts::introspect::introspect` on a real core (no listener): delegation only narrows
//! who may act, a subject token must still be active, grants cover instances only,
//! `client_id` is the authenticated client's, introspection callers are checked as
//! token callers are, credentials must say when they were issued, and node revocations
//! follow each party through delegation.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs,
    reason = "integration test: a panic is a failed test"
)]

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::{json, Map, Value};
use ztid_ca::authority::LeafTemplate;
use ztid_ca::config::{ServerConfig, StsConfig};
use ztid_ca::core::{now, CaCore};
use ztid_ca::datastore::{AgentRecord, GrantRecord, RevocationKind};
use ztid_ca::sts::{OAuthError, OAuthErrorCode as Code};

const S: &str = "spiffe://example.org/user";
const A: &str = "spiffe://example.org/agent-a";
const B: &str = "spiffe://example.org/agent-b";
const C: &str = "spiffe://example.org/agent-c";
/// One per-instance segment (32 lowercase hex characters), as agents mint them.
const INSTANCE: &str = "0123456789abcdef0123456789abcdef";
const NODE: &str = "spiffe://example.org/ztid/agent/join_token/n1";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const AT: &str = "urn:ietf:params:oauth:token-type:access_token";
const TE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

struct Sts {
    _dir: tempfile::TempDir,
    core: Arc<CaCore>,
    issuer: String,
}

fn open() -> Sts {
    open_with(true)
}

fn open_with(node_claims: bool) -> Sts {
    let dir = tempfile::tempdir().unwrap();
    let mut sts = StsConfig::on("127.0.0.1:8443".parse().unwrap());
    sts.node_claims = node_claims;
    let issuer = sts.issuer();
    let core = CaCore::open(ServerConfig {
        trust_domain: "example.org".into(),
        data_dir: dir.path().into(),
        audit_enabled: false,
        sts: Some(sts),
        ..Default::default()
    })
    .unwrap();
    Sts {
        _dir: dir,
        core,
        issuer,
    }
}

impl Sts {
    fn grant_scopes(&self, id: &str, delegate: bool, scopes: Vec<String>) -> GrantRecord {
        self.core
            .create_grant(
                &GrantRecord {
                    id: String::new(),
                    spiffe_id: id.into(),
                    audience: "tool".into(),
                    scopes,
                    ttl_seconds: 0,
                    max_per_minute: 0,
                    node_selectors: vec![],
                    may_delegate: delegate,
                    created_at: 0,
                },
                "test",
            )
            .unwrap()
    }

    fn grant(&self, id: &str, delegate: bool) -> GrantRecord {
        self.grant_scopes(id, delegate, vec!["read".into()])
    }

    /// A JWT-SVID of `id` for the issuer.
    fn svid(&self, id: &str) -> String {
        self.core
            .authorities
            .jwt()
            .mint(id, std::slice::from_ref(&self.issuer), 300, now())
            .unwrap()
            .0
    }

    /// An X509-SVID (leaf DER) of `id`, naming `node` when given.
    fn leaf(&self, id: &str, node: Option<&str>) -> Vec<u8> {
        let kp = rcgen::KeyPair::generate().unwrap();
        let signed = self
            .core
            .authorities
            .x509()
            .sign_leaf(
                &kp,
                &LeafTemplate {
                    spiffe_id: id.into(),
                    dns_names: vec![],
                    ip_addresses: vec![],
                    node: node.map(str::to_string),
                    ttl_seconds: 600,
                },
                now(),
            )
            .unwrap();
        signed.chain.into_iter().next().unwrap()
    }

    async fn exchange(
        &self,
        peer: Option<&[u8]>,
        params: &[(&str, &str)],
    ) -> Result<String, OAuthError> {
        let mut body = format!("grant_type={}&audience=tool", enc(TE));
        for (k, v) in params {
            body.push_str(&format!("&{k}={}", enc(v)));
        }
        ztid_ca::sts::exchange::token(&self.core, peer, body.as_bytes())
            .await
            .map(|r| r.access_token)
    }

    /// `id`'s own token (its JWT-SVID as subject_token), with `extra` parameters.
    async fn own_token(&self, id: &str, extra: &[(&str, &str)]) -> Result<String, OAuthError> {
        let jwt = self.svid(id);
        let mut params = vec![("subject_token", jwt.as_str()), ("subject_token_type", JWT)];
        params.extend_from_slice(extra);
        self.exchange(None, &params).await
    }

    /// `actor` acts for `subject_token` (its JWT-SVID as actor_token), with `extra`.
    async fn act(
        &self,
        actor: &str,
        subject_token: &str,
        extra: &[(&str, &str)],
    ) -> Result<String, OAuthError> {
        let jwt = self.svid(actor);
        let mut params = vec![
            ("subject_token", subject_token),
            ("subject_token_type", AT),
            ("actor_token", jwt.as_str()),
            ("actor_token_type", JWT),
        ];
        params.extend_from_slice(extra);
        self.exchange(None, &params).await
    }

    async fn introspect(&self, caller: &[u8], token: &str) -> Result<Value, OAuthError> {
        let body = format!("token={token}");
        ztid_ca::sts::introspect::introspect(&self.core, Some(caller), body.as_bytes()).await
    }

    fn put_agent(&self, banned: bool) {
        self.put_node(NODE, banned);
    }

    fn put_node(&self, node: &str, banned: bool) {
        let rec: AgentRecord = serde_json::from_value(json!({
            "spiffe_id": node, "method": "join_token", "selectors": [], "granted_aliases": [],
            "aliases": [], "serial": "01", "previous_serial": null, "previous_expires_at": 0,
            "expires_at": now() + 3600, "banned": banned, "attested_at": now(), "evidence_digest": "00"
        }))
        .unwrap();
        self.core.store.put_agent(&rec).unwrap();
    }
}

fn enc(s: &str) -> String {
    s.replace('%', "%25")
        .replace(':', "%3A")
        .replace('/', "%2F")
        .replace(' ', "%20")
        .replace('+', "%2B")
        .replace('=', "%3D")
}

fn claims(token: &str) -> Value {
    let c = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64.decode(c).unwrap()).unwrap()
}

fn refused<T: std::fmt::Debug>(r: Result<T, OAuthError>, code: Code, phrase: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.code, code, "{e}");
    assert!(e.description.contains(phrase), "{phrase:?} not in {e}");
}

#[tokio::test]
async fn a_delegated_token_keeps_its_subjects_may_act() {
    let sts = open();
    sts.grant(S, false);
    sts.grant(A, true);
    sts.grant(B, true);
    let t0 = sts.own_token(S, &[("may_act", A)]).await.unwrap();
    let t1 = sts.act(A, &t0, &[]).await.unwrap();
    assert_eq!(claims(&t1)["may_act"], json!({"sub": A}));
    // B, whom the subject never named, cannot act through A's token.
    refused(
        sts.act(B, &t1, &[]).await,
        Code::InvalidGrant,
        &format!("may_act does not name {B}"),
    );
}

#[tokio::test]
async fn delegation_cannot_widen_or_replace_may_act() {
    let sts = open();
    sts.grant(S, false);
    sts.grant(A, true);
    sts.grant(B, true);
    let t0 = sts.own_token(S, &[("may_act", A)]).await.unwrap();
    refused(
        sts.act(A, &t0, &[("may_act", B)]).await,
        Code::InvalidRequest,
        &format!("may_act {B} is wider than the subject token's may_act {A}"),
    );
    // Narrower (one instance of the named ID) is allowed, and carried.
    let a1 = format!("{A}/{INSTANCE}");
    let t1 = sts.act(A, &t0, &[("may_act", &a1)]).await.unwrap();
    assert_eq!(claims(&t1)["may_act"], json!({"sub": a1}));
    // Still only within what the subject named.
    refused(
        sts.act(B, &t1, &[]).await,
        Code::InvalidGrant,
        &format!("may_act does not name {B}"),
    );
}

#[tokio::test]
async fn delegation_may_add_may_act_when_the_subject_had_none() {
    let sts = open();
    sts.grant(S, false);
    sts.grant(A, true);
    sts.grant(B, true);
    sts.grant(C, true);
    let t0 = sts.own_token(S, &[]).await.unwrap();
    let t1 = sts.act(A, &t0, &[("may_act", B)]).await.unwrap();
    assert_eq!(claims(&t1)["may_act"], json!({"sub": B}));
    refused(
        sts.act(C, &t1, &[]).await,
        Code::InvalidGrant,
        &format!("may_act does not name {C}"),
    );
    let t2 = sts.act(B, &t1, &[]).await.unwrap();
    assert_eq!(claims(&t2)["may_act"], json!({"sub": B}));
}

#[tokio::test]
async fn a_subject_token_whose_grant_was_deleted_is_not_exchanged() {
    let sts = open();
    let gs = sts.grant(S, false);
    sts.grant(A, true);
    let t0 = sts.own_token(S, &[]).await.unwrap();
    assert!(sts.act(A, &t0, &[]).await.is_ok());
    sts.core.delete_grant(&gs.id, "test").unwrap();
    refused(
        sts.act(A, &t0, &[]).await,
        Code::InvalidGrant,
        &format!(
            "the subject token is no longer active: grant {} was deleted",
            gs.id
        ),
    );
}

#[tokio::test]
async fn a_subject_token_of_a_revoked_subject_is_not_exchanged() {
    let sts = open();
    let s1 = format!("{S}/{INSTANCE}");
    sts.grant(S, false);
    sts.grant(A, true);
    let t0 = sts.own_token(&s1, &[]).await.unwrap();
    sts.core
        .revoke(RevocationKind::Instance, &s1, "leaked", "test")
        .unwrap();
    refused(
        sts.act(A, &t0, &[]).await,
        Code::InvalidGrant,
        &format!("the subject token is no longer active: {s1} was revoked by an operator"),
    );
}

#[tokio::test]
async fn a_grant_covers_the_instances_of_its_id_and_no_other_entry_below_it() {
    let sts = open();
    let app = "spiffe://example.org/app";
    sts.grant(app, false);
    let child = format!("{app}/reports");
    assert!(
        ztid_ca::entries::parse_claimable_id(&sts.core.trust_domain, "spiffe_id", &child).is_ok()
    );
    refused(
        sts.own_token(&child, &[]).await,
        Code::InvalidTarget,
        &format!("no grant lets {child} obtain tokens for tool"),
    );
    let instance = format!("{app}/{INSTANCE}");
    let t = sts.own_token(&instance, &[]).await.unwrap();
    assert_eq!(claims(&t)["sub"], instance.as_str());
}

#[tokio::test]
async fn may_act_names_the_instances_of_its_id_and_no_other_entry_below_it() {
    let sts = open();
    sts.grant(S, false);
    let reports = format!("{A}/reports");
    sts.grant(&reports, true);
    sts.grant(A, true);
    let t0 = sts.own_token(S, &[("may_act", A)]).await.unwrap();
    refused(
        sts.act(&reports, &t0, &[]).await,
        Code::InvalidGrant,
        &format!("may_act does not name {reports}"),
    );
    assert!(sts.act(&format!("{A}/{INSTANCE}"), &t0, &[]).await.is_ok());
}

#[tokio::test]
async fn a_client_id_other_than_the_authenticated_client_is_refused() {
    let sts = open();
    sts.grant(S, false);
    sts.grant(A, true);
    refused(
        sts.own_token(S, &[("client_id", A)]).await,
        Code::InvalidClient,
        &format!("client_id names {A} but the client authenticated as {S}"),
    );
    let t = sts.own_token(S, &[("client_id", S)]).await.unwrap();
    assert_eq!(claims(&t)["client_id"], S);
    // Delegating, the client is the actor.
    refused(
        sts.act(A, &t, &[("client_id", S)]).await,
        Code::InvalidClient,
        &format!("client_id names {S} but the client authenticated as {A}"),
    );
    assert!(sts.act(A, &t, &[("client_id", A)]).await.is_ok());
}

#[tokio::test]
async fn introspection_refuses_a_revoked_caller() {
    let sts = open();
    sts.grant(S, false);
    let t = sts.own_token(S, &[]).await.unwrap();
    let rs = format!("spiffe://example.org/rs/{INSTANCE}");
    let caller = sts.leaf(&rs, None);
    assert_eq!(sts.introspect(&caller, &t).await.unwrap()["active"], true);
    sts.core
        .revoke(RevocationKind::Instance, &rs, "leaked", "test")
        .unwrap();
    refused(
        sts.introspect(&caller, &t).await,
        Code::UnauthorizedClient,
        &format!("the client {rs} was revoked by an operator"),
    );
}

#[tokio::test]
async fn introspection_refuses_a_caller_on_a_banned_or_unknown_node() {
    let sts = open();
    sts.grant(S, false);
    let t = sts.own_token(S, &[]).await.unwrap();
    let caller = sts.leaf("spiffe://example.org/rs", Some(NODE));
    refused(
        sts.introspect(&caller, &t).await,
        Code::UnauthorizedClient,
        "is no longer attested (evicted)",
    );
    sts.put_agent(false);
    assert_eq!(sts.introspect(&caller, &t).await.unwrap()["active"], true);
    sts.put_agent(true);
    refused(
        sts.introspect(&caller, &t).await,
        Code::UnauthorizedClient,
        &format!("the node of spiffe://example.org/rs, {NODE}, is banned"),
    );
}

#[tokio::test]
async fn introspection_refuses_a_ztid_identity() {
    let sts = open();
    sts.grant(S, false);
    let t = sts.own_token(S, &[]).await.unwrap();
    let caller = sts.leaf("spiffe://example.org/ztid/admin/ops", None);
    refused(
        sts.introspect(&caller, &t).await,
        Code::UnauthorizedClient,
        "is a ztid identity",
    );
}

#[tokio::test]
async fn a_jwt_svid_without_iat_is_refused() {
    let sts = open();
    sts.grant(S, false);
    let jwt = sts.core.authorities.jwt();
    let mut c = Map::new();
    c.insert("sub".into(), json!(S));
    c.insert("aud".into(), json!([sts.issuer]));
    c.insert("exp".into(), json!(now() + 300));
    let no_iat =
        ztid_spiffe::jwt::encode_es256(&jwt.record().id, &c, |m| jwt.sign_jws(m, now())).unwrap();
    refused(
        sts.exchange(
            None,
            &[("subject_token", &no_iat), ("subject_token_type", JWT)],
        )
        .await,
        Code::InvalidClient,
        "the subject_token has no integer iat claim",
    );
    // The same credential with iat is accepted.
    c.insert("iat".into(), json!(now()));
    let with_iat =
        ztid_spiffe::jwt::encode_es256(&jwt.record().id, &c, |m| jwt.sign_jws(m, now())).unwrap();
    assert!(sts
        .exchange(
            None,
            &[("subject_token", &with_iat), ("subject_token_type", JWT)]
        )
        .await
        .is_ok());
}

#[tokio::test]
async fn a_token_too_long_to_present_back_is_not_issued() {
    let sts = open();
    // The most scopes a grant holds, each as long as a scope may be: stored as a grant
    // made before their total was bounded (`create_grant` now refuses it), straight
    // into the datastore, which the exchange reads.
    let scopes = (0..64)
        .map(|i| format!("s{i:02}{}", "x".repeat(125)))
        .collect();
    sts.core
        .store
        .put_grant(&GrantRecord {
            id: "grant-from-before-the-bound".into(),
            spiffe_id: S.into(),
            audience: "tool".into(),
            scopes,
            ttl_seconds: 0,
            max_per_minute: 0,
            node_selectors: vec![],
            may_delegate: false,
            created_at: now(),
        })
        .unwrap();
    refused(
        sts.own_token(S, &[]).await,
        Code::InvalidRequest,
        "more than the 8192 this server accepts back",
    );
}

/// A node revocation reaches, through every hop, the tokens its workloads took part in:
/// the subject's node and each actor's, whether or not tokens carry node facts.
async fn node_revocation_follows_each_party(node_claims: bool) {
    const NODE_A: &str = "spiffe://example.org/ztid/agent/join_token/n2";
    let sts = open_with(node_claims);
    sts.put_agent(false);
    sts.put_node(NODE_A, false);
    sts.grant(S, false);
    sts.grant(A, true);
    sts.grant(B, true);
    sts.grant(C, true);
    let rs = sts.leaf("spiffe://example.org/rs", None);
    let active = |v: Value| v["active"].as_bool().unwrap();
    // S through NODE; A acts through NODE_A (mTLS); B acts by JWT-SVID (no node).
    let t0 = sts
        .exchange(Some(&sts.leaf(S, Some(NODE))), &[])
        .await
        .unwrap();
    let a_leaf = sts.leaf(A, Some(NODE_A));
    let t1 = sts
        .exchange(
            Some(&a_leaf),
            &[("subject_token", &t0), ("subject_token_type", AT)],
        )
        .await
        .unwrap();
    let t2 = sts.act(B, &t1, &[]).await.unwrap();
    assert_eq!(
        claims(&t2)["ztid_nodes"],
        json!({S: NODE, A: NODE_A}),
        "node_claims = {node_claims}"
    );
    // Revocations count what was issued before them (whole seconds).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    sts.core
        .revoke(RevocationKind::Node, NODE_A, "compromised", "test")
        .unwrap();
    // The actor's node: the tokens it acted in, not the subject's own.
    assert!(active(sts.introspect(&rs, &t0).await.unwrap()));
    assert!(!active(sts.introspect(&rs, &t1).await.unwrap()));
    assert!(!active(sts.introspect(&rs, &t2).await.unwrap()));
    refused(
        sts.act(C, &t2, &[]).await,
        Code::InvalidGrant,
        &format!("the subject token is no longer active: {A} was revoked by an operator (node revocation of {NODE_A})"),
    );
    // The subject's node: every token for that subject, however many hops on.
    sts.core
        .revoke(RevocationKind::Node, NODE, "compromised", "test")
        .unwrap();
    assert!(!active(sts.introspect(&rs, &t0).await.unwrap()));
    refused(
        sts.act(C, &t0, &[]).await,
        Code::InvalidGrant,
        &format!("the subject token is no longer active: {S} was revoked by an operator (node revocation of {NODE})"),
    );
}

#[tokio::test]
async fn a_node_revocation_follows_each_party_through_delegation() {
    node_revocation_follows_each_party(true).await;
}

#[tokio::test]
async fn a_node_revocation_follows_each_party_without_node_claims() {
    node_revocation_follows_each_party(false).await;
}
