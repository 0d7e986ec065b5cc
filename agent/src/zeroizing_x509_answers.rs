//! X509-SVID answers whose private-key copies are zeroized once encoded: the Workload
//! API's `FetchX509SVID` here, the Delegated Identity API's `SubscribeToX509SVIDs`
//! (`delegated_identity`) and Envoy SDS's `StreamSecrets` and `FetchSecrets` (`sds`),
//! through one generic route ([`ZeroizingService`]).
//!
//! Each answer carries a copy of every SVID's key in a prost message field (a plain
//! `Vec<u8>`: PKCS#8, or for SDS the encoded `Secret` holding it in PEM). With a
//! generated server, tonic encodes the message and frees it without zeroizing; here
//! those methods are served through the same service code with an encoder that
//! zeroizes the key fields right after encoding ([`KeyCopies`]). Every other method
//! goes to the generated server unchanged, with the same request size limit. What stays
//! beyond reach (the encoded bytes in tonic's and h2's buffers) is listed in the README.

use std::convert::Infallible;
use std::marker::PhantomData;
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

/// An answer holding private-key copies, which [`KeyCopies::zeroize_keys`] wipes.
pub trait KeyCopies: Message + Send + 'static {
    /// Zeroizes every private-key field.
    fn zeroize_keys(&mut self);
}

impl KeyCopies for X509svidResponse {
    fn zeroize_keys(&mut self) {
        for svid in &mut self.svids {
            svid.x509_svid_key.zeroize();
        }
    }
}

/// Encodes `answer` into `buf`, then zeroizes its private-key copies (whether or not the
/// encoding succeeded).
pub fn encode_then_zeroize_keys<T: KeyCopies>(
    answer: &mut T,
    buf: &mut impl bytes::BufMut,
) -> Result<(), prost::EncodeError> {
    let encoded = answer.encode(buf);
    answer.zeroize_keys();
    encoded
}

/// Encodes answers of type `T`, zeroizing their keys after.
pub struct ZeroizingEncoder<T>(PhantomData<T>);

impl<T: KeyCopies> Encoder for ZeroizingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, mut item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        encode_then_zeroize_keys(&mut item, buf)
            .map_err(|e| Status::internal(format!("encoding the X509-SVID answer: {e}")))
    }
}

/// A method's codec: requests as prost decodes them, answers zeroized once encoded.
pub struct ZeroizingCodec<Req, Resp>(PhantomData<(Req, Resp)>);

impl<Req, Resp> Codec for ZeroizingCodec<Req, Resp>
where
    Req: Message + Default + Send + 'static,
    Resp: KeyCopies,
{
    type Encode = Resp;
    type Decode = Req;
    type Encoder = ZeroizingEncoder<Resp>;
    type Decoder = RequestDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        ZeroizingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(tonic_prost::ProstDecoder::default())
    }
}

/// Decodes requests as the generated servers do.
pub struct RequestDecoder<Req>(tonic_prost::ProstDecoder<Req>);

impl<Req: Message + Default> Decoder for RequestDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        self.0.decode(buf)
    }
}

/// `FetchX509SVID` of the agent's Workload API service.
#[derive(Clone)]
pub struct FetchX509Svid(Arc<WorkloadApi>);

impl tonic::server::ServerStreamingService<X509svidRequest> for FetchX509Svid {
    type Response = X509svidResponse;
    type ResponseStream = <WorkloadApi as SpiffeWorkloadApi>::FetchX509SVIDStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<X509svidRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.fetch_x509svid(request).await })
    }
}

/// How one method's calls are served through [`ZeroizingCodec`]: as tonic's generated
/// code would for its kind ([`ServerStreaming`], [`BidiStreaming`], [`Unary`]).
pub trait ZeroizingMethod<Req>: Clone + Send + 'static {
    /// The answer, whose key copies are zeroized once encoded.
    type Response: KeyCopies;

    /// Serves one call.
    fn serve<B>(
        self,
        grpc: tonic::server::Grpc<ZeroizingCodec<Req, Self::Response>>,
        req: http::Request<B>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static;
}

