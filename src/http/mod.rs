//! The public webhook front door (hyper 1.x): routing, limits,
//! authentication, and the one place that maps ingest results and errors to
//! HTTP status codes.
//!
//! Routes: `POST /webhooks/{source}[/{kind}]`, `GET /healthz`, `GET /readyz`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming as Body;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::allowlist::Allowlists;
use crate::config::{AuthConfig, Config, RateLimit, SourceConfig};
use crate::console::{self, Console};
use crate::ingest::{self, auth};
use crate::metrics::Metrics;
use crate::proto::RawDelivery;
use crate::store::{IngestOutcome, Store, StoreError};

/// The response header that carries the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Request headers never stored, whatever the source's settings.
const UNSTORED_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie", "x-api-key"];

/// Everything a request handler needs.
pub struct FrontDoor {
    config: Arc<Config>,
    store: Store,
    shutdown: CancellationToken,
    /// Token buckets of the sources that have a rate limit.
    limiters: HashMap<String, DefaultDirectRateLimiter>,
    metrics: Arc<Metrics>,
    bodies: Bodies,
    allowlists: Arc<Allowlists>,
}

/// Why a request was not stored. Mapped to a status code in one place.
#[derive(Debug)]
enum Refusal {
    NotFound,
    MethodNotAllowed(&'static str),
    TooLarge(usize),
    /// The body did not arrive in time.
    Timeout,
    BadRequest(&'static str),
    Auth(auth::AuthError),
    /// Over the source's rate limit; retry after this long.
    RateLimited(Duration),
    Unavailable(StoreError),
    /// Too many bodies in flight to read this one in time.
    Busy,
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Auth(auth::AuthError::Unauthorized) => StatusCode::UNAUTHORIZED,
            Self::Auth(auth::AuthError::Forbidden) => StatusCode::FORBIDDEN,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(..) | Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A clear, safe message; internals are logged, never sent.
    fn message(&self) -> String {
        match self {
            Self::NotFound => "no such source or path".into(),
            Self::MethodNotAllowed(allow) => format!("method not allowed; use {allow}"),
            Self::TooLarge(limit) => format!("body larger than {limit} bytes"),
            Self::Timeout => "the body did not arrive in time; nothing was stored".into(),
            Self::BadRequest(why) => (*why).into(),
            Self::Auth(e) => e.to_string(),
            Self::RateLimited(_) => "rate limit of this source exceeded; nothing was stored, retry later".into(),
            Self::Unavailable(..) => "storage unavailable; nothing was stored, retry later".into(),
            Self::Busy => "too many requests in flight; nothing was stored, retry".into(),
        }
    }

    fn into_response(self, request_id: &str) -> Response<Full<Bytes>> {
        match &self {
            Self::Unavailable(e) => {
                // The store logs the failure itself, once; this only says
                // what it costs, at most once per interval.
                if let Some(unlogged) = STORAGE_REFUSALS.allow() {
                    tracing::warn!(request_id, error = %e, unlogged, "webhook not stored (503)");
                }
            }
            other => tracing::debug!(request_id, status = %other.status(), "webhook refused"),
        }
        let mut response = json_response(self.status(), json!({"request_id": request_id, "error": self.message()}));
        match self {
            Self::MethodNotAllowed(allow) => {
                response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::Busy => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            Self::RateLimited(wait) => {
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            _ => {}
        }
        response
    }
}

/// At most one log line per interval for an error that repeats.
struct Throttle {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    /// Occurrences not logged since the last line.
    unlogged: std::sync::atomic::AtomicU64,
    every: Duration,
}

impl Throttle {
    const fn new(every: Duration) -> Self {
        Self { last: std::sync::Mutex::new(None), unlogged: std::sync::atomic::AtomicU64::new(0), every }
    }

    /// `Some(occurrences not logged before)` when this one is to be logged.
    fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < self.every) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(std::time::Instant::now());
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

/// Webhooks answered 503 because storage failed.
static STORAGE_REFUSALS: Throttle = Throttle::new(Duration::from_secs(10));

// === impl FrontDoor ===

impl FrontDoor {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
        bodies: Bodies,
        allowlists: Arc<Allowlists>,
    ) -> Self {
        let limiters = config
            .sources
            .iter()
            .filter_map(|source| Some((source.name.clone(), limiter(source.rate_limit?)?)))
            .collect();
        Self { config, store, shutdown, limiters, metrics, bodies, allowlists }
    }

    /// Takes a token of the source's bucket, or says when to retry.
    fn admit(&self, source: &str) -> Result<(), Refusal> {
        let Some(limiter) = self.limiters.get(source) else { return Ok(()) };
        limiter
            .check()
            .map_err(|not_until| Refusal::RateLimited(not_until.wait_time_from(DefaultClock::default().now())))
    }

    async fn handle(&self, req: Request<Body>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let request_id = uuid::Uuid::now_v7().to_string();
        let response = match self.route(req, peer, &request_id).await {
            Ok(response) => response,
            Err(refusal) => refusal.into_response(&request_id),
        };
        with_request_id(response, &request_id)
    }

    async fn route(
        &self,
        req: Request<Body>,
        peer: SocketAddr,
        request_id: &str,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            ["healthz"] => {
                probe_method(req.method())?;
                Ok(json_response(StatusCode::OK, json!({"status": "ok"})))
            }
            ["readyz"] => {
                probe_method(req.method())?;
                Ok(self.readiness())
            }
            ["webhooks", source, rest @ ..] if rest.len() <= 1 => {
                let kind = rest.first().copied();
                let source = self.config.source(source).ok_or(Refusal::NotFound)?;
                if !source.provider.accepts_kind(kind) || kind == Some("") {
                    return Err(Refusal::NotFound);
                }
                if req.method() != Method::POST {
                    return Err(Refusal::MethodNotAllowed("POST"));
                }
                let started = std::time::Instant::now();
                let result = self.webhook(req, source, kind, peer, request_id).await;
                self.record(&source.name, &result, started);
                result.map(|outcome| outcome_response(&outcome, request_id))
            }
            _ => Err(Refusal::NotFound),
        }
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        if self.shutdown.is_cancelled() {
            json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "shutting down"}))
        } else if !self.store.is_healthy() {
            json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "storage unavailable"}))
        } else if let Some(damage) = self.store.damage() {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "stored data damaged; salvage with `ordertrail export`", "damage": damage}),
            )
        } else {
            let mut ready = json!({"status": "ready"});
            let warnings = self.store.warnings();
            if !warnings.is_empty() {
                ready["warnings"] = json!(warnings);
            }
            let allowlists = self.allowlists.statuses();
            if !allowlists.is_empty() {
                ready["allowlists"] = allowlists.iter().map(allowlist_detail).collect();
            }
            json_response(StatusCode::OK, ready)
        }
    }

    async fn webhook(
        &self,
        req: Request<Body>,
        source: &SourceConfig,
        kind: Option<&str>,
        peer: SocketAddr,
        request_id: &str,
    ) -> Result<IngestOutcome, Refusal> {
        let limit = self.config.http.body_limit_bytes;
        let (parts, body) = req.into_parts();
        let followed = self.allowlists.allowed(&source.name);
        let mut facts = auth::RequestFacts {
            headers: &parts.headers,
            peer,
            query: parts.uri.query(),
            body: &[],
            trusted_proxies: &self.config.http.trusted_proxies,
            followed: followed.as_deref().unwrap_or_default(),
        };
        // Before the body: a stranger is refused without it being read (and
        // without `100 Continue`).
        let verified_by_headers =
            auth::verify_headers(&source.auth, &facts).map_err(|e| self.auth_refusal(source, &facts, e))?;
        let expected = content_length(&parts.headers);
        if expected.is_some_and(|len| len > limit as u64) {
            return Err(Refusal::TooLarge(limit));
        }
        let (body, _held) = self.bodies.read(body, expected, verified_by_headers).await?;
        facts.body = &body;
        let verified = auth::verify(&source.auth, &facts).map_err(|e| self.auth_refusal(source, &facts, e))?;
        // After authentication, so strangers cannot spend a source's budget.
        self.admit(&source.name)?;
        if body.is_empty() {
            return Err(Refusal::BadRequest("empty body: not a webhook"));
        }
        let content_type = header_text(&parts.headers, header::CONTENT_TYPE);
        let raw = RawDelivery {
            request_id: request_id.to_string(),
            received_at: Some(now()),
            source: source.name.clone(),
            provider: source.provider.to_proto() as i32,
            kind: kind.unwrap_or_default().to_string(),
            content_type: content_type.clone(),
            headers: stored_headers(&parts.headers, &source.auth),
            peer_addr: peer.to_string(),
            auth_method: verified.method().to_string(),
            body_sha256: ingest::sha256_hex(&body),
            body,
            ..RawDelivery::default()
        };
        let outcome = self.store.ingest(raw).await.map_err(Refusal::Unavailable)?;
        tracing::debug!(request_id, source = %source.name, ?outcome, "webhook stored");
        Ok(outcome)
    }

    /// The refusal for a request that failed authentication. A sender an
    /// allowlist refused is counted by network and logged (at its first
    /// refusal, then at most once a minute), so a provider's new range
    /// shows up in the logs and metrics rather than as silence.
    fn auth_refusal(&self, source: &SourceConfig, facts: &auth::RequestFacts<'_>, e: auth::AuthError) -> Refusal {
        if e == auth::AuthError::Forbidden
            && let Some(sender) = auth::sender(facts)
        {
            let noted = self.allowlists.note_refused(&source.name, sender);
            self.metrics.allowlist_refused(&source.name, &noted.network);
            if let Some(unlogged) = noted.log {
                tracing::warn!(
                    source = %source.name,
                    network = %noted.network,
                    %sender,
                    unlogged,
                    "webhook refused (403): the sender is not in the source's allowlist; \
                     if the provider sends from a new range, allow it or follow its DNS record"
                );
            }
        }
        Refusal::Auth(e)
    }

    /// Counts the answer to a webhook of a configured source.
    fn record(&self, source: &str, result: &Result<IngestOutcome, Refusal>, started: std::time::Instant) {
        let outcome = match result {
            Ok(IngestOutcome::Applied { .. }) => "applied",
            Ok(IngestOutcome::Quarantined { .. }) => "quarantined",
            Ok(IngestOutcome::Duplicate { .. }) => "duplicate",
            Err(Refusal::Auth(_)) => "rejected_auth",
            Err(Refusal::TooLarge(_)) => "too_large",
            Err(Refusal::Timeout) => "timeout",
            Err(Refusal::RateLimited(_)) => "rate_limited",
            Err(Refusal::Unavailable(..)) => "storage_error",
            Err(Refusal::Busy) => "busy",
            Err(Refusal::BadRequest(_) | Refusal::NotFound | Refusal::MethodNotAllowed(_)) => "bad_request",
        };
        self.metrics.webhook(source, outcome);
        if result.is_ok() {
            self.metrics.ingest_latency(started.elapsed().as_secs_f64());
        }
    }
}

