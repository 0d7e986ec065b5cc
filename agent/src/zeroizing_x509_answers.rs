//! `FetchX509SVID` answers whose private-key copies are zeroized once encoded.
//!
//! Each answer carries a PKCS#8 copy of every SVID's key in a prost message field (a
//! plain `Vec<u8>`). With the generated server, tonic encodes the message and frees it
//! without zeroizing; here `FetchX509SVID` is served through the same service code with
//! an encoder that zeroizes those fields right after encoding. Every other method goes
//! to the generated server unchanged. What stays beyond reach (the encoded bytes in
//! tonic's and h2's buffers) is listed in the README.

use std::convert::Infallible;
use std::sync::Arc;

use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};
use tonic::server::NamedService;
use tonic::Status;
use zeroize::Zeroize;
use ztid_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use ztid_proto::workload::{X509svidRequest, X509svidResponse};

use crate::workload_api::WorkloadApi;

/// The gRPC path of `FetchX509SVID`.
const FETCH_X509_SVID_PATH: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

/// Encodes `answer` into `buf`, then zeroizes its private-key copies (whether or not the
/// encoding succeeded).
pub fn encode_then_zeroize_keys(
    answer: &mut X509svidResponse,
    buf: &mut impl bytes::BufMut,
) -> Result<(), prost::EncodeError> {
    let encoded = answer.encode(buf);
    for svid in &mut answer.svids {
        svid.x509_svid_key.zeroize();
    }
    encoded
}

/// Encodes `FetchX509SVID` answers, zeroizing their keys after.
#[derive(Debug, Default, Clone, Copy)]
struct ZeroizingEncoder;

impl Encoder for ZeroizingEncoder {
    type Item = X509svidResponse;
    type Error = Status;

    fn encode(&mut self, mut item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        encode_then_zeroize_keys(&mut item, buf)
            .map_err(|e| Status::internal(format!("encoding the X509-SVID answer: {e}")))
    }
}

/// `FetchX509SVID`'s codec: requests as prost decodes them, answers zeroized once encoded.
#[derive(Debug, Default, Clone, Copy)]
struct ZeroizingX509Codec;

impl Codec for ZeroizingX509Codec {
    type Encode = X509svidResponse;
    type Decode = X509svidRequest;
    type Encoder = ZeroizingEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ZeroizingEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder::default()
    }
}

/// Decodes `FetchX509SVID` requests as the generated server does.
#[derive(Debug, Default)]
struct RequestDecoder(tonic_prost::ProstDecoder<X509svidRequest>);

impl Decoder for RequestDecoder {
    type Item = X509svidRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(buf)
    }
}

/// `FetchX509SVID` of the agent's Workload API service.
struct FetchX509Svid(Arc<WorkloadApi>);

impl tonic::server::ServerStreamingService<X509svidRequest> for FetchX509Svid {
    type Response = X509svidResponse;
    type ResponseStream = <WorkloadApi as SpiffeWorkloadApi>::FetchX509SVIDStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<X509svidRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.fetch_x509svid(request).await })
    }
}

/// The Workload API service: the generated server, with `FetchX509SVID` answered through
/// [`ZeroizingX509Codec`].
#[derive(Clone)]
pub struct WorkloadApiService {
    api: Arc<WorkloadApi>,
    generated: SpiffeWorkloadApiServer<WorkloadApi>,
    max_request_bytes: usize,
}

impl WorkloadApiService {
    /// Serves `api`, refusing request messages larger than `max_request_bytes`.
    pub fn new(api: WorkloadApi, max_request_bytes: usize) -> Self {
        let api = Arc::new(api);
        Self {
            generated: SpiffeWorkloadApiServer::from_arc(api.clone())
                .max_decoding_message_size(max_request_bytes),
            api,
            max_request_bytes,
        }
    }
}

impl NamedService for WorkloadApiService {
    const NAME: &'static str = <SpiffeWorkloadApiServer<WorkloadApi> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for WorkloadApiService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != FETCH_X509_SVID_PATH {
            return self.generated.call(req);
        }
        let method = FetchX509Svid(self.api.clone());
        let max_request_bytes = self.max_request_bytes;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ZeroizingX509Codec)
                .apply_max_message_size_config(Some(max_request_bytes), None);
            Ok(grpc.server_streaming(method, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztid_proto::workload::X509svid;

    #[test]
    fn the_path_is_the_generated_services_fetch_x509_svid() {
        assert_eq!(
            FETCH_X509_SVID_PATH,
            format!("/{}/FetchX509SVID", WorkloadApiService::NAME)
        );
    }

    #[test]
    fn an_answer_is_encoded_whole_and_its_key_copies_zeroized_after() {
        let svid = |key: &[u8]| X509svid {
            spiffe_id: "spiffe://example.org/w/0123".into(),
            x509_svid: vec![1, 2, 3],
            x509_svid_key: key.to_vec(),
            bundle: vec![4],
            hint: String::new(),
        };
        let mut answer = X509svidResponse {
            svids: vec![svid(b"first key"), svid(b"second key")],
            ..Default::default()
        };
        let expected = answer.clone();
        let mut buf = Vec::new();
        encode_then_zeroize_keys(&mut answer, &mut buf).unwrap();
        assert_eq!(X509svidResponse::decode(buf.as_slice()).unwrap(), expected);
        assert!(answer.svids.iter().all(|s| s.x509_svid_key.is_empty()));
        assert_eq!(answer.svids[0].x509_svid, vec![1, 2, 3], "only the keys");
    }
}
