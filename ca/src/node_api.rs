//! The node API (gRPC over mutual TLS): thin glue from `ztid.node.v1.Node` to [`CaCore`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use ztid_agent_attestor::node_attestation::VerifierStep;
use ztid_proto::node::{self as pb, node_server::Node};

use crate::core::{AuthenticatedAgent, CaCore};
use crate::entries::to_proto;
use crate::Error;

/// How long the server waits for each attestation message.
const ATTEST_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Most requests in one batch.
const MAX_BATCH: usize = 1000;

/// The node API service.
pub struct NodeApi {
    core: Arc<CaCore>,
}

impl NodeApi {
    /// A service over `core`.
    pub fn new(core: Arc<CaCore>) -> Self {
        Self { core }
    }

    fn agent<T>(&self, req: &Request<T>) -> Result<AuthenticatedAgent, Status> {
        let certs = req.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        self.core.authenticate_agent(leaf).map_err(|e| {
            tracing::warn!(event = "node_api_refused", reason = %e, "node API call refused");
            crate::metrics::node_api_refused(&e);
            let _ = self.core.record(
                serde_json::json!({"type": "node_api_refused", "reason": e.to_string(),
                "peer_serial": leaf.and_then(|l| ztid_agent_attestor::svid::serial_hex(l).ok())}),
            );
            Status::from(e)
        })
    }
}

async fn next_message(
    inbound: &mut Streaming<pb::AttestRequest>,
) -> Result<pb::attest_request::Step, Status> {
    match tokio::time::timeout(ATTEST_STEP_TIMEOUT, inbound.message()).await {
        Err(_) => Err(Status::deadline_exceeded(
            "attestation timed out waiting for the agent",
        )),
        Ok(Err(s)) => Err(s),
        Ok(Ok(None)) => Err(Status::cancelled("agent closed the attestation stream")),
        Ok(Ok(Some(m))) => m
            .step
            .ok_or_else(|| Status::invalid_argument("attestation message without a step")),
    }
}

async fn run_attestation(
    core: Arc<CaCore>,
    mut inbound: Streaming<pb::AttestRequest>,
    tx: &mpsc::Sender<Result<pb::AttestResponse, Status>>,
) -> Result<pb::AttestResponse, Status> {
    let pb::attest_request::Step::Init(init) = next_message(&mut inbound).await? else {
        return Err(Status::invalid_argument(
            "attestation must start with AttestInit",
        ));
    };
    let method = init.method.clone();
    let refuse = |e: Error| {
        tracing::warn!(event = "node_attestation_refused", method = %method, reason = %e, "node attestation refused");
        crate::metrics::attestation_refused(&method, &e);
        let _ = core.record(serde_json::json!({"type": "node_attestation_refused", "method": method, "reason": e.to_string()}));
        Status::from(e)
    };
    let agent_key = CaCore::csr_public_key(&init.csr).map_err(refuse)?;
    let verifier = core.verifier(&init.method).map_err(refuse)?;
    let mut step = verifier
        .start(&init.payload, &core.attestation_context(&agent_key))
        .map_err(|e| refuse(e.into()))?;
    let node = loop {
        match step {
            VerifierStep::Attested(node) => break node,
            VerifierStep::Challenge(challenge, session) => {
                let msg = pb::AttestResponse {
                    step: Some(pb::attest_response::Step::Challenge(challenge)),
                };
                tx.send(Ok(msg))
                    .await
                    .map_err(|_| Status::cancelled("agent went away"))?;
                let pb::attest_request::Step::ChallengeResponse(answer) =
                    next_message(&mut inbound).await?
                else {
                    return Err(refuse(Error::InvalidArgument(
                        "expected a challenge response".into(),
                    )));
                };
                step = session
                    .resume(&answer, &core.attestation_context(&agent_key))
                    .map_err(|e| refuse(e.into()))?;
            }
        }
    };
    let (record, leaf) = core
        .complete_attestation(&node, &init.csr)
        .map_err(refuse)?;
    crate::metrics::attestation_passed(&record.method);
    let bundle = core.bundle();
    Ok(pb::AttestResponse {
        step: Some(pb::attest_response::Step::Result(pb::AttestResult {
            spiffe_id: record.spiffe_id,
            svid_chain: leaf.chain,
            bundle: Some(bundle.as_ref().into()),
            selectors: record.selectors.iter().map(Into::into).collect(),
        })),
    })
}

