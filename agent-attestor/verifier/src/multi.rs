//! `multi` node attestation, CA side: runs each factor's verifier in step and combines
//! them (see `ztid_attestation::multi` for the protocol and the binding rules).

use std::collections::BTreeSet;
use std::sync::Arc;

pub use ztid_attestation::multi::*;
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{KeyMismatch, Malformed, PolicyMismatch, Replay, Unsupported};
use ztid_spiffe::Selector;

use crate::{AttestationContext, AttestedNode, NodeVerifier, VerificationSession, VerifierStep};

// ---------------------------------------------------------------------------------------
// CA side

/// Verifies several methods at once with the server's single-method verifiers.
pub struct MultiVerifier {
    factors: Vec<Arc<dyn NodeVerifier>>,
    required: BTreeSet<String>,
    bind_vtpm: bool,
}

impl MultiVerifier {
    /// Combines the configured hardware verifiers; `required` lists methods every
    /// attempt must include (`[attestors.multi] required`).
    pub fn new(
        factors: Vec<Arc<dyn NodeVerifier>>,
        required: BTreeSet<String>,
    ) -> Result<Self, Error> {
        let known: BTreeSet<&str> = factors.iter().map(|f| f.method()).collect();
        for r in &required {
            if !known.contains(r.as_str()) {
                return Err(Error::Config(format!(
                    "[attestors.multi] requires {r}, which is not configured"
                )));
            }
        }
        Ok(Self {
            factors,
            required,
            bind_vtpm: false,
        })
    }

    /// Requires the SEV-SNP factor to name the TPM factor's EK as its SVSM vTPM's
    /// (`[attestors.multi] bind_vtpm = true`); always required for an uncertified EK.
    pub fn binding_vtpm(mut self, bind: bool) -> Self {
        self.bind_vtpm = bind;
        self
    }

    /// Reads `[attestors.multi]` (`required = [...]`).
    pub fn from_config(
        config: Option<&toml::Table>,
        factors: Vec<Arc<dyn NodeVerifier>>,
    ) -> Result<Self, Error> {
        let mut required = BTreeSet::new();
        if let Some(t) = config {
            for k in t.keys() {
                if k != "required" && k != "bind_vtpm" {
                    return Err(Error::Config(format!(
                        "unknown key {k:?} in [attestors.multi] (known: required, bind_vtpm)"
                    )));
                }
            }
            if let Some(v) = t.get("required") {
                let arr = v.as_array().ok_or_else(|| {
                    Error::Config("[attestors.multi] required must be an array".into())
                })?;
                for m in arr {
                    let m = m.as_str().ok_or_else(|| {
                        Error::Config("[attestors.multi] required lists method names".into())
                    })?;
                    required.insert(m.to_string());
                }
                check_methods(required.iter().map(String::as_str))?;
            }
        }
        let bind = match config.and_then(|t| t.get("bind_vtpm")) {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => {
                return Err(Error::Config(
                    "[attestors.multi] bind_vtpm must be true or false".into(),
                ))
            }
        };
        Ok(Self::new(factors, required)?.binding_vtpm(bind))
    }

    /// The methods every attempt must present together (empty: no requirement).
    pub fn required(&self) -> &BTreeSet<String> {
        &self.required
    }

