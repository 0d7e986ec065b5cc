//! `entry create --data FILE` and `entry delete --data FILE`: bulk changes from SPIRE's
//! `-data` JSON, sent in batches (`BatchCreateEntries`, `BatchDeleteEntries`), each
//! entry answered on its own.
//!
//! Create: `{"entries": [{"spiffe_id": .., "parent_id": .., "selectors": [{"type":
//! "unix", "value": "uid:1000"}], "x509_svid_ttl": .., "jwt_svid_ttl": .., "dns_names":
//! [..], "federates_with": [..], "hint": .., "admin": .., "downstream": ..}]}`. IDs may
//! be strings or SPIRE's `{"trust_domain": .., "path": ..}`; ztid's own `shared` and
//! `node` may be given too. A field nobody knows refuses the whole file (a typo must not
//! silently drop a setting); a field ztid knows but cannot honour (`admin`,
//! `downstream`, `store_svid`, an entry expiry, a chosen id) refuses that entry alone.
//! Delete: `{"ids": [..]}`.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};
use ztid_proto::admin as pb;
use ztid_proto::node as npb;

use super::super::output::shown;
use super::super::{Client, Output};
use super::entry_json;

/// Most entries the CLI sends in one batch (the server takes up to 1000).
const CHUNK_ENTRIES: usize = 500;
/// A batch ends once its entries reach about this many bytes (one entry is at most
/// about 300 KiB), well below the 4 MiB the admin API decodes.
const CHUNK_BYTES: usize = 2 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesFile {
    entries: Vec<FileEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdsFile {
    ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSelector {
    r#type: String,
    value: String,
}

/// One entry of SPIRE's `-data` file (its `RegistrationEntry` JSON), plus ztid's own
/// `shared` and `node`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileEntry {
    #[serde(alias = "entry_id")]
    id: String,
    spiffe_id: Value,
    parent_id: Value,
    selectors: Vec<FileSelector>,
    x509_svid_ttl: i64,
    jwt_svid_ttl: i64,
    /// SPIRE's older name of `x509_svid_ttl`.
    ttl: i64,
    dns_names: Vec<String>,
    federates_with: Vec<String>,
    hint: String,
    admin: bool,
    downstream: bool,
    store_svid: bool,
    #[serde(alias = "entryExpiry", alias = "entry_expiry")]
    expires_at: i64,
    // Read-only in SPIRE's output; accepted (a listing can be fed back) and ignored.
    revision_number: Value,
    created_at: Value,
    shared: bool,
    node: bool,
}

/// An ID given as a string or as SPIRE's `{"trust_domain", "path"}`.
fn file_id(what: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Object(m) => {
            let td = m.get("trust_domain").and_then(Value::as_str);
            let path = m.get("path").and_then(Value::as_str);
            match (td, path) {
                (Some(td), Some(path)) if m.len() == 2 => Ok(format!("spiffe://{td}{path}")),
                _ => Err(format!(
                    "{what} must be a string or {{\"trust_domain\": .., \"path\": ..}}"
                )),
            }
        }
        _ => Err(format!(
            "{what} must be a string or {{\"trust_domain\": .., \"path\": ..}}"
        )),
    }
}

impl FileEntry {
    /// The entry to send, or why this one entry cannot be.
    fn to_request(&self) -> Result<npb::Entry, String> {
        if !self.id.is_empty() {
            return Err("an entry id cannot be chosen: the server assigns it".into());
        }
        if self.admin {
            return Err(
                "admin entries are not supported: admin identities come from \
                        `ztid-server admin credential issue`"
                    .into(),
            );
        }
        if self.downstream {
            return Err("downstream entries are not supported".into());
        }
        if self.store_svid {
            return Err("store_svid entries are not supported".into());
        }
        if self.expires_at != 0 {
            return Err("entry expiry is not supported".into());
        }
        if self.ttl != 0 && self.x509_svid_ttl != 0 && self.ttl != self.x509_svid_ttl {
            return Err("ttl and x509_svid_ttl disagree".into());
        }
        let x509_ttl = if self.x509_svid_ttl != 0 {
            self.x509_svid_ttl
        } else {
            self.ttl
        };
        Ok(npb::Entry {
            spiffe_id: file_id("spiffe_id", &self.spiffe_id)?,
            parent_id: file_id("parent_id", &self.parent_id)?,
            selectors: self
                .selectors
                .iter()
                .map(|s| npb::Selector {
                    r#type: s.r#type.clone(),
                    value: s.value.clone(),
                })
                .collect(),
            x509_ttl_seconds: x509_ttl,
            jwt_ttl_seconds: self.jwt_svid_ttl,
            shared: self.shared,
            dns_names: self.dns_names.clone(),
            federates_with: self.federates_with.clone(),
            node: self.node,
            hint: self.hint.clone(),
            ..Default::default()
        })
    }
}

