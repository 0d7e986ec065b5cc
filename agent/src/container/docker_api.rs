//! The docker-compatible Engine API over a Unix socket (docker and `podman system
//! service` serve it): `GET /containers/<id>/json`, HTTP/1.1, bounded in size and time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// Largest inspect answer read (a container with many labels and a long environment is
/// tens of KiB).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Why a runtime gave no answer about a container.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The socket could not be reached (runtime stopped, wrong path).
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        /// The socket.
        socket: String,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP failed (the runtime closed the connection, answered garbage, ...).
    #[error("HTTP to {socket} failed: {why}")]
    Http {
        /// The socket.
        socket: String,
        /// Why.
        why: String,
    },
    /// The runtime answered with an unexpected status.
    #[error("{socket} answered HTTP {status}")]
    Status {
        /// The socket.
        socket: String,
        /// The status code.
        status: u16,
    },
    /// The answer is not the inspect JSON expected, or is too large.
    #[error("{socket} gave an unusable answer: {why}")]
    Answer {
        /// The socket.
        socket: String,
        /// Why.
        why: String,
    },
    /// The process serving the socket is not one whose word is taken: not root, and not
    /// the agent's own uid serving a socket file that uid owns. Whoever can listen at
    /// the configured path (a stale path, a directory others may write) is not believed.
    #[error("{socket} is served by an untrusted process: {why}")]
    Untrusted {
        /// The socket.
        socket: String,
        /// Why.
        why: String,
    },
    /// No answer in time.
    #[error("{socket} did not answer within {0} ms", .timeout.as_millis())]
    Timeout {
        /// The socket.
        socket: String,
        /// The time allowed.
        timeout: Duration,
    },
}

/// What a runtime says about one container (the fields that give selectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerFacts {
    /// Full container ID.
    pub id: String,
    /// Name, without docker's leading `/`.
    pub name: String,
    /// Image ID, the digest of the image's configuration (`sha256:<hex>`).
    pub image_id: String,
    /// The image reference the container was created from (`localhost/app:1`).
    pub image: Option<String>,
    /// Container labels.
    pub labels: BTreeMap<String, String>,
    /// Whether it runs.
    pub running: bool,
    /// Its first process, in the runtime's (the host's) pid namespace; 0 if stopped.
    pub init_pid: i32,
    /// Which runtime answered: `podman`, `docker` or `containerd`.
    pub runtime: &'static str,
    /// The containerd namespace the answer came from (`k8s.io` for the CRI's); `None`
    /// from the docker-compatible API.
    pub namespace: Option<String>,
}

/// Whether a runtime socket served by `peer_uid`, whose file `file_owner` owns, is
/// believed by an agent running as `own_uid`: root's always; the agent's own uid's only
/// if that uid also owns the file (a runtime the agent's user runs for itself).
pub fn peer_trusted(peer_uid: u32, file_owner: u32, own_uid: u32) -> Result<(), String> {
    if peer_uid == 0 || (peer_uid == own_uid && file_owner == own_uid) {
        return Ok(());
    }
    Err(format!(
        "the listening process runs as uid {peer_uid} (the socket file is owned by uid \
         {file_owner}); only uid 0, or this agent's own uid {own_uid} on a socket file it \
         owns, is believed"
    ))
}

