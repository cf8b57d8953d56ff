//! The catch-up-then-live loop every adapter's `subscribe` runs. An adapter supplies a page
//! reader over the whole log and a wake-up signal that changes when new events may be there.
//!
//! Catching up and following live are the same loop: read a page after the last delivered
//! position; when the page is short the reader is at the tail, so wait for a wake-up (or the
//! polling interval, which covers lost wake-ups). Delivery goes through a bounded channel, so a
//! slow consumer slows the reader instead of growing a buffer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::StoreError;
use crate::model::{EventFilter, Position, RecordedEvent};

/// Tuning for subscriptions; the defaults suit both catch-up over a long log and live use.
#[derive(Debug, Clone)]
pub struct SubscriptionOptions {
    /// Events read per query while catching up.
    pub batch_size: usize,
    /// Events buffered between the reader and a slow consumer.
    pub buffer: usize,
    /// Longest wait at the tail without a wake-up: bounds the delay when a wake-up was lost
    /// (another process's writes with no notification channel up, for instance).
    pub poll_interval: Duration,
    /// First and longest pause when newer events exist but are held back behind a transaction
    /// still in flight; the pause doubles between the two, and a wake-up (a commit) ends it
    /// early.
    pub held_back_min: Duration,
    pub held_back_max: Duration,
    /// Longest pause between retries while the store is unavailable.
    pub retry_max: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self {
            batch_size: 512,
            buffer: 1024,
            poll_interval: Duration::from_millis(500),
            held_back_min: Duration::from_millis(1),
            held_back_max: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// One page of the whole log.
pub(crate) struct Page {
    pub events: Vec<RecordedEvent>,
    /// True when committed events exist beyond what the page could show because an older
    /// transaction is still in flight: reading again soon will make progress.
    pub held_back: bool,
}

#[async_trait]
pub(crate) trait PageSource: Send + Sync + 'static {
    async fn read_page(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Page, StoreError>;
}

/// A live feed of recorded events; see [`crate::EventStore::subscribe`].
pub struct Subscription {
    rx: mpsc::Receiver<Result<RecordedEvent, StoreError>>,
    task: JoinHandle<()>,
}

impl Subscription {
    /// A subscription fed by a task of its own: events (or one final error) arrive on `rx`, and
    /// dropping the subscription aborts `task`. For adapters whose store pushes events itself
    /// (KurrentDB's `$all` subscription) and for test decorators around a store.
    pub fn from_channel(
        rx: mpsc::Receiver<Result<RecordedEvent, StoreError>>,
        task: JoinHandle<()>,
    ) -> Self {
        Self { rx, task }
    }
}

impl Stream for Subscription {
    type Item = Result<RecordedEvent, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn spawn<S: PageSource>(
    source: S,
    mut wakeups: watch::Receiver<u64>,
    after: Position,
    filter: EventFilter,
    options: SubscriptionOptions,
) -> Subscription {
    let (tx, rx) = mpsc::channel(options.buffer.max(1));
    let task = tokio::spawn(async move {
        let mut position = after;
        let mut held_back_pause = options.held_back_min;
        let mut retry_pause = Duration::from_millis(50);
        loop {
            // Mark the current wake-up as seen *before* reading, so that one arriving while the
            // read is in flight makes the next wait return at once instead of being lost.
            wakeups.borrow_and_update();
            let page = match source
                .read_page(position, &filter, options.batch_size)
                .await
            {
                Ok(page) => page,
                Err(error) if error.is_unavailable() => {
                    tracing::warn!(%error, pause_ms = retry_pause.as_millis() as u64, "subscription read failed, retrying");
                    tokio::time::sleep(retry_pause).await;
                    retry_pause = (retry_pause * 2).min(options.retry_max);
                    continue;
                }
                Err(error) => {
                    let _ = tx.send(Err(error)).await;
                    return;
                }
            };
            retry_pause = Duration::from_millis(50);
            let full = page.events.len() >= options.batch_size;
            for event in page.events {
                position = event.position;
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            if page.held_back {
                // What holds the reader back is usually another append, whose commit wakes us;
                // the pause covers transactions that send no wake-up.
                tokio::select! {
                    _ = wakeups.changed() => {}
                    _ = tokio::time::sleep(held_back_pause) => {}
                }
                held_back_pause = (held_back_pause * 2).min(options.held_back_max);
                continue;
            }
            held_back_pause = options.held_back_min;
            tokio::select! {
                changed = wakeups.changed() => {
                    // The sender lives as long as the store; without it, fall back to polling.
                    if changed.is_err() {
                        tokio::time::sleep(options.poll_interval).await;
                    }
                }
                _ = tokio::time::sleep(options.poll_interval) => {}
                _ = tx.closed() => return,
            }
        }
    });
    Subscription::from_channel(rx, task)
}
