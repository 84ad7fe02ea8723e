//! The tonic services over the store, and the one place that maps store
//! errors to gRPC `Status`.

use prost::Message;
use tonic::{Request, Response, Status};

use crate::proto::admin_server::Admin;
use crate::proto::order_trail_server::OrderTrail;
use crate::proto::{
    self, EventKind, FindOrdersRequest, FindOrdersResponse, GetDeliveryRequest, GetOrderRequest, GetStatsRequest,
    ListEventsRequest, ListEventsResponse, ListOrdersRequest, ListOrdersResponse, ListQuarantinedRequest,
    ListQuarantinedResponse, ListUnmappedStatusesRequest, ListUnmappedStatusesResponse, Order, OrderStatus,
    RawDelivery, Stats, SubscribeRequest, UnmappedStatus,
};
use crate::proto::{
    DeliveryOutcome, Internals, OrderReference, RebuildRequest, RebuildResponse, RedriveRequest, RedriveResponse,
    RedriveResult,
};
use crate::provider::Provider;
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
    /// `grpc.max_message_bytes`: what one answer may hold.
    max_message_bytes: usize,
}

impl AdminService {
    pub fn new(store: Store, max_message_bytes: usize) -> Self {
        Self { store, max_message_bytes }
    }

    /// Re-drives one quarantined delivery (or, in a dry run, says what
    /// would become of it).
    async fn redrive_one(&self, raw: &RawDelivery, dry_run: bool) -> Result<RedriveResult, Status> {
        let mut result = RedriveResult { raw_id: raw.id, ..RedriveResult::default() };
        let redriven = match dry_run {
            true => self.store.map(raw).map(|normalized| {
                result.events = normalized.observations.len() as u32;
                IngestOutcome::Applied { raw_id: raw.id, sequences: Vec::new() }
            }),
            false => self.store.redrive(raw).await.map_err(|e| store_status(&self.store, e))?,
        };
        match redriven {
            Err(reason) => {
                result.set_outcome(DeliveryOutcome::Quarantined);
                result.reason = reason.0;
            }
            Ok(IngestOutcome::Applied { sequences, .. }) => {
                result.set_outcome(DeliveryOutcome::Applied);
                result.events = result.events.max(sequences.len() as u32);
                result.sequences = sequences;
            }
            Ok(IngestOutcome::Duplicate { raw_id, .. }) => {
                result.set_outcome(DeliveryOutcome::Applied);
                result.duplicate_of = raw_id;
            }
            Ok(IngestOutcome::Quarantined { reason, .. }) => {
                result.set_outcome(DeliveryOutcome::Quarantined);
                result.reason = reason;
            }
        }
        Ok(result)
    }