fn read_file<T: for<'de> Deserialize<'de>>(path: &Path, shape: &str) -> Result<T, String> {
    let text = crate::cli::files::read_bounded(path, crate::cli::files::MAX_ENTRIES_FILE_BYTES)?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not an entries file ({shape}): {e}", path.display()))
}

/// An upper bound of an entry's size in a request.
fn request_bytes(e: &npb::Entry) -> usize {
    e.spiffe_id.len()
        + e.parent_id.len()
        + e.hint.len()
        + e.selectors
            .iter()
            .map(|s| s.r#type.len() + s.value.len() + 18)
            .sum::<usize>()
        + e.dns_names
            .iter()
            .chain(&e.federates_with)
            .map(|s| s.len() + 6)
            .sum::<usize>()
        + 64
}

/// One entry's outcome as the CLI reports it.
struct Outcome {
    /// Index in the file.
    index: usize,
    /// What the file named (its SPIFFE ID, or the id to delete).
    name: String,
    result: Result<npb::Entry, String>,
}

fn code_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from_i32(code))
}

fn from_result(index: usize, name: String, r: pb::EntryResult) -> Outcome {
    let result = match (r.code, r.entry) {
        (0, Some(e)) => Ok(e),
        (0, None) => Err("the server answered without the entry".into()),
        (code, _) => Err(format!("{} ({})", r.message, code_name(code))),
    };
    Outcome {
        index,
        name,
        result,
    }
}

/// Prints every outcome; `Err` (one line) if any entry was refused.
fn report(verb: &str, outcomes: &[Outcome], out: Output) -> Result<(), String> {
    let refused = outcomes.iter().filter(|o| o.result.is_err()).count();
    match out {
        Output::Json => {
            let results: Vec<Value> = outcomes
                .iter()
                .map(|o| match &o.result {
                    Ok(e) => json!({"index": o.index, "status": "ok", "entry": entry_json(e)}),
                    Err(why) => {
                        json!({"index": o.index, "status": "refused", "name": o.name, "error": why})
                    }
                })
                .collect();
            println!("{}", json!({ "results": results }));
        }
        Output::Text => {
            for o in outcomes {
                match &o.result {
                    Ok(e) => println!("{verb} {} {}", shown(&e.id), shown(&e.spiffe_id)),
                    Err(why) => println!(
                        "Refused entry #{} ({}): {}",
                        o.index,
                        shown(&o.name),
                        shown(why)
                    ),
                }
            }
        }
    }
    if refused > 0 {
        return Err(format!(
            "{refused} of {} entries were refused (see above)",
            outcomes.len()
        ));
    }
    Ok(())
}