/// Connects to a runtime socket and checks who serves it (`SO_PEERCRED` of this very
/// connection, so the check and the answers are about the same process).
pub async fn connect_trusted(
    socket: &Path,
    name: &str,
) -> Result<tokio::net::UnixStream, RuntimeError> {
    use std::os::unix::fs::MetadataExt;
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| RuntimeError::Connect {
            socket: name.to_string(),
            source,
        })?;
    let untrusted = |why: String| RuntimeError::Untrusted {
        socket: name.to_string(),
        why,
    };
    let peer = stream
        .peer_cred()
        .map_err(|e| untrusted(format!("SO_PEERCRED: {e}")))?;
    let owner = std::fs::metadata(socket)
        .map_err(|e| untrusted(format!("the socket file: {e}")))?
        .uid();
    peer_trusted(peer.uid(), owner, nix::unistd::geteuid().as_raw()).map_err(untrusted)?;
    Ok(stream)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspect {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    config: Option<InspectConfig>,
    #[serde(default)]
    state: Option<InspectState>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectConfig {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectState {
    #[serde(default)]
    running: bool,
    #[serde(default)]
    pid: i64,
}

/// Asks the runtime at `socket` about container `id` (64 hex digits): `Ok(None)` when it
/// does not know it (404).
pub async fn inspect(
    socket: &Path,
    id: &str,
    timeout: Duration,
) -> Result<Option<ContainerFacts>, RuntimeError> {
    let name = socket.display().to_string();
    within(&name, timeout, inspect_unbounded(socket, &name, id)).await
}

/// `ask`'s answer, or [`RuntimeError::Timeout`] naming `socket` when it takes longer than
/// `timeout` (the docker-compatible API and containerd's are bounded alike).
pub(super) async fn within<T>(
    socket: &str,
    timeout: Duration,
    ask: impl std::future::Future<Output = Result<T, RuntimeError>>,
) -> Result<T, RuntimeError> {
    match tokio::time::timeout(timeout, ask).await {
        Ok(r) => r,
        Err(_) => Err(RuntimeError::Timeout {
            socket: socket.to_string(),
            timeout,
        }),
    }
}

async fn inspect_unbounded(
    socket: &Path,
    name: &str,
    id: &str,
) -> Result<Option<ContainerFacts>, RuntimeError> {
    let http = |why: String| RuntimeError::Http {
        socket: name.to_string(),
        why,
    };
    let answer = |why: String| RuntimeError::Answer {
        socket: name.to_string(),
        why,
    };
    // The ID goes into a path: only the 64 hex digits the cgroup parser accepts.
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(answer(format!("not a container ID: {id:?}")));
    }
    let stream = connect_trusted(socket, name).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.to_string()))?;
    // Driven beside the request; it ends when the sender and the body are dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = http::Request::get(format!("/containers/{id}/json"))
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http(e.to_string()))?;
    let status = response.status();
    if status == http::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if status != http::StatusCode::OK {
        return Err(RuntimeError::Status {
            socket: name.to_string(),
            status: status.as_u16(),
        });
    }
    // podman's compatible API names itself in every answer.
    let runtime = if response.headers().contains_key("libpod-api-version") {
        "podman"
    } else {
        "docker"
    };
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| answer(format!("body: {e}")))?
        .to_bytes();
    let facts = parse_inspect(&body, runtime).map_err(answer)?;
    // A runtime resolves names and ID prefixes too: only the very container asked about.
    if facts.id != id {
        return Err(answer(format!(
            "asked about {id}, the answer is about {}",
            facts.id
        )));
    }
    Ok(Some(facts))
}

/// The facts in a `GET /containers/<id>/json` answer.
pub fn parse_inspect(body: &[u8], runtime: &'static str) -> Result<ContainerFacts, String> {
    let i: Inspect = serde_json::from_slice(body).map_err(|e| format!("inspect JSON: {e}"))?;
    if !i.image.starts_with("sha256:") {
        return Err(format!("image ID {:?} is not sha256:<hex>", i.image));
    }
    let (image, labels) = match i.config {
        Some(c) => (c.image, c.labels.unwrap_or_default()),
        None => (None, BTreeMap::new()),
    };
    let (running, pid) = i.state.map(|s| (s.running, s.pid)).unwrap_or((false, 0));
    Ok(ContainerFacts {
        name: i.name.strip_prefix('/').unwrap_or(&i.name).to_string(),
        id: i.id,
        image_id: i.image,
        image,
        labels,
        running,
        init_pid: i32::try_from(pid).unwrap_or(0),
        runtime,
        namespace: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_podman_inspect() {
        // Trimmed from podman 4.3's compatible API on this machine.
        let body = br#"{"Id":"9ea7895b4d8ff2dd4175e940485e83ecd5ae7c92d928bb9c86b2938bdb0b2ce0",
            "State":{"Status":"running","Running":true,"Pid":11206},
            "Image":"sha256:07a948cae3422a7fbfa5c7d273e2324d71bebc4a926d854cd6f622cb7f10df20",
            "Name":"/c1","Config":{"Image":"localhost/bb:1","Labels":{"app":"one"}}}"#;
        let f = parse_inspect(body, "podman").unwrap();
        assert_eq!(f.name, "c1");
        assert_eq!(f.init_pid, 11206);
        assert!(f.running);
        assert_eq!(f.image.as_deref(), Some("localhost/bb:1"));
        assert_eq!(f.labels.get("app").map(String::as_str), Some("one"));
        assert!(f.image_id.starts_with("sha256:07a9"));
    }

    #[test]
    fn refuses_unusable_answers() {
        assert!(parse_inspect(b"not json", "docker").is_err());
        assert!(parse_inspect(br#"{"Id":"x","Image":"nginx"}"#, "docker")
            .unwrap_err()
            .contains("not sha256"));
        // Null labels and a missing state are a stopped container without labels.
        let f = parse_inspect(
            br#"{"Id":"x","Image":"sha256:ab","Name":"n","Config":{"Labels":null}}"#,
            "docker",
        )
        .unwrap();
        assert!(!f.running && f.labels.is_empty());
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error() {
        let err = inspect(
            Path::new("/nonexistent/x.sock"),
            "ab",
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RuntimeError::Connect { .. }), "{err}");
    }
}
