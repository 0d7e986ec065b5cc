//! `multi` node attestation, node side: several attestors as one (see
//! `ztid_attestation::multi`).

pub use ztid_attestation::multi::*;
use ztid_attestation::Error;

use crate::agent_key::AgentKey;
use crate::NodeAttestor;

// ---------------------------------------------------------------------------------------
// Node side

/// Runs several attestors as one.
pub struct MultiAttestor {
    factors: Vec<Box<dyn NodeAttestor>>,
}

impl MultiAttestor {
    /// Combines `factors` (at least two, distinct, hardware methods).
    pub fn new(factors: Vec<Box<dyn NodeAttestor>>) -> Result<Self, Error> {
        check_methods(factors.iter().map(|f| f.method()))?;
        Ok(Self { factors })
    }

    fn factor(&self, method: &str) -> Result<&dyn NodeAttestor, Error> {
        self.factors
            .iter()
            .find(|f| f.method() == method)
            .map(|f| f.as_ref())
            .ok_or_else(|| not_presented(method))
    }

    fn factor_mut(&mut self, method: &str) -> Result<&mut Box<dyn NodeAttestor>, Error> {
        self.factors
            .iter_mut()
            .find(|f| f.method() == method)
            .ok_or_else(|| not_presented(method))
    }
}

fn not_presented(method: &str) -> Error {
    Error::Protocol(format!(
        "the server challenged {method}, which this agent did not present"
    ))
}

impl NodeAttestor for MultiAttestor {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn agent_key(&mut self) -> Result<Option<AgentKey>, Error> {
        let mut key = None;
        for f in &mut self.factors {
            if let Some(k) = f.agent_key()? {
                if key.is_some() {
                    return Err(Error::Config(
                        "two attestors each want to hold the agent key".into(),
                    ));
                }
                key = Some(k);
            }
        }
        Ok(key)
    }

    fn initial_evidence(&mut self) -> Result<Vec<u8>, Error> {
        let parts = self
            .factors
            .iter_mut()
            .map(|f| {
                Ok(Part {
                    method: f.method().to_string(),
                    data: f.initial_evidence()?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        encode(&Envelope { parts })
    }

    /// Checks every part with its factor.
    fn check_challenge(&self, challenge: &[u8], agent_spki: &[u8]) -> Result<(), Error> {
        let env = parse(challenge, "challenge").map_err(|e| Error::Protocol(e.to_string()))?;
        for p in &env.parts {
            self.factor(&p.method)?
                .check_challenge(&p.data, agent_spki)?;
        }
        Ok(())
    }

    /// Every part is checked before any factor makes evidence, so a part for another key
    /// refuses the whole challenge with nothing signed.
    fn answer(&mut self, challenge: &[u8], agent_spki: &[u8]) -> Result<Vec<u8>, Error> {
        self.check_challenge(challenge, agent_spki)?;
        let env = parse(challenge, "challenge").map_err(|e| Error::Protocol(e.to_string()))?;
        let mut parts = Vec::with_capacity(env.parts.len());
        for p in env.parts {
            let data = self.factor_mut(&p.method)?.answer(&p.data, agent_spki)?;
            parts.push(Part {
                method: p.method,
                data,
            });
        }
        encode(&Envelope { parts })
    }
}
