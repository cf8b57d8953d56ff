//! The contract's error codes and the one way to build each error, so that every answer
//! carries `extensions.code` and a message that is safe to show. Internal detail goes to the
//! log (with the request id), never into the answer.

use std::fmt;

use async_graphql::{Error, ErrorExtensions};

/// `extensions.code` of every error the API returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadUserInput,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    Rejected,
    RateLimited,
    StaleRead,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadUserInput => "BAD_USER_INPUT",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::NotFound => "NOT_FOUND",
            Self::Conflict => "CONFLICT",
            Self::Rejected => "REJECTED",
            Self::RateLimited => "RATE_LIMITED",
            Self::StaleRead => "STALE_READ",
            Self::Unavailable => "UNAVAILABLE",
            Self::Internal => "INTERNAL",
        }
    }

    /// An error with this code and `message`, which must be fit for the caller to read.
    pub fn error(self, message: impl Into<String>) -> Error {
        Error::new(message).extend_with(|_, e| e.set("code", self.as_str()))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// BAD_USER_INPUT naming the offending input field (a path such as `input.lines[2].quantity`).
pub fn bad_user_input(field: &str, message: impl fmt::Display) -> Error {
    ErrorCode::BadUserInput
        .error(format!("{field}: {message}"))
        .extend_with(|_, e| e.set("field", field))
}

/// CONFLICT: the client's `expectedVersion` did not match; `actual` is the stream's version
/// (`None`: the aggregate does not exist, sent as null).
pub fn conflict(expected: u64, actual: Option<u64>) -> Error {
    ErrorCode::Conflict
        .error(format!(
            "expected version {expected}, but the current version is {}",
            actual.map_or_else(|| "none (no such aggregate)".to_owned(), |v| v.to_string())
        ))
        .extend_with(|_, e| match actual {
            Some(v) => e.set("actualVersion", v),
            None => e.set("actualVersion", async_graphql::Value::Null),
        })
}

/// REJECTED: a business rule refused the command; `reason` says which, in words.
pub fn rejected(reason: impl fmt::Display) -> Error {
    let reason = reason.to_string();
    ErrorCode::Rejected
        .error(format!("rejected: {reason}"))
        .extend_with(|_, e| e.set("reason", reason.as_str()))
}

/// Whole seconds until `wait` is over, rounded up and at least 1, so that a client that obeys
/// the hint is never early.
pub fn retry_after_seconds(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// RATE_LIMITED: the caller's budget is spent; `retryAfterSeconds` says when it holds enough.
pub fn rate_limited(wait: std::time::Duration) -> Error {
    let seconds = retry_after_seconds(wait);
    ErrorCode::RateLimited
        .error(format!("too many requests; retry in {seconds} s"))
        .extend_with(|_, e| e.set("retryAfterSeconds", seconds))
}

/// UNAVAILABLE: a dependency is down or overloaded; the detail is logged, not returned.
pub fn unavailable(request_id: &str, detail: &dyn fmt::Display) -> Error {
    tracing::warn!(request_id, error = %detail, "unavailable");
    ErrorCode::Unavailable
        .error("the service is temporarily unavailable; retry later")
        .extend_with(|_, e| e.set("requestId", request_id))
}

/// INTERNAL: a bug or corrupt data; the detail is logged with the request id, which is the only
/// thing the caller gets to quote.
pub fn internal(request_id: &str, detail: &dyn fmt::Display) -> Error {
    tracing::error!(request_id, error = %detail, "internal error");
    ErrorCode::Internal
        .error("internal error")
        .extend_with(|_, e| e.set("requestId", request_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(error: &Error) -> Option<String> {
        let extensions = error.extensions.as_ref()?;
        match extensions.get("code")? {
            async_graphql::Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }

    #[test]
    fn every_helper_sets_the_code_and_its_extension() {
        assert_eq!(
            code(&bad_user_input("input.sku", "bad")).as_deref(),
            Some("BAD_USER_INPUT")
        );
        let conflict = conflict(1, Some(3));
        assert_eq!(code(&conflict).as_deref(), Some("CONFLICT"));
        let actual = conflict
            .extensions
            .as_ref()
            .and_then(|e| e.get("actualVersion").cloned());
        assert_eq!(actual, Some(async_graphql::Value::from(3u64)));
        assert_eq!(code(&rejected("out of stock")).as_deref(), Some("REJECTED"));
    }

    #[test]
    fn internal_errors_say_nothing_of_their_cause() {
        let cause = "password=hunter2 at db:5432";
        let error = internal("req-1", &cause);
        assert_eq!(error.message, "internal error");
        assert_eq!(code(&error).as_deref(), Some("INTERNAL"));
        // Nowhere in what the error carries: its Debug form (message and extensions), its
        // extensions and the error as answered, serialized.
        let debug = format!("{error:?}");
        let extensions = serde_json::to_string(&error.extensions).unwrap();
        let answered =
            serde_json::to_string(&error.clone().into_server_error(Default::default())).unwrap();
        for form in [&debug, &extensions, &answered] {
            assert!(form.contains("req-1"), "the request id is quoted: {form}");
            for secret in [cause, "hunter2", "db:5432"] {
                assert!(!form.contains(secret), "{secret:?} leaked: {form}");
            }
        }
    }
}
