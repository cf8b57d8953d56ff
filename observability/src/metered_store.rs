//! [`MeteredStore`]: the event store port timed and counted from outside, so that no adapter
//! knows of metrics and every adapter reports the same series.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use metrics::counter;
use orderly_event_store::{
    Append, AppendResult, EventStore, ExpectedVersion, NewEvent, StoreError, StoreLayer, StreamName,
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
impl StoreLayer for MeteredStore {
    fn inner(&self) -> &dyn EventStore {
        &*self.inner
    }

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
}
