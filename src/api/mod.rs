//! The tonic services over the store, and the one place that maps store
//! errors to gRPC `Status`.

use tonic::{Request, Response, Status};

use crate::proto::admin_server::Admin;
use crate::proto::order_trail_server::OrderTrail;
use crate::proto::{
    self, EventKind, FindOrdersRequest, FindOrdersResponse, GetDeliveryRequest, GetOrderRequest, GetStatsRequest,
    ListEventsRequest, ListEventsResponse, ListOrdersRequest, ListOrdersResponse, ListQuarantinedRequest,
    ListQuarantinedResponse, ListUnmappedStatusesRequest, ListUnmappedStatusesResponse, Order, OrderStatus,
    RawDelivery, Stats, SubscribeRequest, UnmappedStatus,
};
use crate::proto::{RebuildRequest, RebuildResponse, RedriveRequest, RedriveResponse, RedriveResult};
use crate::store::{EventFilter, IngestOutcome, Lookup, OrderFilter, Page, PageLimit, RefKind, Store, StoreError};

/// Page size when the request names none.
const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page a request may ask for.
const MAX_PAGE_SIZE: usize = 1000;

/// `ordertrail.v1.OrderTrail`.
#[derive(Clone)]
pub struct OrderTrailService {
    store: Store,
    subscriptions: Subscriptions,
    /// `grpc.max_message_bytes`: what one answer may hold.
    max_message_bytes: usize,
}

impl OrderTrailService {
    pub fn new(store: Store, subscriptions: Subscriptions, max_message_bytes: usize) -> Self {
        Self { store, subscriptions, max_message_bytes }
    }
}

/// `ordertrail.v1.Admin`.
#[derive(Clone)]
pub struct AdminService {
    store: Store,
    config: std::sync::Arc<crate::config::Config>,
}

impl AdminService {
    pub fn new(store: Store, config: std::sync::Arc<crate::config::Config>) -> Self {
        Self { store, config }
    }

    /// The quarantined deliveries a re-drive covers.
    async fn quarantined(&self, request: &RedriveRequest) -> Result<Vec<RawDelivery>, Status> {
        if request.raw_id != 0 {
            let id = request.raw_id;
            let raw = blocking(&self.store, move |s| s.raw(id)).await?;
            return match raw {
                Some(raw) if raw.outcome() == proto::DeliveryOutcome::Quarantined => Ok(vec![raw]),
                Some(_) => Ok(Vec::new()),
                None => Err(Status::not_found(format!("no stored delivery {id}"))),
            };
        }
        let after = request.received_after.map(|t| (t.seconds, t.nanos));
        let mut all = Vec::new();
        let mut position = 0;
        loop {
            let limit = PageLimit { items: MAX_PAGE_SIZE, bytes: usize::MAX };
            let page = blocking(&self.store, move |s| s.list_quarantine(position, limit)).await?;
            all.extend(
                page.items
                    .into_iter()
                    .filter(|r| after.is_none_or(|a| r.received_at.is_some_and(|t| (t.seconds, t.nanos) > a))),
            );
            match page.next_after {
                Some(next) => position = next,
                None => return Ok(all),
            }
        }
    }
}

/// Maps a store error to a status: internals are logged, the client gets a
/// clear, safe message.
fn store_status(store: &Store, e: StoreError) -> Status {
    tracing::error!(error = %e, "store error while serving gRPC");
    if let StoreError::Corrupt(why) = &e {
        store.note_damage(why);
    }
    match e {
        StoreError::Unavailable(_) | StoreError::Closed => Status::unavailable("storage unavailable; retry later"),
        StoreError::Corrupt(_) => Status::data_loss("stored data could not be read"),
    }
}

/// Longest part of a client's value repeated in an error message.
const ECHO_CHARS: usize = 64;

/// `value` as an error message repeats it: cut short, so a huge reference
/// cannot make the answer itself too large.
fn echoed(value: &str) -> String {
    match value.char_indices().nth(ECHO_CHARS) {
        Some((cut, _)) => format!("{}… ({} bytes)", &value[..cut], value.len()),
        None => value.to_string(),
    }
}

