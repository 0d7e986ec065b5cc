//! ztid's end-to-end tests: the real `ztid-server` and `ztid-agent` binaries as
//! processes on real sockets, with swtpm, SoftHSM2, PostgreSQL, openssl, py-spiffe and
//! the `spiffe` crate as independent parts. One test binary (one link, not one per
//! file); each module is one area. Run one area with
//! `cargo test -p ztid-tests --test e2e <module>::`.

mod admin_authz;
mod agent_failover;
mod audit;
mod cluster;
mod cluster_sync;
mod containers;
mod delegated_identity;
mod entry_push;
mod entry_scale;
mod envoy_sds;
mod federation;
mod hsm_pkcs11;
mod hsm_tpm;
mod identity_names;
mod issuance_policy;
mod jwt_svid;
mod limits;
mod multi_factor;
mod operator_output;
mod readme;
mod refusals;
mod rotation;
mod svid_pool;
mod tee_fetch;
mod tee_snp;
mod tee_snp_synthetic;
mod tee_tdx;
mod telemetry;
mod token_exchange;
mod tpm_e2e;
mod tpm_protocol;
mod untrusted_input;
mod upstream;
mod workload_api;
mod workload_binding;
