//! gRPC protections against the real server: bearer tokens, TLS and mTLS,
//! message size, concurrent streams per connection, and keepalive.

use std::time::Duration;

use crate::common::TestServer;
use ordertrail::proto::admin_client::AdminClient;
use ordertrail::proto::get_order_request::Reference;
use ordertrail::proto::order_trail_client::OrderTrailClient;
use ordertrail::proto::{GetOrderRequest, GetStatsRequest, SubscribeRequest};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const TOKEN: &str = "a-bearer-token-of-sufficient-length";

fn get(reference: &str) -> GetOrderRequest {
    GetOrderRequest { reference: Some(Reference::ExternalOrderId(reference.into())), source: String::new() }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn bearer_tokens_are_required_on_every_service() {
    let server = TestServer::start_with(&format!("[grpc]\nbearer_tokens = [\"{TOKEN}\"]\n")).await;
    let mut client = OrderTrailClient::connect(format!("http://{}", server.grpc_addr)).await.unwrap();
    assert_eq!(client.get_order(get("x")).await.unwrap_err().code(), Code::Unauthenticated);
    for wrong in ["", "a-bearer-token-of-sufficient-lengt", "a-bearer-token-of-sufficient-length!", "nope"] {
        let status = client.get_order(with_token(get("x"), wrong)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{wrong:?}");
    }
    assert_eq!(client.get_order(with_token(get("x"), TOKEN)).await.unwrap_err().code(), Code::NotFound);
    let stream = client.subscribe(SubscribeRequest::default()).await;
    assert_eq!(stream.unwrap_err().code(), Code::Unauthenticated);
    assert!(client.subscribe(with_token(SubscribeRequest::default(), TOKEN)).await.is_ok());
    // The read token does not open Admin, and with no admin token nothing does.
    let mut admin = AdminClient::connect(format!("http://{}", server.grpc_addr)).await.unwrap();
    for request in [tonic::Request::new(GetStatsRequest {}), with_token(GetStatsRequest {}, TOKEN)] {
        assert_eq!(admin.get_stats(request).await.unwrap_err().code(), Code::PermissionDenied);
    }
}

const ADMIN_TOKEN: &str = "an-admin-token-of-sufficient-length";

#[tokio::test]
async fn admin_has_its_own_tokens() {
    let config = format!("[grpc]\nbearer_tokens = [\"{TOKEN}\"]\nadmin_tokens = [\"{ADMIN_TOKEN}\"]\n");
    let server = TestServer::start_with(&config).await;
    let mut admin = AdminClient::connect(format!("http://{}", server.grpc_addr)).await.unwrap();
    assert_eq!(admin.get_stats(GetStatsRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    let status = admin.get_stats(with_token(GetStatsRequest {}, TOKEN)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "the read API's token is not an admin token");
    assert!(admin.get_stats(with_token(GetStatsRequest {}, ADMIN_TOKEN)).await.is_ok());
    let redrive = ordertrail::proto::RedriveRequest { dry_run: true, ..Default::default() };
    assert!(admin.redrive(with_token(redrive, ADMIN_TOKEN)).await.is_ok());
    // An admin token is not a read token either.
    let mut client = OrderTrailClient::connect(format!("http://{}", server.grpc_addr)).await.unwrap();
    assert_eq!(client.get_order(with_token(get("x"), ADMIN_TOKEN)).await.unwrap_err().code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn admin_is_closed_on_a_public_address_without_admin_tokens() {
    let config = "[grpc]\naddr = \"0.0.0.0:50051\"\nallow_unauthenticated_public = true\n";
    let server = TestServer::start_with(config).await;
    let mut admin = AdminClient::connect(format!("http://{}", server.grpc_addr)).await.unwrap();
    let status = admin.get_stats(GetStatsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("grpc.admin_tokens"), "{status}");
    // The read API stays as configured.
    let mut client = OrderTrailClient::connect(format!("http://{}", server.grpc_addr)).await.unwrap();
    assert_eq!(client.get_order(get("x")).await.unwrap_err().code(), Code::NotFound);
    server.stop().await;
}

/// A CA, a server certificate for localhost and a client certificate, as PEM.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn new_pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server =
        CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&server_key, &issuer).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client".to_string()]).unwrap().signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

async fn tls_server(pki: &Pki, mtls: bool) -> (TestServer, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let (cert, key, ca) =
        (write("server.pem", &pki.server_cert), write("server.key", &pki.server_key), write("ca.pem", &pki.ca));
    let client_ca = if mtls { format!(", client_ca_file = {ca:?}") } else { String::new() };
    let config = format!("[grpc]\ntls = {{ cert_file = {cert:?}, key_file = {key:?}{client_ca} }}\n");
    (TestServer::start_with(&config).await, files)
}

async fn tls_client(
    server: &TestServer,
    pki: &Pki,
    identity: bool,
) -> Result<OrderTrailClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca)).domain_name("localhost");
    if identity {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    let channel =
        Channel::from_shared(format!("https://{}", server.grpc_addr)).unwrap().tls_config(tls)?.connect().await?;
    Ok(OrderTrailClient::new(channel))
}

#[tokio::test]
async fn tls_serves_tls_clients_only() {
    let pki = new_pki();
    let (server, _files) = tls_server(&pki, false).await;
    let mut client = tls_client(&server, &pki, false).await.expect("TLS connect");
    assert_eq!(client.get_order(get("x")).await.unwrap_err().code(), Code::NotFound, "a real answer over TLS");
    let plaintext = OrderTrailClient::connect(format!("http://{}", server.grpc_addr)).await;
    let failed = match plaintext {
        Err(_) => true,
        Ok(mut client) => client.get_order(get("x")).await.is_err_and(|s| s.code() != Code::NotFound),
    };
    assert!(failed, "a plaintext client got an answer from a TLS listener");
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_ca() {
    let pki = new_pki();
    let (server, _files) = tls_server(&pki, true).await;
    let anonymous = match tls_client(&server, &pki, false).await {
        Err(_) => true,
        Ok(mut client) => client.get_order(get("x")).await.is_err_and(|s| s.code() != Code::NotFound),
    };
    assert!(anonymous, "a client without a certificate got an answer");
    let stranger = new_pki();
    let foreign = match tls_client(&server, &Pki { ca: pki.ca.clone(), ..stranger }, true).await {
        Err(_) => true,
        Ok(mut client) => client.get_order(get("x")).await.is_err_and(|s| s.code() != Code::NotFound),
    };
    assert!(foreign, "a certificate from another CA was accepted");
    let mut client = tls_client(&server, &pki, true).await.expect("mTLS connect");
    assert_eq!(client.get_order(get("x")).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn oversized_messages_are_refused_both_ways() {
    let server = TestServer::start_with("[grpc]\nmax_message_bytes = 2048\n").await;
    let mut client = server.grpc().await;
    let status = client.get_order(get(&"x".repeat(4096))).await.unwrap_err();
    assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted), "{status}");
    let description = "d".repeat(4096);
    let body = format!(
        r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"big","ExternalOrderId":"BIG","Description":"{description}"}}"#
    );
    assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
    let status = client.get_order(get("BIG")).await.unwrap_err();
    assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted), "{status}");
    assert_eq!(client.get_order(get("small")).await.unwrap_err().code(), Code::NotFound, "normal calls still work");
    // Subscribe sends stored events as they are: the limit holds there too.
    let request = SubscribeRequest { after_sequence: Some(0), ..SubscribeRequest::default() };
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let status = loop {
        match stream.message().await {
            Err(status) => break status,
            Ok(Some(message)) => assert!(
                !matches!(message.message, Some(ordertrail::proto::subscribe_response::Message::Event(_))),
                "an event over the limit was sent"
            ),
            Ok(None) => panic!("the stream ended without an error"),
        }
    };
    assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted), "{status}");
}