/// Runs a store query off the async runtime.
async fn blocking<T: Send + 'static>(
    store: &Store,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    let answer = tokio::task::spawn_blocking({
        let store = store.clone();
        move || f(&store)
    })
    .await
    .map_err(|_| Status::internal("query failed"))?;
    answer.map_err(|e| store_status(store, e))
}

/// Converts one of the generated `reference` oneofs (same member names in
/// every request) into a store lookup.
macro_rules! lookup_from {
    ($reference:expr, $module:ident) => {{
        use proto::Provider as P;
        use proto::$module::Reference as R;
        match $reference {
            None => None,
            Some(R::ExternalOrderId(v)) => Some((RefKind::Merchant, v, Some(P::Ordermesh))),
            Some(R::CustomerRef(v)) => Some((RefKind::Merchant, v, Some(P::Withings))),
            Some(R::PoNumber(v)) => Some((RefKind::Merchant, v, Some(P::Winkelstraat))),
            Some(R::MerchantReference(v)) => Some((RefKind::Merchant, v, None)),
            Some(R::ProviderOrderId(v)) => Some((RefKind::ProviderOrder, v, None)),
            Some(R::SafeId(v)) => Some((RefKind::Safe, v, Some(P::Ordermesh))),
            Some(R::TrackingNumber(v)) => Some((RefKind::Tracking, v, None)),
        }
    }};
}

mod auth;
mod subscribe;
mod wire;
pub use wire::ProtoCodec;

pub use auth::{AdminAuth, BearerAuth};
pub use subscribe::{Outbound, Subscriptions, TypedOutbound};
pub use wire::SubscribeRoute;

fn lookup(parts: Option<(RefKind, String, Option<proto::Provider>)>) -> Result<Lookup, Status> {
    match parts {
        Some((kind, value, provider)) if !value.is_empty() => Ok(Lookup { kind, value, provider }),
        _ => Err(Status::invalid_argument(
            "set exactly one reference: external_order_id, customer_ref, po_number, provider_order_id, safe_id, tracking_number or merchant_reference",
        )),
    }
}

fn source_filter(source: String) -> Option<String> {
    (!source.is_empty()).then_some(source)
}

/// Room in an answer for what is not a page item (token, head, framing).
const ANSWER_OVERHEAD_BYTES: usize = 16 << 10;

/// A page of `requested` items (default and cap applied) that fits in one
/// answer of `max_message_bytes`.
fn page_limit(requested: u32, max_message_bytes: usize) -> PageLimit {
    let items = match requested as usize {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    PageLimit { items, bytes: max_message_bytes.saturating_sub(ANSWER_OVERHEAD_BYTES).max(1) }
}

/// A page is cut by bytes but always holds one item; one item too large for
/// an answer gets an error that names it, instead of a transport error that
/// a paging client could take for the end of the data.
fn answerable<T: prost::Message>(
    page: &Page<T>,
    max_message_bytes: usize,
    name: impl Fn(&T) -> String,
) -> Result<(), Status> {
    match page.items.as_slice() {
        [only] if only.encoded_len() + ANSWER_OVERHEAD_BYTES > max_message_bytes => {
            Err(Status::resource_exhausted(format!(
                "{} is {} bytes encoded, more than one answer may hold (grpc.max_message_bytes = {max_message_bytes})",
                name(only),
                only.encoded_len()
            )))
        }
        _ => Ok(()),
    }
}

/// Page tokens are opaque to clients: a tag and a position.
fn parse_token(token: &str, tag: &str) -> Result<Option<u64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(tag)
        .and_then(|rest| rest.parse().ok())
        .map(Some)
        .ok_or_else(|| Status::invalid_argument("page_token is not one this server issued"))
}

fn next_token<T>(page: &Page<T>, tag: &str) -> String {
    page.next_after.map(|after| format!("{tag}{after}")).unwrap_or_default()
}

// === impl OrderTrail ===

