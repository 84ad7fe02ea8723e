//! `ordertrail send`: posts a captured webhook body to a running instance,
//! as the provider would, and prints the answer.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Why sending failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("no answer from {0}: {1}")]
    Connect(String, String),
    #[error("the webhook was answered {0}")]
    Refused(http::StatusCode),
}

/// Posts `file` to `url`; fails unless the answer is 2xx.
pub async fn send(url: &str, file: &Path, content_type: Option<String>, headers: &[String]) -> Result<(), SendError> {
    let body = std::fs::read(file).map_err(|e| SendError::Read(file.display().to_string(), e))?;
    let content_type = content_type.unwrap_or_else(|| guess_content_type(&body).to_string());
    let mut request = http::Request::post(url).header(http::header::CONTENT_TYPE, content_type);
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| SendError::Request(format!("header `{header}` is not `name: value`")))?;
        request = request.header(name.trim(), value.trim());
    }
    let request = request.body(Full::new(Bytes::from(body))).map_err(|e| SendError::Request(e.to_string()))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.map_err(|e| SendError::Connect(url.to_string(), e.to_string()))?;
    let status = response.status();
    let answer = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    println!("{status} {}", String::from_utf8_lossy(&answer));
    if status.is_success() { Ok(()) } else { Err(SendError::Refused(status)) }
}

/// JSON when the body looks like JSON; otherwise a urlencoded form.
fn guess_content_type(body: &[u8]) -> &'static str {
    match body.trim_ascii_start().first() {
        Some(b'{' | b'[') => "application/json",
        _ => "application/x-www-form-urlencoded",
    }
}
