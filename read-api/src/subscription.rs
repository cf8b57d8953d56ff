//! The contract's Subscription type, served over graphql-transport-ws.
//!
//! Each resolver calls [`orderly_graphql::subscription_ready`] once it has done the reads it
//! needs before it streams; until then the transport's operation timeout applies.
//!
//! Both subscriptions feed the client through [`bounded`]: a fixed number of messages may wait
//! for a client that does not read; when that buffer stays full for the patience period the
//! subscription ends with an error (UNAVAILABLE, `reason: SLOW_SUBSCRIBER`) and its source is
//! dropped. Nothing is buffered without bound, and the client knows to resubscribe (for
//! `events`, from the last position it received).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_graphql::{Context, Subscription};
use futures::{Stream, StreamExt};
use orderly_event_store::{EventFilter, Position, StreamName};
use orderly_graphql::{Actor, ConsistencyToken};
use orderly_projections::OrderTouched;
use orderly_projections::vocabulary::OrderStatus;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;
use tracing::Instrument;
use uuid::Uuid;

use crate::ReadError;
use crate::context::{ReadApi, may_read_order, reader, request_id, sees_all_orders};
use crate::query::order_owner;
use crate::sql::{OrderRow, StatusRow};
use crate::types::{EventRecord, Order};

#[derive(Default)]
pub struct SubscriptionRoot;

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// Emits the order's read model each time a projection has applied an event to it.
    ///
    /// One message per event of the order's stream, in order, for the events after
    /// `afterVersion` (default: those applied after the subscription started; `-1` for all of
    /// them, so a client that reconnects passes the last version it saw and misses nothing).
    /// When one projection batch applied several events to the order, the messages for the
    /// earlier ones carry that event's `version`, `status`, `updatedAt` and `history` up to it,
    /// with the rest of the read model as after the batch. When the order's payment changes
    /// while its own stream does not (a charge's outcome, a retried charge, a refund after a
    /// cancel), one more message carries the same `version` with the new `payment`; a client
    /// that resumes with `afterVersion` gets the current one again if the order has a payment
    /// (the version names no payment), so a refund made while it was away is not missed.
    #[graphql(complexity = "orderly_graphql::cost::READ + child_complexity")]
    async fn order_updated(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
        after_version: Option<i32>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<Order>> + use<>> {
        let request_id = request_id(ctx).to_owned();
        let api = ReadApi::of(ctx)?.clone();
        let actor = reader(ctx).map_err(|e| e.to_graphql(&request_id))?.clone();
        // Judged from the log, which is always current, not the read model, which may not
        // have the order yet: someone else's order and one that does not exist are both
        // NOT_FOUND, so a subscription says nothing of whether an id exists.
        if !sees_all_orders(&actor) {
            let owner = order_owner(api.events().as_ref(), order_id)
                .await
                .map_err(|e| e.to_graphql(&request_id))?;
            if owner.as_deref() != Some(actor.sub.as_str()) {
                return Err(ReadError::NotFound("order").to_graphql(&request_id));
            }
        }
        // Subscribed before the baseline is read, so that no update between the two is missed.
        let updates = api.hub().order_updates(order_id).boxed();
        let baseline = api
            .store()
            .order(order_id)
            .await
            .map_err(|e| e.to_graphql(&request_id))?;
        if let Some(row) = &baseline
            && !may_read_order(&actor, &row.customer_id)
        {
            return Err(ReadError::NotFound("order").to_graphql(&request_id));
        }
        let emitted = match after_version {
            Some(version) if version < -1 => {
                return Err(ReadError::invalid("afterVersion", "must be -1 or more")
                    .to_graphql(&request_id));
            }
            Some(-1) => None,
            Some(version) => Some(i64::from(version)),
            None => baseline.as_ref().map(|row| row.version),
        };
        // `afterVersion` names the order version a client saw, not its payment: the payment
        // as it is now counts as not seen (at worst one view again, of a payment seen before).
        let payment_emitted = match after_version {
            Some(_) => None,
            None => baseline
                .as_ref()
                .and_then(|row| row.payment.as_ref())
                .map(|payment| payment.version),
        };
        // Versions already applied but after `afterVersion` go out before any update arrives,
        // and so does a payment not seen.
        let behind = matches!((&baseline, emitted), (Some(row), Some(sent)) if row.version > sent)
            || (baseline.is_some() && emitted.is_none())
            || matches!((&baseline, emitted), (Some(row), Some(sent))
                if row.version == sent && row.payment.is_some() && payment_emitted.is_none());
        let catch_up: Pin<Box<dyn Stream<Item = OrderTouched> + Send>> = if behind {
            let now = OrderTouched {
                position: Position::START,
                traceparent: None,
            };
            futures::stream::once(async { now }).boxed()
        } else {
            futures::stream::empty().boxed()
        };
        let follower = OrderFollower {
            api: api.clone(),
            actor,
            order_id,
            emitted,
            payment_emitted,
            pending: VecDeque::new(),
            updates: catch_up.chain(updates).boxed(),
            done: false,
        };
        let limits = api.limits();
        orderly_graphql::subscription_ready(ctx);
        Ok(bounded(
            follower.into_stream(),
            limits.subscription_buffer,
            limits.subscription_patience,
        )
        .map(move |item| item.map_err(|e| e.to_graphql(&request_id))))
    }

    /// The event log itself: catch up from `from` (or from now), then live. Admin only unless
    /// filtered to a stream the caller owns.
    #[graphql(complexity = "orderly_graphql::cost::READ + child_complexity")]
    async fn events(
        &self,
        ctx: &Context<'_>,
        stream: Option<String>,
        category: Option<String>,
        from: Option<ConsistencyToken>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<EventRecord>> + use<>> {
        let request_id = request_id(ctx).to_owned();
        let api = ReadApi::of(ctx)?.clone();
        let source = async {
            let actor = reader(ctx)?;
            let filter = event_filter(stream, category)?;
            if !actor.is_admin() && !owns(&api, actor, &filter).await? {
                return Err(ReadError::Forbidden(
                    "the whole log is for admins; others may follow their own order's streams",
                ));
            }
            let from = match from {
                Some(token) => token.0,
                None => api.events().head().await?,
            };
            Ok(api.events().subscribe(from, filter).await?)
        }
        .await
        .map_err(|e| e.to_graphql(&request_id))?;
        let events = source.map(|event| event.map(EventRecord::from).map_err(ReadError::from));
        let limits = api.limits();
        orderly_graphql::subscription_ready(ctx);
        Ok(bounded(
            events,
            limits.subscription_buffer,
            limits.subscription_patience,
        )
        .map(move |item| item.map_err(|e| e.to_graphql(&request_id))))
    }
}

fn event_filter(
    stream: Option<String>,
    category: Option<String>,
) -> Result<EventFilter, ReadError> {
    match (stream, category) {
        (None, None) => Ok(EventFilter::All),
        (None, Some(category)) => {
            if category.is_empty() || category.contains('-') {
                return Err(ReadError::invalid(
                    "category",
                    "a category is the part of a stream name before its first '-'",
                ));
            }
            Ok(EventFilter::Category(category))
        }
        (Some(stream), category) => {
            let stream = StreamName::parse(stream).map_err(|e| ReadError::invalid("stream", e))?;
            if category.is_some_and(|c| c != stream.category()) {
                return Err(ReadError::invalid(
                    "category",
                    "names another category than `stream`",
                ));
            }
            Ok(EventFilter::Stream(stream))
        }
    }
}

/// Whether `filter` names one stream of an order `actor` placed (`order-<id>` or
/// `payment-<id>`).
async fn owns(api: &ReadApi, actor: &Actor, filter: &EventFilter) -> Result<bool, ReadError> {
    let EventFilter::Stream(stream) = filter else {
        return Ok(false);
    };
    let Some((category, id)) = stream.as_str().split_once('-') else {
        return Ok(false);
    };
    let Ok(order_id) = Uuid::parse_str(id) else {
        return Ok(false);
    };
    if !matches!(category, "order" | "payment") {
        return Ok(false);
    }
    let owner = order_owner(api.events().as_ref(), order_id).await?;
    Ok(owner.as_deref() == Some(actor.sub.as_str()))
}

/// The pause before an order follower reads again after the database did not answer; it
/// doubles up to [`LONGEST_LOOK_PAUSE`].
const FIRST_LOOK_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_LOOK_PAUSE: Duration = Duration::from_secs(5);

/// Turns the hub's "this order changed" hints into one read-model view per order event.
struct OrderFollower {
    api: ReadApi,
    actor: Actor,
    order_id: Uuid,
    /// The order-stream version of the last view sent (or seen when subscribing).
    emitted: Option<i64>,
    /// The payment-stream version in the last view sent (or seen when subscribing): payment
    /// events change the view without moving the order's version.
    payment_emitted: Option<i64>,
    pending: VecDeque<Order>,
    updates: Pin<Box<dyn Stream<Item = OrderTouched> + Send>>,
    done: bool,
}

impl OrderFollower {
    fn into_stream(self) -> impl Stream<Item = Result<Order, ReadError>> + Send + 'static {
        futures::stream::unfold(self, |mut follower| async move {
            loop {
                if let Some(order) = follower.pending.pop_front() {
                    return Some((Ok(order), follower));
                }
                if follower.done {
                    return None;
                }
                // Every hint, a lagged receiver's included, means "look again".
                let touched = follower.updates.next().await?;
                // The push continues the trace of the batch that caused it, hence of the
                // request behind that batch's events.
                let span = tracing::info_span!("subscription.push", order_id = %follower.order_id);
                if let Some(traceparent) = &touched.traceparent {
                    orderly_observability::trace_context::set_parent(&span, traceparent);
                }
                if let Err(error) = follower.look_until_answered().instrument(span).await {
                    follower.done = true;
                    return Some((Err(error), follower));
                }
            }
        })
    }

    /// [`OrderFollower::look`], again after a pause while the database does not answer (a
    /// restart, a failover, a dropped connection, no free connection): the hint stays in hand,
    /// so a change made meanwhile is pushed once the database is back, and the subscription
    /// does not end over an outage its client could do nothing about. Other errors end it.
    async fn look_until_answered(&mut self) -> Result<(), ReadError> {
        let mut pause = FIRST_LOOK_PAUSE;
        loop {
            match self.look().await {
                Err(ReadError::Unavailable(reason)) => {
                    tracing::debug!(order_id = %self.order_id, %reason, ?pause, "order unreadable; looking again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(LONGEST_LOOK_PAUSE);
                }
                done => return done,
            }
        }
    }

    /// Reads the order and queues a view for each version not yet sent, or one view when only
    /// its payment moved on since the last view sent.
    async fn look(&mut self) -> Result<(), ReadError> {
        let store = self.api.store();
        let Some(row) = store.order(self.order_id).await? else {
            return Ok(());
        };
        if !may_read_order(&self.actor, &row.customer_id) {
            return Err(ReadError::NotFound("order"));
        }
        let payment = row.payment.as_ref().map(|payment| payment.version);
        match self.emitted {
            Some(sent) if row.version < sent => return Ok(()),
            // Payment versions only grow, and `None` (no payment yet) comes first.
            Some(sent) if row.version == sent && payment <= self.payment_emitted => {
                return Ok(());
            }
            _ => {}
        }
        let mut history = store
            .history(&[self.order_id])
            .await?
            .remove(&self.order_id)
            .unwrap_or_default();
        // Read after the row, on another connection: a batch committed in between may have
        // added changes the row does not show yet. They come with the next look.
        history.retain(|change| change.version <= row.version);
        let after = self.emitted.unwrap_or(-1);
        for change in history
            .iter()
            .filter(|h| h.version > after && h.version < row.version)
        {
            self.pending.push_back(view_at(&row, &history, change));
        }
        self.emitted = Some(row.version);
        self.payment_emitted = payment;
        self.pending.push_back(Order {
            row,
            lines: None,
            history: Some(history),
        });
        Ok(())
    }
}

/// The order as of an earlier event of the same batch: that event's status, version and time,
/// the history up to it.
fn view_at(row: &OrderRow, history: &[StatusRow], change: &StatusRow) -> Order {
    let mut row = row.clone();
    row.status = change.status;
    row.version = change.version;
    row.updated_at = change.at;
    if change.status != OrderStatus::Cancelled {
        row.cancellation_reason = None;
    }
    Order {
        row,
        lines: None,
        history: Some(
            history
                .iter()
                .filter(|h| h.version <= change.version)
                .cloned()
                .collect(),
        ),
    }
}

/// `source`, with at most `buffer` items waiting for the consumer. When the consumer leaves
/// the buffer full for `patience`, the source is dropped and the consumer gets one error (the
/// items still waiting are dropped with it) and then the end.
pub fn bounded<T, S>(
    source: S,
    buffer: usize,
    patience: Duration,
) -> impl Stream<Item = Result<T, ReadError>> + Send + 'static
where
    T: Send + 'static,
    S: Stream<Item = Result<T, ReadError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(buffer.max(1));
    let overflowed = Arc::new(AtomicBool::new(false));
    let flag = overflowed.clone();
    let task = tokio::spawn(async move {
        let mut source = std::pin::pin!(source);
        while let Some(item) = source.next().await {
            match tx.send_timeout(item, patience).await {
                Ok(()) => {}
                Err(SendTimeoutError::Timeout(_)) => {
                    flag.store(true, Ordering::Release);
                    tracing::info!(buffer, ?patience, "subscriber too slow, disconnecting it");
                    return;
                }
                // The consumer is gone.
                Err(SendTimeoutError::Closed(_)) => return,
            }
        }
    });
    let feed = Feed {
        rx,
        overflowed,
        task,
        buffer,
        patience,
        finished: false,
    };
    futures::stream::unfold(feed, |mut feed| async move {
        if feed.finished {
            return None;
        }
        let next = feed.rx.recv().await;
        // Checked after the receive too: the producer gives up, then the channel closes.
        if feed.overflowed.load(Ordering::Acquire) {
            feed.finished = true;
            let error = ReadError::SlowSubscriber {
                buffer: feed.buffer,
                patience_ms: u64::try_from(feed.patience.as_millis()).unwrap_or(u64::MAX),
            };
            return Some((Err(error), feed));
        }
        next.map(|item| (item, feed))
    })
}

