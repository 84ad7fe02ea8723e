//! The operator console: web pages on the admin listener (`GET /`) that
//! show what came in, why an order is in its state, and what was
//! quarantined, and re-drive it.
//!
//! Every page reads through the gRPC services' own code, called in-process
//! (`OrderTrail`, `Admin`), so the console never disagrees with the API.
//! Pages are rendered on the server with maud (every dynamic value escaped)
//! and read without JavaScript; a little script adds the live feed
//! (server-sent events from `Subscribe`), pause/resume and confirmations.
//! Assets are embedded. Access: the admin tokens (Basic or Bearer) when any
//! are configured, or open on a loopback admin listener; re-drive is
//! POST-only with a per-process CSRF token and a same-origin check; a
//! strict Content-Security-Policy is on every page.
//!
//! This module speaks `http` types only; the `http` module serves it.

mod pages;
mod rates;
mod render;

use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::allowlist::Allowlists;
use crate::api::{AdminService, OrderTrailService, Subscriptions};
use crate::config::{Config, Secret};
use crate::store::Store;

pub use rates::Rates;

/// What a console answer carries: a whole page, or a stream of server-sent
/// events.
pub enum Body {
    Full(Bytes),
    Events(std::pin::Pin<Box<dyn Stream<Item = Bytes> + Send>>),
}

/// The console of one process.
pub struct Console {
    orders: OrderTrailService,
    admin: AdminService,
    store: Store,
    subscriptions: Subscriptions,
    rates: Arc<Rates>,
    allowlists: Arc<Allowlists>,
    /// Who may use it: the admin tokens; none means open (only allowed on
    /// a loopback admin listener, or when the operator said so).
    tokens: Vec<Secret>,
    /// Proves a POST came from a page this process served.
    csrf: String,
    shutdown: CancellationToken,
}

/// The largest form the console accepts.
pub const MAX_FORM_BYTES: usize = 16 * 1024;

/// Rows a page shows.
const PAGE_ROWS: u32 = 50;

impl Console {
    pub fn new(
        config: &Config,
        store: Store,
        subscriptions: Subscriptions,
        rates: Arc<Rates>,
        allowlists: Arc<Allowlists>,
        shutdown: CancellationToken,
    ) -> Self {
        let max = config.grpc.max_message_bytes;
        Self {
            orders: OrderTrailService::new(store.clone(), subscriptions.clone(), max),
            admin: AdminService::new(store.clone(), max),
            store,
            subscriptions,
            rates,
            allowlists,
            tokens: config.grpc.admin_tokens.clone(),
            csrf: uuid::Uuid::new_v4().simple().to_string(),
            shutdown,
        }
    }

    /// Answers one console request (its body already read, at most
    /// [`MAX_FORM_BYTES`]).
    pub async fn handle(&self, request: Request<Bytes>) -> Response<Body> {
        if !self.authorized(request.headers()) {
            let mut response = page_response(StatusCode::UNAUTHORIZED, render::plain("the admin token is required"));
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"ordertrail console\""));
            return response;
        }
        let (parts, body) = request.into_parts();
        let query = parts.uri.query().unwrap_or("");
        let path = parts.uri.path();
        let answer = match (&parts.method, path) {
            (&Method::POST, "/quarantine/redrive") => {
                if let Err(why) = self.same_origin(&parts.headers, &body) {
                    return page_response(StatusCode::FORBIDDEN, render::plain(why));
                }
                pages::redrive(self, &body).await
            }
            (&Method::GET | &Method::HEAD, _) => self.get(path, query).await,
            _ => {
                let mut response = page_response(StatusCode::METHOD_NOT_ALLOWED, render::plain("method not allowed"));
                response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                return response;
            }
        };
        match answer {
            Ok(response) => response,
            Err(error) => page_response(error.status, pages::error_page(&error.message)),
        }
    }

    async fn get(&self, path: &str, query: &str) -> Result<Response<Body>, Failure> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let page = match segments.as_slice() {
            [""] => pages::live(self, query).await?,
            ["live"] => return pages::live_stream(self, query).await,
            ["orders"] => pages::search(self, query).await?,
            ["orders", id] => pages::order(self, number(id)?, query).await?,
            ["events", sequence] => pages::event(self, number(sequence)?).await?,
            ["deliveries", id] => pages::delivery(self, number(id)?).await?,
            ["quarantine"] => pages::quarantine(self, query).await?,
            ["unmapped"] => pages::unmapped(self).await?,
            ["stats"] => pages::stats(self).await?,
            ["assets", "console.css"] => return Ok(asset("text/css", include_str!("assets/console.css"))),
            ["assets", "console.js"] => return Ok(asset("text/javascript", include_str!("assets/console.js"))),
            _ => return Err(Failure::not_found("no such page")),
        };
        Ok(page_response(StatusCode::OK, page))
    }

    /// The admin tokens, as a Basic password (any user name; what a
    /// browser asks for) or a Bearer token (curl). Open without tokens.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        if self.tokens.is_empty() {
            return true;
        }
        let Some(presented) = presented_token(headers) else { return false };
        let mut matched = subtle::Choice::from(0u8);
        for token in &self.tokens {
            matched |= presented.as_slice().ct_eq(token.expose());
        }
        bool::from(matched)
    }

    /// A state-changing request must carry this process's CSRF token and,
    /// when the browser says where it comes from, come from this origin.
    fn same_origin(&self, headers: &HeaderMap, form: &[u8]) -> Result<(), &'static str> {
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(form).unwrap_or_default();
        let token = fields.iter().find(|(name, _)| name == "csrf").map(|(_, value)| value.as_bytes());
        if !token.is_some_and(|token| bool::from(token.ct_eq(self.csrf.as_bytes()))) {
            return Err("the form's CSRF token is missing or stale: reload the page and try again");
        }
        if headers.get("sec-fetch-site").is_some_and(|site| site != "same-origin" && site != "none") {
            return Err("cross-site request refused");
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let origin_host = origin.split_once("://").map(|(_, rest)| rest);
            if origin_host.is_none() || origin_host != host {
                return Err("cross-origin request refused");
            }
        }
        Ok(())
    }
}

fn presented_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Some(rest.trim().as_bytes().to_vec()),
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
            let colon = decoded.iter().position(|b| *b == b':')?;
            Some(decoded[colon + 1..].to_vec())
        }
        _ => None,
    }
}

/// A page that could not be shown, and why.
pub(crate) struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let code = match status.code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self { status: code, message: status.message().to_string() }
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(error: crate::store::StoreError) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: error.to_string() }
    }
}

fn number(text: &str) -> Result<u64, Failure> {
    text.parse().map_err(|_| Failure::bad_request(format!("`{text}` is not a number")))
}

/// The Content-Security-Policy of every answer: only this origin's script
/// and style, no inline script, no framing, forms only to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn page_response(status: StatusCode, page: maud::Markup) -> Response<Body> {
    let mut response = Response::new(Body::Full(Bytes::from(page.into_string())));
    *response.status_mut() = status;
    secure(response.headers_mut(), "text/html; charset=utf-8");
    response
}

fn asset(content_type: &'static str, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::Full(Bytes::from_static(text.as_bytes())));
    secure(response.headers_mut(), content_type);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    response
}

fn secure(headers: &mut HeaderMap, content_type: &'static str) {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}
