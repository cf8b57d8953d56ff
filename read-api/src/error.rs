use async_graphql::ErrorExtensions;
use orderly_graphql::{ErrorCode, error_codes};

/// Everything a query or subscription can fail with. Each variant maps to one contract code in
/// [`ReadError::to_graphql`].
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The caller's input is wrong (a field named): fix the request, do not retry it as is.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// No token where one is needed: authenticate and retry.
    #[error("this query needs a bearer token")]
    Unauthenticated,
    /// The token's roles or subject do not allow this read: do not retry.
    #[error("{0}")]
    Forbidden(&'static str),
    /// `consistency.mode = STRICT` and the read models did not reach `atLeast` in time: retry
    /// later, or ask with BOUNDED and accept `stale: true`.
    #[error("the read models did not reach the requested position within {waited_ms} ms")]
    Stale { waited_ms: u64 },
    /// Nothing of that name the caller may see: do not retry.
    #[error("no such {0}")]
    NotFound(&'static str),
    /// The request collides with work under way (a rebuild of the same projection): wait for
    /// it to end, then retry.
    #[error("{0}")]
    Conflict(String),
    /// A subscriber left `buffer` messages unread for longer than the patience period; the
    /// subscription ended. Resubscribe (for `events`, from the last position received).
    #[error("subscriber too slow: {buffer} messages waited over {patience_ms} ms; resubscribe")]
    SlowSubscriber { buffer: usize, patience_ms: u64 },
    /// The database or the event store did not answer: retry with backoff.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or data that breaks an invariant: logged with the request id, not retried.
    #[error("internal: {0}")]
    Internal(String),
}

impl ReadError {
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// The contract's error: code, safe message, and detail only in the log.
    pub fn to_graphql(&self, request_id: &str) -> async_graphql::Error {
        match self {
            Self::Invalid { field, message } => error_codes::bad_user_input(field, message),
            Self::Unauthenticated => ErrorCode::Unauthenticated.error(self.to_string()),
            Self::Forbidden(why) => ErrorCode::Forbidden.error(*why),
            Self::Stale { .. } => ErrorCode::StaleRead.error(self.to_string()),
            Self::NotFound(_) => ErrorCode::NotFound.error(self.to_string()),
            Self::Conflict(why) => ErrorCode::Conflict.error(why.clone()),
            Self::SlowSubscriber { .. } => ErrorCode::Unavailable
                .error(self.to_string())
                .extend_with(|_, e| e.set("reason", "SLOW_SUBSCRIBER")),
            Self::Unavailable(detail) => error_codes::unavailable(request_id, detail),
            Self::Internal(detail) => error_codes::internal(request_id, detail),
        }
    }
}

impl From<tokio_postgres::Error> for ReadError {
    fn from(error: tokio_postgres::Error) -> Self {
        use orderly_event_store::postgres::{describe, is_data_exception};
        // A server-side error with a SQLSTATE is ours (bad SQL, broken data), except the
        // classes that mean the server cannot serve now: connection (08), insufficient
        // resources (53), operator intervention (57: shutdown, cancel); and data exceptions
        // (22), a value of the request the server cannot store or compare, which the edge
        // should have refused and which is the caller's to fix all the same.
        if is_data_exception(&error) {
            tracing::warn!(error = %describe(&error), "a value reached the database unchecked");
            return Self::invalid("input", "a value is out of the range the database accepts");
        }
        match error.code().map(|code| code.code()) {
            Some(code) if !["08", "53", "57"].iter().any(|c| code.starts_with(c)) => {
                Self::Internal(describe(&error))
            }
            _ => Self::Unavailable(describe(&error)),
        }
    }
}

/// A read-model row holds a word the projections never write: broken data, not the caller's.
impl From<orderly_projections::vocabulary::UnknownWord> for ReadError {
    fn from(error: orderly_projections::vocabulary::UnknownWord) -> Self {
        Self::Internal(error.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for ReadError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(error) => error.into(),
            other => Self::Unavailable(orderly_event_store::postgres::describe_pool(&other)),
        }
    }
}

impl From<orderly_event_store::StoreError> for ReadError {
    fn from(error: orderly_event_store::StoreError) -> Self {
        use orderly_event_store::StoreError;
        match error {
            StoreError::Unavailable(_) => Self::Unavailable(error.to_string()),
            StoreError::InvalidInput(_) => Self::invalid("input", error),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<orderly_projections::ProjectionError> for ReadError {
    fn from(error: orderly_projections::ProjectionError) -> Self {
        Self::Unavailable(error.to_string())
    }
}
