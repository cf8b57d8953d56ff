//! # Layout
//!
//! The event store: the port every other crate writes to and reads from, and its adapters.
//!
//! - [`EventStore`] (this file): append with an expected version, read one stream either way,
//!   read the whole log from a [`Position`] (parsed, or as the stored JSON text), subscribe
//!   (catch up, then live), head position.
//! - `model`: the values that cross the port ([`StreamName`], [`ExpectedVersion`], [`Position`],
//!   [`NewEvent`], [`RecordedEvent`]) and the limits every adapter enforces.
//! - `error`: [`StoreError`], with `Conflict` kept apart from infrastructure failure.
//! - `subscription`: the catch-up-then-live loop shared by the adapters; an adapter supplies a
//!   page reader and a wake-up signal.
//! - `layer`: [`StoreLayer`], how a wrapper of the port is written: it names the calls it
//!   changes, and every other call reaches the store below it as it came.
//! - `fanout`: [`Fanout`], a wrapper whose subscriptions share one reader of the log and are
//!   fed from memory, for processes that serve many subscribers.
//! - `group_commit`: [`GroupCommit`], a wrapper that writes appends made at the same time
//!   together ([`EventStore::append_many`]), for processes whose many tasks append at once.
//! - `memory`: an in-process adapter for other crates' tests.
//! - `postgres`: the default adapter, with its migrations under `migrations/`.
//! - `kurrentdb` (feature `kurrentdb`, on by default): the production option on KurrentDB (or
//!   EventStoreDB 20.6+), through the official client, with the server's own `$all`
//!   subscription and filters.
//!
//! The store knows nothing of orders: streams are names, events are typed JSON.
//!
//! Guarantees every adapter gives (and the contract suite in `tests/contract` checks):
//! an append is atomic and either fully visible or not at all; the whole log has one total order
//! that agrees with every stream's own order; a reader or subscriber of the whole log never skips
//! an event, even one whose writer committed after later writers; re-sending an append with the
//! same event ids at the same expected version writes nothing and returns the first result.

#[cfg(test)]
mod counting;
mod error;
mod fanout;
mod group_commit;
mod idempotency;
#[cfg(feature = "kurrentdb")]
pub mod kurrentdb;
mod layer;
pub mod memory;
mod model;
pub mod postgres;
mod subscription;

use async_trait::async_trait;

pub use error::{BoxError, InvalidInput, StoreError};
pub use fanout::Fanout;
pub use group_commit::GroupCommit;
pub use layer::StoreLayer;
pub use model::{
    Append, AppendResult, Direction, EventFilter, ExpectedVersion, MAX_APPEND_BYTES,
    MAX_EVENT_BYTES, MAX_EVENT_TYPE_BYTES, MAX_EVENTS_PER_APPEND, MAX_STREAM_NAME_BYTES, NewEvent,
    Position, RawRecordedEvent, RecordedEvent, StreamName, category_of, validate_append,
};
pub use subscription::{Subscription, SubscriptionOptions};

/// The event store port. Implementations are cheap to share (`Arc<dyn EventStore>`).
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` atomically if the stream is at `expected`.
    ///
    /// Errors: `Conflict` when it is not (nothing written); `InvalidInput` for an empty append,
    /// oversize events or bad type names (nothing written); `DuplicateEventId` when an id was used
    /// before by a different append. Re-sending ids that the stream already holds, in the same
    /// order, where `expected` puts them (a retry after a success, or a part of it) writes
    /// nothing and answers as that write did, with `deduplicated: true`.
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError>;

    /// Appends to several streams, each as [`EventStore::append`] would, in order, and answers
    /// each in order. Not atomic across appends: one refused (a conflict, say) leaves the others
    /// written. Adapters that can write them together (PostgreSQL: one commit, and one statement
    /// when the streams are distinct) do; the others append one after the other
    /// ([`append_each`]). No default (here and below): a wrapper with a default to fall back on
    /// would silently lose what its adapter saves; wrappers are [`StoreLayer`]s, which pass
    /// every call they do not change to the store below.
    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>>;

    /// Reads up to `limit` events of one stream. Forwards starts at version `from` (None: the
    /// first event); backwards starts at `from` (None: the last event) and goes down. A stream
    /// that does not exist reads as empty.
    async fn read_stream(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads several streams forwards at once: for each `(stream, from)` of `requests` (each
    /// stream at most once), up to `limit` events from version `from`, as `read_stream` would.
    /// The answer holds one page per request, in request order; a missing stream's is empty.
    ///
    /// Adapters that can answer in one round trip (PostgreSQL) do; the others read the streams
    /// one by one ([`read_each`]). A wrapper that fell back on reading one stream after the
    /// other once cost the command side a round trip per product of an order.
    async fn read_streams(
        &self,
        requests: &[(StreamName, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<RecordedEvent>>, StoreError>;

    /// Reads up to `limit` events of the whole log strictly after `after`, in log order, keeping
    /// those that match `filter`. Only events that can no longer be preceded by a late commit
    /// are returned, so a caller that checkpoints the last position it saw never skips one.
    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// [`EventStore::read_all`] with each event's JSON left as the stored text, for readers
    /// that decode it themselves (a rebuild). Adapters that receive the text hand it on without
    /// building JSON trees; the others would parse and print every event again, at twice the
    /// cost.
    async fn read_all_raw(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RawRecordedEvent>, StoreError>;

    /// Position of the last event a `read_all` would return now; `Position::START` when empty.
    async fn head(&self) -> Result<Position, StoreError>;

    /// Follows the log from strictly after `after`: first what is stored, then each new event
    /// as it commits, forever, in log order, keeping those that match `filter`. The stream ends
    /// only after yielding a non-transient error; outages are retried inside with backoff.
    /// Dropping the subscription stops its work.
    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError>;

    /// The version of the stream's last event, `None` when the stream does not exist.
    async fn stream_version(&self, stream: &StreamName) -> Result<Option<u64>, StoreError> {
        let last = self
            .read_stream(stream, Direction::Backwards, None, 1)
            .await?;
        Ok(last.first().map(|e| e.version))
    }
}

/// [`EventStore::read_streams`] for adapters without a way to read several streams at once:
/// one [`EventStore::read_stream`] after the other, in request order.
pub async fn read_each<S: EventStore + ?Sized>(
    store: &S,
    requests: &[(StreamName, u64)],
    limit: usize,
) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
    let mut pages = Vec::with_capacity(requests.len());
    for (stream, from) in requests {
        pages.push(
            store
                .read_stream(stream, Direction::Forwards, Some(*from), limit)
                .await?,
        );
    }
    Ok(pages)
}

/// [`EventStore::append_many`] for adapters without a way to write several appends together:
/// one [`EventStore::append`] after the other, in order.
pub async fn append_each<S: EventStore + ?Sized>(
    store: &S,
    appends: Vec<Append>,
) -> Vec<Result<AppendResult, StoreError>> {
    let mut results = Vec::with_capacity(appends.len());
    for append in appends {
        results.push(
            store
                .append(&append.stream, append.expected, append.events)
                .await,
        );
    }
    results
}
