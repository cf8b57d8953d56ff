//! Live notifications: where each projection is, and which orders its last batch touched.
//!
//! In-process, a runner publishes to a [`ProjectionHub`] after each commit. Across processes,
//! the runner also sends `NOTIFY orderly_projections` with a small JSON payload after the
//! commit, and [`ProjectionHub::follow`] turns those back into hub updates (and polls the
//! checkpoint table, which covers lost notifications: an `orders` checkpoint that moves without
//! its notice tells order listeners to look again). Runners publish a position only once its
//! batch is durable, and every (re)connection replaces the hub's positions with what the
//! database says, so a position the hub vouches for is one a crash cannot have taken back. The read API only talks to a hub: wait
//! until a projection has passed a consistency token, or follow the touched order ids.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use orderly_event_store::Position;
use orderly_event_store::postgres::PgConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use uuid::Uuid;

use crate::error::ProjectionError;
use crate::model::{ProjectionName, to_u64};

/// The PostgreSQL channel runners notify after each committed batch.
pub const NOTIFY_CHANNEL: &str = "orderly_projections";

/// PostgreSQL refuses payloads of 8000 bytes or more; 150 ids of 39 bytes leave room for the rest.
const MAX_NOTIFIED_IDS: usize = 150;

/// How often a follower re-reads the checkpoints, in case a notification was lost.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// What one committed batch changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionUpdate {
    pub projection: String,
    /// The projection's checkpoint after the batch: everything up to it is applied.
    pub position: Position,
    /// Orders whose read model the batch changed (empty for `products`).
    pub order_ids: Vec<Uuid>,
    /// True when `order_ids` was cut to fit a notification payload; a listener that must not
    /// miss an order should then reload what it watches.
    #[serde(default)]
    pub truncated: bool,
    /// The W3C trace context of the batch, so what a listener does about it (a subscription
    /// push) continues the trace of the request behind the batch's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// One order's read model changed (or may have: after missed updates, `position` is
/// `Position::START` and `traceparent` is `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderTouched {
    pub position: Position,
    pub traceparent: Option<String>,
}

impl ProjectionUpdate {
    /// The payload for `NOTIFY`, with the id list cut to stay under PostgreSQL's limit.
    pub fn to_payload(&self) -> String {
        let mut update = self.clone();
        if update.order_ids.len() > MAX_NOTIFIED_IDS {
            update.order_ids.truncate(MAX_NOTIFIED_IDS);
            update.truncated = true;
        }
        serde_json::to_string(&update).unwrap_or_default()
    }
}

/// The meeting point of runners and readers. Cheap to clone.
#[derive(Clone)]
pub struct ProjectionHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    positions: Mutex<HashMap<String, watch::Sender<Position>>>,
    updates: broadcast::Sender<ProjectionUpdate>,
    /// The furthest position each projection's published updates reached: what listeners
    /// heard of, as opposed to what a follower read from the checkpoint table.
    heard: Mutex<HashMap<String, Position>>,
}

impl Default for ProjectionHub {
    fn default() -> Self {
        Self::new()
    }
}

impl ProjectionHub {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(HubInner {
                positions: Mutex::new(HashMap::new()),
                // A slow subscriber loses the oldest updates (and is told so) rather than
                // holding memory: the read model is the truth, updates only say "look again".
                updates: broadcast::channel(1024).0,
                heard: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn sender(&self, projection: &str) -> watch::Sender<Position> {
        let mut positions = self
            .inner
            .positions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        positions
            .entry(projection.to_owned())
            .or_insert_with(|| watch::channel(Position::START).0)
            .clone()
    }

    /// The position `projection` is known to have passed.
    pub fn position(&self, projection: ProjectionName) -> Position {
        *self.sender(projection.as_str()).borrow()
    }

    /// Records an update; positions only move forward, so waiters never see one go back.
    pub fn publish(&self, update: ProjectionUpdate) {
        self.advance(&update.projection, update.position);
        {
            let mut heard = self.inner.heard.lock().unwrap_or_else(|p| p.into_inner());
            let furthest = heard.entry(update.projection.clone()).or_default();
            *furthest = (*furthest).max(update.position);
        }
        let _ = self.inner.updates.send(update);
    }

    /// The furthest position published for `projection`.
    fn heard(&self, projection: &str) -> Position {
        let heard = self.inner.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.get(projection).copied().unwrap_or_default()
    }

    /// Tells every follower of orders to look again: updates of the `orders` projection up to
    /// `position` may have touched any order without saying so.
    fn look_again(&self, position: Position) {
        self.publish(ProjectionUpdate {
            projection: ProjectionName::Orders.as_str().to_owned(),
            position,
            order_ids: Vec::new(),
            truncated: true,
            traceparent: None,
        });
    }

    /// Sets where `projection` is to what its database says, even if that is behind what was
    /// published: after a reconnect, since the server may have lost commits (a failover to a
    /// replica that had not received them) and a reader must not be told a token is applied
    /// when its data is gone. Readers waiting then wait until the runner applies it again.
    pub fn reset(&self, projection: ProjectionName, position: Position) {
        self.set(projection.as_str(), position);
    }

    fn set(&self, projection: &str, position: Position) {
        self.sender(projection).send_if_modified(|current| {
            let moved = position != *current;
            *current = position;
            moved
        });
    }

    fn advance(&self, projection: &str, position: Position) {
        self.sender(projection).send_if_modified(|current| {
            let moved = position > *current;
            if moved {
                *current = position;
            }
            moved
        });
    }

    /// Waits until `projection` has applied everything up to `at_least`, or `timeout` passes.
    /// Returns whether it got there; woken by updates, never by polling.
    pub async fn wait_for(
        &self,
        projection: ProjectionName,
        at_least: Position,
        timeout: Duration,
    ) -> bool {
        let mut rx = self.sender(projection.as_str()).subscribe();
        let reached = rx.wait_for(|p| *p >= at_least);
        matches!(tokio::time::timeout(timeout, reached).await, Ok(Ok(_)))
    }

    /// Every update from now on (for `orderUpdated`: filter on `order_ids`). A receiver that
    /// falls more than 1024 updates behind gets `RecvError::Lagged` and should reload.
    pub fn updates(&self) -> broadcast::Receiver<ProjectionUpdate> {
        self.inner.updates.subscribe()
    }

    /// The updates that touched one order, from now on.
    pub fn order_updates(
        &self,
        order_id: Uuid,
    ) -> impl futures::Stream<Item = OrderTouched> + use<> {
        let rx = self.updates();
        futures::stream::unfold(rx, move |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(update) if update.truncated || update.order_ids.contains(&order_id) => {
                        let touched = OrderTouched {
                            position: update.position,
                            traceparent: update.traceparent,
                        };
                        return Some((touched, rx));
                    }
                    Ok(_) => {}
                    // Missed updates may have been about this order: say "look again".
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let touched = OrderTouched {
                            position: Position::START,
                            traceparent: None,
                        };
                        return Some((touched, rx));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    /// Follows runners in other processes: LISTENs on [`NOTIFY_CHANNEL`] and re-reads the
    /// checkpoint table every second. Runs until the returned task is aborted.
    pub fn follow(&self, pg_config: PgConfig) -> JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = hub.follow_once(&pg_config).await {
                    tracing::warn!(%error, "projection notifications interrupted, reconnecting");
                }
                tokio::time::sleep(FOLLOW_POLL).await;
            }
        })
    }

