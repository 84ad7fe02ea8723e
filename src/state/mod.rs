//! The canonical state rules: how one observation changes an order.
//!
//! Pure: the order, the observation and the event's context go in; the new
//! order and the event come out. The rank tables below are the only place
//! that knows which status may follow which.

use prost_types::Timestamp;

use crate::ingest::Observation;
use crate::proto::{Event, EventKind, Order, OrderStatus, Return, Shipment, ShipmentStatus};

/// Everything about the event that does not come from the observation.
#[derive(Clone, Debug)]
pub struct Context<'a> {
    pub sequence: u64,
    pub received_at: Timestamp,
    pub order_id: u64,
    pub source: &'a str,
    pub provider: crate::proto::Provider,
}

// === The rank tables ===

/// Where an order status stands in the lifecycle; `None` for terminal ones.
fn order_rank(status: OrderStatus) -> Option<u8> {
    use OrderStatus::*;
    match status {
        Unspecified => Some(0),
        Pending => Some(1),
        Accepted => Some(2),
        Processing | OnHold => Some(3),
        PartiallyShipped => Some(4),
        Shipped => Some(5),
        Delivered => Some(6),
        Completed => Some(7),
        Rejected | Cancelled | Failed => None,
    }
}

/// Whether an order may move from `current` to `new`.
///
/// Never backwards; terminal states are sticky, except that a successful
/// (re-)creation replaces a rejection; cancellation and failure may end any
/// non-terminal order; a rejection only applies before acceptance.
fn order_transition_allowed(current: OrderStatus, new: OrderStatus, kind: EventKind) -> bool {
    use OrderStatus::*;
    if current == new {
        return true;
    }
    let Some(current_rank) = order_rank(current) else {
        return current == Rejected && new == Accepted && kind == EventKind::OrderCreated;
    };
    match new {
        Cancelled | Failed => true,
        Rejected => current_rank <= 1,
        _ => order_rank(new).is_some_and(|rank| rank >= current_rank),
    }
}

/// Where a shipment status stands; `None` for terminal ones.
fn shipment_rank(status: ShipmentStatus) -> Option<u8> {
    use ShipmentStatus::*;
    match status {
        Unspecified | Unknown => Some(0),
        LabelCreated => Some(1),
        ReadyForPickup => Some(2),
        InTransit | Delayed => Some(3),
        OutForDelivery | DeliveryAttemptFailed | AvailableForPickup | Exception => Some(4),
        ReturningToSender | Expired => Some(5),
        Delivered | Cancelled => None,
    }
}

/// Whether a shipment may move from `current` to `new`: never backwards,
/// delivered and cancelled are sticky, delivery and cancellation may end any
/// other state.
fn shipment_transition_allowed(current: ShipmentStatus, new: ShipmentStatus) -> bool {
    use ShipmentStatus::*;
    if current == new || new == Unspecified {
        return true;
    }
    let Some(current_rank) = shipment_rank(current) else { return false };
    match new {
        Delivered | Cancelled => true,
        _ => shipment_rank(new).is_some_and(|rank| rank >= current_rank),
    }
}

/// The order status its shipments imply: SHIPPED once one is in transit or
/// later, DELIVERED once every (not cancelled) shipment is delivered.
fn derived_status(shipments: &[Shipment]) -> Option<OrderStatus> {
    let live: Vec<ShipmentStatus> =
        shipments.iter().map(Shipment::status).filter(|s| *s != ShipmentStatus::Cancelled).collect();
    if !live.is_empty() && live.iter().all(|s| *s == ShipmentStatus::Delivered) {
        return Some(OrderStatus::Delivered);
    }
    let in_transit = shipment_rank(ShipmentStatus::InTransit);
    let shipped = live.iter().any(|s| *s == ShipmentStatus::Delivered || shipment_rank(*s) >= in_transit);
    shipped.then_some(OrderStatus::Shipped)
}

