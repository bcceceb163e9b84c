//! `server.token`: bearer authentication for `/events` and `/v1/*`.

use hyper::HeaderMap;
use hyper::header::AUTHORIZATION;
use subtle::ConstantTimeEq as _;

use crate::config::Secret;

/// Whether a path needs the token when one is configured. Health and metrics stay open
/// so that probes and scrapers need no secret; so do the console's static files (`/ui`),
/// whose every data call goes to `/v1` with the token.
pub(crate) fn protected(path: &str) -> bool {
    path == "/events" || path == "/v1" || path.starts_with("/v1/")
}

/// Whether the request carries `Authorization: Bearer <token>`. The comparison takes the
/// same time wherever the first difference is.
pub(crate) fn authorized(token: &Secret, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given
        .trim()
        .as_bytes()
        .ct_eq(token.expose().as_bytes())
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
        assert!(!authorized(&token, &HeaderMap::new()));
        assert!(protected("/events") && protected("/v1/config"));
        assert!(!protected("/healthz") && !protected("/metrics") && !protected("/v10"));
        assert!(!protected("/ui") && !protected("/ui/console.js") && protected("/v1/explain"));
    }
}
