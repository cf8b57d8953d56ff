//! [`MeteredStore`]: the event store port timed and counted from outside, so that no adapter
//! knows of metrics and every adapter reports the same series.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use metrics::counter;
use orderly_event_store::{
    Append, AppendResult, Direction, EventFilter, EventStore, ExpectedVersion, NewEvent, Position,
    RawRecordedEvent, RecordedEvent, StoreError, StreamName, Subscription,
};
use tracing::Instrument;

/// An event store that times its appends and counts what they wrote, for any adapter, without
/// the store itself knowing of metrics. Every other call passes straight through.
pub struct MeteredStore {
    inner: Arc<dyn EventStore>,
    /// `store` label: `postgres` or `kurrentdb`.
    store: &'static str,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn EventStore>, store: &'static str) -> Self {
        Self { inner, store }
    }

    /// One append's time (from `started`) and, unless it was a replay, its events.
    fn record(
        &self,
        stream: &StreamName,
        count: u64,
        result: &Result<AppendResult, StoreError>,
        started: Instant,
    ) {
        metrics::histogram!(
            "orderly_event_store_append_duration_seconds",
            "store" => self.store,
            "outcome" => outcome(result)
        )
        .record(started.elapsed().as_secs_f64());
        if let Ok(appended) = result
            && !appended.deduplicated
        {
            counter!(
                "orderly_event_store_appended_events_total",
                "category" => stream.category().to_owned()
            )
            .increment(count);
        }
    }
}

fn outcome(result: &Result<AppendResult, StoreError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(StoreError::Conflict { .. }) => "conflict",
        Err(_) => "error",
    }
}

#[async_trait]
impl EventStore for MeteredStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let count = events.len() as u64;
        let started = Instant::now();
        let span = tracing::info_span!(
            "event_store.append",
            store = self.store,
            stream = %stream,
            events = count,
            outcome = tracing::field::Empty,
        );
        let result = self
            .inner
            .append(stream, expected, events)
            .instrument(span.clone())
            .await;
        span.record("outcome", outcome(&result));
        self.record(stream, count, &result, started);
        result
    }

    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "event_store.append_many",
            store = self.store,
            appends = appends.len(),
        );
        let counted: Vec<(StreamName, u64)> = appends
            .iter()
            .map(|append| (append.stream.clone(), append.events.len() as u64))
            .collect();
        let results = self.inner.append_many(appends).instrument(span).await;
        for ((stream, count), result) in counted.iter().zip(&results) {
            self.record(stream, *count, result, started);
        }
        results
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_stream(stream, direction, from, limit).await
    }

    async fn read_streams(
        &self,
        requests: &[(StreamName, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
        self.inner.read_streams(requests, limit).await
    }

    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(after, filter, limit).await
    }

    async fn read_all_raw(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RawRecordedEvent>, StoreError> {
        self.inner.read_all_raw(after, filter, limit).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        self.inner.subscribe(after, filter).await
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<Option<u64>, StoreError> {
        self.inner.stream_version(stream).await
    }
}