// === Applying an observation ===

/// Applies `obs` to `current` (or to a new order when there is none yet).
/// Returns the order as it now is and the event that records the change; a
/// stale observation leaves the order as it was and is recorded with
/// `applied = false`.
pub fn apply(current: Option<Order>, obs: &Observation, ctx: &Context<'_>) -> (Order, Event) {
    let mut order = current.unwrap_or_else(|| new_order(ctx));
    let previous_status = order.status();
    let mut event = event_for(obs, ctx, previous_status);
    if let Some(reason) = staleness(&order, obs) {
        return stale(order, event, obs, reason, ctx);
    }
    merge_order(&mut order, obs, Merge::Overwrite);
    let mut note = String::new();
    if let Some(reported) = &obs.status {
        if !reported.verbatim.is_empty() {
            order.provider_status = reported.verbatim.clone();
        }
        match reported.canonical {
            Some(status) => order.status = status as i32,
            None => note = format!("unmapped status `{}`", reported.verbatim),
        }
    }
    if let Some(report) = &obs.shipment {
        if report.status() == ShipmentStatus::Unspecified && !report.provider_status.is_empty() {
            note = format!("unmapped shipment status `{}`", report.provider_status);
        }
        event.shipment = Some(merge_shipment(&mut order.shipments, report, Merge::Overwrite, ctx.sequence));
    }
    if let Some(report) = &obs.return_ {
        event.r#return = Some(upsert_return(&mut order.returns, report, ctx.sequence));
    }
    if let Some(refund) = &obs.refund {
        upsert_by_id(&mut order.refunds, refund.clone(), |r| &r.id);
    }
    if let Some(derived) = derived_status(&order.shipments)
        && order_rank(order.status()).is_some_and(|rank| Some(rank) < order_rank(derived))
    {
        order.status = derived as i32;
    }
    order.updated_at = Some(ctx.received_at);
    order.last_sequence = ctx.sequence;
    keep_within_bounds(&mut order);
    event.applied = true;
    event.note = note;
    event.status = order.status;
    event.references = order.references.clone();
    (order, event)
}

/// A stale observation moves nothing back; it only fills in what is still
/// missing, and is recorded with `applied = false`.
fn stale(mut order: Order, mut event: Event, obs: &Observation, reason: String, ctx: &Context<'_>) -> (Order, Event) {
    let before = order.clone();
    merge_order(&mut order, obs, Merge::FillIn);
    if let Some(report) = &obs.shipment
        && order.shipments.iter().any(|s| s.id == report.id)
    {
        merge_shipment(&mut order.shipments, report, Merge::FillIn, ctx.sequence);
    }
    event.applied = false;
    event.note = reason;
    if order != before {
        event.note.push_str("; filled in missing fields");
        order.updated_at = Some(ctx.received_at);
        order.last_sequence = ctx.sequence;
    }
    event.references = order.references.clone();
    (order, event)
}

/// The largest an order may grow, encoded. One order is read, cached and
/// streamed whole, so it must stay well inside a gRPC message.
pub const ORDER_MAX_BYTES: usize = 1 << 20;

/// Drops the oldest returns, then refunds, then shipments, then items until
/// the order fits [`ORDER_MAX_BYTES`] (the newest of each stays), counting
/// them in `omitted_entries`. The events keep every one.
fn keep_within_bounds(order: &mut Order) {
    use prost::Message;
    fn drop_oldest<T>(list: &mut Vec<T>) -> bool {
        if list.len() > 1 {
            list.remove(0);
            true
        } else {
            false
        }
    }
    while order.encoded_len() > ORDER_MAX_BYTES {
        let dropped = drop_oldest(&mut order.returns)
            || drop_oldest(&mut order.refunds)
            || drop_oldest(&mut order.shipments)
            || drop_oldest(&mut order.items);
        if !dropped {
            return;
        }
        order.omitted_entries += 1;
    }
}

