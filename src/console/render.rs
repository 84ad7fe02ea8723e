//! The console's HTML pieces shared by its pages: the layout, names of
//! enum values, times, small charts. maud escapes every value it renders.

use maud::{DOCTYPE, Markup, html};

use crate::proto::{Event, EventKind, OrderStatus, Provider, ShipmentStatus};

/// A whole page: navigation, title, content.
pub fn layout(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · ordertrail" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                nav {
                    a.brand href="/" { "ordertrail" }
                    a href="/" { "Live events" }
                    a href="/orders" { "Orders" }
                    a href="/quarantine" { "Quarantine" }
                    a href="/unmapped" { "Unmapped statuses" }
                    a href="/stats" { "Stats" }
                }
                main {
                    h1 { (title) }
                    (content)
                }
            }
        }
    }
}

/// A one-line answer (refusals).
pub fn plain(message: &str) -> Markup {
    layout("ordertrail", html! { p.error { (message) } })
}

/// An enum value's name without its type prefix, in lower case:
/// `ORDER_STATUS_SHIPPED` → `shipped`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase().replace('_', " ")
}

pub fn provider(value: i32) -> String {
    Provider::try_from(value).map_or_else(|_| value.to_string(), |p| short(p.as_str_name(), "PROVIDER_"))
}

pub fn kind(value: i32) -> String {
    EventKind::try_from(value).map_or_else(|_| value.to_string(), |k| short(k.as_str_name(), "EVENT_KIND_"))
}

pub fn status(value: i32) -> String {
    OrderStatus::try_from(value).map_or_else(|_| value.to_string(), |s| short(s.as_str_name(), "ORDER_STATUS_"))
}

pub fn shipment_status(value: i32) -> String {
    ShipmentStatus::try_from(value).map_or_else(|_| value.to_string(), |s| short(s.as_str_name(), "SHIPMENT_STATUS_"))
}

/// A time as UTC, to the second; empty when absent.
pub fn time(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(|at| chrono::DateTime::from_timestamp(at.seconds, at.nanos.max(0) as u32))
        .map(|at| at.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// The merchant reference an event's order is known by.
pub fn merchant_reference(event: &Event) -> &str {
    event.references.as_ref().map_or("", |r| r.merchant_reference.as_str())
}

/// One event as a row of the live list (and of its live updates).
pub fn event_row(event: &Event) -> Markup {
    let reference = merchant_reference(event);
    html! {
        tr.stale[!event.applied] data-sequence=(event.sequence) {
            td { a href={ "/events/" (event.sequence) } { (event.sequence) } }
            td { (time(event.received_at.as_ref())) }
            td { (event.source) }
            td { (provider(event.provider)) }
            td { (kind(event.kind)) }
            td {
                a href={ "/orders/" (event.order_id) } {
                    @if reference.is_empty() { "order " (event.order_id) } @else { (reference) }
                }
            }
            td { (status(event.status)) }
            td { code { (event.provider_status) } }
            td { @if event.applied { "applied" } @else { span.badge { "stale" } } }
        }
    }
}

/// The header of [`event_row`]s.
pub fn event_header() -> Markup {
    html! {
        tr {
            th { "seq" } th { "received (UTC)" } th { "source" } th { "provider" } th { "kind" }
            th { "order" } th { "status" } th { "provider status" } th { "" }
        }
    }
}

/// A small line chart of `values` (newest right), as inline SVG.
pub fn sparkline(label: &str, values: &[f64], unit: &str) -> Markup {
    const WIDTH: f64 = 300.0;
    const HEIGHT: f64 = 60.0;
    let max = values.iter().copied().fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { (HEIGHT - 4.0) / max } else { 0.0 };
    let step = if values.len() > 1 { WIDTH / (values.len() - 1) as f64 } else { 0.0 };
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, HEIGHT - 2.0 - v * scale))
        .collect();
    let last = values.last().copied().unwrap_or(0.0);
    html! {
        figure.chart {
            figcaption { (label) ": " strong { (format!("{last:.1}")) } " " (unit) " (max " (format!("{max:.1}")) ")" }
            svg viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } width=(WIDTH) height=(HEIGHT) role="img" aria-label=(label) {
                polyline points=(points.join(" ")) {}
            }
        }
    }
}
