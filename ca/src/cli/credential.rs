//! `ztid-server admin credential issue`: an admin X509-SVID for the remote admin API,
//! made on the server's host. The key is generated here and never leaves this host's
//! files; the server signs a CSR for it over its owner-only admin socket, as
//! `spiffe://TD/ztid/admin/NAME`, an ID no entry can claim (so no remote role can be
//! obtained through the roles it outranks).

use std::path::Path;

use serde_json::json;
use tonic::transport::Channel;
use ztid_proto::admin::{self as pb, admin_client::AdminClient};
use ztid_spiffe::svid::certs_to_pem;

use super::files::{check_private_dir, write_new};
use super::output::expiry;
use crate::cli::Output;

/// The files written into the output directory.
pub(super) const FILES: [&str; 3] = ["svid.pem", "svid.key", "bundle.pem"];

/// Generates a key, has the server sign it as admin `name`, and writes
/// `svid.pem` (chain), `svid.key` (PKCS#8, owner-only) and `bundle.pem` into `dir`.
pub(super) async fn issue(
    client: &mut AdminClient<Channel>,
    name: &str,
    ttl_seconds: i64,
    dir: &Path,
    out: Output,
) -> Result<(), String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("generating a key: {e}"))?;
    // No URI SAN: the server decides the ID (spiffe://TD/ztid/admin/NAME).
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| format!("making the CSR: {e}"))?
        .der()
        .to_vec();
    let r = client
        .issue_admin_svid(pb::IssueAdminSvidRequest {
            name: name.to_string(),
            csr,
            ttl_seconds,
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let bundle = client
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner()
        .bundle
        .unwrap_or_default();
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    // An existing directory others can write (or a symlink to one) would let them
    // replace bundle.pem, the roots the admin trusts the server by, once written.
    check_private_dir(dir)?;
    let chain = certs_to_pem(r.cert_chain.iter().map(Vec::as_slice));
    let roots = certs_to_pem(bundle.x509_authorities.iter().map(Vec::as_slice));
    write_new(dir, FILES[1], key.serialize_pem().as_bytes(), 0o600)?;
    write_new(dir, FILES[0], chain.as_bytes(), 0o644)?;
    write_new(dir, FILES[2], roots.as_bytes(), 0o644)?;
    match out {
        Output::Json => println!(
            "{}",
            json!({"spiffe_id": r.spiffe_id, "expires_at": r.expires_at,
                "files": FILES.iter().map(|f| dir.join(f).display().to_string()).collect::<Vec<_>>()})
        ),
        Output::Text => {
            // stdout stays the SPIFFE ID alone (scripts bind it to roles); the rest is
            // for people, on stderr.
            println!("{}", r.spiffe_id);
            eprintln!("Valid until   : {}", expiry(r.expires_at));
            eprintln!("Written to    : {} ({})", dir.display(), FILES.join(", "));
        }
    }
    Ok(())
}
