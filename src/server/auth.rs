//! `server.token`: bearer authentication for `/events` and `/v1/*`.

use hyper::HeaderMap;
use hyper::header::AUTHORIZATION;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::config::Secret;

/// Whether a path needs the token when one is configured. Health and metrics stay open
/// so that probes and scrapers need no secret; so do the console's static files (`/ui`),
/// whose every data call goes to `/v1` with the token.
pub(crate) fn protected(path: &str) -> bool {
    path == "/events" || path == "/v1" || path.starts_with("/v1/")
}

/// Whether the request carries `Authorization: Bearer <token>` (spaces around the token
/// are the header's, not the token's). The comparison takes the same time wherever the
/// first difference is and whatever the length of what was sent: it compares the
/// SHA-256 digests of both, which always have the same length, so that a wrong guess
/// does not tell the token's length either.
pub(crate) fn authorized(token: &Secret, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let digest = |text: &str| Sha256::digest(text.as_bytes());
    digest(given.trim())
        .as_slice()
        .ct_eq(digest(token.expose()).as_slice())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let token = Secret::new("s3cret".into());
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(authorized(&token, &with("Bearer s3cret")));
        assert!(!authorized(&token, &with("Bearer s3cre")));
        assert!(!authorized(&token, &with("Bearer s3cret2")));
        assert!(!authorized(&token, &with("Basic s3cret")));
        assert!(!authorized(&token, &with("Bearer ")));
        assert!(!authorized(&token, &with("Bearer S3CRET")));
        assert!(
            authorized(&token, &with("Bearer  s3cret ")),
            "the header's spaces"
        );
        assert!(!authorized(&token, &HeaderMap::new()));
        assert!(protected("/events") && protected("/v1/config"));
        assert!(!protected("/healthz") && !protected("/metrics") && !protected("/v10"));
        assert!(!protected("/ui") && !protected("/ui/console.js") && protected("/v1/explain"));
    }
}
