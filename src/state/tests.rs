//! Tests of the canonical state rules: one per rule.
use super::*;
use crate::ingest::ReportedStatus;
use crate::proto::Provider;

fn ctx(sequence: u64) -> Context<'static> {
    Context {
        sequence,
        received_at: Timestamp { seconds: sequence as i64, nanos: 0 },
        order_id: 1,
        source: "s",
        provider: Provider::Ordermesh,
    }
}

fn status(kind: EventKind, s: OrderStatus) -> Observation {
    Observation {
        kind,
        status: Some(ReportedStatus { verbatim: format!("{s:?}"), canonical: Some(s) }),
        ..Observation::default()
    }
}

fn shipment(id: &str, s: ShipmentStatus) -> Observation {
    Observation {
        kind: EventKind::ShipmentUpdated,
        shipment: Some(Shipment { id: id.into(), status: s as i32, ..Shipment::default() }),
        ..Observation::default()
    }
}

/// Applies the observations in order; returns the order and the events.
fn run(observations: &[Observation]) -> (Order, Vec<Event>) {
    let mut order = None;
    let mut events = Vec::new();
    for (i, obs) in observations.iter().enumerate() {
        let (o, e) = apply(order.take(), obs, &ctx(i as u64 + 1));
        order = Some(o);
        events.push(e);
    }
    (order.unwrap(), events)
}

#[test]
fn no_regression_is_recorded_as_stale() {
    use OrderStatus::*;
    let (order, events) =
        run(&[status(EventKind::OrderStatusChanged, Processing), status(EventKind::OrderStatusChanged, Accepted)]);
    assert_eq!(order.status(), Processing);
    assert!(!events[1].applied);
    assert!(events[1].note.starts_with("stale"));
    assert_eq!(events[1].previous_status(), Processing);
}

#[test]
fn terminal_states_are_sticky() {
    use OrderStatus::*;
    for terminal in [Cancelled, Failed, Rejected] {
        let (order, events) =
            run(&[status(EventKind::OrderStatusChanged, terminal), status(EventKind::OrderStatusChanged, Processing)]);
        assert_eq!(order.status(), terminal);
        assert!(!events[1].applied);
    }
}

#[test]
fn successful_recreation_replaces_a_rejection() {
    use OrderStatus::*;
    let (order, events) = run(&[status(EventKind::OrderRejected, Rejected), status(EventKind::OrderCreated, Accepted)]);
    assert_eq!(order.status(), Accepted);
    assert!(events[1].applied);
    assert_eq!(events[1].previous_status(), Rejected);
}

#[test]
fn late_rejection_does_not_undo_acceptance() {
    use OrderStatus::*;
    let (order, _) = run(&[status(EventKind::OrderCreated, Accepted), status(EventKind::OrderRejected, Rejected)]);
    assert_eq!(order.status(), Accepted);
}

#[test]
fn cancellation_ends_any_live_order() {
    use OrderStatus::*;
    let (order, _) =
        run(&[status(EventKind::OrderStatusChanged, Shipped), status(EventKind::OrderStatusChanged, Cancelled)]);
    assert_eq!(order.status(), Cancelled);
}

#[test]
fn shipment_never_moves_back_and_delivered_is_sticky() {
    use ShipmentStatus::*;
    let (order, events) = run(&[shipment("a", Delivered), shipment("a", InTransit)]);
    assert_eq!(order.shipments[0].status(), Delivered);
    assert!(!events[1].applied);
}

#[test]
fn order_status_is_derived_from_shipments() {
    use ShipmentStatus::*;
    let (order, _) = run(&[
        status(EventKind::OrderCreated, OrderStatus::Accepted),
        shipment("a", InTransit),
        shipment("b", LabelCreated),
    ]);
    assert_eq!(order.status(), OrderStatus::Shipped);
    let (order, _) = run(&[shipment("a", InTransit), shipment("b", LabelCreated), shipment("a", Delivered)]);
    assert_eq!(order.status(), OrderStatus::Shipped, "not all delivered");
    let (order, events) = run(&[
        shipment("a", InTransit),
        shipment("b", LabelCreated),
        shipment("a", Delivered),
        shipment("b", Delivered),
    ]);
    assert_eq!(order.status(), OrderStatus::Delivered);
    assert_eq!(events[3].status(), OrderStatus::Delivered);
}