fn new_order(ctx: &Context<'_>) -> Order {
    Order {
        id: ctx.order_id,
        source: ctx.source.to_string(),
        provider: ctx.provider as i32,
        created_at: Some(ctx.received_at),
        ..Order::default()
    }
}

fn event_for(obs: &Observation, ctx: &Context<'_>, previous: OrderStatus) -> Event {
    let reported = obs.status.as_ref();
    Event {
        sequence: ctx.sequence,
        received_at: Some(ctx.received_at),
        source: ctx.source.to_string(),
        provider: ctx.provider as i32,
        kind: obs.kind as i32,
        order_id: ctx.order_id,
        status: reported.and_then(|r| r.canonical).unwrap_or_default() as i32,
        provider_status: reported.map(|r| r.verbatim.clone()).unwrap_or_default(),
        previous_status: previous as i32,
        provider_previous_status: obs.provider_previous_status.clone().unwrap_or_default(),
        shipment: obs.shipment.clone(),
        r#return: obs.return_.clone(),
        refund: obs.refund.clone(),
        invoice: obs.invoice.clone(),
        payment_request: obs.payment_request.clone(),
        description: obs.description.clone(),
        ..Event::default()
    }
}

/// Why `obs` must not be applied to `order`, if it must not.
fn staleness(order: &Order, obs: &Observation) -> Option<String> {
    if let (Some(theirs), Some(ours)) = (&obs.provider_time, &order.provider_updated_at)
        && is_before(theirs, ours)
    {
        return Some("stale: older than the order's last provider update".into());
    }
    if let Some(new) = obs.status.as_ref().and_then(|r| r.canonical)
        && !order_transition_allowed(order.status(), new, obs.kind)
    {
        return Some(format!("stale: order is {:?}, not moved to {new:?}", order.status()));
    }
    let report = obs.shipment.as_ref()?;
    let existing = order.shipments.iter().find(|s| s.id == report.id)?;
    if let (Some(theirs), Some(ours)) = (&report.provider_updated_at, &existing.provider_updated_at)
        && is_before(theirs, ours)
    {
        return Some("stale: older than the shipment's last provider update".into());
    }
    (!shipment_transition_allowed(existing.status(), report.status()))
        .then(|| format!("stale: shipment is {:?}, not moved to {:?}", existing.status(), report.status()))
}

fn is_before(a: &Timestamp, b: &Timestamp) -> bool {
    (a.seconds, a.nanos) < (b.seconds, b.nanos)
}

/// How sent fields are merged into stored ones. Either way, a field that was
/// not sent (empty) never clears stored data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Merge {
    /// What was sent replaces what is stored (a current observation).
    Overwrite,
    /// What was sent only fills fields still empty (a stale observation:
    /// it may complete the record, never move it back).
    FillIn,
}

impl Merge {
    fn text(self, target: &mut String, value: &str) {
        if !value.is_empty() && (self == Self::Overwrite || target.is_empty()) {
            *target = value.to_string();
        }
    }

    fn option<T: Clone>(self, target: &mut Option<T>, value: &Option<T>) {
        if value.is_some() && (self == Self::Overwrite || target.is_none()) {
            target.clone_from(value);
        }
    }

    fn list<T: Clone>(self, target: &mut Vec<T>, value: &[T]) {
        if !value.is_empty() && (self == Self::Overwrite || target.is_empty()) {
            *target = value.to_vec();
        }
    }
}