    /// The quarantined deliveries a re-drive covers.
    async fn quarantined(&self, request: &RedriveRequest) -> Result<Vec<RawDelivery>, Status> {
        if request.raw_id != 0 {
            let id = request.raw_id;
            let raw = self.store.delivery(id).await.map_err(|e| store_status(&self.store, e))?;
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
            let page = self.store.list_quarantined(position, limit).await.map_err(|e| store_status(&self.store, e))?;
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
        StoreError::Unavailable(..) | StoreError::Closed => Status::unavailable("storage unavailable; retry later"),
        StoreError::Corrupt(_) => Status::data_loss("stored data could not be read"),
        StoreError::Invalid(why) => Status::invalid_argument(why),
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

mod auth;
mod subscribe;
mod wire;
pub use wire::ProtoCodec;

pub use auth::{AdminAuth, BearerAuth};
pub use subscribe::{Subscriptions, TypedOutbound};
pub use wire::SubscribeRoute;

/// The reference a `GetOrderRequest` or `FindOrdersRequest` names: their
/// reference fields have `OrderReference`'s numbers and types (service.proto
/// says so), so either request reads as an `OrderReference`.
fn reference_in(request: &impl prost::Message) -> OrderReference {
    OrderReference::decode(request.encode_to_vec().as_slice()).unwrap_or_default()
}

/// The store lookup a reference asks for.
fn lookup(reference: &OrderReference) -> Result<Lookup, Status> {
    use proto::Provider as P;
    use proto::order_reference::Reference as R;
    let (kind, value, provider) = match &reference.reference {
        Some(R::ExternalOrderId(v)) => (RefKind::Merchant, v.as_str(), Some(P::Ordermesh)),
        Some(R::CustomerRef(v)) => (RefKind::Merchant, v.as_str(), Some(P::Withings)),
        Some(R::PoNumber(v)) => (RefKind::Merchant, v.as_str(), Some(P::Winkelstraat)),
        Some(R::MerchantReference(v)) => (RefKind::Merchant, v.as_str(), None),
        Some(R::ProviderOrderId(v)) => (RefKind::ProviderOrder, v.as_str(), None),
        Some(R::SafeId(v)) => (RefKind::Safe, v.as_str(), Some(P::Ordermesh)),
        Some(R::TrackingNumber(v)) => (RefKind::Tracking, v.as_str(), None),
        None => (RefKind::Merchant, "", None),
    };
    if value.is_empty() {
        return Err(Status::invalid_argument(
            "set exactly one reference: external_order_id, customer_ref, po_number, provider_order_id, safe_id, tracking_number or merchant_reference",
        ));
    }
    Ok(Lookup { kind, value: value.to_string(), provider })
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
        let lookup = lookup(&reference_in(&request))?;
        let source = source_filter(request.source);
        let orders =
            self.store.find_orders(&lookup, source.as_deref()).await.map_err(|e| store_status(&self.store, e))?;
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
        let lookup = lookup(&reference_in(&request))?;
        let source = source_filter(request.source);
        let orders =
            self.store.find_orders(&lookup, source.as_deref()).await.map_err(|e| store_status(&self.store, e))?;
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
        let page = self.store.list_orders(&filter, after, limit).await.map_err(|e| store_status(&self.store, e))?;
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
            providers: request.providers.into_iter().filter_map(|p| proto::Provider::try_from(p).ok()).collect(),
            kinds: request.kinds.into_iter().filter_map(|k| EventKind::try_from(k).ok()).collect(),
        };
        let limit = page_limit(request.page_size, self.max_message_bytes);
        let head_sequence = self.store.head_sequence();
        let page = self.store.list_events(&filter, after, limit).await.map_err(|e| store_status(&self.store, e))?;
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
        let max_message_bytes = self.max_message_bytes;
        let limit = page_limit(request.page_size, max_message_bytes);
        let page = self.store.list_quarantined(after, limit).await.map_err(|e| store_status(&self.store, e))?;
        answerable(&page, max_message_bytes, |r: &RawDelivery| format!("delivery {}", r.id))?;
        let next_page_token = next_token(&page, "q");
        Ok(Response::new(ListQuarantinedResponse { deliveries: page.items, next_page_token }))
    }

    async fn list_unmapped_statuses(
        &self,
        _request: Request<ListUnmappedStatusesRequest>,
    ) -> Result<Response<ListUnmappedStatusesResponse>, Status> {
        let rows = self.store.unmapped_statuses().await.map_err(|e| store_status(&self.store, e))?;
        let statuses = rows
            .into_iter()
            .map(|(provider, applies_to, value, count)| {
                let provider = Provider::from_name(&provider).map_or(proto::Provider::Unspecified, Provider::to_proto);
                UnmappedStatus { provider: provider as i32, applies_to, value, count }
            })
            .collect();
        Ok(Response::new(ListUnmappedStatusesResponse { statuses }))
    }

    async fn get_stats(&self, _request: Request<GetStatsRequest>) -> Result<Response<Stats>, Status> {
        let store = &self.store;
        let state = store.state_stats().await.map_err(|e| store_status(store, e))?;
        let (group_commits, group_commit_replies) = store.commit_stats();
        let (backlog, subscriber_store_reads) = store.feed_stats();
        Ok(Response::new(Stats {
            head_sequence: store.head_sequence(),
            oldest_retained_sequence: store.oldest_retained(),
            orders: state.orders,
            quarantined: state.quarantined,
            store_size_bytes: state.size_bytes,
            internals: Some(Internals {
                group_commits,
                group_commit_replies,
                feed_backlog: backlog as u64,
                subscriber_store_reads,
            }),
        }))
    }

    async fn redrive(&self, request: Request<RedriveRequest>) -> Result<Response<RedriveResponse>, Status> {
        let request = request.into_inner();
        let mut response = RedriveResponse::default();
        for raw in self.quarantined(&request).await? {
            let result = self.redrive_one(&raw, request.dry_run).await?;
            match (result.outcome(), result.duplicate_of) {
                (DeliveryOutcome::Quarantined, _) => response.still_quarantined += 1,
                (DeliveryOutcome::Applied, 0) => response.applied += 1,
                _ => {}
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
        let (summary, up_to_raw_id) = self.store.prepare_rebuild().await.map_err(|e| store_status(&self.store, e))?;
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
        match self.store.delivery(raw_id).await.map_err(|e| store_status(&self.store, e))? {
            Some(raw) => Ok(Response::new(raw)),
            None => Err(Status::not_found(format!("no stored delivery {raw_id}"))),
        }
    }
}
