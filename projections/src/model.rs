//! Names, policies and the per-batch outcome shared by the runner, rebuilds and dead letters.

use std::fmt;
use std::str::FromStr;

use orderly_event_store::{EventFilter, Position, RecordedEvent};
use uuid::Uuid;

use crate::error::ProjectionError;
use crate::tables;

/// The projections this crate runs. Each is one unit of consistency: its tables change together,
/// in one transaction with its checkpoint, and are rebuilt and swapped together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjectionName {
    /// `order-*` and `payment-*` streams into `orders`, `order_search`, `order_lines`,
    /// `order_status_history`,
    /// `order_payments`, and the aggregates over orders: `customers`,
    /// `customer_lifetime_values`, `daily_sales`.
    Orders,
    /// `product-*` streams into `products`.
    Products,
}

impl ProjectionName {
    pub const ALL: [ProjectionName; 2] = [Self::Orders, Self::Products];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Products => "products",
        }
    }

    /// The read-model tables this projection owns (what a rebuild copies and swaps).
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Self::Orders => &[
                tables::ORDERS.name,
                tables::ORDER_SEARCH.name,
                tables::ORDER_LINES.name,
                tables::ORDER_STATUS_HISTORY.name,
                tables::ORDER_PAYMENTS.name,
                tables::CUSTOMERS.name,
                tables::CUSTOMER_LIFETIME_VALUES.name,
                tables::DAILY_SALES.name,
            ],
            Self::Products => &[tables::PRODUCTS.name],
        }
    }

    /// The stream categories this projection applies.
    pub(crate) fn categories(self) -> &'static [&'static str] {
        match self {
            Self::Orders => &["order", "payment"],
            Self::Products => &["product"],
        }
    }

    /// The part of the log a rebuild of this projection reads. `orders` needs two categories,
    /// which one filter cannot name, so it reads everything and passes over the rest. (Live
    /// runners read everything; see `runner`.)
    pub(crate) fn filter(self) -> EventFilter {
        match self {
            Self::Orders => EventFilter::All,
            Self::Products => EventFilter::Category("product".to_owned()),
        }
    }

    /// Key of the PostgreSQL advisory lock that makes one runner per projection active (the
    /// session holding it in `pg_locks` is the active runner's).
    pub fn runner_lock(self) -> i64 {
        match self {
            Self::Orders => 0x6f72_6465_726c_7901,
            Self::Products => 0x6f72_6465_726c_7902,
        }
    }

    /// Key of the advisory lock that allows one rebuild per projection at a time.
    pub(crate) fn rebuild_lock(self) -> i64 {
        self.runner_lock() + 0x100
    }

    /// Key of the transaction-level advisory lock every writer of the projection's live
    /// tables takes first (see `batch::lock_checkpoint`); `shadow` for its rebuild copy.
    pub(crate) fn batch_lock(self, shadow: bool) -> i64 {
        self.runner_lock() + if shadow { 0x300 } else { 0x200 }
    }
}

impl fmt::Display for ProjectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProjectionName {
    type Err = ProjectionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ProjectionError::UnknownProjection(s.to_owned()))
    }
}

/// What a projection does with an event its handler cannot apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeadLetterPolicy {
    /// Park it in `dead_letters` and go on with the next event.
    #[default]
    SkipAndPark,
    /// Park it and stop before it; the checkpoint stays just before the poisoned event until an
    /// operator retries or skips it.
    Stop,
}

/// An event the handler could not apply, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    pub event_id: Uuid,
    pub stream: String,
    pub version: u64,
    pub position: Position,
    pub event_type: String,
    pub error: String,
}

impl Parked {
    pub(crate) fn new(event: &RecordedEvent, error: impl fmt::Display) -> Self {
        Self {
            event_id: event.id,
            stream: event.stream.as_str().to_owned(),
            version: event.version,
            position: event.position,
            event_type: event.event_type.clone(),
            error: error.to_string(),
        }
    }
}

/// What applying one batch did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Where the checkpoint goes: the last event handled (applied, ignored or parked).
    pub checkpoint: Option<Position>,
    /// Orders whose read model changed, for live notifications.
    pub order_ids: Vec<Uuid>,
    pub parked: Vec<Parked>,
    /// Under `Stop`: the poisoned event; nothing at or after it was applied.
    pub stopped: Option<Parked>,
    /// Whether any read-model row changed: not when every event was at or below its row's
    /// version (a replay, or a dead letter retried after later events of its stream).
    pub changed: bool,
}

/// Positions travel as two `bigint` columns; stored numbers are never negative.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    v.max(0) as u64
}
