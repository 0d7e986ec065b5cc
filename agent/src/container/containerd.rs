//! containerd's own API (gRPC on its socket): `containers.v1 Get` for the labels and the
//! image reference, `images.v1 Get` to confirm the digest a reference pins
//! (`name@sha256:…`; a tag gives no image digest: it may name another image by now),
//! `tasks.v1 Get` for whether it runs and its first process. The namespace (`k8s.io` for
//! containers the kubelet made through CRI, `default` for `ctr`) goes in the
//! `containerd-namespace` header.
//!
//! The messages are the subset of containerd's protos that is read here, with their
//! upstream field numbers (protobuf skips the fields not declared).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use http::uri::PathAndQuery;
use tonic::client::Grpc;

use super::docker_api::{ContainerFacts, RuntimeError};

/// Largest answer decoded (a container's record holds its OCI spec: tens of KiB).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// `containerd.services.containers.v1.GetContainerRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetContainerRequest {
    /// Container ID.
    #[prost(string, tag = "1")]
    pub id: String,
}

/// `containerd.services.containers.v1.GetContainerResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetContainerResponse {
    /// The container.
    #[prost(message, optional, tag = "1")]
    pub container: Option<Container>,
}

/// `containerd.services.containers.v1.Container` (id, labels, image).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Container {
    /// Container ID.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Labels.
    #[prost(map = "string, string", tag = "2")]
    pub labels: HashMap<String, String>,
    /// Image reference.
    #[prost(string, tag = "3")]
    pub image: String,
}

/// `containerd.services.images.v1.GetImageRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetImageRequest {
    /// Image reference.
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `containerd.services.images.v1.GetImageResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetImageResponse {
    /// The image.
    #[prost(message, optional, tag = "1")]
    pub image: Option<Image>,
}

/// `containerd.services.images.v1.Image` (name, target).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    /// Reference.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The manifest (or index) it names.
    #[prost(message, optional, tag = "3")]
    pub target: Option<Descriptor>,
}

/// `containerd.types.Descriptor` (media type, digest).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Descriptor {
    /// Media type.
    #[prost(string, tag = "1")]
    pub media_type: String,
    /// Content digest, `sha256:<hex>`.
    #[prost(string, tag = "2")]
    pub digest: String,
}

/// `containerd.services.tasks.v1.GetRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetTaskRequest {
    /// Container ID.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Exec ID (empty: the container's first process).
    #[prost(string, tag = "2")]
    pub exec_id: String,
}

/// `containerd.services.tasks.v1.GetResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetTaskResponse {
    /// The process.
    #[prost(message, optional, tag = "1")]
    pub process: Option<Process>,
}

/// `containerd.v1.types.Process` (pid, status).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Process {
    /// Its pid, in containerd's (the host's) pid namespace.
    #[prost(uint32, tag = "3")]
    pub pid: u32,
    /// `containerd.v1.types.Status`: 2 is RUNNING.
    #[prost(int32, tag = "4")]
    pub status: i32,
}

const STATUS_RUNNING: i32 = 2;

/// Asks containerd at `socket` about container `id` in `namespace`: `Ok(None)` when it
/// does not know it there.
pub async fn inspect(
    socket: &Path,
    namespace: &str,
    id: &str,
    timeout: Duration,
) -> Result<Option<ContainerFacts>, RuntimeError> {
    let name = socket.display().to_string();
    super::docker_api::within(
        &name,
        timeout,
        inspect_unbounded(socket, &name, namespace, id),
    )
    .await
}

async fn inspect_unbounded(
    socket: &Path,
    name: &str,
    namespace: &str,
    id: &str,
) -> Result<Option<ContainerFacts>, RuntimeError> {
    let answer = |why: String| RuntimeError::Answer {
        socket: name.to_string(),
        why,
    };
    let stream = super::docker_api::connect_trusted(socket, name).await?;
    let channel = channel_on(stream)
        .await
        .map_err(|e| RuntimeError::Connect {
            socket: name.to_string(),
            source: std::io::Error::other(e),
        })?;
    let mut grpc = Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let call = |path: &'static str| PathAndQuery::from_static(path);

    let container: GetContainerResponse = match unary(
        &mut grpc,
        name,
        namespace,
        GetContainerRequest { id: id.into() },
        call("/containerd.services.containers.v1.Containers/Get"),
    )
    .await?
    {
        Some(r) => r,
        None => return Ok(None),
    };
    let container = container
        .container
        .ok_or_else(|| answer("no container in the answer".into()))?;
    if container.id != id {
        return Err(answer(format!(
            "asked about {id}, the answer is about {}",
            container.id
        )));
    }
    // containerd keeps only the name of the image a container was made from. Only a name
    // that pins a digest says which image that was; the image of that name must still be
    // that digest. A tag names whatever was last pulled or tagged under it, which is not
    // the image the container runs: no image-id selector then, rather than another
    // image's.
    let image_id = match pinned_digest(&container.image) {
        Some(pinned) => {
            let image: Option<GetImageResponse> = unary(
                &mut grpc,
                name,
                namespace,
                GetImageRequest {
                    name: container.image.clone(),
                },
                call("/containerd.services.images.v1.Images/Get"),
            )
            .await?;
            let target = image
                .and_then(|i| i.image)
                .and_then(|i| i.target)
                .map(|t| t.digest);
            pinned_image_id(pinned, target.as_deref())
        }
        None => None,
    }
    .unwrap_or_default();
    let task: Option<GetTaskResponse> = unary(
        &mut grpc,
        name,
        namespace,
        GetTaskRequest {
            container_id: id.into(),
            exec_id: String::new(),
        },
        call("/containerd.services.tasks.v1.Tasks/Get"),
    )
    .await?;
    let process = task.and_then(|t| t.process);
    let (running, init_pid) = match process {
        Some(p) => (
            p.status == STATUS_RUNNING,
            i32::try_from(p.pid).unwrap_or(0),
        ),
        None => (false, 0),
    };
    Ok(Some(ContainerFacts {
        id: container.id,
        name: String::new(),
        image_id,
        image: (!container.image.is_empty()).then_some(container.image),
        labels: container.labels.into_iter().collect(),
        running,
        init_pid,
        runtime: "containerd",
        namespace: Some(namespace.to_string()),
    }))
}

