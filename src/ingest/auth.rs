//! Per-source authentication of a webhook request, before anything is
//! stored. Secrets are compared in constant time.

use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, Secret};

/// Why a request was refused. Nothing of it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Credentials missing or wrong: 401.
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// The sender is not allowed at all: 403.
    #[error("sender not allowed")]
    Forbidden,
}

/// Proof that a request passed its source's authentication, naming the
/// method that passed. Only [`verify`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    method: &'static str,
}

impl Verified {
    /// The authentication method that passed, recorded as provenance.
    pub fn method(&self) -> &'static str {
        self.method
    }
}

/// Checks a request against its source's authentication settings.
pub fn verify(auth: &AuthConfig, headers: &HeaderMap, _body: &[u8]) -> Result<Verified, AuthError> {
    match auth {
        AuthConfig::None => Ok(Verified { method: "none" }),
        AuthConfig::Header { header, secrets } => {
            let mut values = headers.get_all(header.as_str()).iter();
            let (Some(value), None) = (values.next(), values.next()) else {
                return Err(AuthError::Unauthorized);
            };
            if matches_any(value.as_bytes(), secrets) {
                Ok(Verified { method: "header" })
            } else {
                Err(AuthError::Unauthorized)
            }
        }
    }
}

/// Constant-time comparison against every configured secret (no early exit,
/// so timing does not tell which one matched).
fn matches_any(presented: &[u8], secrets: &[Secret]) -> bool {
    let mut matched = subtle::Choice::from(0u8);
    for secret in secrets {
        matched |= presented.ct_eq(secret.expose());
    }
    !presented.is_empty() && bool::from(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_auth() -> AuthConfig {
        AuthConfig::Header { header: "x-secret".into(), secrets: vec![Secret::new("old-key"), Secret::new("new-key")] }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append("x-secret", v.parse().unwrap());
        }
        map
    }

    #[test]
    fn header_secret_matrix() {
        let auth = header_auth();
        let check = |values: &[&str]| verify(&auth, &headers(values), b"");
        assert_eq!(check(&["new-key"]).unwrap().method(), "header");
        assert!(check(&["old-key"]).is_ok(), "rotated keys are all accepted");
        for bad in [&[][..], &[""], &["new-ke"], &["new-keyX"], &["wrong"], &["new-key", "new-key"]] {
            assert_eq!(check(bad), Err(AuthError::Unauthorized), "{bad:?}");
        }
    }

    #[test]
    fn open_source_passes() {
        assert_eq!(verify(&AuthConfig::None, &HeaderMap::new(), b"").unwrap().method(), "none");
    }
}