/// Merges the order data the observation carries.
fn merge_order(order: &mut Order, obs: &Observation, merge: Merge) {
    let refs = order.references.get_or_insert_with(Default::default);
    // References are only ever added: an order keeps every name it had.
    Merge::FillIn.text(&mut refs.merchant_reference, &obs.references.merchant_reference);
    Merge::FillIn.text(&mut refs.provider_order_id, &obs.references.provider_order_id);
    Merge::FillIn.text(&mut refs.safe_id, &obs.references.safe_id);
    let patch = &obs.order;
    merge.text(&mut order.description, &patch.description);
    merge.text(&mut order.customer_id, &patch.customer_id);
    merge.text(&mut order.original_merchant_reference, &patch.original_merchant_reference);
    merge.text(&mut order.original_serial_number, &patch.original_serial_number);
    order.is_replacement |= patch.is_replacement;
    merge.list(&mut order.items, &patch.items);
    merge.option(&mut order.shipping_address, &patch.shipping_address);
    merge.option(&mut order.billing_address, &patch.billing_address);
    merge.option(&mut order.grand_total, &patch.grand_total);
    merge.option(&mut order.subtotal, &patch.subtotal);
    merge.option(&mut order.shipping, &patch.shipping);
    merge.option(&mut order.provider_created_at, &patch.provider_created_at);
    merge.option(&mut order.provider_updated_at, &obs.provider_time);
}

/// Inserts `item`, or replaces the one with the same id.
fn upsert_by_id<T>(list: &mut Vec<T>, item: T, id: impl Fn(&T) -> &String) {
    match list.iter().position(|existing| id(existing) == id(&item)) {
        Some(i) => list[i] = item,
        None => list.push(item),
    }
}

/// Returns carry no provider time; the latest delivery wins, but fields it
/// does not send are kept.
fn upsert_return(returns: &mut Vec<Return>, report: &Return, sequence: u64) -> Return {
    let mut merged = returns.iter().find(|r| r.id == report.id).cloned().unwrap_or_default();
    let merge = Merge::Overwrite;
    merged.id.clone_from(&report.id);
    merge.text(&mut merged.provider_status, &report.provider_status);
    merge.text(&mut merged.carrier, &report.carrier);
    merge.text(&mut merged.tracking_number, &report.tracking_number);
    merge.text(&mut merged.tracking_url, &report.tracking_url);
    merge.option(&mut merged.requested_at, &report.requested_at);
    merge.option(&mut merged.received_at, &report.received_at);
    merge.option(&mut merged.processed_at, &report.processed_at);
    merge.list(&mut merged.items, &report.items);
    merged.last_sequence = sequence;
    upsert_by_id(returns, merged.clone(), |r| &r.id);
    merged
}

/// Inserts or updates the shipment `report` describes; returns it as stored.
/// Its status changes only when overwriting.
fn merge_shipment(shipments: &mut Vec<Shipment>, report: &Shipment, merge: Merge, sequence: u64) -> Shipment {
    let index = match shipments.iter().position(|s| s.id == report.id) {
        Some(i) => i,
        None => {
            shipments.push(Shipment { id: report.id.clone(), ..Shipment::default() });
            shipments.len() - 1
        }
    };
    let s = &mut shipments[index];
    if merge == Merge::Overwrite {
        if report.status() != ShipmentStatus::Unspecified {
            s.status = report.status;
        }
        merge.text(&mut s.provider_status, &report.provider_status);
        merge.option(&mut s.provider_updated_at, &report.provider_updated_at);
        s.last_sequence = sequence;
    }
    merge.text(&mut s.carrier, &report.carrier);
    merge.text(&mut s.carrier_service, &report.carrier_service);
    merge.text(&mut s.tracking_number, &report.tracking_number);
    merge.text(&mut s.tracking_url, &report.tracking_url);
    merge.text(&mut s.package_id, &report.package_id);
    merge.option(&mut s.shipped_at, &report.shipped_at);
    merge.option(&mut s.collected_at, &report.collected_at);
    merge.option(&mut s.delivered_at, &report.delivered_at);
    merge.option(&mut s.fulfilled_at, &report.fulfilled_at);
    merge.list(&mut s.items, &report.items);
    merge.list(&mut s.order_item_ids, &report.order_item_ids);
    s.clone()
}

#[cfg(test)]
mod tests;