/// The digest an image reference pins (`name@sha256:<64 hex>`), if it pins one.
fn pinned_digest(reference: &str) -> Option<&str> {
    let (_, digest) = reference.rsplit_once('@')?;
    let hex = digest.strip_prefix("sha256:")?;
    let pinned = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    pinned.then_some(digest)
}

/// The `image-id` of a container made from a reference pinning `pinned`, whose image of
/// that name now targets `target`: the pinned digest if the image is that digest. (The
/// image may have been removed since, or a name holding a digest may have been made for
/// another image: then no image-id, rather than a guess.)
fn pinned_image_id(pinned: &str, target: Option<&str>) -> Option<String> {
    (target == Some(pinned)).then(|| pinned.to_string())
}

/// A gRPC channel on one connection already made (and its peer checked): it never
/// connects again, so every call goes to the process that was checked.
async fn channel_on(
    stream: tokio::net::UnixStream,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let stream = std::sync::Mutex::new(Some(stream));
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let taken = stream.lock().ok().and_then(|mut s| s.take());
            async move {
                taken
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the checked connection was closed"))
            }
        }))
        .await
}

/// One unary call in `namespace`: `Ok(None)` for NotFound.
async fn unary<Req, Resp>(
    grpc: &mut Grpc<tonic::transport::Channel>,
    name: &str,
    namespace: &str,
    request: Req,
    path: PathAndQuery,
) -> Result<Option<Resp>, RuntimeError>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let http = |why: String| RuntimeError::Http {
        socket: name.to_string(),
        why,
    };
    grpc.ready().await.map_err(|e| http(e.to_string()))?;
    let mut request = tonic::Request::new(request);
    let ns = namespace
        .parse()
        .map_err(|_| http(format!("namespace {namespace:?} is not a header value")))?;
    request.metadata_mut().insert("containerd-namespace", ns);
    match grpc
        .unary(request, path, tonic_prost::ProstCodec::default())
        .await
    {
        Ok(r) => Ok(Some(r.into_inner())),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(http(format!("{:?}: {}", s.code(), s.message()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:855ecc501d86d4280f55920b7f140efa1e773284ff55cf20dff9a31a23f0cf96";
    const B: &str = "sha256:1ddb6b0879ccd5c0c4f9402cd2ee825454c0908f17ef7d2e7a5b86f16ce0f1b8";

    /// A tag names whatever image was last pulled or tagged under it: never the image a
    /// container was made from. Only a pinned digest is, and only while the image of that
    /// name is that digest.
    #[test]
    fn image_id_only_from_a_pinned_reference() {
        for tag in [
            "localhost/app:a",
            "docker.io/library/nginx:latest",
            "nginx",
            "",
            // Not a digest: short, upper case, another algorithm.
            "localhost/app@sha256:855ecc",
            &format!(
                "localhost/app@{}",
                A.to_uppercase().replace("SHA256", "sha256")
            ),
            "localhost/app@sha512:855ecc501d86d4280f55920b7f140efa1e773284ff55cf20dff9a31a23f0cf96",
        ] {
            assert_eq!(pinned_digest(tag), None, "{tag:?}");
        }
        let by_digest = format!("localhost/app@{A}");
        assert_eq!(pinned_digest(&by_digest), Some(A));
        assert_eq!(pinned_digest(&format!("registry:5000/app:1@{A}")), Some(A));
        // The image of that name is the pinned digest.
        assert_eq!(pinned_image_id(A, Some(A)).as_deref(), Some(A));
        // A name holding digest A made for image B (`ctr images tag B name@A`), or an
        // image removed since: no image-id.
        assert_eq!(pinned_image_id(A, Some(B)), None);
        assert_eq!(pinned_image_id(A, None), None);
    }
}
