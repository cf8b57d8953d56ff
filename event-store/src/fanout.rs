//! Many subscribers, one reader: [`Fanout`] wraps a store so that all live subscriptions made
//! through it share one subscription to the whole log and are fed from memory.
//!
//! Each subscriber first catches up from the store itself (pages after its own position) and
//! then follows the shared reader's broadcast, filtering in memory and dropping what it already
//! delivered. A subscriber that falls more than the broadcast's capacity behind (it reads
//! slowly, its consumer does not drain its buffer) misses nothing: the broadcast tells it how
//! much it lost, and it catches up from the store again before it rejoins. The reader never
//! waits for a subscriber, so a slow one cannot hold the others back.
//!
//! Why the switch from the store to the broadcast loses nothing: a subscriber takes its
//! broadcast receiver *before* it reads the store. Every event broadcast before that moment was
//! already visible to readers of the log (the reader only sees what no late commit can
//! precede), so the catch-up that follows reads it; every event broadcast after it arrives on
//! the receiver. Positions are totally ordered, so the overlap is dropped by comparing them.
//!
//! Idle, N subscribers cost what one does: the shared reader's wake-ups and polls. Catching up
//! costs each subscriber its own pages, as before.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};

use crate::error::StoreError;
use crate::model::{EventFilter, Position, RecordedEvent};
use crate::subscription::Subscription;
use crate::{EventStore, SubscriptionOptions};

/// A store whose subscriptions share one reader of the log; everything else goes straight to
/// the wrapped store. Make one per process and share it.
pub struct Fanout {
    inner: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn EventStore>,
    options: SubscriptionOptions,
    /// Events the broadcast keeps for subscribers that have not received them yet.
    capacity: usize,
    /// The running reader's broadcast; `None` before the first subscriber, or after the reader
    /// ended (a new one starts with the next subscriber that needs it).
    live: Mutex<Option<broadcast::Sender<Arc<RecordedEvent>>>>,
}

impl Fanout {
    /// `capacity` events are kept for subscribers that lag; `options` are those of the
    /// subscriptions (page size and per-subscriber buffer while catching up, retry pauses).
    pub fn new(store: Arc<dyn EventStore>, capacity: usize, options: SubscriptionOptions) -> Self {
        Self {
            inner: Arc::new(Shared {
                store,
                options,
                capacity: capacity.max(1),
                live: Mutex::new(None),
            }),
        }
    }
}