#[tonic::async_trait]
impl OrderTrail for OrderTrailService {
    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<Order>, Status> {
        let request = request.into_inner();
        let lookup = lookup(lookup_from!(request.reference, get_order_request))?;
        let source = source_filter(request.source);
        // A point lookup (one index read, a few orders): cheaper inline than
        // handed to the blocking pool, which cost more than the read itself.
        let orders = self.store.find_orders(&lookup, source.as_deref()).map_err(|e| store_status(&self.store, e))?;
        match orders.len() {
            0 => Err(Status::not_found(format!("no order with that reference `{}`", echoed(&lookup.value)))),
            1 => Ok(Response::new(orders.into_iter().next().unwrap_or_default())),
            _ => {
                let sources: Vec<String> = orders.iter().map(|o| format!("{} (order {})", o.source, o.id)).collect();
                Err(Status::failed_precondition(format!(
                    "{} orders match `{}`: {}; pass `source` to choose one",
                    orders.len(),
                    echoed(&lookup.value),
                    sources.join(", ")
                )))
            }
        }
    }

    async fn find_orders(&self, request: Request<FindOrdersRequest>) -> Result<Response<FindOrdersResponse>, Status> {
        let request = request.into_inner();
        let lookup = lookup(lookup_from!(request.reference, find_orders_request))?;
        let source = source_filter(request.source);
        let orders = self.store.find_orders(&lookup, source.as_deref()).map_err(|e| store_status(&self.store, e))?;
        Ok(Response::new(FindOrdersResponse { orders }))
    }

    async fn list_orders(&self, request: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        let request = request.into_inner();
        let after = parse_token(&request.page_token, "o")?.unwrap_or(0);
        let filter = OrderFilter {
            source: source_filter(request.source.clone()),
            provider: proto::Provider::try_from(request.provider).ok().filter(|p| *p != proto::Provider::Unspecified),
            status: OrderStatus::try_from(request.status).ok().filter(|s| *s != OrderStatus::Unspecified),
            updated_after: request.updated_after,
        };
        let limit = page_limit(request.page_size, self.max_message_bytes);
        let page = blocking(&self.store, move |s| s.list_orders(&filter, after, limit)).await?;
        answerable(&page, self.max_message_bytes, |o: &Order| format!("order {}", o.id))?;
        let next_page_token = next_token(&page, "o");
        Ok(Response::new(ListOrdersResponse { orders: page.items, next_page_token }))
    }

    async fn list_events(&self, request: Request<ListEventsRequest>) -> Result<Response<ListEventsResponse>, Status> {
        let request = request.into_inner();
        let after = parse_token(&request.page_token, "e")?.unwrap_or(request.after_sequence);
        let filter = EventFilter {
            order_id: (request.order_id != 0).then_some(request.order_id),
            sources: request.sources,
            kinds: request.kinds.into_iter().filter_map(|k| EventKind::try_from(k).ok()).collect(),
        };
        let limit = page_limit(request.page_size, self.max_message_bytes);
        let head_sequence = self.store.head_sequence();
        let page = blocking(&self.store, move |s| s.list_events(&filter, after, limit)).await?;
        answerable(&page, self.max_message_bytes, |e: &proto::Event| format!("event {}", e.sequence))?;
        let next_page_token = next_token(&page, "e");
        Ok(Response::new(ListEventsResponse { events: page.items, next_page_token, head_sequence }))
    }

    type SubscribeStream = TypedOutbound;

    /// Not reached by clients: [`wire::SubscribeRoute`] serves `Subscribe`
    /// without re-encoding events. Kept equivalent for completeness.
    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let peer = request.remote_addr().map(|addr| addr.ip().to_canonical());
        self.subscriptions.open(request.into_inner(), peer).await.map(|outbound| Response::new(TypedOutbound(outbound)))
    }
}