    async fn follow_once(&self, pg_config: &PgConfig) -> Result<(), ProjectionError> {
        let (client, mut connection) = pg_config.connect(NoTls).await?;
        let hub = self.clone();
        let mut driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        match serde_json::from_str::<ProjectionUpdate>(n.payload()) {
                            Ok(update) => hub.publish(update),
                            Err(error) => {
                                tracing::debug!(%error, "unreadable projection notification")
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(
                            error = %orderly_event_store::postgres::describe(&error),
                            "projection notification connection failed"
                        );
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("listen {NOTIFY_CHANNEL}"))
            .await?;
        // A new connection may find a server that lost commits since the last one (see
        // `reset`): its first reading replaces what the hub knew, later ones only advance it.
        let mut reconnected = true;
        // The `orders` checkpoint the last poll read.
        let mut polled = None;
        loop {
            let orders = self.poll_checkpoints(&client, reconnected).await?;
            // Order updates this hub may never hear of: those notified while no connection of
            // it listened (before this one), and those the last poll read and no notice has
            // announced since (lost, or never sent by a runner that failed between its commit
            // and its notice). Judged a poll late, so that a notice on its way is not taken
            // for lost.
            let missed = reconnected
                || polled.is_some_and(|last| last > self.heard(ProjectionName::Orders.as_str()));
            if let (true, Some(position)) = (missed, orders) {
                self.look_again(position);
            }
            polled = orders;
            reconnected = false;
            tokio::select! {
                _ = &mut driver => return Ok(()),
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    }

    /// Reads every checkpoint into the hub; returns the `orders` one.
    async fn poll_checkpoints(
        &self,
        client: &Client,
        reset: bool,
    ) -> Result<Option<Position>, ProjectionError> {
        let mut orders = None;
        for row in client
            .query(
                "select projection, position_commit, position_prepare from projection_checkpoints",
                &[],
            )
            .await?
        {
            let name: String = row.try_get(0)?;
            let position = Position::new(to_u64(row.try_get(1)?), to_u64(row.try_get(2)?));
            if reset {
                self.set(&name, position);
            } else {
                self.advance(&name, position);
            }
            if name == ProjectionName::Orders.as_str() {
                orders = Some(position);
            }
        }
        Ok(orders)
    }
}

/// Tells other processes about a committed batch. Sent after the commit, outside any
/// transaction of the write path; a lost notification only delays followers until their poll.
pub(crate) async fn notify(client: &Client, update: &ProjectionUpdate) {
    if let Err(error) = client
        .execute(
            "select pg_notify($1, $2)",
            &[&NOTIFY_CHANNEL, &update.to_payload()],
        )
        .await
    {
        tracing::debug!(%error, "could not notify projection followers");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reset_takes_back_what_the_database_no_longer_has() {
        let hub = ProjectionHub::new();
        let (applied, lost) = (Position::new(10, 1), Position::new(12, 3));
        hub.publish(ProjectionUpdate {
            projection: ProjectionName::Orders.as_str().to_owned(),
            position: lost,
            order_ids: Vec::new(),
            truncated: false,
            traceparent: None,
        });
        // Publishing never moves back; only a reset (after a reconnect) does.
        hub.publish(ProjectionUpdate {
            projection: ProjectionName::Orders.as_str().to_owned(),
            position: applied,
            order_ids: Vec::new(),
            truncated: false,
            traceparent: None,
        });
        assert_eq!(hub.position(ProjectionName::Orders), lost);
        hub.reset(ProjectionName::Orders, applied);
        assert_eq!(hub.position(ProjectionName::Orders), applied);
        let short = Duration::from_millis(20);
        assert!(!hub.wait_for(ProjectionName::Orders, lost, short).await);
        assert!(hub.wait_for(ProjectionName::Orders, applied, short).await);
    }
}