/// A followed record in `/readyz`: what it allows now and how old that is.
fn allowlist_detail(status: &crate::allowlist::Status) -> serde_json::Value {
    let mut detail = json!({
        "source": status.source,
        "record": status.record,
        "networks": status.networks.iter().map(|n| n.0.to_string()).collect::<Vec<_>>(),
    });
    match status.age() {
        Some(age) => detail["age_seconds"] = json!(age.as_secs()),
        None => detail["note"] = json!("no DNS-derived entries yet: the static entries alone apply"),
    }
    detail
}

fn limiter(limit: RateLimit) -> Option<DefaultDirectRateLimiter> {
    let per_second = NonZeroU32::new(limit.per_second)?;
    let burst = NonZeroU32::new(limit.burst.unwrap_or(limit.per_second))?;
    Some(RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)))
}

fn probe_method(method: &Method) -> Result<(), Refusal> {
    match *method {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(Refusal::MethodNotAllowed("GET, HEAD")),
    }
}

fn outcome_response(outcome: &IngestOutcome, request_id: &str) -> Response<Full<Bytes>> {
    let mut answer = Answer { outcome: "applied", raw_id: 0, reason: None, request_id, sequences: None };
    let status = match outcome {
        IngestOutcome::Applied { raw_id, sequences } => {
            (answer.raw_id, answer.sequences) = (*raw_id, Some(sequences.as_slice()));
            StatusCode::OK
        }
        IngestOutcome::Quarantined { raw_id, reason } => {
            (answer.outcome, answer.raw_id, answer.reason) = ("quarantined", *raw_id, Some(reason.as_str()));
            StatusCode::ACCEPTED
        }
        IngestOutcome::Duplicate { raw_id, quarantined } => {
            (answer.outcome, answer.raw_id) = ("duplicate", *raw_id);
            if *quarantined { StatusCode::ACCEPTED } else { StatusCode::OK }
        }
    };
    json_bytes_response(status, serde_json::to_vec(&answer).expect("an answer serializes"))
}

