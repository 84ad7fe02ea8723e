//! A DNS server for tests, on loopback UDP: it answers TXT questions from
//! a table the test changes while it runs (a record, no record, a server
//! failure, or silence), as a real server would — no mock of the resolver.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{RData, Record, RecordType};

/// What the server says about a name.
#[derive(Clone, Debug)]
pub enum Answer {
    /// A TXT record of these character strings, with this TTL (seconds).
    Txt(Vec<String>, u32),
    /// SERVFAIL.
    Failure,
    /// No answer at all (the client times out).
    Silence,
}

/// A running server; its thread ends soon after it is dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    questions: Arc<Mutex<u64>>,
}

impl DnsServer {
    pub fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the test DNS server");
        // Wakes up now and then to see whether the server was dropped.
        socket.set_read_timeout(Some(std::time::Duration::from_millis(100))).expect("read timeout");
        let addr = socket.local_addr().expect("its address");
        let answers: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let questions: Arc<Mutex<u64>> = Arc::default();
        let (table, count) = (answers.clone(), questions.clone());
        std::thread::spawn(move || serve(&socket, &table, &count));
        Self { addr, answers, questions }
    }

    /// Sets what `name` answers from now on (a name with no entry has no
    /// record: NXDOMAIN).
    pub fn set(&self, name: &str, answer: Answer) {
        self.answers.lock().expect("answers").insert(name.trim_end_matches('.').to_ascii_lowercase(), answer);
    }

    /// How many questions arrived so far.
    pub fn questions(&self) -> u64 {
        *self.questions.lock().expect("questions")
    }
}

fn serve(socket: &UdpSocket, answers: &Arc<Mutex<HashMap<String, Answer>>>, questions: &Mutex<u64>) {
    let mut buffer = [0u8; 4096];
    // The server's handle holds the other reference to the table.
    while Arc::strong_count(answers) > 1 {
        let Ok((len, peer)) = socket.recv_from(&mut buffer) else { continue };
        let Ok(query) = Message::from_vec(&buffer[..len]) else { continue };
        *questions.lock().expect("questions") += 1;
        let Some(question) = query.queries().first().cloned() else { continue };
        let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let answer = answers.lock().expect("answers").get(&name).cloned();
        let mut response = Message::new();
        response
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(query.op_code())
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(true)
            .set_authoritative(true)
            .add_query(question.clone());
        match answer {
            Some(Answer::Silence) => continue,
            Some(Answer::Failure) => {
                response.set_response_code(ResponseCode::ServFail);
            }
            Some(Answer::Txt(strings, ttl)) if question.query_type() == RecordType::TXT => {
                response.add_answer(Record::from_rdata(question.name().clone(), ttl, RData::TXT(TXT::new(strings))));
            }
            Some(Answer::Txt(..)) => {}
            None => {
                response.set_response_code(ResponseCode::NXDomain);
            }
        }
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, peer);
        }
    }
}
