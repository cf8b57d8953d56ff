//! The crate's one error type. Every variant maps to one contract code at the GraphQL edge
//! (`to_graphql`); the saga runner and workers log and retry by the same classification.

use orderly_domain::Rejection;
use orderly_event_store::StoreError;
use orderly_graphql::error_codes::{self, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The input broke a rule before any decision (a bad SKU, a zero quantity, 101 lines).
    ///
    /// Handling: BAD_USER_INPUT naming `field`; the same input will fail again.
    #[error("{field}: {message}")]
    InvalidInput { field: String, message: String },

    /// No token, or the caller's token does not authenticate.
    ///
    /// Handling: UNAUTHENTICATED; obtain a token.
    #[error("authentication required")]
    Unauthenticated,

    /// The caller's roles do not allow this command.
    ///
    /// Handling: FORBIDDEN; nothing to retry.
    #[error("{0}")]
    Forbidden(&'static str),

    /// The aggregate does not exist (or belongs to someone the caller may not see).
    ///
    /// Handling: NOT_FOUND.
    #[error("{0} not found")]
    NotFound(&'static str),

    /// The client's `expectedVersion` did not match the stream.
    ///
    /// Handling: CONFLICT with `actualVersion`; the client reloads and decides again.
    #[error("expected version {expected}, actual {actual:?}")]
    Conflict { expected: u64, actual: Option<u64> },

    /// The aggregate refused the command.
    ///
    /// Handling: REJECTED with the rejection as `reason`; the saga logs it and moves on.
    #[error("rejected: {0}")]
    Rejected(#[from] Rejection),

    /// The command kept colliding with concurrent writers past the retry budget.
    ///
    /// Handling: UNAVAILABLE (the client may retry); a sign of a hot stream.
    #[error("gave up after {0} version conflicts")]
    Contended(u32),

    /// The event store or the command database could not be reached.
    ///
    /// Handling: UNAVAILABLE; workers retry with backoff.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// The payment gateway failed transiently (timeout, outage, open circuit breaker).
    ///
    /// Handling: the gateway worker records a `PaymentFailed` and the saga retries until the
    /// payment deadline; never reported to API callers.
    #[error("payment gateway: {0}")]
    Gateway(String),

    /// Work this call depends on is still under way: the payment provider's handling of an
    /// earlier request with the same idempotency key (HTTP 409), or a retry of the parked saga
    /// events an operator asked to skip.
    ///
    /// Handling: UNAVAILABLE; try again shortly (workers retry it like `Gateway`). The circuit
    /// breakers do not count it: the provider answered.
    #[error("still in progress: {0}")]
    InProgress(String),

    /// A notification transport failed (SMTP server down, recipient refused, no address).
    ///
    /// Handling: the outbox worker retries with backoff and dead-letters the message after
    /// its last attempt; never reported to API callers.
    #[error("notification delivery: {0}")]
    Delivery(String),

    /// A bug or corrupt data (an event that does not decode, a store invariant broken).
    ///
    /// Handling: INTERNAL, logged with the request id; never retried blindly.
    #[error("internal: {0}")]
    Internal(String),
}

impl CommandError {
    pub fn invalid(field: impl Into<String>, message: impl ToString) -> Self {
        Self::InvalidInput {
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// Whether a worker should try the same thing again later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_)
                | Self::Contended(_)
                | Self::Gateway(_)
                | Self::InProgress(_)
                | Self::Delivery(_)
        )
    }

    /// Whether the failure says the aggregate is not there (for this caller).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::NotFound(_)
                | Self::Rejected(Rejection::OrderNotFound | Rejection::ProductNotRegistered)
        )
    }

    /// The contract error for this failure; detail of internal failures is logged only.
    pub fn to_graphql(&self, request_id: &str) -> async_graphql::Error {
        match self {
            Self::InvalidInput { field, message } => error_codes::bad_user_input(field, message),
            Self::Unauthenticated => ErrorCode::Unauthenticated.error("authentication required"),
            Self::Forbidden(why) => ErrorCode::Forbidden.error(*why),
            Self::NotFound(what) => ErrorCode::NotFound.error(format!("{what} not found")),
            Self::Conflict { expected, actual } => error_codes::conflict(*expected, *actual),
            Self::Rejected(rejection) => rejection_to_graphql(rejection),
            // Says what to wait for; it holds nothing internal.
            Self::InProgress(_) => ErrorCode::Unavailable.error(self.to_string()),
            Self::Contended(_) | Self::Unavailable(_) | Self::Gateway(_) | Self::Delivery(_) => {
                error_codes::unavailable(request_id, self)
            }
            Self::Internal(_) => error_codes::internal(request_id, self),
        }
    }
}

/// Rejections that only say the input was wrong become BAD_USER_INPUT naming the field; those
/// that say something does not exist become NOT_FOUND; business refusals stay REJECTED.
fn rejection_to_graphql(rejection: &Rejection) -> async_graphql::Error {
    match rejection {
        Rejection::NoLines | Rejection::TooManyLines { .. } | Rejection::DuplicateSku { .. } => {
            error_codes::bad_user_input("input.lines", rejection)
        }
        Rejection::UnknownSku { .. } | Rejection::MixedCurrencies { .. } => {
            error_codes::bad_user_input("input.lines", rejection)
        }
        Rejection::AmountOverflow => error_codes::bad_user_input("input.lines", rejection),
        Rejection::OrderNotFound => ErrorCode::NotFound.error("order not found"),
        Rejection::ProductNotRegistered => ErrorCode::NotFound.error("product not found"),
        _ => error_codes::rejected(rejection),
    }
}

impl From<StoreError> for CommandError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => Self::Unavailable(error.to_string()),
            StoreError::InvalidInput(input) => Self::invalid("input", input),
            // Conflicts are handled by the retry loop; one that escapes it is a bug.
            StoreError::Conflict { .. }
            | StoreError::DuplicateEventId { .. }
            | StoreError::Internal(_) => Self::Internal(error.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for CommandError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        Self::Unavailable(orderly_event_store::postgres::describe_pool(&error))
    }
}

impl From<tokio_postgres::Error> for CommandError {
    fn from(error: tokio_postgres::Error) -> Self {
        use orderly_event_store::postgres::{describe, is_data_exception, is_transient};
        // Outages, restarts, lock and statement timeouts, serialization failures: try again.
        // A value the server cannot store (class 22) is the request's. Anything else the
        // server refused is a bug or corrupt data here.
        let text = describe(&error);
        if is_transient(&error) {
            Self::Unavailable(text)
        } else if is_data_exception(&error) {
            tracing::warn!(error = %text, "a value reached the database unchecked");
            Self::invalid("input", "a value is out of the range the database accepts")
        } else {
            Self::Internal(text)
        }
    }
}
