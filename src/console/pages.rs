//! The console's pages. Each reads through the gRPC services (called
//! in-process) or, for what the API has no call for (an order by its id),
//! through the same `Store` query the services use.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Response, StatusCode};
use maud::{Markup, html};
use tonic::Request;

use super::render::{self, event_header, event_row, layout, sparkline, time};
use super::{Body, Console, Failure, PAGE_ROWS, rates};
use crate::proto::admin_server::Admin;
use crate::proto::order_trail_server::OrderTrail;
use crate::proto::subscribe_response::Message;
use crate::proto::{
    DeliveryOutcome, EventKind, FindOrdersRequest, GetDeliveryRequest, GetStatsRequest, ListEventsRequest,
    ListQuarantinedRequest, ListUnmappedStatusesRequest, Order, RawDelivery, RedriveRequest, SubscribeRequest,
    find_orders_request::Reference,
};

/// How far back the live page looks for events matching its filter.
const WINDOW: u64 = 1000;

/// Events of an order's history on one page.
const HISTORY_PAGE: u32 = 200;

/// The query string's fields.
fn fields(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str(query).unwrap_or_default()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(key, value)| key == name && !value.is_empty()).map(|(_, value)| value.as_str())
}

/// The live list's filter, from its query.
struct Filter {
    source: Option<String>,
    provider: Option<i32>,
    kind: Option<i32>,
}

impl Filter {
    fn from(fields: &[(String, String)]) -> Self {
        Self {
            source: field(fields, "source").map(str::to_string),
            provider: field(fields, "provider").and_then(|name| named(name, render::provider)),
            kind: field(fields, "kind").and_then(|name| named(name, render::kind)),
        }
    }

    fn query(&self) -> String {
        let mut pairs = Vec::new();
        if let Some(source) = &self.source {
            pairs.push(("source", source.clone()));
        }
        if let Some(provider) = self.provider {
            pairs.push(("provider", render::provider(provider)));
        }
        if let Some(kind) = self.kind {
            pairs.push(("kind", render::kind(kind)));
        }
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }
}

/// The enum value whose short name is `name`.
fn named(name: &str, short: fn(i32) -> String) -> Option<i32> {
    (1..64).find(|value| short(*value) == name)
}

fn providers() -> Vec<String> {
    (1..=3).map(render::provider).collect()
}

fn kinds() -> Vec<String> {
    (1..64).filter(|k| EventKind::try_from(*k).is_ok()).map(render::kind).collect()
}

// === Live events ===