    /// Refuses a single-method attempt (`method` is not `multi`) while the server
    /// requires factors together: join tokens included, since a token proves nothing about
    /// the machine that redeems it.
    pub fn check_single(&self, method: &str) -> Result<(), Error> {
        if self.required.is_empty() || method == METHOD {
            return Ok(());
        }
        Err(refused(
            PolicyMismatch,
            format!(
                "this server requires {} together in one attestation; {method} alone is not enough",
                self.required
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        ))
    }
}

impl NodeVerifier for MultiVerifier {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn start(&self, evidence: &[u8], ctx: &AttestationContext<'_>) -> Result<VerifierStep, Error> {
        let env = parse(evidence, "evidence")?;
        check_methods(env.parts.iter().map(|p| p.method.as_str())).map_err(|e| match e {
            Error::Config(m) => refused(Malformed, m),
            other => other,
        })?;
        let presented: BTreeSet<&str> = env.parts.iter().map(|p| p.method.as_str()).collect();
        let missing: Vec<&str> = self
            .required
            .iter()
            .map(String::as_str)
            .filter(|r| !presented.contains(r))
            .collect();
        if !missing.is_empty() {
            return Err(refused(
                PolicyMismatch,
                format!(
                    "this server requires {} in every attestation; missing: {}",
                    self.required
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" and "),
                    missing.join(", ")
                ),
            ));
        }
        let mut progress = Progress {
            bind_vtpm: self.bind_vtpm,
            ..Default::default()
        };
        for p in env.parts {
            let v = self
                .factors
                .iter()
                .find(|f| f.method() == p.method)
                .ok_or_else(|| {
                    refused(
                        Unsupported,
                        format!("factor {} is not enabled on this server", p.method),
                    )
                })?;
            let step = v
                .start_as_factor(&p.data, ctx)
                .map_err(|e| in_factor(&p.method, e))?;
            progress.record(p.method, step);
        }
        progress.next()
    }
}

/// Factors done and factors waiting for an answer.
#[derive(Default)]
struct Progress {
    done: Vec<AttestedNode>,
    pending: Vec<(String, Box<dyn VerificationSession>)>,
    challenges: Vec<Part>,
    bind_vtpm: bool,
}

impl Progress {
    fn record(&mut self, method: String, step: VerifierStep) {
        match step {
            VerifierStep::Attested(n) => self.done.push(n),
            VerifierStep::Challenge(c, s) => {
                self.challenges.push(Part {
                    method: method.clone(),
                    data: c,
                });
                self.pending.push((method, s));
            }
        }
    }

    fn next(self) -> Result<VerifierStep, Error> {
        if self.pending.is_empty() {
            check_vtpm_binding(&self.done, self.bind_vtpm)?;
            return combine(self.done).map(VerifierStep::Attested);
        }
        let challenge = encode(&Envelope {
            parts: self.challenges,
        })?;
        Ok(VerifierStep::Challenge(
            challenge,
            Box::new(MultiSession {
                done: self.done,
                pending: self.pending,
                bind_vtpm: self.bind_vtpm,
            }),
        ))
    }
}

struct MultiSession {
    done: Vec<AttestedNode>,
    pending: Vec<(String, Box<dyn VerificationSession>)>,
    bind_vtpm: bool,
}

impl VerificationSession for MultiSession {
    fn resume(
        self: Box<Self>,
        answer: &[u8],
        ctx: &AttestationContext<'_>,
    ) -> Result<VerifierStep, Error> {
        let env = parse(answer, "answer")?;
        let asked: BTreeSet<&str> = self.pending.iter().map(|(m, _)| m.as_str()).collect();
        let got: BTreeSet<&str> = env.parts.iter().map(|p| p.method.as_str()).collect();
        if asked != got {
            return Err(refused(
                Replay,
                format!(
                    "multi-factor answer is for {}, the challenge was for {}",
                    got.into_iter().collect::<Vec<_>>().join(","),
                    asked.into_iter().collect::<Vec<_>>().join(",")
                ),
            ));
        }
        let mut progress = Progress {
            done: self.done,
            bind_vtpm: self.bind_vtpm,
            ..Default::default()
        };
        for (method, session) in self.pending {
            let data = env
                .parts
                .iter()
                .find(|p| p.method == method)
                .map(|p| p.data.as_slice())
                .unwrap_or_default();
            let step = session
                .resume(data, ctx)
                .map_err(|e| in_factor(&method, e))?;
            progress.record(method, step);
        }
        progress.next()
    }
}

/// The value of the first selector `kind:key:…` of a node.
fn selector_value<'a>(n: &'a AttestedNode, kind: &str, key: &str) -> Option<&'a str> {
    n.selectors
        .iter()
        .filter(|s| s.kind() == kind)
        .find_map(|s| s.value().strip_prefix(key)?.strip_prefix(':'))
}

