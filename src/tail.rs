//! `ordertrail tail`: a command-line subscriber that prints the event stream
//! one line per event and, after a disconnect, resumes from the last
//! sequence it saw, so an operator can watch traffic without gaps.

use std::io::Write;
use std::time::Duration;

use prost_types::Timestamp;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::proto::order_trail_client::OrderTrailClient;
use crate::proto::subscribe_response::Message;
use crate::proto::{Event, OrderReference, SubscribeRequest, order_reference};

/// What to watch and how to print it.
#[derive(Clone, Debug)]
pub struct TailOptions {
    /// `http://host:port` of the gRPC listener.
    pub endpoint: String,
    /// Start after this sequence; `None`: from now.
    pub after: Option<u64>,
    /// Only these sources.
    pub sources: Vec<String>,
    /// Only the order with this merchant reference.
    pub reference: Option<String>,
    /// One JSON object per line instead of text.
    pub json: bool,
    /// Bearer token to send, when the server asks for one.
    pub token: Option<String>,
    /// PEM CA certificate: connect with TLS and trust this CA.
    pub ca_pem: Option<Vec<u8>>,
}

/// Why tailing stopped.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The server refused the subscription itself (bad request, history gone).
    #[error("{0}")]
    Refused(String),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Prints events until `stop`, reconnecting (with backoff) after failures.
pub async fn run(options: TailOptions, out: &mut impl Write, stop: CancellationToken) -> Result<(), TailError> {
    let mut position = options.after;
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            outcome = stream_once(&options, &mut position, out) => outcome,
        };
        match outcome {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(why)) => {
                let from = position.map_or("now".to_string(), |p| format!("after {p}"));
                eprintln!("ordertrail tail: {why}; reconnecting in {backoff:?} (resuming {from})");
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

enum Failure {
    Retry(String),
    Fatal(TailError),
}

/// One connection: subscribes after `position` and prints until it ends.
async fn stream_once(options: &TailOptions, position: &mut Option<u64>, out: &mut impl Write) -> Result<(), Failure> {
    let mut client = connect(options).await?;
    let order = options
        .reference
        .clone()
        .map(|r| OrderReference { reference: Some(order_reference::Reference::MerchantReference(r)) });
    let request = SubscribeRequest {
        after_sequence: *position,
        sources: options.sources.clone(),
        order_reference: order,
        ..Default::default()
    };
    let mut stream = client.subscribe(request).await.map_err(status_failure)?.into_inner();
    loop {
        let message = match stream.message().await {
            Ok(Some(response)) => response.message,
            Ok(None) => return Err(Failure::Retry("the server ended the stream".into())),
            Err(status) => return Err(status_failure(status)),
        };
        match message {
            Some(Message::Event(event)) => {
                writeln!(out, "{}", if options.json { json_line(&event) } else { text_line(&event) })
                    .and_then(|()| out.flush())
                    .map_err(|e| Failure::Fatal(e.into()))?;
                *position = Some(event.sequence);
            }
            Some(Message::CaughtUp(c)) => *position = Some(c.sequence),
            Some(Message::Progress(p)) => *position = Some(p.resume_after_sequence),
            Some(Message::SnapshotComplete(s)) => *position = Some(s.sequence),
            Some(Message::SnapshotOrder(_)) | None => {}
        }
    }
}

/// Adds the bearer token to every call, when there is one.
#[derive(Clone)]
struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = OrderTrailClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Token>>;

async fn connect(options: &TailOptions) -> Result<Client, Failure> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let token = match &options.token {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| Failure::Fatal(TailError::Refused("invalid token".into())))?,
        ),
        None => None,
    };
    let mut endpoint = Channel::from_shared(options.endpoint.clone())
        .map_err(|e| Failure::Fatal(TailError::Refused(e.to_string())))?;
    if let Some(ca) = &options.ca_pem {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        endpoint = endpoint.tls_config(tls).map_err(|e| Failure::Fatal(TailError::Refused(e.to_string())))?;
    }
    let channel = endpoint.connect().await.map_err(|e| Failure::Retry(e.to_string()))?;
    Ok(OrderTrailClient::with_interceptor(channel, Token(token)))
}

fn status_failure(status: tonic::Status) -> Failure {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::NotFound | Code::Unimplemented | Code::Unauthenticated => {
            Failure::Fatal(TailError::Refused(status.message().to_string()))
        }
        _ => Failure::Retry(format!("{}: {}", status.code(), status.message())),
    }
}

fn time(t: Option<Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_string()
}

fn text_line(e: &Event) -> String {
    let refs = e.references.clone().unwrap_or_default();
    let mut line = format!(
        "{} {} {} {} order={} ref={} status={}",
        e.sequence,
        time(e.received_at),
        e.source,
        short(e.kind().as_str_name(), "EVENT_KIND_"),
        e.order_id,
        refs.merchant_reference,
        short(e.status().as_str_name(), "ORDER_STATUS_"),
    );
    if let Some(s) = &e.shipment {
        line.push_str(&format!(
            " shipment={} {} {}",
            s.id,
            short(s.status().as_str_name(), "SHIPMENT_STATUS_"),
            s.tracking_number
        ));
    }
    if !e.applied {
        line.push_str(" (stale)");
    }
    line
}

fn json_line(e: &Event) -> String {
    let refs = e.references.clone().unwrap_or_default();
    json!({
        "sequence": e.sequence,
        "received_at": time(e.received_at),
        "source": e.source,
        "provider": e.provider().as_str_name(),
        "kind": e.kind().as_str_name(),
        "order_id": e.order_id,
        "merchant_reference": refs.merchant_reference,
        "provider_order_id": refs.provider_order_id,
        "status": e.status().as_str_name(),
        "provider_status": e.provider_status,
        "previous_status": e.previous_status().as_str_name(),
        "applied": e.applied,
        "note": e.note,
        "shipment": e.shipment.as_ref().map(|s| json!({
            "id": s.id,
            "status": s.status().as_str_name(),
            "tracking_number": s.tracking_number,
            "carrier": s.carrier,
        })),
        "raw_id": e.provenance.as_ref().map(|p| p.raw_id),
    })
    .to_string()
}
