//! JSON replies with the error shape of the design: `{"error": {"message": ...}}`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ACCEPT_ENCODING, ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

pub type Body = Full<Bytes>;

/// A JSON reply.
pub(crate) fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    raw_json(
        status,
        serde_json::to_vec(value).expect("JSON values serialise"),
    )
}

/// A reply whose body is already JSON.
pub(crate) fn raw_json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `{"error": {"message": ...}}` with a status.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let body = crate::api::ErrorReply {
        error: crate::api::ErrorBody {
            message: message.into(),
        },
    };
    json(status, &body)
}

/// 503 with `Retry-After`.
pub(crate) fn unavailable(message: &str, retry_after_secs: u64) -> Response<Body> {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// 415 with `Accept-Encoding: identity`, for a body sent in a content coding (RFC 9110,
/// 15.5.16): provisiond reads the envelope as it is sent.
pub(crate) fn unsupported_coding(coding: &str) -> Response<Body> {
    let mut response = error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "the body is sent with Content-Encoding: {coding}; provisiond takes the envelope \
             uncompressed, with no Content-Encoding"
        ),
    );
    response
        .headers_mut()
        .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    response
}

pub(crate) fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// 401 with `WWW-Authenticate: Bearer`.
pub(crate) fn unauthorized() -> Response<Body> {
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong token: send \"Authorization: Bearer <server.token>\"",
    );
    response.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    response
}

pub(crate) fn not_found(path: &str) -> Response<Body> {
    error(StatusCode::NOT_FOUND, format!("no route for {path}"))
}