// === impl Admin ===

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_quarantined(
        &self,
        request: Request<ListQuarantinedRequest>,
    ) -> Result<Response<ListQuarantinedResponse>, Status> {
        let request = request.into_inner();
        let after = parse_token(&request.page_token, "q")?.unwrap_or(0);
        let max_message_bytes = self.config.grpc.max_message_bytes;
        let limit = page_limit(request.page_size, max_message_bytes);
        let page = blocking(&self.store, move |s| s.list_quarantine(after, limit)).await?;
        answerable(&page, max_message_bytes, |r: &RawDelivery| format!("delivery {}", r.id))?;
        let next_page_token = next_token(&page, "q");
        Ok(Response::new(ListQuarantinedResponse { deliveries: page.items, next_page_token }))
    }

    async fn list_unmapped_statuses(
        &self,
        _request: Request<ListUnmappedStatusesRequest>,
    ) -> Result<Response<ListUnmappedStatusesResponse>, Status> {
        let rows = blocking(&self.store, |s| s.unmapped_statuses()).await?;
        let statuses = rows
            .into_iter()
            .map(|(provider, applies_to, value, count)| UnmappedStatus { provider, applies_to, value, count })
            .collect();
        Ok(Response::new(ListUnmappedStatusesResponse { statuses }))
    }

    async fn get_stats(&self, _request: Request<GetStatsRequest>) -> Result<Response<Stats>, Status> {
        let store = &self.store;
        let (flushes, flushed_replies) = store.commit_stats();
        let (backlog, feed_lags) = store.feed_stats();
        Ok(Response::new(Stats {
            head_sequence: store.head_sequence(),
            oldest_retained_sequence: store.oldest_retained(),
            flushes,
            flushed_replies,
            feed_backlog: backlog as u64,
            feed_lags,
        }))
    }

    async fn redrive(&self, request: Request<RedriveRequest>) -> Result<Response<RedriveResponse>, Status> {
        let request = request.into_inner();
        let mut response = RedriveResponse::default();
        for raw in self.quarantined(&request).await? {
            let mapped = crate::ingest::map_raw(&raw, self.config.kind_aliases(&raw.source));
            let mut result = RedriveResult { raw_id: raw.id, ..RedriveResult::default() };
            match mapped {
                Err(reason) => {
                    result.outcome = "quarantined".into();
                    result.reason = reason.0;
                    response.still_quarantined += 1;
                }
                Ok(normalized) if request.dry_run => {
                    result.outcome = "applied".into();
                    result.events = normalized.observations.len() as u32;
                    response.applied += 1;
                }
                Ok(normalized) => {
                    result.events = normalized.observations.len() as u32;
                    match self.store.redrive(raw.id, normalized).await.map_err(|e| store_status(&self.store, e))? {
                        IngestOutcome::Applied { sequences, .. } => {
                            result.outcome = "applied".into();
                            result.sequences = sequences;
                            response.applied += 1;
                        }
                        _ => result.outcome = "duplicate".into(),
                    }
                }
            }
            response.results.push(result);
        }
        tracing::info!(
            applied = response.applied,
            still_quarantined = response.still_quarantined,
            dry_run = request.dry_run,
            "re-drive"
        );
        Ok(Response::new(response))
    }

    async fn rebuild(&self, _request: Request<RebuildRequest>) -> Result<Response<RebuildResponse>, Status> {
        let config = self.config.clone();
        let aliases = |source: &str| config.kind_aliases(source).clone();
        let (summary, up_to_raw_id) =
            self.store.prepare_rebuild(&self.config.store, &aliases).await.map_err(|e| store_status(&self.store, e))?;
        tracing::info!(up_to_raw_id, "rebuild prepared; it is swapped in at the next start");
        Ok(Response::new(RebuildResponse {
            applied: summary.applied,
            quarantined: summary.quarantined,
            duplicates: summary.duplicates,
            up_to_raw_id,
        }))
    }

    async fn get_delivery(&self, request: Request<GetDeliveryRequest>) -> Result<Response<RawDelivery>, Status> {
        let raw_id = request.into_inner().raw_id;
        match blocking(&self.store, move |s| s.raw(raw_id)).await? {
            Some(raw) => Ok(Response::new(raw)),
            None => Err(Status::not_found(format!("no stored delivery {raw_id}"))),
        }
    }
}
