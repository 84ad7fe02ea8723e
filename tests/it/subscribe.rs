//! `Subscribe` against the real server: resume, the replay/live seam under
//! concurrent ingest, slow consumers, snapshot + tail, filters, progress,
//! shutdown, retention and the concurrency limit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::TestServer;
use ordertrail::proto::subscribe_response::Message;
use ordertrail::proto::{
    EventKind, ListOrdersRequest, Order, OrderReference, Provider, SubscribeRequest, SubscribeResponse, order_reference,
};
use tonic::{Code, Streaming};

/// Generous bound so a broken stream fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

/// A unique OrderMesh creation: one new order, one event.
fn creation(i: usize) -> String {
    format!(
        r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o-{i}","ExternalOrderId":"E-{i}","SafeId":"S-{i}"}}"#
    )
}

/// A status update of order `i`.
fn update(i: usize, status: &str) -> String {
    format!(r#"{{"EventType":"OrderUpdate","OrderId":"o-{i}","ExternalOrderId":"E-{i}","NewStatus":"{status}"}}"#)
}

async fn post(server: &TestServer, body: String) {
    let answer = server.post_json("/webhooks/ordermesh", body).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
}

async fn subscribe(server: &TestServer, request: SubscribeRequest) -> Streaming<SubscribeResponse> {
    server.grpc().await.subscribe(request).await.expect("Subscribe").into_inner()
}

fn after(sequence: u64) -> SubscribeRequest {
    SubscribeRequest { after_sequence: Some(sequence), ..Default::default() }
}

/// The next message; panics if the stream ends, fails or stays silent.
async fn next(stream: &mut Streaming<SubscribeResponse>) -> Message {
    match tokio::time::timeout(PATIENCE, stream.message()).await {
        Ok(Ok(Some(response))) => response.message.expect("a message"),
        Ok(Ok(None)) => panic!("stream ended"),
        Ok(Err(status)) => panic!("stream failed: {status}"),
        Err(_) => panic!("no message within {PATIENCE:?}"),
    }
}

/// Event sequences until (and including) `last`, skipping other messages.
async fn events_until(stream: &mut Streaming<SubscribeResponse>, last: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        if let Message::Event(event) = next(stream).await {
            assert!(event.sequence <= last, "got {} past {last}", event.sequence);
            seen.push(event.sequence);
        }
    }
    seen
}

#[tokio::test]
async fn resume_delivers_exactly_the_missed_events() {
    let server = TestServer::start().await;
    for i in 0..5 {
        post(&server, creation(i)).await;
    }
    let mut stream = subscribe(&server, after(0)).await;
    assert_eq!(events_until(&mut stream, 3).await, [1, 2, 3]);
    drop(stream);
    for i in 5..9 {
        post(&server, creation(i)).await;
    }
    let mut stream = subscribe(&server, after(3)).await;
    assert_eq!(events_until(&mut stream, 9).await, [4, 5, 6, 7, 8, 9]);
    match next(&mut stream).await {
        Message::CaughtUp(c) => assert_eq!(c.sequence, 9),
        other => panic!("expected caught_up, got {other:?}"),
    }
    // Nothing is repeated: the next event is the next new one.
    post(&server, creation(9)).await;
    assert_eq!(events_until(&mut stream, 10).await, [10]);
}

