//! Bench-side gRPC pieces: a `Subscribe` client that reads only what the
//! catch-up scenario checks (each event's sequence, and `caught_up`), so the
//! load generator sharing the cores with the server does not spend them
//! decoding whole events; and the lookup baseline, a bare tonic server that
//! answers the same generated `GetOrder` call with one order held in memory.

use bytes::Buf;
use prost::encoding::{WireType, decode_key, decode_varint, skip_field};
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::BoxStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_prost::{ProstCodec, ProstEncoder};

use ordertrail::proto::order_trail_server::OrderTrail;
use ordertrail::proto::{
    FindOrdersRequest, FindOrdersResponse, GetOrderRequest, ListEventsRequest, ListEventsResponse, ListOrdersRequest,
    ListOrdersResponse, Order, SubscribeRequest, SubscribeResponse,
};

/// What the catch-up client takes from a `SubscribeResponse`.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// `event` with this sequence.
    Event(u64),
    /// `caught_up` at this sequence.
    CaughtUp(u64),
    /// Anything else.
    Other,
}

/// `SubscribeResponse.event` and `.caught_up`; field 1 of `Event` and of
/// `CaughtUp` is the sequence.
const EVENT: u32 = 1;
const CAUGHT_UP: u32 = 2;
const SEQUENCE: u32 = 1;

/// Reads the `sequence` (field 1, varint) of a message `len` bytes long,
/// skipping every other field.
fn sequence_of(buf: &mut impl Buf, len: usize) -> Result<u64, prost::DecodeError> {
    let end = buf.remaining().saturating_sub(len);
    let mut sequence = 0;
    while buf.remaining() > end {
        let (field, wire_type) = decode_key(buf)?;
        if field == SEQUENCE && wire_type == WireType::Varint {
            sequence = decode_varint(buf)?;
        } else {
            skip_field(wire_type, field, buf, prost::encoding::DecodeContext::default())?;
        }
    }
    Ok(sequence)
}

fn seen(buf: &mut impl Buf) -> Result<Seen, prost::DecodeError> {
    let mut seen = Seen::Other;
    while buf.has_remaining() {
        let (field, wire_type) = decode_key(buf)?;
        match (field, wire_type) {
            (EVENT | CAUGHT_UP, WireType::LengthDelimited) => {
                let len = decode_varint(buf)? as usize;
                let sequence = sequence_of(buf, len)?;
                seen = if field == EVENT { Seen::Event(sequence) } else { Seen::CaughtUp(sequence) };
            }
            _ => skip_field(wire_type, field, buf, prost::encoding::DecodeContext::default())?,
        }
    }
    Ok(seen)
}

/// Encodes `SubscribeRequest` (prost's encoder), decodes [`Seen`].
#[derive(Clone, Copy, Default)]
pub struct SequenceCodec;

pub struct SeenDecoder;

impl Decoder for SeenDecoder {
    type Item = Seen;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Seen>, Status> {
        seen(src).map(Some).map_err(|e| Status::internal(format!("bad SubscribeResponse: {e}")))
    }
}

impl Codec for SequenceCodec {
    type Encode = SubscribeRequest;
    type Decode = Seen;
    type Encoder = ProstEncoder<SubscribeRequest>;
    type Decoder = SeenDecoder;

    fn encoder(&mut self) -> ProstEncoder<SubscribeRequest> {
        ProstCodec::<SubscribeRequest, SubscribeResponse>::default().encoder()
    }

    fn decoder(&mut self) -> SeenDecoder {
        SeenDecoder
    }
}

/// `Subscribe` with [`SequenceCodec`].
pub async fn subscribe_sequences(
    channel: Channel,
    request: SubscribeRequest,
) -> Result<tonic::Streaming<Seen>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/ordertrail.v1.OrderTrail/Subscribe");
    Ok(grpc.server_streaming(Request::new(request), path, SequenceCodec).await?.into_inner())
}

/// The lookup baseline: `GetOrder` answered with one order from memory,
/// no store. Every other method is unimplemented.
pub struct BareOrders(pub Order);

#[tonic::async_trait]
impl OrderTrail for BareOrders {
    async fn get_order(&self, _request: Request<GetOrderRequest>) -> Result<Response<Order>, Status> {
        Ok(Response::new(self.0.clone()))
    }

    async fn find_orders(&self, _: Request<FindOrdersRequest>) -> Result<Response<FindOrdersResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn list_orders(&self, _: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn list_events(&self, _: Request<ListEventsRequest>) -> Result<Response<ListEventsResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    type SubscribeStream = BoxStream<SubscribeResponse>;

    async fn subscribe(&self, _: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("bare"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordertrail::proto::subscribe_response::Message as Streamed;
    use ordertrail::proto::{CaughtUp, Event};
    use prost::Message;

    #[test]
    fn reads_the_sequence_of_events_and_caught_up() {
        let event = Event { sequence: 300, source: "ordermesh".into(), ..Event::default() };
        let response = SubscribeResponse { message: Some(Streamed::Event(event)) }.encode_to_vec();
        assert_eq!(seen(&mut response.as_slice()).unwrap(), Seen::Event(300));
        let caught_up = SubscribeResponse { message: Some(Streamed::CaughtUp(CaughtUp { sequence: 7 })) };
        assert_eq!(seen(&mut caught_up.encode_to_vec().as_slice()).unwrap(), Seen::CaughtUp(7));
        assert_eq!(seen(&mut [].as_slice()).unwrap(), Seen::Other);
    }
}
