//! A real full filesystem: the data dir lives on a small tmpfs this test
//! mounts (the tests run as root, as CI does). While it is full every
//! webhook gets 503 and the log does not flood; once space is freed the
//! store reopens itself and ingest resumes without a restart; a shutdown
//! while the disk is full ends promptly; nothing acknowledged is lost.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ordertrail::proto::GetDeliveryRequest;
use ordertrail::proto::admin_client::AdminClient;
use ordertrail::testing::free_addr;

const BIN: &str = env!("CARGO_BIN_EXE_ordertrail");

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "this test mounts a tmpfs and must run as root (as CI does)");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem up with a file at `path`.
    fn fill(&self, path: &Path) {
        use std::io::Write;
        let mut file = std::fs::File::create(path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

struct Server {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
    /// Every line the server logged.
    log: Arc<Mutex<Vec<String>>>,
}

fn start(data_dir: &Path, ports: Option<(SocketAddr, SocketAddr)>) -> Server {
    let (http, grpc) = ports.unwrap_or_else(|| (free_addr(), free_addr()));
    let mut child = Command::new(BIN)
        .env("ORDERTRAIL_HTTP_ADDR", http.to_string())
        .env("ORDERTRAIL_GRPC_ADDR", grpc.to_string())
        .env("ORDERTRAIL_ADMIN_ADDR", "127.0.0.1:0")
        .env("ORDERTRAIL_DATA_DIR", data_dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (ready, serving) = std::sync::mpsc::channel();
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("ordertrail serving") {
                let _ = ready.send(());
            }
            kept.lock().unwrap().push(line);
        }
    });
    serving.recv_timeout(Duration::from_secs(60)).expect("the server started");
    Server { child, http, grpc, log }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Left running only by a failing test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Posts webhook `n` (with `pad` bytes of padding); the status and raw id.
    fn post(&self, n: usize, pad: usize) -> (u16, Option<u64>) {
        use std::io::{Read, Write};
        let body = format!(
            r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"d-{n}","ExternalOrderId":"DX-{n}","Pad":"{}"}}"#,
            "x".repeat(pad)
        );
        let mut stream = std::net::TcpStream::connect(self.http).unwrap();
        let request = format!(
            "POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer[9..12].parse().unwrap();
        let json: serde_json::Value =
            answer.split("\r\n\r\n").nth(1).and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
        (status, json["raw_id"].as_u64())
    }

    fn get(&self, path: &str) -> u16 {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.http).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer[9..12].parse().unwrap()
    }

    fn wait_ready(&self, expected: u16) {
        for _ in 0..3000 {
            if self.get("/readyz") == expected {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("/readyz never answered {expected}");
    }

    fn stop(&mut self) -> Vec<String> {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        for _ in 0..1000 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exited with {status}");
                return self.log.lock().unwrap().clone();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the server did not stop within 20 s while storage was failing");
    }
}

#[test]
fn a_full_disk_answers_503_then_recovers_without_a_restart_and_loses_nothing() {
    let disk = Tmpfs::mount("8m");
    let data_dir = disk.path().join("data");
    let filler: PathBuf = disk.path().join("filler");
    let server = start(&data_dir, None);
    let mut acked = Vec::new();
    let mut n = 0;
    let mut post = |server: &Server, acked: &mut Vec<(usize, u64)>| {
        n += 1;
        let (status, raw_id) = server.post(n, 2000);
        if status == 200 {
            acked.push((n, raw_id.unwrap()));
        }
        status
    };
    for _ in 0..20 {
        assert_eq!(post(&server, &mut acked), 200);
    }

    disk.fill(&filler);
    let mut refused = 0;
    for _ in 0..300 {
        match post(&server, &mut acked) {
            200 => {}
            503 => refused += 1,
            other => panic!("a full disk answered {other}"),
        }
    }
    assert!(refused > 250, "a full disk should answer 503: {refused} of 300");
    server.wait_ready(503);
    assert_eq!(server.get("/healthz"), 200, "the process stays up and serves reads");
    let logged = server.log.lock().unwrap().len();
    assert!(logged < 40, "{refused} refusals logged {logged} lines: {:#?}", server.log.lock().unwrap());

    // Space comes back: the store reopens itself.
    std::fs::remove_file(&filler).unwrap();
    server.wait_ready(200);
    for _ in 0..20 {
        assert_eq!(post(&server, &mut acked), 200, "ingest resumed");
    }
    assert!(server.log.lock().unwrap().iter().any(|l| l.contains("storage recovered")));

    // Full again, then a shutdown: it ends promptly.
    disk.fill(&filler);
    while post(&server, &mut acked) == 200 {}
    let ports = (server.http, server.grpc);
    let mut server = server;
    server.stop();
    std::fs::remove_file(&filler).unwrap();

    // Nothing acknowledged was lost.
    let mut server = start(&data_dir, Some(ports));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut admin = AdminClient::connect(format!("http://{}", server.grpc)).await.unwrap();
        for (n, raw_id) in &acked {
            let stored = admin.get_delivery(GetDeliveryRequest { raw_id: *raw_id }).await.unwrap().into_inner();
            let body = String::from_utf8_lossy(&stored.body).into_owned();
            assert!(body.contains(&format!("\"d-{n}\"")), "delivery {raw_id} holds {body}");
        }
    });
    assert!(acked.len() > 40, "{}", acked.len());
    server.stop();
}
