//! Bearer-token authentication of gRPC calls, compared in constant time
//! against every configured token.

use std::sync::Arc;

use subtle::{Choice, ConstantTimeEq};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::Secret;

/// Checks `authorization: Bearer <token>`; lets everything through when no
/// token is configured.
#[derive(Clone)]
pub struct BearerAuth {
    tokens: Arc<Vec<Secret>>,
}

impl BearerAuth {
    pub fn new(tokens: Vec<Secret>) -> Self {
        Self { tokens: Arc::new(tokens) }
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        let mut matched = Choice::from(0u8);
        for token in self.tokens.iter() {
            matched |= presented.ct_eq(token.expose());
        }
        !presented.is_empty() && bool::from(matched)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.tokens.is_empty() {
            return Ok(request);
        }
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .and_then(|v| v.get(..7).filter(|p| p.eq_ignore_ascii_case(b"bearer ")).map(|_| &v[7..]));
        match presented {
            Some(token) if self.accepts(token) => Ok(request),
            _ => Err(Status::unauthenticated("missing or invalid bearer token")),
        }
    }
}

// === impl AdminAuth ===

/// Who may call the `Admin` service, which changes state (`Redrive`,
/// `Rebuild`) and reads raw deliveries: only holders of
/// `grpc.admin_tokens`, never of the read API's tokens. With no admin token
/// configured it is open only in the local default (a loopback gRPC
/// address, no read tokens, no client certificates) and closed otherwise.
#[derive(Clone)]
pub enum AdminAuth {
    Tokens(BearerAuth),
    Open,
    Closed,
}

impl AdminAuth {
    pub fn new(config: &crate::config::GrpcConfig) -> Self {
        if !config.admin_tokens.is_empty() {
            Self::Tokens(BearerAuth::new(config.admin_tokens.clone()))
        } else if config.addr.ip().is_loopback() && !config.is_authenticated() {
            Self::Open
        } else {
            Self::Closed
        }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self {
            Self::Tokens(tokens) => tokens.call(request),
            Self::Open => Ok(request),
            Self::Closed => Err(Status::permission_denied(
                "the Admin service needs its own bearer token: configure grpc.admin_tokens",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(auth: &mut BearerAuth, header: Option<&str>) -> bool {
        let mut request = Request::new(());
        if let Some(value) = header {
            request.metadata_mut().insert("authorization", value.parse().unwrap());
        }
        auth.call(request).is_ok()
    }

    #[test]
    fn bearer_matrix() {
        let mut auth = BearerAuth::new(vec![Secret::new("token-0123456789ab"), Secret::new("token-rotated-9876")]);
        assert!(check(&mut auth, Some("Bearer token-0123456789ab")));
        assert!(check(&mut auth, Some("bearer token-rotated-9876")));
        for bad in [
            None,
            Some(""),
            Some("Bearer "),
            Some("Bearer token-0123456789a"),
            Some("Bearer token-0123456789abc"),
            Some("Basic token-0123456789ab"),
        ] {
            assert!(!check(&mut auth, bad), "{bad:?}");
        }
        assert!(check(&mut BearerAuth::new(Vec::new()), None), "no tokens configured: open");
    }
}
