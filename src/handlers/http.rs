//! HTTP handlers: one pooled reqwest client, the envelope POSTed as JSON, optional
//! Standard Webhooks signing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use hmac::{KeyInit, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};

use super::{Call, CallError, REPLY_CAP, Reply, root_cause};
use crate::config::{HttpTarget, SigningKey};

/// The event's name, on every call.
const EVENT_HEADER: HeaderName = HeaderName::from_static("x-provisioning-event");
/// The handler's name, on every call.
const HANDLER_HEADER: HeaderName = HeaderName::from_static("x-provisioning-handler");
/// The attempt's number (1 for the first), as a script's `PROVISIONING_ATTEMPT`: with no
/// `secret` (so no `webhook-id`), all a handler has to tell a retry from a first call.
const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-provisioning-attempt");

/// The client every HTTP handler shares: keep-alive pool, no redirects (a handler that
/// redirects is misconfigured, and following one would re-send the envelope elsewhere),
/// no retries of its own, no proxy from the environment.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        // rustls with ring, and the system's CA roots read at the first https handshake
        // rather than here (`tls.rs`).
        .tls_backend_preconfigured(super::tls::config())
        .redirect(reqwest::redirect::Policy::none())
        // No hidden retries: a POST repeated behind the caller's back could provision
        // twice; the after stage retries deliveries itself, with backoff. (With no retry
        // allowed at all, reqwest does not copy each request's headers for one either.)
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .user_agent(concat!("provisiond/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client builds with static settings")
}

pub(crate) async fn call(
    client: &reqwest::Client,
    target: &HttpTarget,
    call: &Call<'_>,
) -> Result<Reply, CallError> {
    let mut request = client
        .request(target.method.clone(), target.url.clone())
        .timeout(call.timeout);
    if !target.headers.is_empty() {
        request = request.headers(target.headers.clone());
    }
    let mut request = request
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(EVENT_HEADER, call.event)
        .header(HANDLER_HEADER, call.handler.name.as_str())
        .header(ATTEMPT_HEADER, HeaderValue::from(call.attempt));
    if let Some(key) = &target.secret {
        for (name, value) in sign(key, call.message_id, unix_now(), &call.body) {
            request = request.header(name, value);
        }
    }
    let timeout = call.timeout;
    let classify = |e: reqwest::Error| {
        let cause = root_cause(&e);
        if e.is_timeout() {
            CallError::Timeout(timeout)
        } else if e.is_connect() {
            CallError::Connect {
                to: host_and_port(&target.url),
                cause,
            }
        } else {
            CallError::Request(cause)
        }
    };
    let mut response = request
        .body(call.body.clone())
        .send()
        .await
        .map_err(classify)?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    // The status came: a failure now is the reply's, not the request's.
    let cut_short = |e: reqwest::Error| {
        if e.is_timeout() {
            CallError::Timeout(timeout)
        } else {
            CallError::CutShort {
                status,
                cause: root_cause(&e),
            }
        }
    };
    let mut body = BytesMut::new();
    let mut truncated = false;
    while let Some(chunk) = response.chunk().await.map_err(cut_short)? {
        let room = REPLY_CAP.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            truncated = true;
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply::Http {
        status,
        body: body.freeze(),
        truncated,
        retry_after,
    })
}

/// `host:port` of a handler's URL, the port given even when it is the scheme's default.
fn host_and_port(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// The Standard Webhooks headers for one message: `webhook-id`, `webhook-timestamp`
/// and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body`).
pub(crate) fn sign(
    key: &SigningKey,
    id: &str,
    timestamp: u64,
    body: &Bytes,
) -> [(&'static str, String); 3] {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(&key.0).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    [
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", format!("v1,{signature}")),
    ]
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `Retry-After` as seconds or as an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_error_names_the_host_and_port_only() {
        let at = |url: &str| host_and_port(&url.parse().unwrap());
        assert_eq!(at("http://127.0.0.1:8080/hook?key=k"), "127.0.0.1:8080");
        assert_eq!(at("https://crm.example.com/hook"), "crm.example.com:443");
        assert_eq!(at("http://user:pw@[::1]/x"), "[::1]:80");
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let body = Bytes::from_static(br#"{"test": 2432232314}"#);
        let headers = sign(
            &SigningKey(key),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            &body,
        );
        assert_eq!(
            headers[2].1,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