pub(super) async fn live(console: &Console, query: &str) -> Result<Markup, Failure> {
    let fields = fields(query);
    let filter = Filter::from(&fields);
    let stats = console.admin.get_stats(Request::new(GetStatsRequest {})).await?.into_inner();
    let head = stats.head_sequence;
    let before = field(&fields, "before").and_then(|b| b.parse::<u64>().ok()).unwrap_or(head + 1);
    let upto = before.saturating_sub(1).min(head);
    let from = upto.saturating_sub(WINDOW);
    let request = ListEventsRequest {
        after_sequence: from,
        page_size: WINDOW as u32,
        sources: filter.source.iter().cloned().collect(),
        providers: filter.provider.into_iter().collect(),
        kinds: filter.kind.into_iter().collect(),
        ..ListEventsRequest::default()
    };
    let listed = console.orders.list_events(Request::new(request)).await?.into_inner();
    let mut events: Vec<_> = listed.events.into_iter().filter(|e| e.sequence <= upto).collect();
    let shown = events.len().saturating_sub(PAGE_ROWS as usize);
    events.drain(..shown);
    events.reverse();
    let older = events.last().map_or(from + 1, |e| e.sequence);
    let rate = console.rates.per_second(Duration::from_secs(60));
    let live = before > head;
    let filter_query = filter.query();
    Ok(layout(
        "Live events",
        html! {
            section.summary {
                a.tile href="/quarantine" { span.value #quarantined { (stats.quarantined) } span { "in quarantine" } }
                div.tile { span.value { (format!("{:.1}", rate.deliveries)) } span { "webhooks/s (last minute)" } }
                div.tile { span.value { (format!("{:.1}", rate.events)) } span { "events/s" } }
                a.tile href="/stats" { span.value #head-sequence { (head) } span { "head sequence" } }
            }
            form.filters method="get" action="/" {
                label { "source " input name="source" value=[filter.source.as_deref()] placeholder="any"; }
                label { "provider " select name="provider" {
                    option value="" { "any" }
                    @for name in providers() {
                        option value=(name) selected[filter.provider.map(render::provider).as_deref() == Some(name.as_str())] { (name) }
                    }
                } }
                label { "kind " select name="kind" {
                    option value="" { "any" }
                    @for name in kinds() {
                        option value=(name) selected[filter.kind.map(render::kind).as_deref() == Some(name.as_str())] { (name) }
                    }
                } }
                button type="submit" { "Filter" }
            }
            @if live {
                p.live-status #live data-after=(head) data-filter=(filter_query) { "Newest first; new events appear as they arrive." }
            } @else {
                p { "Events up to sequence " (upto) ". " a href={ "/?" (filter_query) } { "Back to the newest" } }
            }
            table.events {
                thead { (event_header()) }
                tbody #events { @for event in &events { (event_row(event)) } }
            }
            @if events.is_empty() {
                @if upto == 0 { p.empty #no-events { "No events yet." } }
                @else { p.empty #no-events { "No matching events in sequences " (from + 1) "–" (upto) "." } }
            }
            @if older > 1 {
                p { a href={ "/?" (filter_query) "&before=" (older) } { "Older events →" } }
            }
        },
    ))
}

/// Server-sent events: each new event as a row of the live list, from the
/// same gap-free feed as `Subscribe`, after the sequence the page showed.
pub(super) async fn live_stream(console: &Console, query: &str) -> Result<Response<Body>, Failure> {
    let fields = fields(query);
    let filter = Filter::from(&fields);
    let after = field(&fields, "after").and_then(|a| a.parse().ok()).unwrap_or_else(|| console.store.head_sequence());
    let request = SubscribeRequest {
        after_sequence: Some(after),
        sources: filter.source.into_iter().collect(),
        providers: filter.provider.into_iter().collect(),
        kinds: filter.kind.into_iter().collect(),
        ..SubscribeRequest::default()
    };
    let stream = console.orders.subscribe(Request::new(request)).await?.into_inner();
    let shutdown = console.shutdown.clone();
    let events = stream
        .take_until(async move { shutdown.cancelled().await })
        .scan((), |(), message| std::future::ready(message.ok()))
        .map(|response| match response.message {
            Some(Message::Event(event)) => {
                let row = event_row(&event).into_string().replace('\n', " ");
                Bytes::from(format!("id: {}\nevent: event\ndata: {row}\n\n", event.sequence))
            }
            _ => Bytes::from_static(b": progress\n\n"),
        });
    let mut response = Response::new(Body::Events(Box::pin(events)));
    super::secure(response.headers_mut(), "text/event-stream");
    Ok(response)
}

// === Orders ===

/// The reference kinds a search can use: (field name, label).
const REFERENCE_KINDS: [(&str, &str); 4] = [
    ("merchant_reference", "merchant reference"),
    ("provider_order_id", "provider order id"),
    ("safe_id", "SafeId"),
    ("tracking_number", "tracking number"),
];

pub(super) async fn search(console: &Console, query: &str) -> Result<Markup, Failure> {
    let fields = fields(query);
    let value = field(&fields, "q").map(str::trim).unwrap_or("");
    let kind = field(&fields, "kind").unwrap_or("merchant_reference");
    let source = field(&fields, "source").unwrap_or("");
    let form = html! {
        form.search method="get" action="/orders" {
            input name="q" value=(value) placeholder="reference" autofocus;
            select name="kind" {
                @for (name, label) in REFERENCE_KINDS {
                    option value=(name) selected[name == kind] { (label) }
                }
            }
            input name="source" value=(source) placeholder="any source";
            button type="submit" { "Find" }
        }
    };
    if value.is_empty() {
        return Ok(layout("Orders", html! { (form) p { "Find an order by any reference it is known by." } }));
    }
    let reference = match kind {
        "provider_order_id" => Reference::ProviderOrderId(value.to_string()),
        "safe_id" => Reference::SafeId(value.to_string()),
        "tracking_number" => Reference::TrackingNumber(value.to_string()),
        _ => Reference::MerchantReference(value.to_string()),
    };
    let request = FindOrdersRequest { reference: Some(reference), source: source.to_string() };
    let orders = console.orders.find_orders(Request::new(request)).await?.into_inner().orders;
    if let [order] = orders.as_slice() {
        return order_page(console, order, 0).await;
    }
    Ok(layout(
        "Orders",
        html! {
            (form)
            @if orders.is_empty() {
                p.empty { "No order has that reference." }
            } @else {
                p.warning { (orders.len()) " orders match; choose one (pass a source to narrow the search):" }
                (order_list(&orders))
            }
        },
    ))
}

fn order_list(orders: &[Order]) -> Markup {
    html! {
        table {
            thead { tr { th { "order" } th { "source" } th { "provider" } th { "merchant reference" } th { "status" } th { "updated" } } }
            tbody {
                @for order in orders {
                    tr {
                        td { a href={ "/orders/" (order.id) } { (order.id) } }
                        td { (order.source) }
                        td { (render::provider(order.provider)) }
                        td { (order.references.as_ref().map_or("", |r| r.merchant_reference.as_str())) }
                        td { (render::status(order.status)) }
                        td { (time(order.updated_at.as_ref())) }
                    }
                }
            }
        }
    }
}

/// An order by its id; its history from after the sequence `after` in the
/// query (a page at a time).
pub(super) async fn order(console: &Console, id: u64, query: &str) -> Result<Markup, Failure> {
    let order = console.store.order(id).await?.ok_or_else(|| Failure::not_found(format!("no order {id}")))?;
    let after = field(&fields(query), "after").and_then(|after| after.parse().ok()).unwrap_or(0);
    order_page(console, &order, after).await
}

/// A link target that is safe to put in `href`: http(s) only.
fn web_link(url: &str) -> Option<&str> {
    (url.starts_with("https://") || url.starts_with("http://")).then_some(url)
}

async fn order_page(console: &Console, order: &Order, after: u64) -> Result<Markup, Failure> {
    let request = ListEventsRequest {
        order_id: order.id,
        after_sequence: after,
        page_size: HISTORY_PAGE,
        ..ListEventsRequest::default()
    };
    let listed = console.orders.list_events(Request::new(request)).await?.into_inner();
    let references = order.references.clone().unwrap_or_default();
    let title = if references.merchant_reference.is_empty() {
        format!("Order {}", order.id)
    } else {
        format!("Order {}", references.merchant_reference)
    };
    Ok(layout(
        &title,
        html! {
            table.facts {
                tr { th { "id" } td { (order.id) } }
                tr { th { "source" } td { (order.source) " (" (render::provider(order.provider)) ")" } }
                tr { th { "status" } td { strong { (render::status(order.status)) } " — provider says " code { (order.provider_status) } } }
                tr { th { "merchant reference" } td { (references.merchant_reference) } }
                tr { th { "provider order id" } td { (references.provider_order_id) } }
                @if !references.safe_id.is_empty() { tr { th { "SafeId" } td { (references.safe_id) } } }
                @if !order.customer_id.is_empty() { tr { th { "customer" } td { (order.customer_id) } } }
                @if order.original_order_id != 0 {
                    tr { th { "replaces" } td { a href={ "/orders/" (order.original_order_id) } { "order " (order.original_order_id) } } }
                }
                @if !order.description.is_empty() { tr { th { "description" } td { (order.description) } } }
                tr { th { "created" } td { (time(order.created_at.as_ref())) } }
                tr { th { "updated" } td { (time(order.updated_at.as_ref())) } }
            }
            h2 { "Shipments" }
            @if order.shipments.is_empty() { p.empty { "None." } } @else {
                table {
                    thead { tr { th { "id" } th { "status" } th { "provider status" } th { "carrier" } th { "tracking" } th { "shipped" } th { "delivered" } } }
                    tbody { @for shipment in &order.shipments {
                        tr {
                            td { (shipment.id) }
                            td { (render::shipment_status(shipment.status)) }
                            td { code { (shipment.provider_status) } }
                            td { (shipment.carrier) " " (shipment.carrier_service) }
                            td {
                                @if let Some(url) = web_link(&shipment.tracking_url) {
                                    a href=(url) rel="noopener noreferrer" target="_blank" { (shipment.tracking_number) }
                                } @else { (shipment.tracking_number) }
                            }
                            td { (time(shipment.shipped_at.as_ref())) }
                            td { (time(shipment.delivered_at.as_ref())) }
                        }
                    } }
                }
            }
            @if !order.returns.is_empty() {
                h2 { "Returns" }
                table {
                    thead { tr { th { "id" } th { "provider status" } th { "requested" } th { "received" } th { "tracking" } } }
                    tbody { @for ret in &order.returns {
                        tr {
                            td { (ret.id) } td { code { (ret.provider_status) } }
                            td { (time(ret.requested_at.as_ref())) } td { (time(ret.received_at.as_ref())) }
                            td { (ret.carrier) " " (ret.tracking_number) }
                        }
                    } }
                }
            }
            @if !order.refunds.is_empty() {
                h2 { "Refunds" }
                table {
                    thead { tr { th { "id" } th { "created" } th { "total" } } }
                    tbody { @for refund in &order.refunds {
                        tr {
                            td { (refund.id) } td { (time(refund.created_at.as_ref())) }
                            td { @if let Some(total) = &refund.grand_total { (total.amount) " " (total.currency) } }
                        }
                    } }
                }
            }
            h2 { "History" }
            ol.timeline {
                @for event in &listed.events {
                    li.stale[!event.applied] {
                        a href={ "/events/" (event.sequence) } { "#" (event.sequence) }
                        " " (time(event.received_at.as_ref())) " · " (render::kind(event.kind)) " · "
                        (render::status(event.previous_status)) " → " strong { (render::status(event.status)) }
                        " (" code { (event.provider_status) } ")"
                        @if !event.applied { " " span.badge { "stale" } }
                        @if !event.note.is_empty() { " — " em { (event.note) } }
                        @if let Some(provenance) = &event.provenance {
                            " · " a href={ "/deliveries/" (provenance.raw_id) } { "delivery " (provenance.raw_id) }
                        }
                    }
                }
            }
            @if after > 0 { p { a href={ "/orders/" (order.id) } { "← From the first event" } } }
            @if let Some(last) = listed.events.last().filter(|_| !listed.next_page_token.is_empty()) {
                p { a href={ "/orders/" (order.id) "?after=" (last.sequence) } { "Later events →" } }
            }
        },
    ))
}

// === One event, one delivery ===

pub(super) async fn event(console: &Console, sequence: u64) -> Result<Markup, Failure> {
    let request =
        ListEventsRequest { after_sequence: sequence.saturating_sub(1), page_size: 1, ..ListEventsRequest::default() };
    let listed = console.orders.list_events(Request::new(request)).await?.into_inner();
    let event = listed
        .events
        .into_iter()
        .find(|e| e.sequence == sequence)
        .ok_or_else(|| Failure::not_found(format!("no event {sequence} (it may be past the retained history)")))?;
    let provenance = event.provenance.unwrap_or_default();
    let request = GetDeliveryRequest { raw_id: provenance.raw_id };
    let raw = console.admin.get_delivery(Request::new(request)).await.ok().map(|raw| raw.into_inner());
    Ok(layout(
        &format!("Event {sequence}"),
        html! {
            table.facts {
                tr { th { "received" } td { (time(event.received_at.as_ref())) " UTC" } }
                tr { th { "source" } td { (event.source) " (" (render::provider(event.provider)) ")" } }
                tr { th { "kind" } td { (render::kind(event.kind)) } }
                tr { th { "order" } td { a href={ "/orders/" (event.order_id) } { (render::merchant_reference(&event)) " (order " (event.order_id) ")" } } }
                tr { th { "status" } td { (render::status(event.previous_status)) " → " strong { (render::status(event.status)) } } }
                tr { th { "provider status" } td { code { (event.provider_previous_status) } " → " code { (event.provider_status) } } }
                tr { th { "applied" } td { @if event.applied { "yes" } @else { span.badge { "stale" } " (recorded in the history only)" } } }
                @if !event.note.is_empty() { tr { th { "note" } td { (event.note) } } }
                @if !event.description.is_empty() { tr { th { "description" } td { (event.description) } } }
            }
            h2 { "Provenance" }
            table.facts {
                tr { th { "raw delivery" } td { a href={ "/deliveries/" (provenance.raw_id) } { (provenance.raw_id) } } }
                tr { th { "mapper version" } td { (provenance.mapper_version) } }
                @if let Some(raw) = &raw {
                    tr { th { "request id" } td { code { (raw.request_id) } } }
                    tr { th { "body SHA-256" } td { code { (raw.body_sha256) } } }
                    tr { th { "content type" } td { (raw.content_type) } }
                    tr { th { "authentication" } td { (raw.auth_method) } }
                    tr { th { "peer" } td { (raw.peer_addr) } }
                    tr { th { "dedup key" } td { code { (raw.dedup_key) } } }
                }
            }
            h2 { "Everything it carries" }
            pre { (format!("{event:#?}")) }
        },
    ))
}

pub(super) async fn delivery(console: &Console, raw_id: u64) -> Result<Markup, Failure> {
    let raw = console.admin.get_delivery(Request::new(GetDeliveryRequest { raw_id })).await?.into_inner();
    let quarantined = raw.outcome == DeliveryOutcome::Quarantined as i32;
    Ok(layout(
        &format!("Delivery {raw_id}"),
        html! {
            table.facts {
                tr { th { "received" } td { (time(raw.received_at.as_ref())) " UTC" } }
                tr { th { "source" } td { (raw.source) " (" (render::provider(raw.provider)) ")" @if !raw.kind.is_empty() { " kind " code { (raw.kind) } } } }
                tr { th { "outcome" } td {
                    @if quarantined { span.badge { "quarantined" } " " (raw.quarantine_reason) } @else { "applied" }
                } }
                tr { th { "events" } td { @for sequence in &raw.event_sequences { a href={ "/events/" (sequence) } { "#" (sequence) } " " } } }
                tr { th { "request id" } td { code { (raw.request_id) } } }
                tr { th { "peer" } td { (raw.peer_addr) } }
                tr { th { "authentication" } td { (raw.auth_method) } }
                tr { th { "content type" } td { (raw.content_type) } }
                tr { th { "body SHA-256" } td { code { (raw.body_sha256) } } }
                tr { th { "dedup key" } td { code { (raw.dedup_key) } } }
            }
            h2 { "Headers (as stored; credentials are never stored)" }
            table.headers { @for (name, value) in &raw.headers { tr { th { (name) } td { code { (value) } } } } }
            h2 { "Body (" (raw.body.len()) " bytes)" }
            (body_view(&raw).await)
        },
    ))
}

/// The body, readable: JSON pretty-printed, a form or multipart form as
/// its fields, anything else as text.
async fn body_view(raw: &RawDelivery) -> Markup {
    let content_type = raw.content_type.to_ascii_lowercase();
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&raw.body) {
        return html! { pre.body { (serde_json::to_string_pretty(&json).unwrap_or_default()) } };
    }
    if content_type.starts_with("application/x-www-form-urlencoded")
        && let Ok(pairs) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&raw.body)
    {
        return field_table(&pairs);
    }
    if content_type.starts_with("multipart/form-data")
        && let Ok(boundary) = multer::parse_boundary(&raw.content_type)
    {
        let body = raw.body.clone();
        let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut multipart = multer::Multipart::new(stream, boundary);
        let mut pairs = Vec::new();
        while let Ok(Some(part)) = multipart.next_field().await {
            let name = part.name().unwrap_or("").to_string();
            pairs.push((name, part.text().await.unwrap_or_default()));
        }
        if !pairs.is_empty() {
            return field_table(&pairs);
        }
    }
    html! { pre.body { (String::from_utf8_lossy(&raw.body)) } }
}

fn field_table(pairs: &[(String, String)]) -> Markup {
    html! { table.headers { @for (name, value) in pairs { tr { th { (name) } td { code { (value) } } } } } }
}

// === Quarantine and re-drive ===

pub(super) async fn quarantine(console: &Console, query: &str) -> Result<Markup, Failure> {
    let fields = fields(query);
    let page_token = field(&fields, "page").unwrap_or("").to_string();
    let source = field(&fields, "source");
    let text = field(&fields, "q");
    let request = ListQuarantinedRequest { page_size: PAGE_ROWS, page_token: page_token.clone() };
    let listed = console.admin.list_quarantined(Request::new(request)).await?.into_inner();
    let matches = |raw: &&RawDelivery| {
        source.is_none_or(|s| raw.source == s)
            && text.is_none_or(|t| raw.quarantine_reason.contains(t) || String::from_utf8_lossy(&raw.body).contains(t))
    };
    let shown: Vec<&RawDelivery> = listed.deliveries.iter().filter(matches).collect();
    let mut next = Vec::new();
    for (name, value) in [("source", source), ("q", text)] {
        if let Some(value) = value {
            next.push((name, value.to_string()));
        }
    }
    next.push(("page", listed.next_page_token.clone()));
    Ok(layout(
        "Quarantine",
        html! {
            p { "Deliveries that were authentic but not understood, oldest first. A re-drive runs them through the current mappers (after a new kind alias or a mapper upgrade); a dry run comes first." }
            form.filters method="get" action="/quarantine" {
                label { "source " input name="source" value=[source] placeholder="any"; }
                label { "reason or body contains " input name="q" value=[text]; }
                button type="submit" { "Filter" }
            }
            form.redrive-all method="post" action="/quarantine/redrive" {
                input type="hidden" name="csrf" value=(console.csrf);
                label { "Re-drive every quarantined delivery received after (UTC) " input type="datetime-local" name="since" step="1"; }
                button type="submit" { "Dry run" }
            }
            @if shown.is_empty() { p.empty { "Nothing quarantined here." } } @else {
                table.quarantine {
                    thead { tr { th { "delivery" } th { "received" } th { "source" } th { "kind" } th { "reason" } th { "body" } th { "" } } }
                    tbody { @for raw in &shown {
                        tr {
                            td { a href={ "/deliveries/" (raw.id) } { (raw.id) } }
                            td { (time(raw.received_at.as_ref())) }
                            td { (raw.source) }
                            td { code { (raw.kind) } }
                            td { (raw.quarantine_reason) }
                            td { code.excerpt { (excerpt(&raw.body)) } }
                            td {
                                form method="post" action="/quarantine/redrive" {
                                    input type="hidden" name="csrf" value=(console.csrf);
                                    input type="hidden" name="raw_id" value=(raw.id);
                                    button type="submit" { "Re-drive…" }
                                }
                            }
                        }
                    } }
                }
            }
            @if !listed.next_page_token.is_empty() {
                p { a href={ "/quarantine?" (serde_urlencoded::to_string(&next).unwrap_or_default()) } { "More →" } }
            }
        },
    ))
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(160) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.into_owned(),
    }
}

/// `POST /quarantine/redrive`: without `confirm=yes` a dry run that shows
/// what would change and asks to confirm; with it, the re-drive and its
/// result.
pub(super) async fn redrive(console: &Console, form: &[u8]) -> Result<Response<Body>, Failure> {
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(form).unwrap_or_default();
    let raw_id = field(&fields, "raw_id")
        .map(|id| id.parse::<u64>())
        .transpose()
        .map_err(|_| Failure::bad_request("raw_id is not a number"))?;
    let since = field(&fields, "since").map(parse_since).transpose()?;
    let confirmed = field(&fields, "confirm") == Some("yes");
    let request = RedriveRequest { raw_id: raw_id.unwrap_or(0), received_after: since, dry_run: !confirmed };
    let response = console.admin.redrive(Request::new(request)).await?.into_inner();
    let what = match (raw_id, field(&fields, "since")) {
        (Some(id), _) => format!("delivery {id}"),
        (None, Some(since)) => format!("every quarantined delivery received after {since} UTC"),
        (None, None) => "every quarantined delivery".to_string(),
    };
    let mut would_become = std::collections::HashMap::new();
    if !confirmed {
        for result in response.results.iter().take(PAGE_ROWS as usize) {
            let request = GetDeliveryRequest { raw_id: result.raw_id };
            if let Ok(raw) = console.admin.get_delivery(Request::new(request)).await {
                would_become.insert(result.raw_id, console.store.map(&raw.into_inner()));
            }
        }
    }
    let title = if confirmed { "Re-driven" } else { "Re-drive: dry run" };
    let page = layout(
        title,
        html! {
            @if confirmed {
                p.result #result { "Re-drove " (what) ": " strong { (response.applied) " applied" } ", " (response.still_quarantined) " still quarantined." }
            } @else {
                p #dry-run { "Dry run for " (what) ": nothing has changed yet. " (response.applied) " would be applied, " (response.still_quarantined) " would stay quarantined." }
            }
            table.redrive {
                thead { tr { th { "delivery" } th { "before" } th { "after" } th { "events" } } }
                tbody { @for result in &response.results {
                    tr {
                        td { a href={ "/deliveries/" (result.raw_id) } { (result.raw_id) } }
                        td { "quarantined" }
                        td {
                            @if result.outcome == DeliveryOutcome::Applied as i32 {
                                strong { @if confirmed { "applied" } @else { "would be applied" } }
                                @if result.duplicate_of != 0 { " (already applied by delivery " a href={ "/deliveries/" (result.duplicate_of) } { (result.duplicate_of) } ")" }
                            } @else { "still quarantined: " (result.reason) }
                            @if let Some(Ok(normalized)) = would_become.get(&result.raw_id) {
                                ul.observations { @for observation in &normalized.observations {
                                    li {
                                        (render::kind(observation.kind as i32)) " for "
                                        strong { (observation.references.merchant_reference) }
                                        @if let Some(status) = &observation.status {
                                            ": " code { (status.verbatim) } " → "
                                            (status.canonical.map_or("unmapped".to_string(), |s| render::status(s as i32)))
                                        }
                                    }
                                } }
                            }
                        }
                        td {
                            (result.events)
                            @for sequence in &result.sequences { " " a href={ "/events/" (sequence) } { "#" (sequence) } }
                        }
                    }
                } }
            }
            @if !confirmed && response.applied > 0 {
                form.confirm method="post" action="/quarantine/redrive" {
                    @for (name, value) in &fields {
                        @if name != "confirm" { input type="hidden" name=(name) value=(value); }
                    }
                    input type="hidden" name="confirm" value="yes";
                    button.danger #confirm type="submit" { "Confirm: re-drive for real" }
                }
            }
            p { a href="/quarantine" { "Back to the quarantine" } }
        },
    );
    Ok(super::page_response(StatusCode::OK, page))
}

/// A `datetime-local` value, taken as UTC.
fn parse_since(text: &str) -> Result<prost_types::Timestamp, Failure> {
    let parsed = ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S"]
        .iter()
        .find_map(|format| chrono::NaiveDateTime::parse_from_str(text, format).ok())
        .ok_or_else(|| Failure::bad_request(format!("`{text}` is not a time like 2026-11-30T10:00")))?;
    let utc = parsed.and_utc();
    Ok(prost_types::Timestamp { seconds: utc.timestamp(), nanos: 0 })
}

// === Unmapped statuses, stats ===

pub(super) async fn unmapped(console: &Console) -> Result<Markup, Failure> {
    let listed = console.admin.list_unmapped_statuses(Request::new(ListUnmappedStatusesRequest {})).await?;
    let statuses = listed.into_inner().statuses;
    Ok(layout(
        "Unmapped statuses",
        html! {
            p { "Provider status values the mapping tables do not know yet. They are kept verbatim and leave the canonical status unchanged." }
            @if statuses.is_empty() { p.empty { "None: every status seen is mapped." } } @else {
                table {
                    thead { tr { th { "provider" } th { "applies to" } th { "value" } th { "seen" } } }
                    tbody { @for status in &statuses {
                        tr { td { (render::provider(status.provider)) } td { (status.applies_to) } td { code { (status.value) } } td { (status.count) } }
                    } }
                }
            }
        },
    ))
}

pub(super) async fn stats(console: &Console) -> Result<Markup, Failure> {
    let stats = console.admin.get_stats(Request::new(GetStatsRequest {})).await?.into_inner();
    let samples = console.rates.samples();
    let steps = rates::steps(&samples);
    let events: Vec<f64> = steps.iter().map(|s| s.0).collect();
    let deliveries: Vec<f64> = steps.iter().map(|s| s.1).collect();
    let lag: Vec<f64> = samples.iter().map(|s| s.lag as f64).collect();
    let mut positions = console.subscriptions.positions();
    positions.sort_unstable();
    let allowlists = console.allowlists.statuses();
    Ok(layout(
        "Stats",
        html! {
            table.facts {
                tr { th { "head sequence" } td #head { (stats.head_sequence) } }
                tr { th { "oldest retained sequence" } td { (stats.oldest_retained_sequence) } }
                tr { th { "orders" } td { (stats.orders) } }
                tr { th { "quarantined" } td { a href="/quarantine" { (stats.quarantined) } } }
                tr { th { "store size" } td { (format!("{:.1} MiB", stats.store_size_bytes as f64 / 1_048_576.0)) } }
            }
            h2 { "The last minutes" }
            div.charts {
                (sparkline("webhooks answered by this node", &deliveries, "/s"))
                (sparkline("events", &events, "/s"))
                (sparkline("largest subscriber lag", &lag, "events"))
            }
            h2 { "Subscribers" }
            @if positions.is_empty() { p.empty { "No open Subscribe streams." } } @else {
                table {
                    thead { tr { th { "subscriber" } th { "position" } th { "behind the head" } } }
                    tbody { @for (id, position) in &positions {
                        tr { td { (id) } td { (position) } td { (stats.head_sequence.saturating_sub(*position)) } }
                    } }
                }
            }
            @if !allowlists.is_empty() {
                h2 { "Allowlists followed in DNS" }
                table {
                    thead { tr { th { "source" } th { "record" } th { "ranges allowed now" } th { "age of the last good answer" } } }
                    tbody { @for status in &allowlists {
                        tr {
                            td { (status.source) } td { code { (status.record) } }
                            td { @for network in &status.networks { code { (network.0) } " " } }
                            td { @match status.age() {
                                Some(age) => { (age.as_secs()) " s" }
                                None => { span.badge { "no DNS-derived entries yet" } }
                            } }
                        }
                    } }
                }
            }
        },
    ))
}

pub(super) fn error_page(message: &str) -> Markup {
    layout("Not available", html! { p.error { (message) } p { a href="/" { "Back to the live events" } } })
}
