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
//! as after any connection lost mid-append. An append whose caller stops waiting while it is
//! still queued (its task was cancelled, its timeout passed) is dropped unwritten.

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

    /// The oldest appends queued, at most [`MAX_ROUND`]. Those whose caller stopped waiting
    /// are dropped, not written: nobody would learn the outcome, and a write made after its
    /// caller gave up (a saga lane fenced, a request timed out) would surprise it.
    fn take_round(&self) -> Vec<Waiting> {
        let mut waiting = self.waiting();
        waiting.retain(|w| !w.answer.is_closed());
        let round = waiting.len().min(MAX_ROUND);
        let rest = waiting.split_off(round);
        std::mem::replace(&mut *waiting, rest)
    }

    /// Writes `round` together and answers each of its appends.
    async fn write(&self, round: Vec<Waiting>) {
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
        let (answer, mut answered) = oneshot::channel();
        self.waiting().push(Waiting {
            append: Append {
                stream: stream.clone(),
                expected,
                events,
            },
            answer,
        });
        let answer = {
            let _writer = self
                .writers
                .acquire()
                .await
                .map_err(|e| StoreError::Unavailable(e.into()))?;
            // Rounds are taken from the front of the queue, so with more than a round queued
            // this append may be left for the next; this writer goes on until its own is
            // answered, since no other caller may be left to take it.
            loop {
                match answered.try_recv() {
                    Ok(result) => break Some(result),
                    Err(oneshot::error::TryRecvError::Closed) => break Some(Err(cancelled())),
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
                // Empty when a round of another writer took this append along.
                let round = self.take_round();
                if round.is_empty() {
                    break None;
                }
                self.write(round).await;
            }
        };
        match answer {
            Some(result) => result,
            None => answered.await.unwrap_or_else(|_| Err(cancelled())),
        }
    }
}

fn cancelled() -> StoreError {
    StoreError::Unavailable(
        "the round writing this append was cancelled; its outcome is unknown".into(),
    )
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

    #[tokio::test]
    async fn an_append_queued_behind_abandoned_ones_is_written_and_they_are_not() {
        let counting = Arc::new(Counting {
            round_takes: Duration::from_millis(100),
            ..Counting::default()
        });
        let store = Arc::new(GroupCommit::new(counting.clone(), 1));
        let first = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .append(
                        &stream("order-first"),
                        ExpectedVersion::NoStream,
                        vec![event()],
                    )
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // More than a round's worth of callers queue behind the round in flight and give up.
        let names: Vec<StreamName> = (0..MAX_ROUND + 3)
            .map(|i| stream(&format!("order-abandoned{i}")))
            .collect();
        let abandoned = names.iter().map(|name| {
            let append = store.append(name, ExpectedVersion::NoStream, vec![event()]);
            tokio::time::timeout(Duration::from_millis(1), append)
        });
        for gave_up in futures::future::join_all(abandoned).await {
            assert!(gave_up.is_err(), "an append was answered before its round");
        }
        let last = tokio::time::timeout(
            Duration::from_secs(5),
            store.append(
                &stream("order-last"),
                ExpectedVersion::NoStream,
                vec![event()],
            ),
        )
        .await
        .expect("the last append is answered without another coming")
        .expect("written");
        assert_eq!(last.next_expected_version, 0);
        first.await.expect("joined").expect("written");
        let written: Vec<String> = counting
            .store
            .read_all(Position::START, &EventFilter::All, 100)
            .await
            .expect("read")
            .into_iter()
            .map(|e| e.stream.to_string())
            .collect();
        assert_eq!(written, ["order-first", "order-last"]);
    }
}
