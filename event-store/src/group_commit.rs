//! Group commit: [`GroupCommit`] wraps a store so that appends made at the same time by many
//! tasks are written together, with one [`EventStore::append_many`] (in PostgreSQL: one
//! transaction, one commit, one flush of the write-ahead log) instead of one each.
//!
//! Nothing waits for company: an append that finds a writer free goes at once, alone. Only
//! while every writer is busy do new appends queue, and the next writer to come free takes the
//! whole queue. So a quiet process appends as fast as before, and a busy one commits a few
//! times per round trip instead of once per append. Each append is still answered as if sent
//! alone (`append_many`'s promise): a conflict refuses that append only.
//!
//! An append whose round is dropped half-way (its writer's task was cancelled) is answered
//! `Unavailable`: whether it was written is unknown, and re-sending the same event ids is safe,
//! as after any connection lost mid-append.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{Semaphore, oneshot};

use crate::EventStore;
use crate::error::StoreError;
use crate::model::{Append, AppendResult, ExpectedVersion, NewEvent, StreamName};

/// Appends written together at most: one transaction stays short enough not to hold the log's
/// horizon back for long (readers wait for it), and far below the statement limits.
const MAX_ROUND: usize = 64;

/// A store whose concurrent appends are written together; everything else goes straight to
/// the wrapped store.
pub struct GroupCommit {
    inner: Arc<dyn EventStore>,
    waiting: Mutex<Vec<Waiting>>,
    /// Rounds in flight at once; each holds one connection of the store while it writes.
    writers: Semaphore,
}

struct Waiting {
    append: Append,
    answer: oneshot::Sender<Result<AppendResult, StoreError>>,
}

impl GroupCommit {
    /// At most `writers` rounds are written at once (at least one).
    pub fn new(inner: Arc<dyn EventStore>, writers: usize) -> Self {
        Self {
            inner,
            waiting: Mutex::default(),
            writers: Semaphore::new(writers.max(1)),
        }
    }

    /// The queue; a panic while it was held left it whole (pushes and splits only).
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_round(&self) -> Vec<Waiting> {
        let mut waiting = self.waiting();
        let round = waiting.len().min(MAX_ROUND);
        let rest = waiting.split_off(round);
        std::mem::replace(&mut *waiting, rest)
    }
}

#[async_trait]
impl crate::StoreLayer for GroupCommit {
    fn inner(&self) -> &dyn EventStore {
        &*self.inner
    }

    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.waiting().push(Waiting {
            append: Append {
                stream: stream.clone(),
                expected,
                events,
            },
            answer,
        });
        {
            let _writer = self
                .writers
                .acquire()
                .await
                .map_err(|e| StoreError::Unavailable(e.into()))?;
            // Empty when a round of another writer took this append along.
            let round = self.take_round();
            if !round.is_empty() {
                let (appends, answers): (Vec<_>, Vec<_>) = round
                    .into_iter()
                    .map(|waiting| (waiting.append, waiting.answer))
                    .unzip();
                let results = self.inner.append_many(appends).await;
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
            }
        }
        answered.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the round writing this append was cancelled; its outcome is unknown".into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::counting::Counting;
    use crate::{EventFilter, Position};

    /// Each round held a while, so that appends pile up behind it as behind a commit.
    fn counting() -> Arc<Counting> {
        Arc::new(Counting {
            round_takes: Duration::from_millis(20),
            ..Counting::default()
        })
    }

    fn stream(name: &str) -> StreamName {
        StreamName::parse(name).expect("valid")
    }

    fn event() -> NewEvent {
        NewEvent::new("Numbered", json!({}))
    }

    #[tokio::test]
    async fn concurrent_appends_share_rounds_and_each_gets_its_own_answer() {
        let counting = counting();
        let store = Arc::new(GroupCommit::new(counting.clone(), 1));
        let appends = (0..40).map(|i| {
            let store = store.clone();
            async move {
                // Every fifth append expects a stream that does not exist: refused alone.
                let expected = if i % 5 == 0 {
                    ExpectedVersion::Exact(7)
                } else {
                    ExpectedVersion::NoStream
                };
                store
                    .append(&stream(&format!("order-{i}")), expected, vec![event()])
                    .await
            }
        });
        let results = futures::future::join_all(appends).await;
        for (i, result) in results.iter().enumerate() {
            match result {
                Err(StoreError::Conflict { .. }) if i % 5 == 0 => {}
                Ok(appended) if i % 5 != 0 => assert_eq!(appended.next_expected_version, 0),
                other => panic!("append {i} answered {other:?}"),
            }
        }
        // Every append goes through append_many.
        assert_eq!(Counting::count(&counting.appends), 0);
        let calls = Counting::count(&counting.rounds);
        assert!(calls < 10, "40 concurrent appends took {calls} rounds");
        assert!(Counting::count(&counting.largest_round) > 1);
        let head = counting.store.head().await.expect("head");
        let written = counting
            .store
            .read_all(Position::START, &EventFilter::All, 100)
            .await
            .expect("read");
        assert_eq!(written.len(), 32);
        assert_eq!(written.last().map(|e| e.position), Some(head));
    }

    #[tokio::test]
    async fn an_append_alone_goes_at_once() {
        let counting = counting();
        let store = GroupCommit::new(counting.clone(), 2);
        for version in 0..3 {
            let expected = match version {
                0 => ExpectedVersion::NoStream,
                v => ExpectedVersion::Exact(v - 1),
            };
            let appended = store
                .append(&stream("order-1"), expected, vec![event()])
                .await
                .expect("appended");
            assert_eq!(appended.next_expected_version, version);
        }
        assert_eq!(Counting::count(&counting.appends), 0);
        assert_eq!(Counting::count(&counting.rounds), 3);
        assert_eq!(Counting::count(&counting.largest_round), 1);
    }
}
