//! A store for the wrappers' unit tests: an in-memory store that counts the calls reaching it,
//! so a test of a wrapper (fan-out, group commit) can say how much of its work got through.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::EventStore;
use crate::error::StoreError;
use crate::memory::MemoryEventStore;
use crate::model::{
    Append, AppendResult, EventFilter, ExpectedVersion, NewEvent, Position, RecordedEvent,
    StreamName,
};
use crate::subscription::Subscription;

#[derive(Default)]
pub(crate) struct Counting {
    pub store: MemoryEventStore,
    /// `append` calls.
    pub appends: AtomicUsize,
    /// `append_many` calls, and the most appends one of them carried.
    pub rounds: AtomicUsize,
    pub largest_round: AtomicUsize,
    /// `read_all` calls.
    pub reads: AtomicUsize,
    pub subscriptions: AtomicUsize,
    /// How long each `append_many` is held, so that appends pile up behind it as they do
    /// behind a commit.
    pub round_takes: Duration,
}

impl Counting {
    pub fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl crate::StoreLayer for Counting {
    fn inner(&self) -> &dyn EventStore {
        &self.store
    }

    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        self.store.append(stream, expected, events).await
    }

    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>> {
        self.rounds.fetch_add(1, Ordering::SeqCst);
        self.largest_round
            .fetch_max(appends.len(), Ordering::SeqCst);
        tokio::time::sleep(self.round_takes).await;
        self.store.append_many(appends).await
    }

    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.store.read_all(after, filter, limit).await
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        self.store.subscribe(after, filter).await
    }
}
