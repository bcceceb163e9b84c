//! `GET /ui`: the web console, served from the binary.
//!
//! Three files, embedded at build time from `assets/ui/`: plain HTML, CSS and JavaScript,
//! no build step and nothing from the network. The page needs no token; its data comes
//! from the `/v1` API and `/metrics`, with the token the operator types in (kept in the
//! tab's `sessionStorage`), so the console can do nothing the admin API does not allow.

use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode};

use crate::server::reply::{self, Body};

const INDEX: &str = include_str!("../../../assets/ui/index.html");
const SCRIPT: &str = include_str!("../../../assets/ui/console.js");
const STYLE: &str = include_str!("../../../assets/ui/console.css");

/// What the page may load and talk to: itself only. No inline script, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The asset at `path` (`/ui`, `/ui/`, `/ui/console.js`, `/ui/console.css`).
pub(crate) fn asset(method: &Method, path: &str) -> Response<Body> {
    let (body, content_type) = match path {
        "/ui" | "/ui/" | "/ui/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/ui/console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/ui/console.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return reply::not_found(path),
    };
    if method != Method::GET {
        return reply::method_not_allowed("GET");
    }
    let mut response = Response::new(crate::server::full(body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // A new binary may bring new assets: always revalidate.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        for asset in [INDEX, SCRIPT, STYLE] {
            assert!(
                !asset.contains("http://")
                    && !asset.contains("https://")
                    && !asset.contains("//cdn"),
                "an asset refers to the network"
            );
        }
        for path in ["/ui/console.js", "/ui/console.css"] {
            assert!(INDEX.contains(path), "index.html does not load {path}");
            assert_eq!(asset(&Method::GET, path).status(), StatusCode::OK);
        }
        assert!(
            !INDEX.contains("<script>") && !INDEX.contains("style="),
            "inline code breaks the CSP"
        );
        assert_eq!(
            asset(&Method::GET, "/ui/nope.js").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            asset(&Method::POST, "/ui").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn data_is_never_written_as_html() {
        // Event names, replies and errors come from the billing and the handlers: the
        // script puts them in the page as text only.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!SCRIPT.contains(sink), "console.js uses {sink}");
        }
    }

    #[test]
    fn the_console_knows_every_outcome() {
        // `const OUTCOMES = { allowed: {...}, ... };`: its keys, in the script's order.
        let block = SCRIPT
            .split_once("const OUTCOMES = {")
            .and_then(|(_, rest)| rest.split_once("\n};"))
            .expect("console.js has its OUTCOMES table")
            .0;
        let mut keys: Vec<&str> = block
            .lines()
            .filter_map(|line| line.trim().split_once(": {").map(|(k, _)| k))
            .collect();
        keys.sort_unstable();
        let mut names = crate::outcome::CallOutcome::ALL.map(crate::outcome::CallOutcome::as_str);
        names.sort_unstable();
        assert_eq!(keys, names);
    }
}
