//! The [`Immunity`] of each TLS listener: which verified clients it exists for, and so
//! never closes to make room while they have a request in flight.
//!
//! A certificate that merely chains to the trust bundle is not enough: every workload
//! holds one, and one workload's SVID could otherwise fill the node API with stalled
//! streams that no new agent could displace.

use std::sync::Arc;

use spiffe::{SpiffeId, TrustDomain};
use ztid_spiffe::spiffe_id::{is_admin_id, is_agent_id, is_instance_segment};
use ztid_spiffe::svid::spiffe_id_of_leaf;

use super::listener::Immunity;

/// The node API's: agents of `td`, each by its own ID.
pub fn agents(td: TrustDomain) -> Immunity {
    named(td, is_agent_id)
}

/// The remote admin API's: admins of `td`, each by its own ID.
pub fn admins(td: TrustDomain) -> Immunity {
    named(td, is_admin_id)
}

/// The token endpoint's: workloads of `td`, by entry: a per-instance ID counts as its
/// entry's (the ID without its instance segment), so a workload that starts many
/// processes is still one identity.
pub fn workload_entries(td: TrustDomain) -> Immunity {
    Arc::new(move |leaf| {
        let id = spiffe_id_of_leaf(leaf).ok()?;
        if id.trust_domain() != &td {
            return None;
        }
        let id = id.to_string();
        Some(match id.rsplit_once('/') {
            Some((entry, last)) if is_instance_segment(last) => entry.to_string(),
            _ => id,
        })
    })
}

fn named(td: TrustDomain, is: fn(&TrustDomain, &SpiffeId) -> bool) -> Immunity {
    Arc::new(move |leaf| {
        let id = spiffe_id_of_leaf(leaf).ok()?;
        is(&td, &id).then(|| id.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(uri: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn each_listener_names_only_its_own_callers() {
        let td = TrustDomain::new("example.org").unwrap();
        let agent = leaf("spiffe://example.org/ztid/agent/tpm/abc");
        let admin = leaf("spiffe://example.org/ztid/admin/alice");
        let workload = leaf("spiffe://example.org/web");
        let instance = leaf("spiffe://example.org/web/0123456789abcdef0123456789abcdef");
        let foreign = leaf("spiffe://other.org/web");
        let (agents, admins, workloads) =
            (agents(td.clone()), admins(td.clone()), workload_entries(td));
        assert_eq!(
            agents(&agent).as_deref(),
            Some("spiffe://example.org/ztid/agent/tpm/abc")
        );
        assert_eq!(agents(&workload), None, "a workload is no agent");
        assert_eq!(agents(&admin), None);
        assert_eq!(
            admins(&admin).as_deref(),
            Some("spiffe://example.org/ztid/admin/alice")
        );
        assert_eq!(admins(&agent), None);
        // Every instance of an entry is one identity.
        assert_eq!(
            workloads(&instance).as_deref(),
            Some("spiffe://example.org/web")
        );
        assert_eq!(
            workloads(&workload).as_deref(),
            Some("spiffe://example.org/web")
        );
        assert_eq!(workloads(&foreign), None);
        assert_eq!(agents(b"not a certificate"), None);
    }
}