#[tokio::test]
async fn absent_after_sequence_means_from_now() {
    let server = TestServer::start().await;
    post(&server, creation(0)).await;
    let mut stream = subscribe(&server, SubscribeRequest::default()).await;
    match next(&mut stream).await {
        Message::CaughtUp(c) => assert_eq!(c.sequence, 1),
        other => panic!("expected caught_up, got {other:?}"),
    }
    post(&server, creation(1)).await;
    assert_eq!(events_until(&mut stream, 2).await, [2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_clients_joining_at_random_points_see_contiguous_ranges() {
    const WEBHOOKS: usize = 240;
    const CLIENTS: usize = 12;
    let server = Arc::new(TestServer::start().await);
    let poster = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut posts = tokio::task::JoinSet::new();
            for i in 0..WEBHOOKS {
                let server = server.clone();
                posts.spawn(async move { post(&server, creation(i)).await });
                if posts.len() >= 8 {
                    posts.join_next().await.unwrap().unwrap();
                }
            }
            posts.join_all().await;
        })
    };
    let mut clients = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..CLIENTS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(seed % 40)).await;
        let head = server.head().await;
        let start = seed % (head + 1);
        let stream = subscribe(&server, after(start)).await;
        clients.push((start, stream));
    }
    poster.await.unwrap();
    let total = WEBHOOKS as u64;
    for (start, mut stream) in clients {
        let seen = events_until(&mut stream, total).await;
        let expected: Vec<u64> = (start + 1..=total).collect();
        assert_eq!(seen, expected, "client after {start}");
    }
    let log: Vec<u64> = server.all_events().await.iter().map(|e| e.sequence).collect();
    assert_eq!(log, (1..=total).collect::<Vec<_>>(), "the global log is gap-free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_subscribers_never_block_ingest_and_catch_up_later() {
    const WEBHOOKS: usize = 600;
    let server = TestServer::start_with("[store]\nfeed_buffer_events = 32\n[grpc]\nsubscription_buffer = 4\n").await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(subscribe(&server, after(0)).await);
    }
    let mut normal = subscribe(&server, after(0)).await;
    let reader = tokio::spawn(async move { events_until(&mut normal, WEBHOOKS as u64).await });
    let server = Arc::new(server);
    let mut posts = tokio::task::JoinSet::new();
    // Large events, so the stalled streams' HTTP/2 windows (2 MiB) fill up
    // and their tasks stop taking from the live feed.
    let padding = "x".repeat(8 * 1024);
    for i in 0..WEBHOOKS {
        let server = server.clone();
        let body = creation(i).replace(r#""EventType""#, &format!(r#""Description":"{padding}","EventType""#));
        posts.spawn(async move { post(&server, body).await });
        if posts.len() >= 16 {
            posts.join_next().await.unwrap().unwrap();
        }
    }
    posts.join_all().await;
    let expected: Vec<u64> = (1..=WEBHOOKS as u64).collect();
    assert_eq!(reader.await.unwrap(), expected, "a normal subscriber gets everything");
    // Memory stays bounded: the live feed keeps at most its buffer while
    // the stalled subscribers hold their positions, not the events.
    let (backlog, _) = server.feed_stats().await;
    assert!(backlog <= 32, "live feed holds {backlog} events");
    for mut stream in stalled {
        assert_eq!(events_until(&mut stream, WEBHOOKS as u64).await, expected, "a stalled subscriber, gap-free");
    }
    let (_, lags) = server.feed_stats().await;
    assert!(lags >= 3, "the stalled subscribers were never switched to reading the store ({lags} lags)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_and_tail_together_equal_the_final_state() {
    let server = Arc::new(TestServer::start().await);
    for i in 0..20 {
        post(&server, creation(i)).await;
    }
    let writer = {
        let server = server.clone();
        tokio::spawn(async move {
            for round in 0..4 {
                for i in 0..20 {
                    let status = ["ReadyForFulfillment", "OnHold", "Shipped", "Completed"][round];
                    post(&server, update(i, status)).await;
                }
            }
        })
    };
    // The snapshot is taken while updates are being committed.
    while server.head().await <= 20 {
        tokio::task::yield_now().await;
    }
    let mut stream = subscribe(&server, SubscribeRequest { snapshot: true, ..Default::default() }).await;
    let mut snapshot: BTreeMap<u64, Order> = BTreeMap::new();
    let cut = loop {
        match next(&mut stream).await {
            Message::SnapshotOrder(order) => {
                snapshot.insert(order.id, order);
            }
            Message::SnapshotComplete(done) => break done.sequence,
            other => panic!("unexpected {other:?} during the snapshot"),
        }
    };
    writer.await.unwrap();
    let head = 20 + 80;
    let tail = events_until(&mut stream, head).await;
    assert_eq!(tail, (cut + 1..=head).collect::<Vec<_>>(), "the stream continues right after the snapshot");
    assert_eq!(snapshot.len(), 20);
    let mut client = server.grpc().await;
    let finals =
        client.list_orders(ListOrdersRequest { page_size: 100, ..Default::default() }).await.unwrap().into_inner();
    for order in finals.orders {
        let seen = &snapshot[&order.id];
        assert!(seen.last_sequence <= cut, "snapshot order {} reflects {} > {cut}", order.id, seen.last_sequence);
        if order.last_sequence <= cut {
            assert_eq!(seen, &order, "untouched since the snapshot: identical");
        } else {
            assert!(tail.contains(&order.last_sequence), "its later change is in the tail");
        }
    }
}

#[tokio::test]
async fn filters_select_sources_kinds_and_one_order() {
    let server = TestServer::start_with(
        "[grpc]\nprogress_interval_ms = 100\n[[sources]]\nname = \"a\"\nprovider = \"ordermesh\"\n[[sources]]\nname = \"b\"\nprovider = \"ordermesh\"\n[[sources]]\nname = \"w\"\nprovider = \"withings\"\n",
    )
    .await;
    let by_source = SubscribeRequest { after_sequence: Some(0), sources: vec!["b".into()], ..Default::default() };
    let by_kind = SubscribeRequest {
        after_sequence: Some(0),
        kinds: vec![EventKind::OrderStatusChanged as i32],
        ..Default::default()
    };
    let by_provider =
        SubscribeRequest { after_sequence: Some(0), providers: vec![Provider::Withings as i32], ..Default::default() };
    let reference = OrderReference { reference: Some(order_reference::Reference::ExternalOrderId("E-1".into())) };
    let by_order = SubscribeRequest { after_sequence: Some(0), order_reference: Some(reference), ..Default::default() };
    let mut streams = Vec::new();
    for request in [by_source, by_kind, by_provider, by_order] {
        streams.push(subscribe(&server, request).await);
    }
    for (source, body) in
        [("a", creation(1)), ("b", creation(2)), ("b", update(2, "Open")), ("a", update(1, "Shipped"))]
    {
        assert_eq!(server.post_json(&format!("/webhooks/{source}"), body).await.status, 200);
    }
    let withings = "customer_ref=E-1&status=OPEN";
    assert_eq!(server.post("/webhooks/w", "application/x-www-form-urlencoded", withings).await.status, 200);
    // The order filter follows order 1 of source a only (E-1 under withings
    // is another provider's reference namespace).
    let expected: [&[u64]; 4] = [&[2, 3], &[3, 4, 5], &[5], &[1, 4]];
    for (stream, expected) in streams.iter_mut().zip(expected) {
        let mut seen = Vec::new();
        while seen.len() < expected.len() {
            if let Message::Event(e) = next(stream).await {
                seen.push(e.sequence);
            }
        }
        assert_eq!(seen, expected);
    }
    // Nothing else matched: after one more unrelated event, the next thing
    // each filtered stream sees is not an event.
    post_to(&server, "a", creation(3)).await;
    for stream in streams.iter_mut().take(3).skip(1) {
        loop {
            match next(stream).await {
                Message::Event(e) => panic!("unexpected event {}", e.sequence),
                Message::Progress(p) if p.resume_after_sequence >= 6 => break,
                _ => {}
            }
        }
    }
}

async fn post_to(server: &TestServer, source: &str, body: String) {
    assert_eq!(server.post_json(&format!("/webhooks/{source}"), body).await.status, 200);
}

#[tokio::test]
async fn progress_reaches_the_head_even_when_nothing_matches() {
    let server = TestServer::start_with("[grpc]\nprogress_interval_ms = 50\n").await;
    let request = SubscribeRequest { after_sequence: Some(0), sources: vec!["nobody".into()], ..Default::default() };
    let mut stream = subscribe(&server, request).await;
    for i in 0..5 {
        post(&server, creation(i)).await;
    }
    loop {
        match next(&mut stream).await {
            Message::Progress(p) if p.resume_after_sequence == 5 => break,
            Message::Progress(p) => assert!(p.resume_after_sequence <= 5),
            Message::CaughtUp(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_a_resume_point() {
    let server = TestServer::start_with("shutdown_grace_ms = 60000\n").await;
    for i in 0..3 {
        post(&server, creation(i)).await;
    }
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = subscribe(&server, after(0)).await;
        assert_eq!(events_until(&mut stream, 3).await, [1, 2, 3]);
        streams.push(stream);
    }
    // Well inside the grace period: open streams must not hold shutdown.
    tokio::time::timeout(Duration::from_secs(30), server.stop()).await.expect("shutdown waited for streams");
    for mut stream in streams {
        let status = loop {
            match tokio::time::timeout(PATIENCE, stream.message()).await.expect("stream end") {
                Ok(Some(_)) => {}
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), Code::Unavailable, "{status}");
        assert!(status.message().contains("resume with after_sequence = 3"), "{}", status.message());
    }
}

#[tokio::test]
async fn history_no_longer_retained_is_out_of_range() {
    let server = TestServer::start_with("[store]\nretain_events = 5\n").await;
    for i in 0..10 {
        post(&server, creation(i)).await;
    }
    let mut client = server.grpc().await;
    let status = client.subscribe(after(2)).await.expect_err("OUT_OF_RANGE");
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(status.message().contains("oldest retained sequence is 6"), "{}", status.message());
    let mut stream = subscribe(&server, after(5)).await;
    assert_eq!(events_until(&mut stream, 10).await, [6, 7, 8, 9, 10]);
}

#[tokio::test]
async fn the_subscription_limit_answers_resource_exhausted_and_frees_slots() {
    let server = TestServer::start_with("[grpc]\nmax_subscriptions = 2\n").await;
    let first = subscribe(&server, SubscribeRequest::default()).await;
    let _second = subscribe(&server, SubscribeRequest::default()).await;
    let status = server.grpc().await.subscribe(SubscribeRequest::default()).await.expect_err("limit");
    assert_eq!(status.code(), Code::ResourceExhausted);
    drop(first);
    // The server notices the disconnect and frees the slot.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match server.grpc().await.subscribe(SubscribeRequest::default()).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("slot never freed: {status}"),
        }
    }
}

#[tokio::test]
async fn a_resume_point_beyond_the_head_waits_for_it() {
    let server = TestServer::start_with("[grpc]\nprogress_interval_ms = 50\n").await;
    for i in 0..3 {
        post(&server, creation(i)).await;
    }
    for ahead in [5, u64::MAX] {
        let mut stream = subscribe(&server, after(ahead)).await;
        let Message::CaughtUp(caught_up) = next(&mut stream).await else { panic!("caught_up first") };
        assert!(caught_up.sequence >= ahead.min(u64::MAX - 1), "{caught_up:?}");
        assert!(matches!(next(&mut stream).await, Message::Progress(_)), "the stream waits, it does not fail");
    }
    let mut stream = subscribe(&server, after(5)).await;
    for i in 3..6 {
        post(&server, creation(i)).await;
    }
    assert_eq!(events_until(&mut stream, 6).await, [6], "the first event after the resume point");
}

#[tokio::test]
async fn one_client_address_cannot_take_every_subscription_slot() {
    let server = TestServer::start_with("[grpc]\nmax_subscriptions = 10\nmax_subscriptions_per_peer = 2\n").await;
    let from = |ip: &str| {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
            .unwrap()
            .local_address(Some(ip.parse().unwrap()));
        async move {
            let channel = endpoint.connect().await.unwrap();
            ordertrail::proto::order_trail_client::OrderTrailClient::new(channel)
        }
    };
    let mut greedy = from("127.0.0.1").await;
    let _first = greedy.subscribe(SubscribeRequest::default()).await.unwrap();
    let _second = greedy.subscribe(SubscribeRequest::default()).await.unwrap();
    let status = greedy.subscribe(SubscribeRequest::default()).await.expect_err("over its share");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("max_subscriptions_per_peer"), "{status}");
    // Another client still gets a stream.
    let mut other = from("127.0.0.2").await;
    other.subscribe(SubscribeRequest::default()).await.expect("another client's share");
}