/// The consumer's end of [`bounded`]; dropping it stops the producer task (and its source).
struct Feed<T> {
    rx: mpsc::Receiver<Result<T, ReadError>>,
    overflowed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    buffer: usize,
    patience: Duration,
    finished: bool,
}

impl<T> Drop for Feed<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reading_consumer_gets_every_item_in_order() {
        let source = futures::stream::iter((0..1000).map(Ok));
        let got: Vec<i32> = bounded(source, 4, Duration::from_secs(5))
            .map(|item| item.unwrap())
            .collect()
            .await;
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_consumer_that_stops_reading_is_cut_off_with_an_error_not_buffered() {
        let produced = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = produced.clone();
        let source = futures::stream::iter(0..).map(move |i: u64| {
            counter.fetch_add(1, Ordering::Relaxed);
            Ok(i)
        });
        let mut stream = Box::pin(bounded(source, 8, Duration::from_millis(50)));
        assert_eq!(stream.next().await.unwrap().unwrap(), 0);
        // The consumer now sleeps; the producer fills the buffer and gives up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = produced.load(Ordering::Relaxed);
        assert!(held <= 8 + 3, "the producer ran ahead by {held} items");
        let next = stream.next().await.unwrap();
        assert!(
            matches!(next, Err(ReadError::SlowSubscriber { buffer: 8, .. })),
            "{next:?}"
        );
        assert!(stream.next().await.is_none());
        assert_eq!(
            produced.load(Ordering::Relaxed),
            held,
            "the source was not dropped"
        );
    }
}