/// The SVSM vTPM binding: when required (`bind_vtpm`) or when the TPM's EK came without
/// a certificate, the SEV-SNP report must name the TPM factor's EK as its vTPM's.
fn check_vtpm_binding(done: &[AttestedNode], required: bool) -> Result<(), Error> {
    let Some(tpm) = done.iter().find(|n| n.method == "tpm") else {
        return Ok(());
    };
    let uncertified = selector_value(tpm, "tpm", "ek-cert") == Some("none");
    if !required && !uncertified {
        return Ok(());
    }
    let why = if uncertified {
        "the TPM's EK has no certificate, so only an SEV-SNP report can vouch for it"
    } else {
        "[attestors.multi] bind_vtpm is set"
    };
    let ek = selector_value(tpm, "tpm", "ek-hash").unwrap_or_default();
    let Some(snp) = done.iter().find(|n| n.method == "sev-snp") else {
        return Err(refused(
            PolicyMismatch,
            format!("{why}, but no sev-snp factor was presented"),
        ));
    };
    match selector_value(snp, "sev-snp", "vtpm-ek-hash") {
        None => Err(refused(PolicyMismatch, format!(
            "{why}, but the SEV-SNP report carries no SVSM vTPM manifest (the agent asks for one with --sev-snp-svsm-vtpm)"
        ))),
        Some(v) if v == ek => Ok(()),
        Some(v) => Err(refused(KeyMismatch, format!(
            "the SEV-SNP report's SVSM vTPM has EK {v}, but the TPM factor's EK is {ek}: not this guest's vTPM"
        ))),
    }
}

