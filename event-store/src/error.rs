//! The one error type of the port. `Conflict` is kept apart from infrastructure failure because
//! callers handle it differently: a conflict is normal optimistic concurrency, an outage is not.

use uuid::Uuid;

use crate::model::{ExpectedVersion, StreamName};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream was not at the expected version; nothing was written.
    ///
    /// Handling: reload the stream and decide again (a bounded number of times), or, when the
    /// expected version came from a client, report CONFLICT with `actual`.
    #[error("wrong expected version for stream {stream}: expected {expected}, actual {}", describe_version(*.actual))]
    Conflict {
        stream: StreamName,
        expected: ExpectedVersion,
        /// The stream's last version when the conflict was seen; `None` when it does not exist.
        actual: Option<u64>,
    },

    /// An event id is already stored, but the append is not a re-send of stored events: some
    /// of its ids are stored and some not, or they are stored in another stream or in another
    /// order. (The same ids stored in this stream, in this order, but not where `expected`
    /// puts them are a `Conflict`: a retry from a stale view of the stream.) Nothing was
    /// written.
    ///
    /// Handling: a client bug (ids must be fresh per logical append); do not retry.
    #[error("event id {id} is already stored in stream {stream} at version {version}")]
    DuplicateEventId {
        id: Uuid,
        stream: String,
        version: u64,
    },

    /// The request itself is malformed; nothing was written.
    ///
    /// Handling: report BAD_USER_INPUT; retrying the same request cannot succeed.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),

    /// The store could not be reached or is overloaded; whether a write took effect is unknown
    /// only if the connection dropped during it (then retry with the same event ids, which is
    /// safe).
    ///
    /// Handling: retry with backoff; report UNAVAILABLE to API callers.
    #[error("event store unavailable: {0}")]
    Unavailable(#[source] BoxError),

    /// Anything else: a bug, a schema mismatch, corrupt data.
    ///
    /// Handling: log it with context, report INTERNAL, do not retry blindly.
    #[error("event store internal error: {0}")]
    Internal(#[source] BoxError),
}

/// Malformed requests, each with a message fit to show to whoever sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("an append needs at least one event")]
    EmptyAppend,
    #[error("an append may carry at most {limit} events, got {count}")]
    TooManyEvents { count: usize, limit: usize },
    #[error("event {index} is {size} bytes of JSON, over the limit of {limit}")]
    EventTooLarge {
        index: usize,
        size: usize,
        limit: usize,
    },
    #[error("the append is {size} bytes of JSON, over the limit of {limit}")]
    AppendTooLarge { size: usize, limit: usize },
    #[error(
        "invalid stream name {name:?}: use 1-255 printable ASCII characters without spaces, not starting with '$' or '-'"
    )]
    StreamName { name: String },
    #[error(
        "invalid event type {name:?}: use 1-128 characters of A-Z, a-z, 0-9, '_', '.', '-', ':'"
    )]
    EventType { name: String },
    #[error("event id {id} appears twice in one append")]
    RepeatedEventId { id: Uuid },
    #[error("invalid position token {token:?}: expected 32 lowercase hex digits")]
    Position { token: String },
    /// The database refused a value of the request (SQLSTATE class 22).
    #[error("a value the event store cannot store: {reason}")]
    Value { reason: String },
}

fn describe_version(v: Option<u64>) -> String {
    v.map_or_else(|| "no stream".to_owned(), |v| v.to_string())
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}