/// Declares a method kind: the three differ only in tonic's handler and its bounds.
macro_rules! zeroizing_method {
    ($(#[$doc:meta])* $kind:ident, $service:ident, $handler:ident, [$($bounds:tt)*]) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $kind<M>(pub M);

        impl<Req, M> ZeroizingMethod<Req> for $kind<M>
        where
            Req: Message + Default + Send + 'static,
            M: tonic::server::$service<Req> + Clone + Send + 'static,
            M::Response: KeyCopies,
            M::Future: Send + 'static,
            $($bounds)*
        {
            type Response = M::Response;

            fn serve<B>(
                self,
                mut grpc: tonic::server::Grpc<ZeroizingCodec<Req, M::Response>>,
                req: http::Request<B>,
            ) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
            where
                B: Body + Send + 'static,
                B::Error: Into<StdError> + Send + 'static,
            {
                Box::pin(async move { Ok(grpc.$handler(self.0, req).await) })
            }
        }
    };
}

zeroizing_method!(
    /// A server-streaming method.
    ServerStreaming, ServerStreamingService, server_streaming, [M::ResponseStream: Send + 'static,]
);
zeroizing_method!(
    /// A bidirectional-streaming method.
    BidiStreaming, StreamingService, streaming, [M::ResponseStream: Send + 'static,]
);
zeroizing_method!(
    /// A unary method.
    Unary, UnaryService, unary, []
);

/// A generated server `G` with one method (`M`, at `path`) answered through
/// [`ZeroizingCodec`]; nest them for more than one.
#[derive(Clone)]
pub struct ZeroizingService<G, M, Req> {
    generated: G,
    path: &'static str,
    method: M,
    max_request_bytes: usize,
    request: PhantomData<fn() -> Req>,
}

impl<G, M, Req> ZeroizingService<G, M, Req> {
    /// `generated`, with `method` at `path` answered through the zeroizing codec; its
    /// request messages larger than `max_request_bytes` are refused, as the generated
    /// server's are (configure `generated` with the same bound).
    pub fn new(generated: G, path: &'static str, method: M, max_request_bytes: usize) -> Self {
        Self {
            generated,
            path,
            method,
            max_request_bytes,
            request: PhantomData,
        }
    }
}

/// The Workload API service, `FetchX509SVID` zeroizing its answers' keys.
pub type WorkloadApiService = ZeroizingService<
    SpiffeWorkloadApiServer<WorkloadApi>,
    ServerStreaming<FetchX509Svid>,
    X509svidRequest,
>;

impl WorkloadApiService {
    /// Serves `api`, refusing request messages larger than `max_request_bytes`.
    pub fn serving(api: WorkloadApi, max_request_bytes: usize) -> Self {
        let api = Arc::new(api);
        Self::new(
            SpiffeWorkloadApiServer::from_arc(api.clone())
                .max_decoding_message_size(max_request_bytes),
            FETCH_X509_SVID_PATH,
            ServerStreaming(FetchX509Svid(api)),
            max_request_bytes,
        )
    }
}

impl<G: NamedService, M, Req> NamedService for ZeroizingService<G, M, Req> {
    const NAME: &'static str = G::NAME;
}

impl<G, M, Req, B> Service<http::Request<B>> for ZeroizingService<G, M, Req>
where
    G: Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future = BoxFuture<http::Response<tonic::body::Body>, Infallible>,
        > + Clone
        + Send
        + 'static,
    M: ZeroizingMethod<Req>,
    Req: Message + Default + Send + 'static,
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
        if req.uri().path() != self.path {
            return self.generated.call(req);
        }
        let grpc = tonic::server::Grpc::new(ZeroizingCodec::<Req, M::Response>(PhantomData))
            .apply_max_message_size_config(Some(self.max_request_bytes), None);
        self.method.clone().serve(grpc, req)
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