/// The answer to a stored webhook, written straight from its fields (it is
/// on every request's path); the fields in the order of the other answers'
/// sorted keys.
#[derive(serde::Serialize)]
struct Answer<'a> {
    outcome: &'static str,
    raw_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequences: Option<&'a [u64]>,
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    json_bytes_response(status, serde_json::to_vec(&body).expect("a JSON value serializes"))
}

fn json_bytes_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> String {
    headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).unwrap_or_default()
}

/// The request headers kept as provenance: all but credentials.
fn stored_headers(headers: &HeaderMap, auth: &AuthConfig) -> BTreeMap<String, String> {
    let secret_header = match auth {
        AuthConfig::Header { header, .. } => Some(header.to_ascii_lowercase()),
        AuthConfig::IpAllowlist { second_factor: Some(factor), .. } => {
            factor.header.as_ref().map(|h| h.to_ascii_lowercase())
        }
        _ => None,
    };
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let name = name.as_str();
        if UNSTORED_HEADERS.contains(&name) || secret_header.as_deref() == Some(name) {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes());
        out.entry(name.to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    out
}

fn now() -> prost_types::Timestamp {
    let now = chrono::Utc::now();
    prost_types::Timestamp { seconds: now.timestamp(), nanos: now.timestamp_subsec_nanos() as i32 }
}

// === Serving ===

mod body;
mod connection;
pub use body::Bodies;
pub use connection::serve;

/// 503 with `Retry-After`: too many requests in flight.
fn busy_response() -> Response<Full<Bytes>> {
    refused(Refusal::Busy)
}

/// The answer to a request refused before the front door saw it.
fn refused(refusal: Refusal) -> Response<Full<Bytes>> {
    let request_id = uuid::Uuid::now_v7().to_string();
    with_request_id(refusal.into_response(&request_id), &request_id)
}

/// Every answer carries its request id in a header.
fn with_request_id(mut response: Response<Full<Bytes>>, request_id: &str) -> Response<Full<Bytes>> {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// The front door once the store is open. Until then requests wait for it,
/// at most `wait` (then 503): a process taking over holds what it accepts
/// until its predecessor has released the store.
#[derive(Clone)]
pub struct Door {
    front: watch::Receiver<Option<Arc<FrontDoor>>>,
    wait: Duration,
}

impl Door {
    /// A door with no front yet; open it by sending the front door.
    pub fn new(wait: Duration) -> (Self, watch::Sender<Option<Arc<FrontDoor>>>) {
        let (open, front) = watch::channel(None);
        (Self { front, wait }, open)
    }

    /// A connection slot for a webhook that came in beyond the connection
    /// limit; `None` if none frees up within the wait.
    pub(crate) async fn wait_for_slot(
        &self,
        slots: Arc<tokio::sync::Semaphore>,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(self.wait, slots.acquire_owned()).await.ok()?.ok()
    }

    pub(crate) async fn handle(&self, req: Request<Body>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let opened = self.front.borrow().clone();
        if let Some(front) = opened {
            return front.handle(req, peer).await;
        }
        match req.uri().path() {
            "/healthz" => return json_response(StatusCode::OK, json!({"status": "ok"})),
            "/readyz" => return json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "starting"})),
            _ => {}
        }
        let mut front = self.front.clone();
        let opened = match tokio::time::timeout(self.wait, front.wait_for(Option::is_some)).await {
            Ok(Ok(opened)) => opened.clone(),
            _ => None,
        };
        match opened {
            Some(front) => front.handle(req, peer).await,
            None => refused(Refusal::Unavailable(StoreError::unavailable_because("the store did not open in time"))),
        }
    }
}

