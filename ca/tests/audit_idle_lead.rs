//! The audit log as the server runs it: on a runtime whose idle workers lead the batches
//! (`ztid_ca::audit::lead_on_runtime_idle`). A test binary of its own, because the hook
//! is process-wide: every log opened after it leaves its batches to the idle workers.

use std::sync::Arc;

use serde_json::json;
use ztid_ca::audit::{lead_on_runtime_idle, log_path, verify, AuditLog};
use ztid_hsm::{KeyManager, SoftwareKeyManager};

#[test]
fn idle_workers_answer_each_call_only_after_a_seal_covers_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let km: Arc<dyn KeyManager> =
        Arc::new(SoftwareKeyManager::open(dir.path().join("keys")).unwrap());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    let rt = lead_on_runtime_idle(&mut builder).build().unwrap();
    let audit = dir.path().join("audit");
    let log = AuditLog::open(&audit, km.clone()).unwrap();

    let calls = rt.block_on(async {
        let tasks: Vec<_> = (0..16)
            .map(|t| {
                let log = log.clone();
                let audit = audit.clone();
                tokio::spawn(async move {
                    for i in 0..20 {
                        let serial = format!("s-{t}-{i}");
                        let seq = {
                            let own = log.begin_records();
                            for k in 0..1 + (t + i) % 3 {
                                log.append(json!({"type": "x509_svid_issued",
                                    "serial": format!("{serial}-{k}")}))
                                    .unwrap();
                            }
                            own.finish().unwrap()
                        };
                        log.durable(seq).await.unwrap();
                        // Answered: the record is in the file and a seal follows it.
                        let text = std::fs::read_to_string(log_path(&audit)).unwrap();
                        let at = text
                            .find(&format!("\"{serial}-0\""))
                            .unwrap_or_else(|| panic!("{serial} answered before written"));
                        assert!(
                            text[at..].contains("\"seal\""),
                            "{serial} answered before a seal covered it"
                        );
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        log.close().await.unwrap();
        16 * 20
    });

    let report = verify(&audit, km.as_ref()).unwrap();
    assert_eq!(report.unsigned_tail, 0);
    assert!(
        report.seals < calls,
        "concurrent calls share batches: {} seals for {calls} calls",
        report.seals
    );
}