#[tokio::test]
async fn concurrent_streams_per_connection_are_limited() {
    let server = TestServer::start_with("[grpc]\nmax_concurrent_streams = 1\n").await;
    let mut client = server.grpc().await;
    let stream = client.subscribe(SubscribeRequest::default()).await.unwrap().into_inner();
    // The one stream slot of this connection is taken: a second call waits.
    let mut second = client.clone();
    let mut call = tokio::spawn(async move { second.get_order(get("x")).await });
    // A negative: only waiting can show that nothing happens.
    let early = tokio::time::timeout(Duration::from_millis(500), &mut call).await;
    assert!(early.is_err(), "a second stream was opened past the limit");
    drop(stream);
    let status = tokio::time::timeout(Duration::from_secs(60), call).await.expect("never served").unwrap();
    assert_eq!(status.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn a_peer_that_never_answers_keepalive_pings_is_disconnected() {
    let server = TestServer::start_with("[grpc]\nkeepalive_interval_ms = 200\nkeepalive_timeout_ms = 200\n").await;
    let mut stream = tokio::net::TcpStream::connect(server.grpc_addr).await.unwrap();
    // An HTTP/2 client preface and empty SETTINGS, then silence: no ACKs.
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    // (With the default 30 s interval the same peer stays connected.)
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the silent peer was never disconnected");
    assert!(!sink.is_empty(), "the server sent nothing (no SETTINGS, no PING) before closing");
}

#[tokio::test]
async fn a_call_whose_request_never_arrives_times_out() {
    let server = TestServer::start_with("[grpc]\nrequest_timeout_ms = 300\n").await;
    let tcp = tokio::net::TcpStream::connect(server.grpc_addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{}/ordertrail.v1.OrderTrail/GetOrder", server.grpc_addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    // Headers only: the message itself never comes.
    let (response, _body_never_sent) = client.send_request(request, false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(60), response).await.expect("the call never timed out");
    let response = response.unwrap();
    let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
    let status = match status {
        Some(status) => status,
        None => {
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            let trailers = body.trailers().await.unwrap().unwrap_or_default();
            trailers.get("grpc-status").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
        }
    };
    assert!(status == "4" || status == "1", "expected DEADLINE_EXCEEDED or CANCELLED, got grpc-status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_its_preface_is_closed_and_frees_its_slot() {
    let server = TestServer::start_with("[grpc]\npreface_timeout_ms = 300\nmax_connections = 1\n").await;
    let mut stalled = tokio::net::TcpStream::connect(server.grpc_addr).await.unwrap();
    stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // The only connection slot is the stalled one's: a real call waits for it.
    let call = tokio::spawn({
        let addr = server.grpc_addr;
        async move {
            let mut client = OrderTrailClient::connect(format!("http://{addr}")).await.unwrap();
            client.get_order(get("x")).await.unwrap_err().code()
        }
    });
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "the stalled connection was not closed: {read:?}");
    assert_eq!(call.await.unwrap(), Code::NotFound, "served once the slot was free");
    server.stop().await;
}

/// Sends `body` as the encoded request of `path`, as a client with a broken
/// encoder would.
async fn raw_call(addr: std::net::SocketAddr, path: &'static str, body: Vec<u8>) -> tonic::Status {
    #[derive(Default)]
    struct Raw;
    impl tonic::codec::Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
    impl tonic::codec::Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    impl tonic::codec::Decoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            Ok(Some(bytes::Buf::copy_to_bytes(src, bytes::Buf::remaining(src)).to_vec()))
        }
    }
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary::<Vec<u8>, Vec<u8>, Raw>(tonic::Request::new(body), path, Raw).await.unwrap_err()
}

#[tokio::test]
async fn undecodable_requests_are_invalid_arguments_and_huge_references_are_not_echoed() {
    let server = TestServer::start().await;
    // Field 1 as a length-delimited value longer than the message.
    let broken = vec![0x0a, 0x7f, b'x'];
    for path in ["/ordertrail.v1.OrderTrail/GetOrder", "/ordertrail.v1.OrderTrail/Subscribe"] {
        let status = raw_call(server.grpc_addr, path, broken.clone()).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status}");
    }
    let huge = "R".repeat(10_000);
    let mut client = OrderTrailClient::connect(format!("http://{}", server.grpc_addr)).await.unwrap();
    let status = client.get_order(get(&huge)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status}");
    assert!(status.message().len() < 200, "the whole reference came back: {} bytes", status.message().len());
    server.stop().await;
}