/// The node every factor attested, as one.
fn combine(mut done: Vec<AttestedNode>) -> Result<AttestedNode, Error> {
    done.sort_by(|a, b| a.method.cmp(b.method));
    let mut id = ring::digest::Context::new(&ring::digest::SHA256);
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut selectors = BTreeSet::new();
    let mut aliases = BTreeSet::new();
    for n in &done {
        id.update(format!("{}={}\n", n.method, n.node_id).as_bytes());
        digest.update(&n.evidence_digest);
        selectors.insert(Selector::new(METHOD, &format!("method:{}", n.method))?);
        selectors.extend(n.selectors.iter().cloned());
        aliases.extend(n.aliases.iter().cloned());
    }
    let mut evidence_digest = [0u8; 32];
    evidence_digest.copy_from_slice(digest.finish().as_ref());
    Ok(AttestedNode {
        method: METHOD,
        node_id: hex::encode(id.finish()),
        selectors: selectors.into_iter().collect(),
        aliases: aliases.into_iter().collect(),
        evidence_digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztid_attestation::RefusalKind;

    /// A method that attests after `rounds` challenges, or refuses at a given round.
    struct Scripted {
        method: &'static str,
        rounds: usize,
        refuse_at: Option<usize>,
    }

    struct ScriptedSession {
        method: &'static str,
        left: usize,
        round: usize,
        refuse_at: Option<usize>,
    }

    fn step(
        method: &'static str,
        left: usize,
        round: usize,
        refuse_at: Option<usize>,
    ) -> Result<VerifierStep, Error> {
        if refuse_at == Some(round) {
            return Err(refused(PolicyMismatch, format!("round {round} refused")));
        }
        if left == 0 {
            return Ok(VerifierStep::Attested(AttestedNode {
                method,
                node_id: format!("{method}-node"),
                selectors: vec![],
                aliases: vec![format!("spiffe://td/{method}-alias")],
                evidence_digest: [round as u8; 32],
            }));
        }
        Ok(VerifierStep::Challenge(
            format!("{method}-challenge-{round}").into_bytes(),
            Box::new(ScriptedSession {
                method,
                left: left - 1,
                round: round + 1,
                refuse_at,
            }),
        ))
    }

    impl NodeVerifier for Scripted {
        fn method(&self) -> &'static str {
            self.method
        }
        fn start(
            &self,
            evidence: &[u8],
            _: &AttestationContext<'_>,
        ) -> Result<VerifierStep, Error> {
            assert_eq!(evidence, format!("{}-evidence", self.method).as_bytes());
            step(self.method, self.rounds, 0, self.refuse_at)
        }
    }

    impl VerificationSession for ScriptedSession {
        fn resume(
            self: Box<Self>,
            answer: &[u8],
            _: &AttestationContext<'_>,
        ) -> Result<VerifierStep, Error> {
            assert_eq!(
                answer,
                format!("{}-answer-{}", self.method, self.round - 1).as_bytes()
            );
            step(self.method, self.left, self.round, self.refuse_at)
        }
    }

    fn ctx() -> AttestationContext<'static> {
        AttestationContext {
            agent_public_key: b"key",
            now: std::time::SystemTime::now(),
        }
    }

    fn verifier(tpm: Scripted, snp: Scripted, required: &[&str]) -> MultiVerifier {
        MultiVerifier::new(
            vec![Arc::new(tpm), Arc::new(snp)],
            required.iter().map(|s| s.to_string()).collect(),
        )
        .unwrap()
    }

    fn scripted(method: &'static str, rounds: usize, refuse_at: Option<usize>) -> Scripted {
        Scripted {
            method,
            rounds,
            refuse_at,
        }
    }

    fn evidence(methods: &[&str]) -> Vec<u8> {
        encode(&Envelope {
            parts: methods
                .iter()
                .map(|m| Part {
                    method: m.to_string(),
                    data: format!("{m}-evidence").into_bytes(),
                })
                .collect(),
        })
        .unwrap()
    }

    /// Answers every part of a challenge the way the scripted methods expect.
    fn answer(challenge: &[u8]) -> Vec<u8> {
        let env = parse(challenge, "challenge").unwrap();
        encode(&Envelope {
            parts: env
                .parts
                .into_iter()
                .map(|p| {
                    let c = String::from_utf8(p.data).unwrap();
                    Part {
                        method: p.method,
                        data: c.replace("challenge", "answer").into_bytes(),
                    }
                })
                .collect(),
        })
        .unwrap()
    }

    fn run(v: &MultiVerifier, methods: &[&str]) -> Result<AttestedNode, Error> {
        let mut step = v.start(&evidence(methods), &ctx())?;
        loop {
            match step {
                VerifierStep::Attested(n) => return Ok(n),
                VerifierStep::Challenge(c, s) => step = s.resume(&answer(&c), &ctx())?,
            }
        }
    }

    /// The detail of a refusal of `kind`.
    fn refusal(kind: RefusalKind, r: Result<AttestedNode, Error>) -> String {
        match r {
            Err(Error::Refused(m)) if m.kind == kind => m.detail,
            other => panic!("expected a {kind} refusal, got {other:?}"),
        }
    }

    #[test]
    fn factors_with_different_round_counts_all_pass() {
        let v = verifier(scripted("tpm", 1, None), scripted("sev-snp", 3, None), &[]);
        let n = run(&v, &["sev-snp", "tpm"]).unwrap();
        assert_eq!(n.method, "multi");
        assert_eq!(n.node_id.len(), 64);
        let sels: Vec<String> = n.selectors.iter().map(|s| s.to_string()).collect();
        assert!(sels.contains(&"multi:method:tpm".to_string()), "{sels:?}");
        assert!(
            sels.contains(&"multi:method:sev-snp".to_string()),
            "{sels:?}"
        );
        assert_eq!(
            n.aliases,
            vec![
                "spiffe://td/sev-snp-alias".to_string(),
                "spiffe://td/tpm-alias".to_string()
            ]
        );
        // The order the agent lists its factors in does not change the identity.
        let again = run(&v, &["tpm", "sev-snp"]).unwrap();
        assert_eq!(again.node_id, n.node_id);
    }

    #[test]
    fn one_failing_factor_refuses_the_attempt_and_is_named() {
        let v = verifier(
            scripted("tpm", 1, Some(1)),
            scripted("sev-snp", 1, None),
            &[],
        );
        assert_eq!(
            refusal(PolicyMismatch, run(&v, &["tpm", "sev-snp"])),
            "tpm factor: round 1 refused"
        );
        let v = verifier(
            scripted("tpm", 1, None),
            scripted("sev-snp", 2, Some(0)),
            &[],
        );
        assert_eq!(
            refusal(PolicyMismatch, run(&v, &["tpm", "sev-snp"])),
            "sev-snp factor: round 0 refused"
        );
    }

    #[test]
    fn malformed_or_incomplete_attempts_are_refused() {
        let v = verifier(
            scripted("tpm", 1, None),
            scripted("sev-snp", 1, None),
            &["sev-snp", "tpm"],
        );
        assert_eq!(
            refusal(Malformed, run(&v, &["tpm"])),
            "multi-factor attestation takes 2 to 4 methods"
        );
        assert_eq!(
            refusal(Malformed, run(&v, &["tpm", "tpm"])),
            "multi-factor evidence names tpm twice"
        );
        assert_eq!(
            refusal(Malformed, run(&v, &["tpm", "join-token"])),
            "attestor \"join-token\" cannot be combined (multi-factor takes tpm, sev-snp, tdx)"
        );
        assert_eq!(
            refusal(PolicyMismatch, run(&v, &["tpm", "tdx"])),
            "this server requires sev-snp and tpm in every attestation; missing: sev-snp"
        );
        assert!(
            refusal(Malformed, v.start(b"{", &ctx()).map(|_| unreachable!()))
                .starts_with("malformed multi-factor evidence")
        );
        // An answer that skips a challenged factor.
        let VerifierStep::Challenge(_, s) =
            v.start(&evidence(&["tpm", "sev-snp"]), &ctx()).unwrap()
        else {
            panic!("expected a challenge")
        };
        let partial = encode(&Envelope {
            parts: vec![Part {
                method: "tpm".into(),
                data: b"tpm-answer-0".to_vec(),
            }],
        })
        .unwrap();
        assert_eq!(
            refusal(Replay, s.resume(&partial, &ctx()).map(|_| unreachable!())),
            "multi-factor answer is for tpm, the challenge was for sev-snp,tpm"
        );
        // Single-method attempts are refused while factors are required.
        assert_eq!(
            v.check_single("tpm").unwrap_err().refusal_kind(),
            Some(PolicyMismatch)
        );
        assert_eq!(
            v.check_single("tpm").unwrap_err().to_string(),
            "attestation refused: this server requires sev-snp and tpm together in one attestation; tpm alone is not enough"
        );
        assert_eq!(
            v.check_single("join-token").unwrap_err().to_string(),
            "attestation refused: this server requires sev-snp and tpm together in one attestation; join-token alone is not enough"
        );
        assert!(v.check_single(METHOD).is_ok());
        let open = verifier(scripted("tpm", 1, None), scripted("sev-snp", 1, None), &[]);
        assert!(open.check_single("tpm").is_ok());
    }

    #[test]
    fn config_is_checked() {
        let f = || -> Vec<Arc<dyn NodeVerifier>> {
            vec![
                Arc::new(scripted("tpm", 1, None)),
                Arc::new(scripted("sev-snp", 1, None)),
            ]
        };
        let t = |s: &str| -> toml::Table { toml::from_str(s).unwrap() };
        let err = |s: &str| match MultiVerifier::from_config(Some(&t(s)), f()) {
            Err(Error::Config(m)) => m,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted {s}"),
        };
        assert_eq!(
            err("required = [\"tpm\", \"tdx\"]"),
            "[attestors.multi] requires tdx, which is not configured"
        );
        assert_eq!(
            err("require = []"),
            "unknown key \"require\" in [attestors.multi] (known: required, bind_vtpm)"
        );
        assert_eq!(
            err("required = [\"tpm\"]"),
            "multi-factor attestation takes 2 to 4 methods"
        );
        let ok =
            MultiVerifier::from_config(Some(&t("required = [\"tpm\", \"sev-snp\"]")), f()).unwrap();
        assert_eq!(ok.required().len(), 2);
        assert!(MultiVerifier::from_config(None, f())
            .unwrap()
            .required()
            .is_empty());
    }
}
