//! ztid as an intermediate under an organisation's existing root.

use std::path::Path;

use ztid_tests::*;

const TD: &str = "example.org";

/// An "organisation root": self-signed CA certificate and PKCS#8 key, as PEM files.
fn org_root(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, format!("Org root {name}"));
    p.distinguished_name = dn;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = p.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    // The server refuses an upstream key file others can read.
    std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (c, k)
}

fn config(dir: &Path, cert: &Path, key: &Path) -> std::path::PathBuf {
    let p = dir.join("server.toml");
    std::fs::write(
        &p,
        format!(
            "[upstream]\ncert = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    p
}

#[test]
fn workloads_get_the_full_chain_and_the_bundle_holds_the_upstream_root() {
    let org = tempfile::tempdir().unwrap();
    let (cert, key) = org_root(org.path(), "acme");
    let cfg = config(org.path(), &cert, &key);
    let server = Server::start_with(TD, &["--config", cfg.to_str().unwrap()]);
    let bundle = server.cli_ok(&["bundle", "show"]);
    assert_eq!(
        bundle.trim(),
        std::fs::read_to_string(&cert).unwrap().trim(),
        "the bundle is the upstream root"
    );
    let agent = Agent::start(&server);
    entry_for_my_uid(&server, &agent, "spiffe://example.org/app", &[]);
    let out = tempfile::tempdir().unwrap();
    wait_for("an SVID", READY_TIMEOUT, || {
        agent
            .cli(&[
                "api",
                "fetch",
                "x509",
                "--write",
                out.path().to_str().unwrap(),
            ])
            .ok
            .then_some(())
    });
    let chain = std::fs::read_to_string(out.path().join("svid.0.pem")).unwrap();
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf and ztid's intermediate"
    );
    let blocks = pem::parse_many(&chain).unwrap();
    std::fs::write(out.path().join("intermediate.pem"), pem::encode(&blocks[1])).unwrap();
    std::fs::write(out.path().join("leaf.pem"), pem::encode(&blocks[0])).unwrap();
    let v = openssl(&[
        "verify",
        "-CAfile",
        cert.to_str().unwrap(),
        "-untrusted",
        out.path().join("intermediate.pem").to_str().unwrap(),
        out.path().join("leaf.pem").to_str().unwrap(),
    ]);
    assert!(
        v.ok,
        "openssl verifies leaf → intermediate → org root: {} {}",
        v.stdout, v.stderr
    );

    // Rotation under an upstream root: a new intermediate, the same bundle.
    let old = server.cli_ok(&["authority", "x509", "show", "--output", "json"]);
    server.cli_ok(&["authority", "x509", "prepare"]);
    server.cli_ok(&["authority", "x509", "activate"]);
    assert_eq!(
        server.cli_ok(&["bundle", "show"]),
        bundle,
        "rotating intermediates leaves the bundle alone"
    );
    assert_ne!(
        server.cli_ok(&["authority", "x509", "show", "--output", "json"]),
        old
    );
}

#[test]
fn an_upstream_key_that_does_not_match_its_certificate_is_refused() {
    let org = tempfile::tempdir().unwrap();
    let (cert, _) = org_root(org.path(), "acme");
    let (_, other_key) = org_root(org.path(), "other");
    let cfg = config(org.path(), &cert, &other_key);
    let data = org.path().join("data");
    let out = std::process::Command::new(bin("ztid-server"))
        .args([
            "run",
            "--trust-domain",
            TD,
            "--data-dir",
            data.to_str().unwrap(),
            "--bind",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the upstream key does not match the upstream certificate"),
        "{stderr}"
    );
    let keys = std::fs::read_dir(data.join("keys"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(keys, 0, "no authority was created");
}