// === The admin listener ===

/// What the admin listener answers with: a whole body, or the console's
/// stream of server-sent events.
type AdminBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// How long a console form may take to arrive.
const FORM_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` (Prometheus text format), `GET /healthz` and the
/// operator console (everything else) until `shutdown`.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    console: Arc<Console>,
    shutdown: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let (metrics, console) = (metrics.clone(), console.clone());
        let service = service_fn(move |req: Request<Body>| {
            let (metrics, console) = (metrics.clone(), console.clone());
            async move { Ok::<_, Infallible>(admin_response(req, &metrics, &console).await) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

async fn admin_response(req: Request<Body>, metrics: &Metrics, console: &Console) -> Response<AdminBody> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render().await)
        }
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        _ => return console_response(req, console).await,
    };
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Reads a console request's (small) body, lets the console answer, and
/// turns its answer into a hyper body.
async fn console_response(req: Request<Body>, console: &Console) -> Response<AdminBody> {
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, console::MAX_FORM_BYTES);
    let form = match tokio::time::timeout(FORM_READ_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "form too large or unreadable"),
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "the form did not arrive in time"),
    };
    console.handle(Request::from_parts(parts, form)).await.map(|body| match body {
        console::Body::Full(bytes) => Full::new(bytes).boxed_unsync(),
        console::Body::Events(events) => {
            let frames = futures::StreamExt::map(events, |bytes| Ok(hyper::body::Frame::data(bytes)));
            BodyExt::boxed_unsync(http_body_util::StreamBody::new(frames))
        }
    })
}

fn plain(status: StatusCode, message: &'static str) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(Bytes::from_static(message.as_bytes())).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use serde_json::json;

    use super::*;

    /// The answer written from its fields is the JSON the other answers
    /// would make of the same values, byte for byte.
    #[tokio::test]
    async fn a_stored_webhook_is_answered_with_the_same_json_as_before() {
        let cases = [
            (
                IngestOutcome::Applied { raw_id: 7, sequences: vec![3, 4] },
                json!({"request_id": "r\"1", "outcome": "applied", "raw_id": 7, "sequences": [3, 4]}),
                StatusCode::OK,
            ),
            (
                IngestOutcome::Quarantined { raw_id: 8, reason: "unknown kind \"x\"".into() },
                json!({"request_id": "r\"1", "outcome": "quarantined", "raw_id": 8, "reason": "unknown kind \"x\""}),
                StatusCode::ACCEPTED,
            ),
            (
                IngestOutcome::Duplicate { raw_id: 9, quarantined: true },
                json!({"request_id": "r\"1", "outcome": "duplicate", "raw_id": 9}),
                StatusCode::ACCEPTED,
            ),
            (
                IngestOutcome::Duplicate { raw_id: 9, quarantined: false },
                json!({"request_id": "r\"1", "outcome": "duplicate", "raw_id": 9}),
                StatusCode::OK,
            ),
        ];
        for (outcome, expected, status) in cases {
            let response = outcome_response(&outcome, "r\"1");
            assert_eq!(response.status(), status);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(String::from_utf8_lossy(&body), expected.to_string());
        }
    }
}
