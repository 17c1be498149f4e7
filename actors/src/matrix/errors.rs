//! matrix-sdk errors as supervision failures.
//!
//! The SDK's own retries are off ([`matrix_sdk::config::RequestConfig::disable_retry`]): the
//! supervisor's restart with backoff is the retry layer of the session (login, sync), so
//! every such error ends the incarnation, and the only question is which kind. A send the
//! homeserver rate-limits is the exception: the client sends it again after its
//! `retry_after` ([`rate_limit`]) within `matrix.send_retry_within_ms`.
//!
//! | Error | Outcome |
//! |---|---|
//! | connection reset, refused, timed out; 5xx | transient |
//! | 429 / `M_LIMIT_EXCEEDED` | transient, restart no sooner than its `retry_after` |
//! | `M_UNKNOWN_TOKEN` | [`Class::UnknownToken`]: the caller logs in again or gives up |
//! | `M_USER_DEACTIVATED`; `M_FORBIDDEN` and other 4xx at login | fatal |

use std::error::Error as _;
use std::io;
use std::time::{Duration, SystemTime};

use matrix_sdk::ruma::api::error::{ErrorKind, RetryAfter};
use matrix_sdk::{HttpError, reqwest};

use crate::supervision::Failure;

/// How an error ends an incarnation.
#[derive(Debug)]
pub(crate) enum Class {
    /// Retry through the supervisor.
    Transient(Failure),
    /// The access token was rejected.
    UnknownToken,
    /// Nothing a restart can fix.
    Fatal(Failure),
}

/// Where the error happened: a rejected login is fatal, a rejected sync need not be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum During {
    /// The password login.
    Login,
    /// `whoami`, `/sync`, key uploads.
    Session,
}

/// Classifies an error of a request.
pub(crate) fn classify_http(err: &HttpError, during: During) -> Class {
    if let HttpError::Reqwest(e) = err {
        return Class::Transient(Failure::transient(describe(e)));
    }
    if let HttpError::Cached(inner) = err {
        return classify_http(inner, during);
    }
    let Some(api) = err.as_client_api_error() else {
        return Class::Transient(Failure::transient(err.to_string()));
    };
    let status = api.status_code.as_u16();
    let text = format!("{} ({status})", first_line(&err.to_string()));
    match api.error_kind() {
        Some(ErrorKind::UnknownToken(_)) => return Class::UnknownToken,
        Some(ErrorKind::UserDeactivated) => {
            return Class::Fatal(Failure::fatal(format!(
                "the account is deactivated: {text}"
            )));
        }
        Some(ErrorKind::LimitExceeded(data)) => {
            let mut failure = Failure::transient(format!("rate limited: {text}"));
            if let Some(delay) = data.retry_after.as_ref().and_then(retry_after) {
                failure = failure.retry_after(delay);
            }
            return Class::Transient(failure);
        }
        _ => {}
    }
    if status == 429 {
        return Class::Transient(Failure::transient(format!("rate limited: {text}")));
    }
    if status >= 500 {
        return Class::Transient(Failure::transient(format!("homeserver error: {text}")));
    }
    match during {
        During::Login => Class::Fatal(Failure::fatal(format!(
            "login refused: {text}; check the password and user_id"
        ))),
        During::Session => Class::Transient(Failure::transient(format!("request refused: {text}"))),
    }
}

/// Classifies an SDK error (a request's, or the store's).
pub(crate) fn classify(err: &matrix_sdk::Error, during: During) -> Class {
    match err {
        matrix_sdk::Error::Http(http) => classify_http(http, during),
        other => Class::Transient(Failure::transient(first_line(&other.to_string()))),
    }
}

/// `Some` when `err` is a rate limit (429 / `M_LIMIT_EXCEEDED`), with the server's
/// `retry_after` when it gave one.
pub(crate) fn rate_limit(err: &matrix_sdk::Error) -> Option<Option<Duration>> {
    let api = err.as_client_api_error()?;
    match api.error_kind() {
        Some(ErrorKind::LimitExceeded(data)) => {
            Some(data.retry_after.as_ref().and_then(retry_after))
        }
        _ => (api.status_code.as_u16() == 429).then_some(None),
    }
}