#[test]
fn derived_status_never_overrides_a_later_or_terminal_one() {
    let (order, _) =
        run(&[status(EventKind::OrderStatusChanged, OrderStatus::Completed), shipment("a", ShipmentStatus::Delivered)]);
    assert_eq!(order.status(), OrderStatus::Completed);
    let (order, _) =
        run(&[status(EventKind::OrderStatusChanged, OrderStatus::Cancelled), shipment("a", ShipmentStatus::InTransit)]);
    assert_eq!(order.status(), OrderStatus::Cancelled);
}

#[test]
fn unmapped_status_is_kept_verbatim_and_leaves_canonical_unchanged() {
    let unmapped = Observation {
        kind: EventKind::OrderStatusChanged,
        status: Some(ReportedStatus { verbatim: "Teleported".into(), canonical: None }),
        ..Observation::default()
    };
    let (order, events) = run(&[status(EventKind::OrderCreated, OrderStatus::Accepted), unmapped]);
    assert_eq!(order.status(), OrderStatus::Accepted);
    assert_eq!(order.provider_status, "Teleported");
    assert!(events[1].applied);
    assert!(events[1].note.contains("unmapped"));
}

#[test]
fn older_provider_time_is_stale() {
    let at = |s| Observation {
        kind: EventKind::OrderUpdated,
        provider_time: Some(Timestamp { seconds: s, nanos: 0 }),
        order: Order { description: format!("at {s}"), ..Order::default() },
        ..Observation::default()
    };
    let (order, events) = run(&[at(20), at(10)]);
    assert_eq!(order.description, "at 20");
    assert!(!events[1].applied);
}

#[test]
fn a_stale_observation_fills_in_missing_data_but_moves_nothing_back() {
    let mut late_order = status(EventKind::OrderStatusChanged, OrderStatus::Processing);
    late_order.order.items = vec![crate::proto::Item { sku: "sku-1".into(), ..Default::default() }];
    let (order, events) = run(&[shipment("a", ShipmentStatus::InTransit), late_order]);
    assert_eq!(order.status(), OrderStatus::Shipped, "derived status kept");
    assert_eq!(order.items.len(), 1, "items filled in");
    assert!(!events[1].applied);
    assert!(events[1].note.contains("filled in"), "{}", events[1].note);
}

#[test]
fn missing_fields_never_clear_stored_data() {
    let mut first = shipment("a", ShipmentStatus::InTransit);
    first.shipment.as_mut().unwrap().tracking_number = "1Z".into();
    let (order, _) = run(&[first, shipment("a", ShipmentStatus::Delivered)]);
    assert_eq!(order.shipments[0].tracking_number, "1Z");
    assert_eq!(order.shipments[0].status(), ShipmentStatus::Delivered);
}

#[test]
fn an_order_never_grows_past_its_bound() {
    use prost::Message;
    // Five returns of about 880 kB each, as five large RMAs would make.
    let rma = |n: usize| Observation {
        kind: EventKind::ReturnUpdated,
        return_: Some(Return { id: format!("rma-{n}"), provider_status: "x".repeat(880_000), ..Return::default() }),
        ..Observation::default()
    };
    let (order, events) = run(&(0..5).map(rma).collect::<Vec<_>>());
    assert!(order.encoded_len() <= ORDER_MAX_BYTES, "{} bytes", order.encoded_len());
    assert_eq!(order.returns.last().map(|r| r.id.as_str()), Some("rma-4"), "the newest stays");
    assert_eq!(order.omitted_entries as usize + order.returns.len(), 5);
    assert!(events.iter().all(|e| e.r#return.is_some()), "every return is in its event");
}