/// `entry create --data FILE`.
pub(super) async fn create(client: &mut Client, path: &Path, out: Output) -> Result<(), String> {
    let file: EntriesFile = read_file(path, r#"{"entries": [...]}"#)?;
    let mut outcomes = Vec::with_capacity(file.entries.len());
    // Entries refused before sending are answered here; the others go in batches.
    let mut pending: Vec<(usize, String, npb::Entry)> = Vec::new();
    for (index, fe) in file.entries.iter().enumerate() {
        let name = file_id("spiffe_id", &fe.spiffe_id).unwrap_or_else(|_| "?".into());
        match fe.to_request() {
            Ok(e) => pending.push((index, name, e)),
            Err(why) => outcomes.push(Outcome {
                index,
                name,
                result: Err(why),
            }),
        }
    }
    let mut rest = pending.as_slice();
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        for (_, _, e) in rest {
            if n == CHUNK_ENTRIES || (n > 0 && bytes + request_bytes(e) > CHUNK_BYTES) {
                break;
            }
            bytes += request_bytes(e);
            n += 1;
        }
        let (chunk, next) = rest.split_at(n);
        rest = next;
        let req = pb::BatchCreateEntriesRequest {
            entries: chunk.iter().map(|(_, _, e)| e.clone()).collect(),
        };
        match client.batch_create_entries(req).await {
            Ok(r) => {
                let results = r.into_inner().results;
                if results.len() != chunk.len() {
                    return Err(format!(
                        "the server answered {} results for {} entries",
                        results.len(),
                        chunk.len()
                    ));
                }
                for ((index, name, _), r) in chunk.iter().zip(results) {
                    outcomes.push(from_result(*index, name.clone(), r));
                }
            }
            Err(s) => {
                for (index, name, _) in chunk {
                    outcomes.push(Outcome {
                        index: *index,
                        name: name.clone(),
                        result: Err(s.message().to_string()),
                    });
                }
            }
        }
    }
    outcomes.sort_by_key(|o| o.index);
    report("Created", &outcomes, out)
}

/// `entry delete --data FILE`.
pub(super) async fn delete(client: &mut Client, path: &Path, out: Output) -> Result<(), String> {
    let file: IdsFile = read_file(path, r#"{"ids": [...]}"#)?;
    let mut outcomes = Vec::with_capacity(file.ids.len());
    for (start, chunk) in (0..)
        .step_by(CHUNK_ENTRIES)
        .zip(file.ids.chunks(CHUNK_ENTRIES))
    {
        let req = pb::BatchDeleteEntriesRequest {
            ids: chunk.to_vec(),
        };
        match client.batch_delete_entries(req).await {
            Ok(r) => {
                let results = r.into_inner().results;
                if results.len() != chunk.len() {
                    return Err(format!(
                        "the server answered {} results for {} ids",
                        results.len(),
                        chunk.len()
                    ));
                }
                for (i, (id, r)) in chunk.iter().zip(results).enumerate() {
                    outcomes.push(from_result(start + i, id.clone(), r));
                }
            }
            Err(s) => {
                for (i, id) in chunk.iter().enumerate() {
                    outcomes.push(Outcome {
                        index: start + i,
                        name: id.clone(),
                        result: Err(s.message().to_string()),
                    });
                }
            }
        }
    }
    report("Deleted", &outcomes, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spire_shaped_entries_parse_and_unknown_fields_are_refused() {
        let f: EntriesFile = serde_json::from_str(
            r#"{"entries":[{"spiffe_id":"spiffe://example.org/a","parent_id":{"trust_domain":"example.org","path":"/p"},
            "selectors":[{"type":"unix","value":"uid:1000"}],"x509_svid_ttl":60,"jwt_svid_ttl":30,
            "dns_names":["a.example"],"admin":false,"downstream":false,"federates_with":["other.org"],"hint":"h"}]}"#,
        )
        .unwrap();
        let e = f.entries[0].to_request().unwrap();
        assert_eq!(e.parent_id, "spiffe://example.org/p");
        assert_eq!((e.x509_ttl_seconds, e.jwt_ttl_seconds), (60, 30));
        assert_eq!(e.selectors[0].value, "uid:1000");
        let err = serde_json::from_str::<EntriesFile>(
            r#"{"entries":[{"spiffe_id":"spiffe://example.org/a","selecters":[]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `selecters`"), "{err}");
        assert!(serde_json::from_str::<IdsFile>(r#"{"ids":["a"],"x":1}"#).is_err());
        let admin: EntriesFile = serde_json::from_str(
            r#"{"entries":[{"spiffe_id":"spiffe://example.org/a","admin":true}]}"#,
        )
        .unwrap();
        assert!(admin.entries[0].to_request().unwrap_err().contains("admin"));
    }
}
