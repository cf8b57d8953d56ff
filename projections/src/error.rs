//! The one error type of the projections crate.

use orderly_event_store::StoreError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// PostgreSQL refused or dropped a statement of the read side.
    ///
    /// Handling: when [`ProjectionError::is_transient`] says so, retry the whole batch with
    /// backoff (its transaction rolled back, so nothing is half-applied); otherwise stop and
    /// report: it is a bug or a schema mismatch.
    #[error("read-model database error: {}", orderly_event_store::postgres::describe(.0))]
    Database(#[from] tokio_postgres::Error),

    /// The event store could not be read.
    ///
    /// Handling: as `StoreError` says; `Unavailable` is retried with backoff by the runner.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// No projection has this name.
    ///
    /// Handling: report it to the operator with the list of names ([`crate::ProjectionName::ALL`]).
    #[error("no projection is called {0:?} (known: orders, products)")]
    UnknownProjection(String),

    /// No dead letter has this id, or it was already resolved.
    ///
    /// Handling: report it; `orderly dlq list` shows what is waiting.
    #[error("no unresolved dead letter with id {0}")]
    DeadLetterNotFound(i64),

    /// Another process holds the lock this operation needs (a rebuild of the same projection).
    ///
    /// Handling: wait for it to finish, or stop it; do not force.
    #[error("{0}")]
    Busy(String),

    /// A rebuilt shadow copy failed its checks; the live tables were left untouched and the
    /// shadow kept for inspection.
    ///
    /// Handling: look at the message and the shadow schema, fix the cause, rebuild again
    /// (the next rebuild starts over from the start of the log, replacing the copy).
    #[error("rebuild of {projection} did not verify: {reason}")]
    Verification { projection: String, reason: String },

    /// The migrations could not be applied.
    ///
    /// Handling: fatal at start-up; the message says which migration failed.
    #[error("read-model migrations failed: {0}")]
    Migration(#[source] BoxError),

    /// A failure injected on purpose before a batch's commit (`RunnerOptions::fail_before_commit`),
    /// standing in for a crash in tests.
    ///
    /// Handling: none in production; the runner treats it like any other failed batch.
    #[error("injected failure before commit")]
    Injected,

    /// A read-model table holds a word no version of this code writes (a hand edit, or a
    /// schema from elsewhere).
    ///
    /// Handling: not transient; stop and report, and repair the row or rebuild the projection.
    #[error("read model holds an unknown word: {0}")]
    UnknownWord(#[from] crate::vocabulary::UnknownWord),

    /// The projection stopped on a poisoned event under the `Stop` policy.
    ///
    /// Handling: inspect it with `orderly dlq list`, then `retry` or `skip` it and restart.
    #[error("projection {projection} stopped at dead letter for event {event_id}: {error}")]
    Stopped {
        projection: String,
        event_id: uuid::Uuid,
        error: String,
    },
}

impl ProjectionError {
    /// Whether retrying the same work later may succeed (connection loss, overload, a
    /// serialization failure or deadlock).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(error) => orderly_event_store::postgres::is_transient(error),
            Self::Store(error) => error.is_unavailable(),
            _ => false,
        }
    }

    /// Whether the server cancelled a statement for running past `statement_timeout`
    /// (SQLSTATE 57014): transient, but the same batch may well take as long again.
    pub fn is_statement_timeout(&self) -> bool {
        matches!(self, Self::Database(error)
            if error.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED))
    }
}
