//! Read paths that large data cannot break: pages are cut by bytes as well
//! as by count, and one order stays within its bound however many large
//! returns it gets.

use crate::common::{TestServer, fixture};
use ordertrail::proto::get_order_request::Reference;
use ordertrail::proto::{GetOrderRequest, ListEventsRequest, ListOrdersRequest, ListQuarantinedRequest};
use prost::Message;

/// The largest answer (the default `grpc.max_message_bytes`).
const MAX_MESSAGE: usize = 4 << 20;

/// A Winkelstraat RMA of about `bytes` for order `000000549`.
fn large_rma(n: usize, bytes: usize) -> Vec<u8> {
    let mut rma: serde_json::Value = serde_json::from_slice(&fixture("winkelstraat/rma.json")).unwrap();
    let item = rma["items"][0].clone();
    let per_item = item.to_string().len();
    let items: Vec<serde_json::Value> = (0..bytes / per_item)
        .map(|i| {
            let mut item = item.clone();
            item["id"] = serde_json::json!(i);
            item
        })
        .collect();
    rma["items"] = serde_json::Value::Array(items);
    rma["increment_id"] = serde_json::json!(format!("RMA-{n}"));
    serde_json::to_vec(&rma).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_items_are_paged_by_bytes_and_an_order_stays_readable() {
    let server = TestServer::start().await;
    // Five quarantined bodies of 1 MB each.
    for n in 0..5 {
        let body = format!("{n}{}", "q".repeat(1_000_000));
        assert_eq!(server.post("/webhooks/ordermesh", "text/plain", body).await.status, 202);
    }
    // Five RMAs of about 880 kB each on one order.
    for n in 0..5 {
        let answer = server.post_json("/webhooks/winkelstraat/rma", large_rma(n, 880_000)).await;
        assert_eq!(answer.status, 200, "{}", answer.json);
    }

    // Every page fits one answer, and paging gets everything.
    let mut admin = server.admin().await;
    let (mut token, mut quarantined, mut pages) = (String::new(), 0, 0);
    loop {
        let request = ListQuarantinedRequest { page_token: token.clone(), ..Default::default() };
        let page = admin.list_quarantined(request).await.expect("ListQuarantined").into_inner();
        assert!(page.encoded_len() <= MAX_MESSAGE);
        quarantined += page.deliveries.len();
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!((quarantined, pages > 1), (5, true));

    let mut client = server.grpc().await;
    let (mut token, mut events) = (String::new(), 0);
    loop {
        let request = ListEventsRequest { page_token: token.clone(), ..Default::default() };
        let page = client.list_events(request).await.expect("ListEvents").into_inner();
        events += page.events.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(events, 5);
    let orders = client.list_orders(ListOrdersRequest::default()).await.expect("ListOrders").into_inner();
    assert_eq!(orders.orders.len(), 1);

    let request =
        GetOrderRequest { reference: Some(Reference::PoNumber("YOUR_ORDER_REFERENCE".into())), source: String::new() };
    let order = client.get_order(request).await.expect("GetOrder").into_inner();
    assert!(order.omitted_entries > 0 && !order.returns.is_empty(), "{} returns", order.returns.len());
    assert_eq!(order.returns.last().unwrap().id, "RMA-4", "the newest return stays");

    // The console pages the same data: the quarantine shows excerpts of a
    // page that fits one answer, and the order's history pages on.
    let (status, _, page) = server.console("GET", "/quarantine", &[], "").await;
    assert_eq!(status, 200);
    assert!(page.len() < 64 * 1024, "excerpts, not the bodies: {} bytes", page.len());
    assert!(page.contains("More →"), "the rest is on the next page");
    let (status, _, page) = server.console("GET", &format!("/orders/{}", order.id), &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains("RMA-4"));
    server.stop().await;
}
