//! A gRPC codec that hands the encoded request through as bytes.
//!
//! tonic's prost codec would decode every request into structs; Phoenix forwards most data
//! untouched, so receiver and exporter both speak bytes and decode only on demand.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use futures_util::future::BoxFuture;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::Status;

use super::ExportMetricsServiceResponse;

/// Server side: decodes to raw bytes, encodes a prost response.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawRequestCodec<Resp>(std::marker::PhantomData<Resp>);

/// Client side: encodes raw bytes, decodes a prost response.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawClientCodec<Resp>(std::marker::PhantomData<Resp>);

#[derive(Debug, Clone, Copy, Default)]
pub struct BytesDecoder;

impl Decoder for BytesDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ProstEncoder<M>(std::marker::PhantomData<M>);

impl<M: Message> Encoder for ProstEncoder<M> {
    type Item = M;
    type Error = Status;

    fn encode(&mut self, item: M, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding response: {e}")))
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ProstDecoder<M>(std::marker::PhantomData<M>);

impl<M: Message + Default> Decoder for ProstDecoder<M> {
    type Item = M;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<M>, Status> {
        M::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding response: {e}")))
    }
}

impl<Resp: Message + Default + Send + 'static> Codec for RawRequestCodec<Resp> {
    type Encode = Resp;
    type Decode = Bytes;
    type Encoder = ProstEncoder<Resp>;
    type Decoder = BytesDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder(std::marker::PhantomData)
    }
    fn decoder(&mut self) -> Self::Decoder {
        BytesDecoder
    }
}

impl<Resp: Message + Default + Send + 'static> Codec for RawClientCodec<Resp> {
    type Encode = Bytes;
    type Decode = Resp;
    type Encoder = BytesEncoder;
    type Decoder = ProstDecoder<Resp>;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(std::marker::PhantomData)
    }
}

/// gRPC service name of OTLP metrics.
pub const METRICS_SERVICE: &str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
/// gRPC path of OTLP metrics export.
pub const METRICS_EXPORT_PATH: &str =
    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// Answers one OTLP metrics export whose request is kept as bytes.
pub trait ExportHandler: Clone + Send + Sync + 'static {
    /// Largest request accepted after decompression; read per call, so it may change while
    /// the server runs.
    fn max_message_size(&self) -> usize;

    fn export(
        &self,
        request: Bytes,
    ) -> BoxFuture<'static, Result<ExportMetricsServiceResponse, Status>>;
}

/// `MetricsService/Export` over gRPC, gzip accepted, the request handed to `H` as bytes.
#[derive(Clone)]
pub struct RawMetricsServer<H>(pub H);

impl<H: ExportHandler> NamedService for RawMetricsServer<H> {
    const NAME: &'static str = METRICS_SERVICE;
}

struct ExportCall<H>(H);

impl<H: ExportHandler> tonic::server::UnaryService<Bytes> for ExportCall<H> {
    type Response = ExportMetricsServiceResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::Response>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let reply = self.0.export(request.into_inner());
        Box::pin(async move { reply.await.map(tonic::Response::new) })
    }
}

impl<H, B> tower::Service<http::Request<B>> for RawMetricsServer<H>
where
    H: ExportHandler,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != METRICS_EXPORT_PATH {
            let path = request.uri().path().to_string();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("unknown method {path}")).into_http())
            });
        }
        let max = self.0.max_message_size();
        let call = ExportCall(self.0.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(
                RawRequestCodec::<ExportMetricsServiceResponse>::default(),
            )
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(max);
            Ok(grpc.unary(call, request).await)
        })
    }
}
