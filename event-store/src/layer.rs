//! [`StoreLayer`]: a wrapper of the port that changes some calls and passes the others on.

use async_trait::async_trait;

use crate::EventStore;
use crate::error::StoreError;
use crate::model::{
    Append, AppendResult, Direction, EventFilter, ExpectedVersion, NewEvent, Position,
    RawRecordedEvent, RecordedEvent, StreamName,
};
use crate::subscription::Subscription;

/// A store wrapped around another (timing its appends, grouping them, sharing one reader of
/// the log, a test's faults) that changes some calls and passes every other one to
/// [`StoreLayer::inner`] as it came. Every layer is an [`EventStore`]; each method means what
/// the port's method of the same name does.
///
/// Each method passes the call on by default, so a layer names only what it changes, and a
/// call it does not change always reaches the adapter's own way of answering it (its
/// one-round-trip [`EventStore::read_streams`], its [`EventStore::append_many`]) instead of
/// the port's generic one.
#[async_trait]
pub trait StoreLayer: Send + Sync + 'static {
    /// The store below this layer.
    fn inner(&self) -> &dyn EventStore;

    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        self.inner().append(stream, expected, events).await
    }

    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>> {
        self.inner().append_many(appends).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner()
            .read_stream(stream, direction, from, limit)
            .await
    }

    async fn read_streams(
        &self,
        requests: &[(StreamName, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
        self.inner().read_streams(requests, limit).await
    }

    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner().read_all(after, filter, limit).await
    }

    async fn read_all_raw(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RawRecordedEvent>, StoreError> {
        self.inner().read_all_raw(after, filter, limit).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.inner().head().await
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        self.inner().subscribe(after, filter).await
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<Option<u64>, StoreError> {
        self.inner().stream_version(stream).await
    }
}

#[async_trait]
impl<L: StoreLayer> EventStore for L {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        StoreLayer::append(self, stream, expected, events).await
    }

    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>> {
        StoreLayer::append_many(self, appends).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        StoreLayer::read_stream(self, stream, direction, from, limit).await
    }

    async fn read_streams(
        &self,
        requests: &[(StreamName, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
        StoreLayer::read_streams(self, requests, limit).await
    }

    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        StoreLayer::read_all(self, after, filter, limit).await
    }

    async fn read_all_raw(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RawRecordedEvent>, StoreError> {
        StoreLayer::read_all_raw(self, after, filter, limit).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        StoreLayer::head(self).await
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        StoreLayer::subscribe(self, after, filter).await
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<Option<u64>, StoreError> {
        StoreLayer::stream_version(self, stream).await
    }
}
