//! `Subscribe` on the wire without re-encoding events.
//!
//! An event is encoded once: when stored (replay sends the stored bytes) or
//! when published live (every subscriber shares one encoding). The
//! generated service would decode and re-encode it for each subscriber, so
//! `Subscribe` is served by [`SubscribeRoute`] with [`SubscribeCodec`],
//! which writes an [`Outgoing::Event`]'s bytes as field 1 of
//! `SubscribeResponse`: byte for byte what the generated code would send.
//! Every other method goes to the generated service unchanged.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic_prost::{ProstCodec, ProstDecoder};

use super::OrderTrailService;
use super::subscribe::Outbound;
use crate::proto::order_trail_server::OrderTrailServer;
use crate::proto::{SubscribeRequest, SubscribeResponse};

/// `SubscribeResponse.event` (field 1).
const EVENT_FIELD: u32 = 1;

/// One `SubscribeResponse`: typed, or an event already encoded.
#[derive(Debug)]
pub enum Outgoing {
    Message(Box<SubscribeResponse>),
    Event { sequence: u64, encoded: Bytes },
}

impl Outgoing {
    /// The typed message (decoding an encoded event).
    pub fn into_message(self) -> Result<SubscribeResponse, Status> {
        match self {
            Self::Message(message) => Ok(*message),
            Self::Event { encoded, .. } => SubscribeResponse::decode(encoded_response(&encoded).as_ref())
                .map_err(|e| Status::internal(format!("stored event could not be read: {e}"))),
        }
    }
}

/// `SubscribeResponse { event }` around an encoded event.
fn encoded_response(event: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(event.len() + 11);
    write_event(event, &mut out);
    out
}

fn write_event(event: &[u8], out: &mut impl BufMut) {
    encode_key(EVENT_FIELD, WireType::LengthDelimited, out);
    encode_varint(event.len() as u64, out);
    out.put_slice(event);
}

/// Encodes [`Outgoing`], decodes `SubscribeRequest`.
#[derive(Clone, Copy, Default)]
pub struct SubscribeCodec;

pub struct OutgoingEncoder;

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outgoing::Message(message) => {
                message.encode(dst).map_err(|e| Status::internal(format!("encoding failed: {e}")))
            }
            Outgoing::Event { encoded, .. } => {
                write_event(&encoded, dst);
                Ok(())
            }
        }
    }
}

impl Codec for SubscribeCodec {
    type Encode = Outgoing;
    type Decode = SubscribeRequest;
    type Encoder = OutgoingEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> OutgoingEncoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder(ProstCodec::<SubscribeResponse, SubscribeRequest>::default().decoder())
    }
}

/// prost's decoder for the request.
pub struct RequestDecoder(ProstDecoder<SubscribeRequest>);

impl Decoder for RequestDecoder {
    type Item = SubscribeRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<SubscribeRequest>, Status> {
        self.0.decode(src).map_err(callers_fault)
    }
}

// === The codec of every generated service and client ===

/// prost's codec, except that a message that cannot be decoded is the
/// sender's fault: `INVALID_ARGUMENT`, not prost's `INTERNAL` (build.rs
/// makes the generated code use it).
pub struct ProtoCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> ProtoDecoder<U> {
        ProtoDecoder(self.0.decoder())
    }
}

/// prost's decoder, its errors the sender's.
pub struct ProtoDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(src).map_err(callers_fault)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

fn callers_fault(status: Status) -> Status {
    match status.code() {
        tonic::Code::Internal => {
            Status::invalid_argument(format!("the message could not be decoded: {}", status.message()))
        }
        _ => status,
    }
}

/// The `OrderTrail` service: `Subscribe` served here, the rest by the
/// generated server.
#[derive(Clone)]
pub struct SubscribeRoute {
    pub generated: OrderTrailServer<OrderTrailService>,
    pub service: Arc<OrderTrailService>,
    pub max_decoding: usize,
    pub max_encoding: usize,
}

impl NamedService for SubscribeRoute {
    const NAME: &'static str = <OrderTrailServer<OrderTrailService> as NamedService>::NAME;
}

const SUBSCRIBE_PATH: &str = "/ordertrail.v1.OrderTrail/Subscribe";

impl Service<http::Request<Body>> for SubscribeRoute {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != SUBSCRIBE_PATH {
            return self.generated.call(request);
        }
        let method = Subscribe(self.service.clone());
        let (max_decoding, max_encoding) = (self.max_decoding, self.max_encoding);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(SubscribeCodec)
                .apply_max_message_size_config(Some(max_decoding), Some(max_encoding));
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}

struct Subscribe(Arc<OrderTrailService>);

impl tonic::server::ServerStreamingService<SubscribeRequest> for Subscribe {
    type Response = Outgoing;
    type ResponseStream = Outbound;
    type Future = BoxFuture<tonic::Response<Outbound>, Status>;

    fn call(&mut self, request: tonic::Request<SubscribeRequest>) -> Self::Future {
        let service = self.0.clone();
        let peer = request.remote_addr().map(|addr| addr.ip().to_canonical());
        Box::pin(async move { service.subscriptions.open(request.into_inner(), peer).await.map(tonic::Response::new) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::subscribe_response::Message as Streamed;
    use crate::proto::{Event, EventKind};

    #[test]
    fn an_encoded_event_is_the_response_the_generated_code_would_send() {
        let event = Event {
            sequence: 42,
            source: "ordermesh".into(),
            kind: EventKind::OrderCreated as i32,
            ..Event::default()
        };
        let typed = SubscribeResponse { message: Some(Streamed::Event(event.clone())) }.encode_to_vec();
        assert_eq!(encoded_response(&event.encode_to_vec()), typed);
        let outgoing = Outgoing::Event { sequence: 42, encoded: event.encode_to_vec().into() };
        assert_eq!(outgoing.into_message().unwrap().message, Some(Streamed::Event(event)));
    }
}