fn retry_after(hint: &RetryAfter) -> Option<Duration> {
    match hint {
        RetryAfter::Delay(delay) => Some(*delay),
        RetryAfter::DateTime(at) => at.duration_since(SystemTime::now()).ok(),
    }
}

/// A network error in the words an operator looks for: "connection reset by peer",
/// "connection refused", "timed out", else the innermost cause.
pub(crate) fn describe(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        return "request timed out".to_string();
    }
    let mut source = err.source();
    let mut innermost = None;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionReset => return "connection reset by peer".to_string(),
                io::ErrorKind::ConnectionRefused => return "connection refused".to_string(),
                io::ErrorKind::ConnectionAborted => return "connection aborted".to_string(),
                io::ErrorKind::TimedOut => return "connection timed out".to_string(),
                io::ErrorKind::UnexpectedEof => return "connection closed early".to_string(),
                _ => {}
            }
        }
        innermost = Some(e.to_string());
        source = e.source();
    }
    match innermost {
        Some(cause) => format!("{}: {cause}", first_line(&err.to_string())),
        None => first_line(&err.to_string()),
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use matrix_sdk::reqwest::StatusCode;
    use matrix_sdk::ruma::api::client::uiaa::UiaaResponse;
    use matrix_sdk::ruma::api::error::{
        ErrorBody, FromHttpResponseError, LimitExceededErrorData, StandardErrorBody,
        UnknownTokenErrorData,
    };

    use super::*;
    use crate::supervision::FailureClass;

    fn api(status: u16, kind: ErrorKind) -> HttpError {
        let status = StatusCode::from_u16(status).expect("status");
        let body = ErrorBody::Standard(StandardErrorBody::new(kind, "nope".to_string()));
        let error = UiaaResponse::MatrixError(body.into_error(status));
        HttpError::Api(Box::new(FromHttpResponseError::Server(error)))
    }

    fn transient(class: Class) -> Failure {
        match class {
            Class::Transient(f) => {
                assert_eq!(f.class, FailureClass::Transient);
                f
            }
            other => panic!("expected transient, got {other:?}"),
        }
    }

    fn fatal(class: Class) -> Failure {
        match class {
            Class::Fatal(f) => {
                assert_eq!(f.class, FailureClass::Fatal);
                f
            }
            other => panic!("expected fatal, got {other:?}"),
        }
    }

    #[test]
    fn rate_limits_are_transient_and_keep_their_retry_after() {
        let mut data = LimitExceededErrorData::new();
        data.retry_after = Some(RetryAfter::Delay(Duration::from_secs(7)));
        let err = api(429, ErrorKind::LimitExceeded(data));
        for during in [During::Login, During::Session] {
            let f = transient(classify_http(&err, during));
            assert_eq!(f.retry_after, Some(Duration::from_secs(7)));
            assert!(f.reason.contains("rate limited"), "{}", f.reason);
        }
    }

    #[test]
    fn server_errors_are_transient_even_at_login() {
        let f = transient(classify_http(&api(502, ErrorKind::Unknown), During::Login));
        assert!(f.reason.contains("502"), "{}", f.reason);
    }

    #[test]
    fn a_refused_login_and_a_deactivated_account_are_fatal() {
        let f = fatal(classify_http(
            &api(403, ErrorKind::Forbidden),
            During::Login,
        ));
        assert!(f.reason.contains("login refused"), "{}", f.reason);
        let f = fatal(classify_http(
            &api(403, ErrorKind::UserDeactivated),
            During::Session,
        ));
        assert!(f.reason.contains("deactivated"), "{}", f.reason);
        // The same 403 on a running session is worth a restart.
        transient(classify_http(
            &api(403, ErrorKind::Forbidden),
            During::Session,
        ));
    }

    #[test]
    fn a_rejected_token_is_its_own_class() {
        let kind = ErrorKind::UnknownToken(UnknownTokenErrorData::new());
        assert!(matches!(
            classify_http(&api(401, kind), During::Session),
            Class::UnknownToken
        ));
    }
}
