//! An in-process event store for tests of other crates. It keeps the same guarantees as the
//! PostgreSQL adapter (it passes the same contract suite) but nothing survives the process.
//!
//! Appends happen under one lock, so they are never in flight while a reader looks: there is no
//! late commit to hold readers back from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::watch;
use uuid::Uuid;

use crate::EventStore;
use crate::error::StoreError;
use crate::idempotency::{StoredId, resolve_prior_write};
use crate::model::{
    Append, AppendResult, Direction, EventFilter, ExpectedVersion, NewEvent, Position,
    RawRecordedEvent, RecordedEvent, StreamName, validate_append,
};
use crate::subscription::{self, Page, PageSource, Subscription, SubscriptionOptions};

#[derive(Clone)]
pub struct MemoryEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    log: Mutex<Log>,
    wake: watch::Sender<u64>,
    options: SubscriptionOptions,
}

#[derive(Default)]
struct Log {
    events: Vec<RecordedEvent>,
    /// Indexes into `events`, per stream, in version order.
    streams: HashMap<StreamName, Vec<usize>>,
    ids: HashMap<Uuid, usize>,
}

impl Default for MemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEventStore {
    pub fn new() -> Self {
        Self::with_options(SubscriptionOptions::default())
    }

    pub fn with_options(options: SubscriptionOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                log: Mutex::new(Log::default()),
                wake: watch::channel(0).0,
                options,
            }),
        }
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        // A panic while holding the lock cannot leave the log half-appended (appends push only
        // after every check), so a poisoned lock is still consistent.
        self.inner
            .log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Positions are 1-based indexes into the log, so `Position::START` precedes the first event.
fn position_of(index: usize) -> Position {
    let n = index as u64 + 1;
    Position::new(n, n)
}

fn index_after(position: Position) -> usize {
    position.commit as usize
}

#[async_trait]
impl EventStore for MemoryEventStore {
    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>> {
        crate::append_each(self, appends).await
    }

    async fn read_streams(
        &self,
        requests: &[(StreamName, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
        crate::read_each(self, requests, limit).await
    }

    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(&events)?;
        let mut log = self.log();
        let current = log.streams.get(stream).map(|s| s.len() as u64 - 1);
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let found: Vec<StoredId> = ids
            .iter()
            .filter_map(|id| log.ids.get(id))
            .map(|&i| {
                let e = &log.events[i];
                StoredId {
                    id: e.id,
                    stream: e.stream.to_string(),
                    version: e.version,
                    position: e.position,
                }
            })
            .collect();
        if let Some(replayed) = resolve_prior_write(stream, expected, &ids, found, current)? {
            return Ok(replayed);
        }
        if !expected.admits(current) {
            return Err(StoreError::Conflict {
                stream: stream.clone(),
                expected,
                actual: current,
            });
        }
        let first_version = current.map_or(0, |v| v + 1);
        let first_index = log.events.len();
        let recorded_at = Utc::now();
        for (offset, event) in events.into_iter().enumerate() {
            let index = first_index + offset;
            log.ids.insert(event.id, index);
            log.streams.entry(stream.clone()).or_default().push(index);
            log.events.push(RecordedEvent {
                id: event.id,
                stream: stream.clone(),
                version: first_version + offset as u64,
                position: position_of(index),
                event_type: event.event_type,
                data: event.data,
                metadata: event.metadata,
                recorded_at,
            });
        }
        let last_index = log.events.len() - 1;
        let result = AppendResult {
            next_expected_version: log.events[last_index].version,
            first_position: position_of(first_index),
            position: position_of(last_index),
            deduplicated: false,
        };
        drop(log);
        self.inner.wake.send_modify(|n| *n = n.wrapping_add(1));
        Ok(result)
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let log = self.log();
        let Some(indexes) = log.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let picked: Vec<RecordedEvent> = match direction {
            Direction::Forwards => {
                let start = from.unwrap_or(0) as usize;
                indexes
                    .iter()
                    .skip(start)
                    .take(limit)
                    .map(|&i| log.events[i].clone())
                    .collect()
            }
            Direction::Backwards => {
                let end = from.map_or(indexes.len(), |v| (v as usize + 1).min(indexes.len()));
                indexes[..end]
                    .iter()
                    .rev()
                    .take(limit)
                    .map(|&i| log.events[i].clone())
                    .collect()
            }
        };
        Ok(picked)
    }

    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        Ok(self.read_page(after, filter, limit).await?.events)
    }

    /// The memory log holds trees, not text: each event is printed as it is read.
    async fn read_all_raw(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RawRecordedEvent>, StoreError> {
        self.read_all(after, filter, limit)
            .await?
            .into_iter()
            .map(RawRecordedEvent::try_from)
            .collect()
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let log = self.log();
        Ok(log
            .events
            .len()
            .checked_sub(1)
            .map_or(Position::START, position_of))
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        let wakeups = self.inner.wake.subscribe();
        Ok(subscription::spawn(
            self.clone(),
            wakeups,
            after,
            filter,
            self.inner.options.clone(),
        ))
    }
}

#[async_trait]
impl PageSource for MemoryEventStore {
    async fn read_page(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let log = self.log();
        let start = index_after(after).min(log.events.len());
        let events = log.events[start..]
            .iter()
            .filter(|e| filter.matches(&e.stream))
            .take(limit)
            .cloned()
            .collect();
        Ok(Page {
            events,
            held_back: false,
        })
    }
}