#[tonic::async_trait]
impl Node for NodeApi {
    type AttestStream = ReceiverStream<Result<pb::AttestResponse, Status>>;

    async fn attest(
        &self,
        request: Request<Streaming<pb::AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let core = self.core.clone();
        tokio::spawn(async move {
            let result = run_attestation(core, inbound, &tx).await;
            let _ = tx.send(result).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew_agent(
        &self,
        request: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let agent = self.agent(&request)?;
        let leaf = self.core.renew_agent(&agent, &request.get_ref().csr)?;
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::RenewAgentResponse {
            svid_chain: leaf.chain,
        }))
    }

    async fn sign_x509_svids(
        &self,
        request: Request<pb::SignX509SvidsRequest>,
    ) -> Result<Response<pb::SignX509SvidsResponse>, Status> {
        let agent = self.agent(&request)?;
        let reqs = &request.get_ref().requests;
        if reqs.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} CSRs per batch"
            )));
        }
        let results = reqs
            .iter()
            .map(|r| {
                let result = match self.core.sign_workload_svid(&agent, &r.entry_id, &r.csr) {
                    Ok((spiffe_id, leaf)) => pb::svid_result::Result::Svid(pb::X509Svid {
                        spiffe_id,
                        cert_chain: leaf.chain,
                        expires_at: leaf.not_after,
                    }),
                    Err(e) => {
                        tracing::warn!(event = "x509_svid_refused", agent = %agent.record.spiffe_id, entry = %r.entry_id, reason = %e, "CSR refused");
                        crate::metrics::node_api_refused(&e);
                        let _ = self.core.record(serde_json::json!({"type": "x509_svid_refused", "agent": agent.record.spiffe_id, "entry": r.entry_id, "reason": e.to_string()}));
                        pb::svid_result::Result::Error(e.to_string())
                    }
                };
                pb::SvidResult { result: Some(result) }
            })
            .collect();
        // No SVID leaves before its audit record is durable (one sync for the batch).
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::SignX509SvidsResponse { results }))
    }

    async fn mint_jwt_svids(
        &self,
        request: Request<pb::MintJwtSvidsRequest>,
    ) -> Result<Response<pb::MintJwtSvidsResponse>, Status> {
        let agent = self.agent(&request)?;
        let reqs = &request.get_ref().requests;
        if reqs.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} JWT requests per batch"
            )));
        }
        let results = reqs
            .iter()
            .map(|r| {
                let result = match self.core.mint_jwt_svid(&agent, &r.entry_id, &r.spiffe_id, &r.audience) {
                    Ok((token, expires_at)) => pb::jwt_result::Result::Svid(pb::JwtSvid {
                        spiffe_id: r.spiffe_id.clone(),
                        token,
                        expires_at,
                    }),
                    Err(e) => {
                        tracing::warn!(event = "jwt_svid_refused", agent = %agent.record.spiffe_id, entry = %r.entry_id, reason = %e, "JWT-SVID refused");
                        crate::metrics::node_api_refused(&e);
                        let _ = self.core.record(serde_json::json!({"type": "jwt_svid_refused", "agent": agent.record.spiffe_id, "entry": r.entry_id, "reason": e.to_string()}));
                        pb::jwt_result::Result::Error(e.to_string())
                    }
                };
                pb::JwtResult { result: Some(result) }
            })
            .collect();
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::MintJwtSvidsResponse { results }))
    }

    async fn sync_entries(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        let agent = self.agent(&request)?;
        let req = request.get_ref();
        let sync =
            self.core
                .sync_entries(&agent, req.since_revision, req.authorities_in_use.clone())?;
        let bundle = self.core.bundle();
        let federated = self
            .core
            .federated_for_sync(req.federated_bundles_version)?;
        let (federated_bundles, federated_bundles_version) = match federated {
            Some((all, v)) => (all.iter().map(Into::into).collect(), v),
            None => (Vec::new(), 0),
        };
        Ok(Response::new(pb::SyncEntriesResponse {
            federated_bundles,
            federated_bundles_version,
            full: sync.full,
            upserted: sync.upserted.iter().map(to_proto).collect(),
            deleted: sync.deleted,
            revision: sync.revision,
            bundle: (req.bundle_sequence < bundle.sequence).then(|| bundle.as_ref().into()),
        }))
    }

    async fn fetch_bundle(
        &self,
        request: Request<pb::FetchBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.agent(&request)?;
        Ok(Response::new(self.core.bundle().as_ref().into()))
    }
}
