//! `console`: each page of the operator console on a store of `--orders`
//! webhooks, one request at a time, against `GET /healthz` on the same
//! admin listener (the same connection handling, no store read).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::Args;
use crate::load::{http_client, merchant_ref, tracking};
use crate::measure::{Sample, ServerCpu, sample};
use crate::report::{header, median, row};
use crate::scenarios::lookup::{discard, prepared};
use crate::servers::{Mode, start_ordertrail};

/// Requests per page and round.
const REQUESTS: usize = 200;

pub(crate) async fn console(args: &Args) {
    let settings = args.settings();
    let (dir, run) = prepared(args.orders, &settings).await;
    // Orders near the middle of the store, found by what a person would paste.
    let n = args.orders / 2 - (args.orders / 2) % 3;
    // (name, path, what the answer must hold to count).
    let pages: Vec<(&str, String, &str)> = vec![
        ("GET /healthz (baseline)", "/healthz".into(), "ok"),
        ("live events", "/".into(), "<tr class="),
        ("live events, filtered by kind", "/?kind=shipment+updated".into(), "<tr class="),
        (
            "order search by tracking number",
            format!("/orders?q={}&kind=tracking_number", tracking(run, n + 2)),
            "<title>Order ",
        ),
        ("order search by merchant reference", format!("/orders?q={}", merchant_ref(run, n)), "<title>Order "),
        ("order page by id", format!("/orders/{}", n / 3 + 1), "<title>Order "),
        ("event", format!("/events/{}", n + 1), "<title>Event "),
        ("raw delivery", format!("/deliveries/{}", n + 1), "<title>Delivery "),
        ("quarantine", "/quarantine".into(), "<title>Quarantine"),
        ("unmapped statuses", "/unmapped".into(), "<title>Unmapped"),
        ("stats", "/stats".into(), "<title>Stats"),
    ];
    println!(
        "Console pages with {} webhooks stored, one request at a time ({REQUESTS} per page and round). Baseline: \
         GET /healthz on the same admin listener.\n",
        args.orders
    );
    let mut measured: Vec<Vec<Sample>> = vec![Vec::new(); pages.len()];
    for _ in 0..args.rounds.max(1) {
        let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "", &settings).await;
        for (i, (_, path, expected)) in pages.iter().enumerate() {
            measured[i].push(one_at_a_time(subject.admin, path, expected).await);
        }
        subject.stop().await;
    }
    header("page");
    let base = median(&measured[0], |s| s.per_second).0;
    for (i, (name, path, _)) in pages.iter().enumerate() {
        row(name, path, &measured[i], base);
    }
    discard(&dir, &settings);
}

/// `REQUESTS` GETs of `path`, one after another on one connection; an
/// answer without `expected` in it counts as an error.
async fn one_at_a_time(address: std::net::SocketAddr, path: &str, expected: &str) -> Sample {
    let client = http_client(1);
    let cpu = ServerCpu::start();
    let started = Instant::now();
    let (mut latencies, mut errors) = (Vec::with_capacity(REQUESTS), 0);
    for _ in 0..REQUESTS {
        let sent = Instant::now();
        let request =
            hyper::Request::get(format!("http://{address}{path}")).body(Full::<Bytes>::default()).expect("request");
        let ok = match client.request(request).await {
            Ok(response) if response.status().is_success() => match response.into_body().collect().await {
                Ok(body) => String::from_utf8_lossy(&body.to_bytes()).contains(expected),
                Err(_) => false,
            },
            Ok(_) => false,
            Err(_) => false,
        };
        if ok {
            latencies.push(sent.elapsed());
        } else {
            errors += 1;
        }
    }
    sample(latencies, errors, started.elapsed().max(Duration::from_millis(1)), cpu.used())
}