impl Shared {
    /// A receiver of the shared reader's events from now on, starting the reader when none
    /// runs.
    async fn receiver(
        self: &Arc<Self>,
    ) -> Result<broadcast::Receiver<Arc<RecordedEvent>>, StoreError> {
        if let Some(tx) = self.lock().as_ref() {
            return Ok(tx.subscribe());
        }
        // The reader starts at the head: subscribers catch up to it from the store.
        let head = self.store.head().await?;
        let source = self.store.subscribe(head, EventFilter::All).await?;
        let mut live = self.lock();
        // Another subscriber may have started one meanwhile; the later source is dropped.
        if let Some(tx) = live.as_ref() {
            return Ok(tx.subscribe());
        }
        let (tx, rx) = broadcast::channel(self.capacity);
        *live = Some(tx.clone());
        tokio::spawn(read(Arc::downgrade(self), source, tx));
        Ok(rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<broadcast::Sender<Arc<RecordedEvent>>>> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The shared reader: broadcasts every event of the log until its source fails for good or the
/// [`Fanout`] is gone. A failed reader forgets itself, so the next subscriber starts another;
/// its receivers see the broadcast close and catch up from the store.
async fn read(
    shared: std::sync::Weak<Shared>,
    mut source: Subscription,
    tx: broadcast::Sender<Arc<RecordedEvent>>,
) {
    use futures::StreamExt;
    while let Some(event) = source.next().await {
        match event {
            // No receiver is not an error: the reader stays for the next subscriber.
            Ok(event) => drop(tx.send(Arc::new(event))),
            Err(error) => {
                tracing::warn!(%error, "the shared log reader failed; the next subscriber restarts it");
                break;
            }
        }
        if shared.strong_count() == 0 {
            return;
        }
    }
    if let Some(shared) = shared.upgrade() {
        let mut live = shared.lock();
        if live
            .as_ref()
            .is_some_and(|current| current.same_channel(&tx))
        {
            *live = None;
        }
    }
}

/// One subscriber: catch up from the store, then follow the broadcast; again after a lag.
async fn follow(
    shared: Arc<Shared>,
    mut position: Position,
    filter: EventFilter,
    out: mpsc::Sender<Result<RecordedEvent, StoreError>>,
) {
    let batch = shared.options.batch_size.max(1);
    let mut retry = Duration::from_millis(50);
    loop {
        let caught_up = async {
            let mut live = shared.receiver().await?;
            loop {
                let page = shared.store.read_all(position, &filter, batch).await?;
                let short = page.len() < batch;
                for event in page {
                    position = event.position;
                    if out.send(Ok(event)).await.is_err() {
                        return Ok(None);
                    }
                }
                if short {
                    return Ok::<_, StoreError>(Some(live));
                }
                // Keep the receiver current while a long catch-up runs: what it missed is
                // read from the store anyway.
                live = live.resubscribe();
            }
        }
        .await;
        let mut live = match caught_up {
            Ok(Some(live)) => live,
            Ok(None) => return,
            Err(error) if error.is_unavailable() => {
                tracing::warn!(%error, pause_ms = retry.as_millis() as u64, "subscription read failed, retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(shared.options.retry_max);
                continue;
            }
            Err(error) => {
                let _ = out.send(Err(error)).await;
                return;
            }
        };
        retry = Duration::from_millis(50);
        loop {
            match live.recv().await {
                Ok(event) => {
                    if event.position <= position {
                        continue;
                    }
                    position = event.position;
                    if filter.matches(&event.stream)
                        && out.send(Ok(RecordedEvent::clone(&event))).await.is_err()
                    {
                        return;
                    }
                }
                // Events were lost to this receiver: read them from the store.
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        "a subscriber fell behind the shared reader, catching up"
                    );
                    break;
                }
                Err(RecvError::Closed) => break,
            }
        }
    }
}

#[async_trait]
impl crate::StoreLayer for Fanout {
    fn inner(&self) -> &dyn EventStore {
        &*self.inner.store
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        let (tx, rx) = mpsc::channel(self.inner.options.buffer.max(1));
        let task = tokio::spawn(follow(self.inner.clone(), after, filter, tx));
        Ok(Subscription::from_channel(rx, task))
    }
}

#[cfg(test)]
mod tests {

    use futures::StreamExt;
    use serde_json::json;

    use super::*;
    use crate::counting::Counting;
    use crate::{ExpectedVersion, NewEvent, StreamName};

    fn event(n: usize) -> NewEvent {
        NewEvent::new("Noted", json!({ "n": n }))
    }

    async fn append(store: &dyn EventStore, stream: &str, n: usize) {
        let stream = StreamName::parse(stream).unwrap();
        store
            .append(&stream, ExpectedVersion::Any, vec![event(n)])
            .await
            .unwrap();
    }

    fn numbers(events: &[RecordedEvent]) -> Vec<u64> {
        events
            .iter()
            .map(|e| e.data["n"].as_u64().unwrap())
            .collect()
    }

    async fn take(subscription: &mut Subscription, n: usize) -> Vec<RecordedEvent> {
        let mut events = Vec::new();
        while events.len() < n {
            let next = tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("an event within 5 s")
                .expect("the subscription goes on")
                .unwrap();
            events.push(next);
        }
        events
    }

    fn counting() -> Arc<Counting> {
        Arc::new(Counting::default())
    }

    #[tokio::test]
    async fn a_thousand_subscribers_share_one_reader_and_each_gets_its_streams_events() {
        let store = counting();
        let fanout = Fanout::new(store.clone(), 64, SubscriptionOptions::default());
        append(&fanout, "order-0", 0).await;
        let mut subscribers = Vec::new();
        for i in 0..1000 {
            let filter =
                EventFilter::Stream(StreamName::parse(format!("order-{}", i % 10)).unwrap());
            subscribers.push(fanout.subscribe(Position::START, filter).await.unwrap());
        }
        for n in 1..30 {
            append(&fanout, &format!("order-{}", n % 10), n).await;
        }
        for (i, subscriber) in subscribers.iter_mut().enumerate() {
            let expected: Vec<u64> = (0..30).filter(|n| n % 10 == i as u64 % 10).collect();
            let got = take(subscriber, expected.len()).await;
            assert_eq!(numbers(&got), expected, "subscriber {i}");
        }
        assert_eq!(Counting::count(&store.subscriptions), 1);
        // Each subscriber read the store once to catch up; following live read nothing more.
        let reads = Counting::count(&store.reads);
        assert!(reads <= 1000 + 10, "{reads} reads");
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_catches_up_from_the_store_without_a_gap() {
        let store = counting();
        // Room for 8 events in the broadcast, 2 in the subscriber's buffer: a subscriber that
        // does not read for 100 events lags far past both.
        let options = SubscriptionOptions {
            buffer: 2,
            batch_size: 16,
            ..SubscriptionOptions::default()
        };
        let fanout = Fanout::new(store.clone(), 8, options);
        let mut slow = fanout
            .subscribe(Position::START, EventFilter::All)
            .await
            .unwrap();
        let mut quick = fanout
            .subscribe(Position::START, EventFilter::All)
            .await
            .unwrap();
        let mut seen_quick = Vec::new();
        for n in 0..100 {
            append(&fanout, "order-1", n).await;
            seen_quick.extend(take(&mut quick, 1).await);
        }
        // The quick one was never held up by the slow one.
        assert_eq!(numbers(&seen_quick), (0..100).collect::<Vec<_>>());
        let reads_before = Counting::count(&store.reads);
        let got = take(&mut slow, 100).await;
        assert_eq!(numbers(&got), (0..100).collect::<Vec<_>>());
        assert!(
            Counting::count(&store.reads) > reads_before,
            "the slow subscriber did not read the store to catch up"
        );
        // And it follows live again afterwards.
        append(&fanout, "order-1", 100).await;
        assert_eq!(numbers(&take(&mut slow, 1).await), [100]);
    }
}
