//! The order-fulfilment saga: a pure state machine from placement to confirmation or
//! cancellation, one instance per order.
//!
//! ```text
//! OrderPlaced -> reserve every line -> all reserved -> mark stock reserved + request charge
//!   -> charged -> mark paid + confirm -> confirmed -> notify  -> shipped -> ship stock
//! any reservation rejected -> cancel "out of stock"    -+
//! a product with no answer by the stock deadline        |
//!   -> cancel "stock not reserved in time"              |
//! payment declined -> cancel "payment declined"         +-> release every reservation held,
//! not charged by the payment deadline -> cancel         |   refund if (ever) charged
//! cancelled by the customer -> (nothing more to cancel) +
//! ```
//!
//! A cancel the saga sends while a charge may have gone through unseen (the deadline passed
//! with an attempt unanswered) is compensated only once the order's `OrderCancelled` arrives:
//! the order refuses it once shipped, and the saga then ships the stock instead.
//!
//! # Driving it (the runner's loop)
//!
//! Route each recorded event to its order with [`order_of`] (events that return `None` are not
//! the saga's business), load that order's [`FulfilmentState`] (`Default` for a new one), then:
//!
//! ```text
//! let input = SagaInput::Event(&event);         // or SagaInput::Tick { now } on a timer
//! let (next, commands) = fulfilment::step_at(state, &input, now);
//! send every command, in order, to its aggregate (Command::stream names it);
//! state = next;
//! store state (it is Serialize + Deserialize) with the log position, in one transaction.
//! ```
//!
//! Sending before storing makes delivery at-least-once: after a crash the event is fed again to
//! the old state, and the same commands go out again. Every command the saga sends is idempotent
//! at its aggregate, so that is harmless. A `Rejection` of a saga command means the aggregate
//! moved on (say, the customer cancelled meanwhile): log it and continue; the saga compensates when
//! the event that moved it arrives. The state is a set of facts plus a record of what was sent, so
//! events may also arrive late, twice or out of order: nothing is sent twice, no reservation is
//! left behind, no second charge is requested while one may succeed.
//!
//! Deadlines are data, not timers: `stock_due_at`, `payment_due_at` and `retry_due_at` live in
//! the state, and a [`SagaInput::Tick`] with the current time lets the saga act on them. The
//! runner ticks every active saga periodically (see [`FulfilmentState::next_due_at`]). The saga
//! never reads the clock: deadlines are judged on the latest time it has seen, and commands
//! are stamped with that or, when later, the time the runner says it handles the input
//! ([`step_at`]), so a deadline a command starts never begins in the past.
//!
//! The stock deadline is for answers the saga may never see by itself (the step of a product's
//! event parked for good, or skipped by an operator): once it passes, the runner reads what the
//! products hold for the order ([`FulfilmentState::stock_to_check`]) and feeds that in as
//! [`SagaInput::StockChecked`], before the tick. A hold found counts like its event (the saga
//! goes on to the charge, or cancels out of stock, or releases it while cancelling); a product
//! with no hold for the order then never gets one, and the order is cancelled. The clock alone
//! never cancels for missing stock.
//!
//! The same wait guards the end: while an order cancelled or shipped has not settled (a
//! reservation's, release's or shipment's answer, a refund or a payment outcome not seen), the
//! runner reads the products whose answer it has not seen, and the payment's stream, a stock
//! deadline later (`settle_due_at`), then after waits that double each time (up to 256 stock
//! deadlines), until it has, or until nothing is left that a read could bring. The saga
//! otherwise reads nothing once the order ended, and an answer whose step was parked, then
//! skipped, would leave it open for good.
//!
//! The state can also be rebuilt instead of stored: replay the order's events up to the
//! checkpoint (order, its product reservations, its payment) through `evolve`, discarding the
//! commands; whatever a tick decided but never got into the log, the next tick decides again.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use orderly_event_schemas::orders::CancelledBy;
use orderly_event_schemas::{Event, OrderEvent, PaymentEvent, ProductEvent};
use serde::{Deserialize, Serialize};

use crate::order::OrderCommand;
use crate::payment::PaymentCommand;
use crate::product::{Hold, ProductCommand};
use crate::streams;
use crate::values::{
    CustomerId, GatewayReference, Money, OrderId, PaymentToken, Quantity, Reason, Sku,
};

/// How long after the first charge request the order may stay unpaid before it is cancelled.
pub const PAYMENT_DEADLINE: TimeDelta = TimeDelta::minutes(15);

/// How long after sending its reservations (at placement, or whenever a saga catching up
/// handles it) the saga waits for the products' answers before it asks the products itself
/// (see [`SagaInput::StockChecked`]). Answers take milliseconds; this is for an answer the
/// saga will not see by itself (its step parked, or skipped by an operator).
pub const STOCK_DEADLINE: TimeDelta = TimeDelta::minutes(5);

/// How long after a transient failure the next charge attempt is requested, before the growth
/// per attempt and the jitter of [`Timing::retry_delay`].
pub const RETRY_AFTER: TimeDelta = TimeDelta::seconds(30);

/// The wait doubles with each failed attempt up to this many times `retry_after`: fewer calls
/// to a provider that stays down, while an order still sees a recovered provider within two
/// minutes (with the defaults) and gets several attempts before its deadline.
const MAX_RETRY_GROWTH: i64 = 4;

/// The settle check's wait doubles after each check that left the saga waiting, at most this
/// many times: 256 stock deadlines (21 hours with the default). A saga that waits for good (a
/// refund dead-lettered, a product that forgot the order) is read a few times a day, not
/// every few minutes, and stays in the census for an operator.
const MAX_SETTLE_DOUBLINGS: u32 = 8;

/// How far a retry's wait may move either side of its nominal value, in per mille (±20 %).
const RETRY_JITTER_PER_MILLE: i64 = 200;

/// The saga's waiting times. `Default` is [`PAYMENT_DEADLINE`], [`RETRY_AFTER`] and
/// [`STOCK_DEADLINE`]; a runner may configure others (tests shorten them so a deadline passes
/// in seconds). Stored in the state, so a saga keeps the times it started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    pub payment_deadline_ms: i64,
    pub retry_after_ms: i64,
    /// States stored before the stock deadline existed read as the default.
    #[serde(default = "default_stock_deadline_ms")]
    pub stock_deadline_ms: i64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            payment_deadline_ms: PAYMENT_DEADLINE.num_milliseconds(),
            retry_after_ms: RETRY_AFTER.num_milliseconds(),
            stock_deadline_ms: default_stock_deadline_ms(),
        }
    }
}

fn default_stock_deadline_ms() -> i64 {
    STOCK_DEADLINE.num_milliseconds()
}

/// `at` plus `wait`, or the end of the calendar when that is past it: times come from events
/// and waits from settings, and a corrupt or extreme one must not panic a step. Such a
/// deadline never comes; the order waits on its other inputs (and an operator, who sees it
/// among the unsettled instances).
fn after(at: DateTime<Utc>, wait: TimeDelta) -> DateTime<Utc> {
    at.checked_add_signed(wait)
        .unwrap_or(if wait < TimeDelta::zero() {
            DateTime::<Utc>::MIN_UTC
        } else {
            DateTime::<Utc>::MAX_UTC
        })
}

/// `ms` milliseconds, no fewer than none.
fn millis(ms: i64) -> TimeDelta {
    TimeDelta::try_milliseconds(ms.max(0)).unwrap_or(TimeDelta::MAX)
}

impl Timing {
    fn payment_deadline(self) -> TimeDelta {
        millis(self.payment_deadline_ms)
    }

    fn stock_deadline(self) -> TimeDelta {
        millis(self.stock_deadline_ms)
    }

    /// The wait before the settle check that follows `checks` earlier ones: the stock
    /// deadline, doubled per check up to [`MAX_SETTLE_DOUBLINGS`] times.
    fn settle_wait(self, checks: u32) -> TimeDelta {
        let factor = 1_i64 << checks.min(MAX_SETTLE_DOUBLINGS);
        millis(self.stock_deadline_ms.max(0).saturating_mul(factor))
    }

    /// How long after attempt `attempt` failed the next one is requested: `retry_after`,
    /// doubled for each earlier failure up to [`MAX_RETRY_GROWTH`] times, then moved by up to
    /// ±20 % by a hash of the order and the attempt.
    ///
    /// Orders that failed together (a provider blip, a restart that replays a backlog) must
    /// not come back together, or their retries arrive in waves that look like an outage.
    /// The spread is derived, not drawn: the saga stays pure, and a state rebuilt from the log
    /// gets the same deadlines.
    pub fn retry_delay(self, order_id: OrderId, attempt: u32) -> TimeDelta {
        let doublings = attempt.saturating_sub(1).min(MAX_RETRY_GROWTH.ilog2());
        let nominal = self.retry_after_ms.max(0).saturating_mul(1 << doublings);
        let offset = jitter_per_mille(order_id, attempt);
        // nominal * offset / 1000 in i128: no overflow whatever the configured wait.
        let moved = i128::from(nominal) * i128::from(offset) / 1000;
        let delay = i128::from(nominal) + moved;
        millis(i64::try_from(delay).unwrap_or(i64::MAX))
    }
}

/// A stable hash of the order and attempt, in `-RETRY_JITTER_PER_MILLE..=RETRY_JITTER_PER_MILLE`.
/// SplitMix64's finalizer, written out (not `std::hash`, whose output may change between Rust
/// releases) so a stored deadline and a rebuilt one agree.
fn jitter_per_mille(order_id: OrderId, attempt: u32) -> i64 {
    let id = order_id.0.as_u128();
    let mut z =
        (id as u64) ^ ((id >> 64) as u64) ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let span = 2 * RETRY_JITTER_PER_MILLE.unsigned_abs() + 1;
    // Below `span` (401): the cast cannot wrap.
    (z % span) as i64 - RETRY_JITTER_PER_MILLE
}

/// What the saga reacts to: a recorded event, or the passing of time.
///
/// Borrows the event: the runner already holds it, and the saga keeps only the facts it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaInput<'a> {
    Event(&'a Event),
    Tick {
        now: DateTime<Utc>,
    },
    /// What the products hold for this order, read by the runner at `now` because the stock
    /// deadline passed (see [`FulfilmentState::stock_to_check`]): each product's answer counts
    /// like the event that recorded it, which the saga may never see (its step parked or
    /// skipped). A product missing from `holds` has not answered.
    StockChecked {
        now: DateTime<Utc>,
        holds: &'a [(Sku, Hold)],
    },
}

/// Something the saga wants done: a command for one aggregate, or a message for the customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Order {
        order_id: OrderId,
        command: OrderCommand,
    },
    Product {
        sku: Sku,
        command: ProductCommand,
    },
    Payment {
        order_id: OrderId,
        command: PaymentCommand,
    },
    Notify(Notification),
}

impl Command {
    /// The stream the command is decided against; `None` for notifications.
    pub fn stream(&self) -> Option<String> {
        match self {
            Command::Order { order_id, .. } => Some(streams::order(*order_id)),
            Command::Product { sku, .. } => Some(streams::product(sku)),
            Command::Payment { order_id, .. } => Some(streams::payment(*order_id)),
            Command::Notify(_) => None,
        }
    }
}

/// Messages for the customer; delivered by a notifier port, at least once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    OrderConfirmed {
        order_id: OrderId,
        customer_id: CustomerId,
    },
}

/// What the saga knows about one line's stock, from the product's events. Later facts win over
/// earlier ones whatever order they arrive in (see `rank`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Stock {
    #[default]
    Unknown,
    Reserved,
    Rejected,
    Released,
    Shipped,
}

impl Stock {
    fn rank(self) -> u8 {
        match self {
            Stock::Unknown => 0,
            Stock::Reserved | Stock::Rejected => 1,
            Stock::Released | Stock::Shipped => 2,
        }
    }

    fn merge(self, fact: Stock) -> Stock {
        if fact.rank() > self.rank() {
            fact
        } else {
            self
        }
    }
}

impl From<Hold> for Stock {
    fn from(hold: Hold) -> Self {
        match hold {
            Hold::Reserved { .. } => Stock::Reserved,
            Hold::Rejected => Stock::Rejected,
            Hold::Released => Stock::Released,
            Hold::Shipped => Stock::Shipped,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Line {
    /// `None` until `OrderPlaced` arrives (a product event may come first).
    quantity: Option<Quantity>,
    stock: Stock,
    reserve_sent: bool,
    release_sent: bool,
    ship_sent: bool,
}

impl Line {
    /// Its reservation was sent and no answer seen.
    fn unanswered(&self) -> bool {
        self.reserve_sent && self.stock == Stock::Unknown
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Placed {
    customer_id: CustomerId,
    total: Money,
    payment_token: PaymentToken,
    /// Sent with the reservations: a product refuses one for an order placed before the
    /// settled orders it has forgotten. `None` in states stored before it was kept.
    #[serde(default)]
    placed_at: Option<DateTime<Utc>>,
}

/// Facts from the order's own stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct OrderFacts {
    cancelled: bool,
    shipped: bool,
    /// The order's `OrderConfirmed` was seen: only then is the customer told, since the
    /// saga's confirm may be refused (the customer cancelled while the charge was on its
    /// way). States stored before it was kept read `false`; they had told the customer with
    /// the confirm already (`sent.notified`), so nothing is sent twice.
    #[serde(default)]
    confirmed: bool,
}

/// Facts from the payment stream; each only ever grows, so arrival order does not matter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PaymentFacts {
    /// Highest attempt that failed transiently.
    failed: u32,
    charged: Option<GatewayReference>,
    declined: bool,
    refunded: bool,
}

/// What the saga has already sent, so a redelivered or reordered input sends nothing twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Sent {
    stock_reserved: bool,
    /// Highest charge attempt requested; the next retry is this + 1. A request seen in the
    /// payment stream counts too (a state rebuilt from the log), so this is also the highest
    /// attempt the log holds: the saga appends a request before it stores that it sent it.
    /// Older stored states also hold a copy of it (`payment.requested`), ignored when read.
    charge_attempt: u32,
    paid: bool,
    confirmed: bool,
    notified: bool,
    cancel: bool,
    refund: bool,
}

/// One order's saga state. Opaque on purpose: the runner only stores it and hands it back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FulfilmentState {
    order_id: Option<OrderId>,
    placed: Option<Placed>,
    lines: BTreeMap<Sku, Line>,
    order: OrderFacts,
    payment: PaymentFacts,
    sent: Sent,
    payment_due_at: Option<DateTime<Utc>>,
    retry_due_at: Option<DateTime<Utc>>,
    /// When the runner asks the products for answers not seen yet: from when the
    /// reservations were sent, and only while one is unanswered (a state rebuilt from the log
    /// agrees once they are all answered, whenever they were sent).
    #[serde(default)]
    stock_due_at: Option<DateTime<Utc>>,
    /// The products were asked at or after `stock_due_at` (or `settle_due_at`): a line still
    /// unanswered then was never reserved, and the order is cancelled (if it was not). Only
    /// an answer read from the products cancels so, never the clock alone.
    #[serde(default)]
    stock_checked: bool,
    /// When the runner reads again what an order that ended (cancelled or shipped) still waits
    /// for: the products' answers it has not seen, its payment from its
    /// stream (see [`FulfilmentState::stock_to_check`]). Set a stock deadline after the order
    /// ended, again after each such check (see [`MAX_SETTLE_DOUBLINGS`]), while the saga has
    /// not settled and waits for an answer a read could bring; `None` otherwise.
    #[serde(default)]
    settle_due_at: Option<DateTime<Utc>>,
    /// Settle checks made so far; each doubles the wait before the next.
    #[serde(default)]
    settle_checks: u32,
    /// When the runner acts on an order fact whose own step was parked (a cancel, a shipment):
    /// the fact is recorded, what it calls for not sent, and no other deadline may come (a
    /// confirmed order has none). Cleared by the next step that runs, which sends it.
    #[serde(default)]
    parked_due_at: Option<DateTime<Utc>>,
    /// Latest time seen in any input; deadlines are checked against it.
    clock: Option<DateTime<Utc>>,
    /// States stored before timings were configurable read as the defaults.
    #[serde(default)]
    timing: Timing,
}

impl FulfilmentState {
    /// A new saga that waits as `timing` says instead of the defaults.
    pub fn with_timing(timing: Timing) -> Self {
        Self {
            timing,
            ..Self::default()
        }
    }

    pub fn order_id(&self) -> Option<OrderId> {
        self.order_id
    }

    /// Whether `self` and `other` hold the same facts, sends and deadlines, whatever their
    /// clocks say. A step that moved nothing but the clock (the echo of a command the saga
    /// sent itself: `OrderStockReserved`, `OrderPaid`) need not be stored:
    /// the clock only ever grows, and a state whose clock lags decides the same, except that
    /// a deadline it could judge from the lost time waits for the next input (a tick brings
    /// the time anyway). Listed field by field, so a new field must say which side it is on.
    pub fn same_apart_from_clock(&self, other: &Self) -> bool {
        let Self {
            order_id,
            placed,
            lines,
            order,
            payment,
            sent,
            payment_due_at,
            retry_due_at,
            stock_due_at,
            stock_checked,
            settle_due_at,
            settle_checks,
            parked_due_at,
            clock: _,
            timing,
        } = self;
        *order_id == other.order_id
            && *placed == other.placed
            && *lines == other.lines
            && *order == other.order
            && *payment == other.payment
            && *sent == other.sent
            && *payment_due_at == other.payment_due_at
            && *retry_due_at == other.retry_due_at
            && *stock_due_at == other.stock_due_at
            && *stock_checked == other.stock_checked
            && *settle_due_at == other.settle_due_at
            && *settle_checks == other.settle_checks
            && *parked_due_at == other.parked_due_at
            && *timing == other.timing
    }

    /// When a tick could next make the saga act; `None` when no deadline is pending. The runner
    /// uses it to schedule ticks instead of ticking every saga.
    pub fn next_due_at(&self) -> Option<DateTime<Utc>> {
        if self.is_settled() {
            return None;
        }
        // Also while cancelling: a reservation answered unseen must still be given back.
        let stock_due = self.awaiting_stock().then_some(self.stock_due_at).flatten();
        let due = if self.order.cancelled || self.sent.cancel || self.payment.charged.is_some() {
            stock_due
        } else {
            [self.pending_retry_at(), self.payment_due_at, stock_due]
                .into_iter()
                .flatten()
                .min()
        };
        [due, self.parked_due_at, self.settle_due_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// The products whose answer for this order the runner must read and feed back as
    /// [`SagaInput::StockChecked`] before a tick at `now`:
    ///
    /// - once the stock deadline has passed (cancelling or not), the lines whose reservation
    ///   is unanswered; none before it, none once a charge was requested (every line was
    ///   answered then) and none after one such check;
    /// - once the settle check is due (an order ended, not settled), the lines whose answer
    ///   a read may still bring (see [`Self::awaits_stock_answer`]).
    pub fn stock_to_check(&self, now: DateTime<Utc>) -> Vec<Sku> {
        let reservations = self.awaiting_stock() && self.stock_due_at.is_some_and(|due| now >= due);
        let settlements = self.settle_due_at.is_some_and(|due| now >= due);
        self.lines
            .iter()
            .filter(|(_, line)| {
                (reservations && line.unanswered())
                    || (settlements && self.awaits_stock_answer(line))
            })
            .map(|(sku, _)| sku.clone())
            .collect()
    }

    /// Whether a product's answer for `line` may still come that the saga has not seen: its
    /// stock held and a release or shipment sent, or no answer seen and the products not
    /// asked yet, whatever the saga recorded as sent, and also after a charge was requested.
    /// A step that sent its commands (a reservation, the charge) and then failed before its
    /// state was stored leaves answers in the log the saga only sees if the step is fed again;
    /// parked and skipped, it never is.
    fn awaits_stock_answer(&self, line: &Line) -> bool {
        let sent_back = line.stock == Stock::Reserved && (line.release_sent || line.ship_sent);
        sent_back || self.unasked(line)
    }

    /// No answer for `line` seen, and the products not asked yet: it may hold stock.
    fn unasked(&self, line: &Line) -> bool {
        line.stock == Stock::Unknown && !self.stock_checked
    }

    /// Reservations were sent, some unanswered, and no charge requested yet.
    fn stock_unanswered(&self) -> bool {
        self.sent.charge_attempt == 0 && self.lines.values().any(Line::unanswered)
    }

    /// [`Self::stock_unanswered`], and the products not yet asked after the stock deadline: a
    /// product with no answer then never gets a reservation from this saga, so there is
    /// nothing more to wait for.
    fn awaiting_stock(&self) -> bool {
        !self.stock_checked && self.stock_unanswered()
    }

    /// What a tick on this state at the deadline `due` is named (with the order id, it names the
    /// tick's commands): the deadline and what was sent before it. A tick repeated on the same
    /// state (a crash before it was stored) decides the same commands under the same names, so
    /// they are written once; a tick on a state that has sent more since decides other
    /// commands (a cancel after a retry), under other names.
    pub fn tick_name(&self, due: DateTime<Utc>) -> String {
        format!(
            "tick/{}/{}/{}",
            due.timestamp_millis(),
            self.sent.charge_attempt,
            u8::from(self.sent.cancel)
        )
    }

    /// What the step that acts on a fact kept from a parked step ([`act_on_parked`]) is named;
    /// `None` when no such fact waits. Named by its due time, so the step repeated after a
    /// crash sends the same command ids.
    pub fn parked_name(&self) -> Option<String> {
        self.parked_due_at
            .map(|due| format!("parked/{}", due.timestamp_millis()))
    }

    /// When the next charge attempt is due: only while the last one sent has failed. Once the
    /// retry is sent its time is history, not a deadline; left in, it would make every tick
    /// until the answer come back to this saga for nothing.
    fn pending_retry_at(&self) -> Option<DateTime<Utc>> {
        let attempt = self.sent.charge_attempt;
        (attempt > 0 && self.payment.failed == attempt)
            .then_some(self.retry_due_at)
            .flatten()
    }

    /// The charge attempt sent whose outcome the saga has not seen: neither charged, declined
    /// nor failed. The runner withdraws it from the outbox when the order is cancelled before
    /// it went out.
    pub fn unanswered_charge(&self) -> Option<u32> {
        let attempt = self.sent.charge_attempt;
        (attempt > self.payment.failed && self.payment.charged.is_none() && !self.payment.declined)
            .then_some(attempt)
    }

    /// Nothing more will ever be sent: the order is delivered, or cancelled with every
    /// reservation given back and any charge refunded. The runner may archive the state.
    pub fn is_settled(&self) -> bool {
        if self.placed.is_none() {
            return false;
        }
        let ended = self.order.cancelled;
        // A reservation with no answer seen may hold stock until the products are asked,
        // before the charge (`awaiting_stock`) or after it (see `awaits_stock_answer`).
        let unasked = self.lines.values().any(|line| self.unasked(line));
        let nothing_held = !unasked
            && self
                .lines
                .values()
                .all(|line| line.stock != Stock::Reserved);
        let delivered =
            self.order.shipped && self.lines.values().all(|line| line.stock == Stock::Shipped);
        delivered || (ended && nothing_held && self.money_settled())
    }

    /// No money taken that was not given back, and no charge attempt still unanswered.
    fn money_settled(&self) -> bool {
        (self.payment.charged.is_none() || self.payment.refunded)
            && self.unanswered_charge().is_none()
    }

    /// The order ended (cancelled or shipped), its saga has not settled, and an answer it
    /// waits for may be read again: a product's (see [`Self::awaits_stock_answer`]), or the
    /// payment's (a refund, a charge's outcome) of a cancelled order. A saga that waits for
    /// nothing a read could bring (a product gave back stock the order shipped) is left to an
    /// operator rather than read for ever.
    fn awaits_answers(&self) -> bool {
        let ended = self.order.cancelled || self.order.shipped;
        let stock = self
            .lines
            .values()
            .any(|line| self.awaits_stock_answer(line));
        let money = self.order.cancelled && !self.money_settled();
        ended && !self.is_settled() && (stock || money)
    }
}

/// Where a saga instance is, for operators: derived from the state, never stored in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Placed, reservations outstanding.
    Reserving,
    /// Charge requested, not yet charged (declined or past the deadline until the cancel).
    AwaitingPayment,
    /// Charged or confirmed, not shipped: waits on the warehouse, so it may last days.
    AwaitingShipment,
    /// Shipped, reserved stock not all shipped yet.
    Shipping,
    /// Cancelling: releasing stock or refunding.
    Compensating,
    /// Settled: delivered.
    Delivered,
    /// Settled: cancelled, everything given back.
    Cancelled,
}

impl Phase {
    /// The open phases, in the order a saga goes through them.
    pub const OPEN: [Phase; 5] = [
        Phase::Reserving,
        Phase::AwaitingPayment,
        Phase::AwaitingShipment,
        Phase::Shipping,
        Phase::Compensating,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Reserving => "reserving",
            Phase::AwaitingPayment => "awaiting_payment",
            Phase::AwaitingShipment => "awaiting_shipment",
            Phase::Shipping => "shipping",
            Phase::Compensating => "compensating",
            Phase::Delivered => "delivered",
            Phase::Cancelled => "cancelled",
        }
    }
}

impl FulfilmentState {
    /// The phase this instance is in.
    pub fn phase(&self) -> Phase {
        if self.is_settled() {
            return if self.order.cancelled {
                Phase::Cancelled
            } else {
                Phase::Delivered
            };
        }
        if self.order.cancelled || self.sent.cancel || self.sent.refund {
            Phase::Compensating
        } else if self.order.shipped {
            Phase::Shipping
        } else if self.sent.confirmed || self.payment.charged.is_some() {
            Phase::AwaitingShipment
        } else if self.sent.charge_attempt > 0 {
            Phase::AwaitingPayment
        } else {
            Phase::Reserving
        }
    }
}

/// The order an event belongs to, for routing it to a saga; `None` for catalog events.
pub fn order_of(event: &Event) -> Option<OrderId> {
    match event {
        Event::Order(event) => Some(match event {
            OrderEvent::OrderPlaced(e) => e.order_id,
            OrderEvent::OrderStockReserved(e) => e.order_id,
            OrderEvent::OrderPaid(e) => e.order_id,
            OrderEvent::OrderConfirmed(e) => e.order_id,
            OrderEvent::OrderCancelled(e) => e.order_id,
            OrderEvent::OrderShipped(e) => e.order_id,
            OrderEvent::OrderDelivered(e) => e.order_id,
        }),
        Event::Product(event) => match event {
            ProductEvent::ProductRegistered(_)
            | ProductEvent::ProductRestocked(_)
            | ProductEvent::ProductPriceChanged(_) => None,
            ProductEvent::StockReserved(e) => Some(e.order_id),
            ProductEvent::StockReservationRejected(e) => Some(e.order_id),
            ProductEvent::StockReservationReleased(e) => Some(e.order_id),
            ProductEvent::ReservedStockShipped(e) => Some(e.order_id),
        },
        Event::Payment(event) => Some(match event {
            PaymentEvent::PaymentChargeRequested(e) => e.order_id,
            PaymentEvent::PaymentCharged(e) => e.order_id,
            PaymentEvent::PaymentDeclined(e) => e.order_id,
            PaymentEvent::PaymentFailed(e) => e.order_id,
            PaymentEvent::PaymentRefunded(e) => e.order_id,
        }),
    }
}

/// The commands `input` calls for, given the saga's state before it.
pub fn react(state: &FulfilmentState, input: &SagaInput<'_>) -> Vec<Command> {
    step(state.clone(), input).1
}

/// The saga's state after `input` (and after sending what [`react`] returned for it).
pub fn evolve(state: FulfilmentState, input: &SagaInput<'_>) -> FulfilmentState {
    step(state, input).0
}

/// `react` and `evolve` in one pass, for runners that want both.
pub fn step(state: FulfilmentState, input: &SagaInput<'_>) -> (FulfilmentState, Vec<Command>) {
    step_inner(state, input, None)
}

/// [`step`] for a runner that handles `input` at `handled_at` on its own clock: commands are
/// stamped, and the deadlines they start (the payment deadline of a first charge) run, from
/// the later of that and the latest time the saga has seen. Deadlines are still judged on the
/// times seen (events, ticks), never on `handled_at`.
///
/// Without it a saga catching up on a backlog (after an outage) would stamp a first charge
/// with the time of the order's old events, and the payment deadline would have passed
/// before the charge was even sent: every order placed more than a deadline before the
/// saga came back would be cancelled at its first tick.
pub fn step_at(
    state: FulfilmentState,
    input: &SagaInput<'_>,
    handled_at: DateTime<Utc>,
) -> (FulfilmentState, Vec<Command>) {
    step_inner(state, input, Some(handled_at))
}

/// The state to keep when the step of `input` failed for good and its event was parked: the
/// state as it was, so the facts can be fed again (an operator's retry) and a deadline already
/// running reads what the step may have done (the stock deadline the products, the payment
/// deadline the payment). Two exceptions, facts no deadline reads:
///
/// - The order's `OrderPlaced`, whose state before was empty, with no deadline to settle the
///   order: the placement is kept with its reservations counted as sent (some may have been,
///   before the failure), so the stock deadline asks the products. The order goes on if every
///   product holds its line, and is cancelled "stock not reserved in time", with what is held
///   given back, if one does not.
/// - A cancel or a shipment of a placed order: the fact is kept, what it calls for (stock and
///   money given back, reserved stock shipped) not marked sent, and the runner's tick sends it
///   after the pause of a failed charge's first retry. A confirmed order has no deadline that
///   would: its customer's money and its stock would wait for an operator.
pub fn parked(
    mut state: FulfilmentState,
    input: &SagaInput<'_>,
    handled_at: DateTime<Utc>,
) -> FulfilmentState {
    if state.placed.is_none() && placement(input) {
        return step_at(state, input, handled_at).0;
    }
    let order_fact = matches!(
        input,
        SagaInput::Event(Event::Order(
            OrderEvent::OrderCancelled(_) | OrderEvent::OrderShipped(_)
        ))
    );
    if let (true, Some(order_id), Some(_)) = (order_fact, state.order_id, &state.placed) {
        let at = state
            .clock
            .map_or(handled_at, |clock| clock.max(handled_at));
        observe(&mut state, input);
        state.parked_due_at = Some(after(at, state.timing.retry_delay(order_id, 1)));
    }
    state
}

/// [`step_at`] for an operator's retry of a parked event. A retried `OrderPlaced` sends its
/// reservations again while one is unanswered: its first step may have failed before sending
/// it ([`parked`] counted it as sent). All of them, as the first step did, so each command
/// keeps its place in the step and with it its id (ids follow the causing event and the
/// place): a reservation that went through the first time is not written twice, and a
/// product answers one it holds already with nothing new. Not once a charge was requested or
/// the products were asked at the stock deadline (every line was answered then, one way or
/// the other), nor while cancelling.
pub fn step_retried(
    mut state: FulfilmentState,
    input: &SagaInput<'_>,
    handled_at: DateTime<Utc>,
) -> (FulfilmentState, Vec<Command>) {
    let cancelling = state.order.cancelled || state.sent.cancel;
    if placement(input) && state.awaiting_stock() && !cancelling {
        for line in state.lines.values_mut() {
            line.reserve_sent = false;
        }
    }
    step_at(state, input, handled_at)
}

fn placement(input: &SagaInput<'_>) -> bool {
    matches!(
        input,
        SagaInput::Event(Event::Order(OrderEvent::OrderPlaced(_)))
    )
}

fn step_inner(
    mut state: FulfilmentState,
    input: &SagaInput<'_>,
    handled_at: Option<DateTime<Utc>>,
) -> (FulfilmentState, Vec<Command>) {
    if !observe(&mut state, input) {
        return (state, Vec::new());
    }
    decide(state, handled_at)
}

/// What a fact kept from a parked step (see [`parked`]) calls for, and the state once it is
/// sent; nothing when no such fact waits. A runner sends it under its own name
/// ([`FulfilmentState::parked_name`]) before feeding the state events it saw before (a tick
/// reads the payment's stream again): fed again, an event must decide what it decided the first
/// time, or its commands would take the ids of other ones.
pub fn act_on_parked(
    state: FulfilmentState,
    handled_at: DateTime<Utc>,
) -> (FulfilmentState, Vec<Command>) {
    if state.parked_due_at.is_none() {
        return (state, Vec::new());
    }
    decide(state, Some(handled_at))
}

/// The commands the state's facts call for, and the state once they are sent.
fn decide(
    mut state: FulfilmentState,
    handled_at: Option<DateTime<Utc>>,
) -> (FulfilmentState, Vec<Command>) {
    let commands = plan(&mut state, handled_at);
    // Whatever a parked fact called for went out with this step's commands.
    state.parked_due_at = None;
    if !state.stock_unanswered() {
        state.stock_due_at = None;
    }
    schedule_settle_check(&mut state, handled_at);
    (state, commands)
}

/// Starts the settle check of an order that ended (see `settle_due_at`) a stock deadline from
/// now, and once it has passed (a check was made at it), starts the next one after twice the
/// last wait; drops it once nothing is left that a check could read (see
/// [`FulfilmentState::awaits_answers`]).
///
/// A step that brings a time past the check without a check (an event stamped later than it)
/// moves it on too: that check then comes one wait later.
fn schedule_settle_check(state: &mut FulfilmentState, handled_at: Option<DateTime<Utc>>) {
    let Some(clock) = state.clock.filter(|_| state.awaits_answers()) else {
        state.settle_due_at = None;
        return;
    };
    match state.settle_due_at {
        Some(due) if clock < due => {}
        passed => {
            if passed.is_some() {
                state.settle_checks = state.settle_checks.saturating_add(1);
            }
            let from = handled_at.map_or(clock, |handled_at| clock.max(handled_at));
            state.settle_due_at = Some(after(from, state.timing.settle_wait(state.settle_checks)));
        }
    }
}

/// Records the facts `input` carries; `false` (state untouched) when it is not this saga's.
fn observe(state: &mut FulfilmentState, input: &SagaInput<'_>) -> bool {
    let event = match input {
        SagaInput::Tick { now } => {
            state.clock = state.clock.max(Some(*now));
            return true;
        }
        SagaInput::StockChecked { now, holds } => {
            observe_holds(state, *now, holds);
            return true;
        }
        SagaInput::Event(event) => event,
    };
    let Some(order_id) = order_of(event) else {
        return false;
    };
    if state.order_id.is_some_and(|known| known != order_id) {
        return false;
    }
    state.order_id = Some(order_id);
    let at = match event {
        Event::Order(event) => observe_order(state, event),
        Event::Product(event) => observe_product(state, event),
        Event::Payment(event) => observe_payment(state, event),
    };
    state.clock = state.clock.max(at);
    true
}

fn observe_order(state: &mut FulfilmentState, event: &OrderEvent) -> Option<DateTime<Utc>> {
    match event {
        OrderEvent::OrderPlaced(placed) => {
            state.placed = Some(Placed {
                customer_id: placed.customer_id.clone(),
                total: placed.total,
                payment_token: placed.payment_token.clone(),
                placed_at: Some(placed.placed_at),
            });
            for line in &placed.lines {
                state.lines.entry(line.sku.clone()).or_default().quantity = Some(line.quantity);
            }
            Some(placed.placed_at)
        }
        // The saga sent these itself; it acts on the facts behind them, not on the echo.
        OrderEvent::OrderStockReserved(e) => Some(e.stock_reserved_at),
        OrderEvent::OrderPaid(e) => Some(e.paid_at),
        OrderEvent::OrderConfirmed(e) => {
            state.order.confirmed = true;
            Some(e.confirmed_at)
        }
        OrderEvent::OrderCancelled(cancelled) => {
            state.order.cancelled = true;
            if cancelled.cancelled_by == CancelledBy::Fulfilment {
                state.sent.cancel = true;
            }
            Some(cancelled.cancelled_at)
        }
        OrderEvent::OrderShipped(shipped) => {
            state.order.shipped = true;
            Some(shipped.shipped_at)
        }
        OrderEvent::OrderDelivered(e) => Some(e.delivered_at),
    }
}

fn observe_product(state: &mut FulfilmentState, event: &ProductEvent) -> Option<DateTime<Utc>> {
    let (sku, fact, at) = match event {
        ProductEvent::ProductRegistered(_)
        | ProductEvent::ProductRestocked(_)
        | ProductEvent::ProductPriceChanged(_) => return None,
        ProductEvent::StockReserved(e) => (&e.sku, Stock::Reserved, e.reserved_at),
        ProductEvent::StockReservationRejected(e) => (&e.sku, Stock::Rejected, e.rejected_at),
        ProductEvent::StockReservationReleased(e) => (&e.sku, Stock::Released, e.released_at),
        ProductEvent::ReservedStockShipped(e) => (&e.sku, Stock::Shipped, e.shipped_at),
    };
    let line = state.lines.entry(sku.clone()).or_default();
    line.stock = line.stock.merge(fact);
    Some(at)
}

/// The products' answers read at `now`, merged like their events; holds for products this
/// order has no line of are ignored.
fn observe_holds(state: &mut FulfilmentState, now: DateTime<Utc>, holds: &[(Sku, Hold)]) {
    state.clock = state.clock.max(Some(now));
    for (sku, hold) in holds {
        if let Some(line) = state.lines.get_mut(sku) {
            line.stock = line.stock.merge(Stock::from(*hold));
        }
    }
    // A line still unanswered after either check was never reserved (see `stock_checked`).
    let passed = |due: Option<DateTime<Utc>>| due.is_some_and(|due| now >= due);
    if passed(state.stock_due_at) || passed(state.settle_due_at) {
        state.stock_checked = true;
    }
}

fn observe_payment(state: &mut FulfilmentState, event: &PaymentEvent) -> Option<DateTime<Utc>> {
    let payment = &mut state.payment;
    match event {
        PaymentEvent::PaymentChargeRequested(requested) => {
            // Rebuilding from the log: the request is proof it was sent. The saga's own
            // request echoed back changes nothing (its deadline is the one set when sending).
            state.sent.charge_attempt = state.sent.charge_attempt.max(requested.attempt);
            if requested.attempt == 1 {
                state.payment_due_at = Some(after(
                    requested.requested_at,
                    state.timing.payment_deadline(),
                ));
            }
            Some(requested.requested_at)
        }
        PaymentEvent::PaymentCharged(charged) => {
            payment.charged = Some(charged.gateway_reference.clone());
            Some(charged.charged_at)
        }
        PaymentEvent::PaymentDeclined(declined) => {
            payment.declined = true;
            Some(declined.declined_at)
        }
        PaymentEvent::PaymentFailed(failed) => {
            if failed.attempt > payment.failed {
                payment.failed = failed.attempt;
                let wait = state.timing.retry_delay(failed.order_id, failed.attempt);
                state.retry_due_at = Some(after(failed.failed_at, wait));
            }
            Some(failed.failed_at)
        }
        PaymentEvent::PaymentRefunded(refunded) => {
            payment.refunded = true;
            Some(refunded.refunded_at)
        }
    }
}

/// Why the saga must cancel the order, if it must.
fn failure(state: &FulfilmentState) -> Option<&'static str> {
    if state
        .lines
        .values()
        .any(|line| line.stock == Stock::Rejected)
    {
        return Some("out of stock");
    }
    if state.stock_checked && state.stock_unanswered() {
        return Some("stock not reserved in time");
    }
    if state.payment.charged.is_some() {
        return None;
    }
    if state.payment.declined {
        return Some("payment declined");
    }
    let overdue = state
        .payment_due_at
        .is_some_and(|due| state.clock.is_some_and(|now| now >= due));
    overdue.then_some("payment not completed before the deadline")
}

/// Whether a charge may have gone through: one was seen, or one was requested whose answer
/// (charged, declined, failed) the saga has not seen.
///
/// A failed attempt counts as answered although its outcome is unknown (a timed-out call may
/// have charged): waiting on it could last until the provider is back, and the stock would
/// stay reserved meanwhile. Once the order is cancelled the outbox asks the provider about
/// that attempt and records a charge it finds; the compensation below refunds it like any
/// charge that arrives after the cancel.
fn charge_may_have_succeeded(state: &FulfilmentState) -> bool {
    state.payment.charged.is_some()
        || (!state.payment.declined && state.payment.failed < state.sent.charge_attempt)
}

/// Every command the facts call for that has not been sent yet, marking each as sent: a
/// cancel when a step failed, then either compensation or the next steps forward
/// (reservations, the charge, payment and confirmation, shipping the reserved stock).
fn plan(state: &mut FulfilmentState, handled_at: Option<DateTime<Utc>>) -> Vec<Command> {
    let mut commands = Vec::new();
    let (Some(order_id), Some(placed), Some(clock)) =
        (state.order_id, state.placed.clone(), state.clock)
    else {
        // Facts that arrive before `OrderPlaced` wait for it; nothing can be decided without it.
        return commands;
    };
    let plan = Plan {
        order_id,
        placed: &placed,
        at: handled_at.map_or(clock, |handled_at| clock.max(handled_at)),
        clock,
    };
    plan.cancel_on_failure(state, &mut commands);
    if state.sent.cancel && !state.order.cancelled && charge_may_have_succeeded(state) {
        // The order decides: a charge the saga has not seen (a crash lost it, or its event is
        // still on the way) may have led to a paid, confirmed or shipped order, which refuses
        // the saga's cancel. Releasing or refunding now would take stock and money from such
        // an order; they follow the order's `OrderCancelled`, and on `OrderShipped` the saga
        // goes on.
        if !state.order.shipped {
            return commands;
        }
    } else if state.order.cancelled || state.sent.cancel {
        plan.compensate(state, &mut commands);
        return commands;
    }
    plan.reserve(state, &mut commands);
    plan.charge(state, &mut commands);
    plan.confirm(state, &mut commands);
    plan.ship(state, &mut commands);
    commands
}

/// What every step of [`plan`] needs: whose order, what was placed, and the time decided at.
struct Plan<'p> {
    order_id: OrderId,
    placed: &'p Placed,
    /// When the commands are decided: what they are stamped with, and where a deadline they
    /// start begins.
    at: DateTime<Utc>,
    /// The latest time seen, which judges whether a deadline has passed (see [`step_at`]).
    clock: DateTime<Utc>,
}

impl Plan<'_> {
    fn order(&self, command: OrderCommand) -> Command {
        Command::Order {
            order_id: self.order_id,
            command,
        }
    }

    fn payment(&self, command: PaymentCommand) -> Command {
        Command::Payment {
            order_id: self.order_id,
            command,
        }
    }

    /// A step that failed (see [`failure`]) cancels the order, once, unless it shipped.
    fn cancel_on_failure(&self, state: &mut FulfilmentState, commands: &mut Vec<Command>) {
        if state.order.cancelled || state.sent.cancel || state.order.shipped {
            return;
        }
        if let Some(reason) = failure(state) {
            state.sent.cancel = true;
            commands.push(self.order(OrderCommand::Cancel {
                cancellation_reason: fixed_reason(reason),
                cancelled_by: CancelledBy::Fulfilment,
                cancelled_at: self.at,
            }));
        }
    }

    /// Reservations still in flight are released when their event arrives; a charge still in
    /// flight is refunded when it succeeds. No new charge is ever requested. The refund comes
    /// first: the runner sends a step's commands in order and stops at one that fails (but for
    /// a release, after which it still sends the other releases), and a customer's money must
    /// not wait on a product's stream.
    fn compensate(&self, state: &mut FulfilmentState, commands: &mut Vec<Command>) {
        if state.payment.charged.is_some() && !state.payment.refunded && !state.sent.refund {
            state.sent.refund = true;
            commands.push(self.payment(PaymentCommand::Refund {
                reason: fixed_reason("order cancelled"),
                refunded_at: self.at,
            }));
        }
        for (sku, line) in &mut state.lines {
            if line.stock == Stock::Reserved && !line.release_sent {
                line.release_sent = true;
                commands.push(Command::Product {
                    sku: sku.clone(),
                    command: ProductCommand::ReleaseReservation {
                        order_id: self.order_id,
                        released_at: self.at,
                    },
                });
            }
        }
    }

    /// Every line's stock is reserved once (which starts the stock deadline); when all are,
    /// the order is told so.
    fn reserve(&self, state: &mut FulfilmentState, commands: &mut Vec<Command>) {
        for (sku, line) in &mut state.lines {
            if let (Some(quantity), false) = (line.quantity, line.reserve_sent) {
                line.reserve_sent = true;
                state
                    .stock_due_at
                    .get_or_insert(after(self.at, state.timing.stock_deadline()));
                commands.push(Command::Product {
                    sku: sku.clone(),
                    command: ProductCommand::ReserveStock {
                        order_id: self.order_id,
                        quantity,
                        reserved_at: self.at,
                        placed_at: self.placed.placed_at,
                    },
                });
            }
        }
        if all_reserved(state) && !state.sent.stock_reserved {
            state.sent.stock_reserved = true;
            commands.push(self.order(OrderCommand::MarkStockReserved {
                stock_reserved_at: self.at,
            }));
        }
    }

    /// The first charge once all stock is reserved (which starts the payment deadline), and
    /// another attempt when a failed one's retry is due; none after a charge or a decline.
    fn charge(&self, state: &mut FulfilmentState, commands: &mut Vec<Command>) {
        let retry_due = state
            .pending_retry_at()
            .is_some_and(|due| self.clock >= due);
        let first_charge = all_reserved(state) && state.sent.charge_attempt == 0;
        if state.payment.charged.is_some() || state.payment.declined || !(first_charge || retry_due)
        {
            return;
        }
        state.sent.charge_attempt += 1;
        if first_charge {
            state.payment_due_at = Some(after(self.at, state.timing.payment_deadline()));
        }
        commands.push(self.payment(PaymentCommand::RequestCharge {
            order_id: self.order_id,
            amount: self.placed.total,
            payment_token: self.placed.payment_token.clone(),
            attempt: state.sent.charge_attempt,
            requested_at: self.at,
        }));
    }

    /// Once charged: the order is marked paid and confirmed; once confirmed (the order may
    /// refuse it), the customer is told.
    fn confirm(&self, state: &mut FulfilmentState, commands: &mut Vec<Command>) {
        let Some(gateway_reference) = state.payment.charged.clone() else {
            return;
        };
        if !state.sent.paid {
            state.sent.paid = true;
            commands.push(self.order(OrderCommand::MarkPaid {
                amount: self.placed.total,
                gateway_reference,
                paid_at: self.at,
            }));
        }
        if !state.sent.confirmed {
            state.sent.confirmed = true;
            commands.push(self.order(OrderCommand::Confirm {
                confirmed_at: self.at,
            }));
        }
        if state.order.confirmed && !state.sent.notified {
            state.sent.notified = true;
            commands.push(Command::Notify(Notification::OrderConfirmed {
                order_id: self.order_id,
                customer_id: self.placed.customer_id.clone(),
            }));
        }
    }

    /// A shipped order takes its reserved stock out of the warehouse.
    fn ship(&self, state: &mut FulfilmentState, commands: &mut Vec<Command>) {
        if !state.order.shipped {
            return;
        }
        for (sku, line) in &mut state.lines {
            if line.stock == Stock::Reserved && !line.ship_sent {
                line.ship_sent = true;
                commands.push(Command::Product {
                    sku: sku.clone(),
                    command: ProductCommand::ShipReservedStock {
                        order_id: self.order_id,
                        shipped_at: self.at,
                    },
                });
            }
        }
    }
}

/// Whether every line's stock is reserved (or already shipped).
fn all_reserved(state: &FulfilmentState) -> bool {
    state.lines.values().all(|line| {
        line.quantity.is_some() && matches!(line.stock, Stock::Reserved | Stock::Shipped)
    })
}

/// The saga's own reasons (its runner's too) are short literals that always pass
/// `Reason::parse`.
pub fn fixed_reason(text: &'static str) -> Reason {
    Reason::parse(text).unwrap_or_else(|_| unreachable!("{text:?} is a valid reason"))
}

#[cfg(test)]
mod tests {
    use orderly_event_schemas::orders::*;
    use orderly_event_schemas::payments::*;
    use orderly_event_schemas::products::*;

    use super::*;
    use crate::testing::fixtures::*;
    use crate::testing::saga::{Step, given};

    const ORDER: u128 = 1;

    fn tea() -> Sku {
        sku("TEA")
    }

    fn mug() -> Sku {
        sku("MUG")
    }

    fn placed() -> Step {
        let line = |code: &str, quantity: u32, unit: i64| OrderLine {
            sku: sku(code),
            name: name(code),
            quantity: qty(quantity),
            unit_price: eur(unit),
            line_total: eur(unit * i64::from(quantity)),
        };
        OrderPlaced {
            order_id: order_id(ORDER),
            customer_id: customer(),
            lines: vec![line("TEA", 2, 650), line("MUG", 1, 1200)],
            total: eur(2500),
            shipping_address: address(),
            payment_token: token("tok_ok"),
            placed_at: at(0),
        }
        .into()
    }

    fn reserved(sku: Sku, quantity: u32) -> Step {
        StockReserved {
            sku,
            order_id: order_id(ORDER),
            quantity: qty(quantity),
            reserved_at: at(1),
        }
        .into()
    }

    fn rejected(sku: Sku) -> Step {
        StockReservationRejected {
            sku,
            order_id: order_id(ORDER),
            quantity: qty(1),
            available: 0,
            rejected_at: at(1),
        }
        .into()
    }

    fn charge_requested(attempt: u32, minute: i64) -> Step {
        PaymentChargeRequested {
            order_id: order_id(ORDER),
            amount: eur(2500),
            payment_token: token("tok_ok"),
            attempt,
            requested_at: at(minute),
        }
        .into()
    }

    fn charged(minute: i64) -> Step {
        PaymentCharged {
            order_id: order_id(ORDER),
            amount: eur(2500),
            gateway_reference: reference("ch_1"),
            charged_at: at(minute),
        }
        .into()
    }

    fn failed(attempt: u32, minute: i64) -> Step {
        PaymentFailed {
            order_id: order_id(ORDER),
            reason: reason("gateway timed out"),
            attempt,
            failed_at: at(minute),
        }
        .into()
    }

    fn declined() -> Step {
        PaymentDeclined {
            order_id: order_id(ORDER),
            reason: reason("insufficient funds"),
            declined_at: at(2),
        }
        .into()
    }

    fn confirmed(minute: i64) -> Step {
        OrderConfirmed {
            order_id: order_id(ORDER),
            confirmed_at: at(minute),
        }
        .into()
    }

    fn cancelled_by_customer(minute: i64) -> Step {
        OrderCancelled {
            order_id: order_id(ORDER),
            cancellation_reason: reason("changed my mind"),
            cancelled_by: CancelledBy::Customer,
            cancelled_at: at(minute),
        }
        .into()
    }

    fn tick(minute: i64) -> Step {
        Step::Tick(at(minute))
    }

    /// Placed, both lines reserved, first charge requested at minute 1.
    fn awaiting_payment() -> Vec<Step> {
        vec![
            placed(),
            reserved(tea(), 2),
            reserved(mug(), 1),
            charge_requested(1, 1),
        ]
    }

    fn awaiting_payment_and<const N: usize>(more: [Step; N]) -> Vec<Step> {
        awaiting_payment().into_iter().chain(more).collect()
    }

    fn reserve(sku: Sku, quantity: u32, minute: i64) -> Command {
        Command::Product {
            sku,
            command: ProductCommand::ReserveStock {
                order_id: order_id(ORDER),
                quantity: qty(quantity),
                reserved_at: at(minute),
                placed_at: Some(at(0)),
            },
        }
    }

    fn release(sku: Sku, minute: i64) -> Command {
        Command::Product {
            sku,
            command: ProductCommand::ReleaseReservation {
                order_id: order_id(ORDER),
                released_at: at(minute),
            },
        }
    }

    fn order(command: OrderCommand) -> Command {
        Command::Order {
            order_id: order_id(ORDER),
            command,
        }
    }

    fn request_charge(attempt: u32, minute: i64) -> Command {
        Command::Payment {
            order_id: order_id(ORDER),
            command: PaymentCommand::RequestCharge {
                order_id: order_id(ORDER),
                amount: eur(2500),
                payment_token: token("tok_ok"),
                attempt,
                requested_at: at(minute),
            },
        }
    }

    fn cancel(why: &str, minute: i64) -> Command {
        order(OrderCommand::Cancel {
            cancellation_reason: reason(why),
            cancelled_by: CancelledBy::Fulfilment,
            cancelled_at: at(minute),
        })
    }

    fn refund(minute: i64) -> Command {
        Command::Payment {
            order_id: order_id(ORDER),
            command: PaymentCommand::Refund {
                reason: reason("order cancelled"),
                refunded_at: at(minute),
            },
        }
    }

    #[test]
    fn placing_an_order_reserves_every_line() {
        // Lines come out in SKU order: the state keeps them in a sorted map.
        given([])
            .when(placed())
            .then([reserve(mug(), 1, 0), reserve(tea(), 2, 0)]);
    }

    #[test]
    fn a_state_stored_before_placement_times_were_kept_still_reads() {
        let (state, _) = placed().apply(FulfilmentState::default());
        assert_eq!(state.placed.as_ref().unwrap().placed_at, Some(at(0)));
        let mut stored = serde_json::to_value(&state).unwrap();
        stored["placed"]
            .as_object_mut()
            .unwrap()
            .remove("placed_at");
        let read: FulfilmentState = serde_json::from_value(stored).unwrap();
        // Its reservations, if it sends any again, go without one: decided as before.
        assert_eq!(read.placed.unwrap().placed_at, None);
    }

    #[test]
    fn one_line_reserved_of_two_asks_for_nothing_yet() {
        given([placed()]).when(reserved(tea(), 2)).then_nothing();
    }

    #[test]
    fn all_lines_reserved_marks_the_order_and_requests_the_charge() {
        given([placed(), reserved(tea(), 2)])
            .when(reserved(mug(), 1))
            .then([
                order(OrderCommand::MarkStockReserved {
                    stock_reserved_at: at(1),
                }),
                request_charge(1, 1),
            ]);
    }

    #[test]
    fn a_charged_payment_marks_the_order_paid_and_confirms_it() {
        given(awaiting_payment()).when(charged(2)).then([
            order(OrderCommand::MarkPaid {
                amount: eur(2500),
                gateway_reference: reference("ch_1"),
                paid_at: at(2),
            }),
            order(OrderCommand::Confirm {
                confirmed_at: at(2),
            }),
        ]);
    }

    #[test]
    fn a_confirmed_order_notifies_the_customer_once() {
        let notify = Command::Notify(Notification::OrderConfirmed {
            order_id: order_id(ORDER),
            customer_id: customer(),
        });
        given(awaiting_payment_and([charged(2)]))
            .when(confirmed(2))
            .then([notify]);
        given(awaiting_payment_and([charged(2), confirmed(2)]))
            .when(confirmed(2))
            .then([]);
    }

    #[test]
    fn a_charge_seen_after_the_customer_cancelled_refunds_and_notifies_nobody() {
        // The charge went through while the customer cancelled: the saga's confirm is
        // refused by the order, so no confirmation mail may go out.
        given(awaiting_payment_and([charged(2)]))
            .when(cancelled_by_customer(3))
            .then([refund(3), release(mug(), 3), release(tea(), 3)]);
    }

    #[test]
    fn a_rejected_reservation_releases_the_others_and_cancels_out_of_stock() {
        given([placed(), reserved(tea(), 2)])
            .when(rejected(mug()))
            .then([cancel("out of stock", 1), release(tea(), 1)]);
    }

    #[test]
    fn a_reservation_that_arrives_after_an_out_of_stock_cancel_is_released() {
        given([placed(), rejected(mug())])
            .when(reserved(tea(), 2))
            .then([release(tea(), 1)]);
    }

    #[test]
    fn a_declined_payment_releases_everything_and_cancels() {
        given(awaiting_payment()).when(declined()).then([
            cancel("payment declined", 2),
            release(mug(), 2),
            release(tea(), 2),
        ]);
    }

    /// The wait the saga gives attempt `attempt` of this test's order after it failed.
    fn retry_delay(attempt: u32) -> TimeDelta {
        Timing::default().retry_delay(order_id(ORDER), attempt)
    }

    #[test]
    fn a_transient_failure_is_retried_on_the_first_tick_after_the_backoff() {
        let state = given(awaiting_payment_and([failed(1, 2)]))
            .when(tick(2))
            .then_nothing();
        let now = at(2) + retry_delay(1);
        let early = fulfilment_react(&state, now - TimeDelta::milliseconds(1));
        assert_eq!(early, vec![], "not before its jittered wait");
        let retry = fulfilment_react(&state, now);
        assert_eq!(
            retry,
            vec![Command::Payment {
                order_id: order_id(ORDER),
                command: PaymentCommand::RequestCharge {
                    order_id: order_id(ORDER),
                    amount: eur(2500),
                    payment_token: token("tok_ok"),
                    attempt: 2,
                    requested_at: now,
                },
            }]
        );
    }

    fn fulfilment_react(state: &FulfilmentState, now: DateTime<Utc>) -> Vec<Command> {
        react(state, &SagaInput::Tick { now })
    }

    #[test]
    fn a_retry_once_sent_is_no_longer_a_deadline_but_the_payment_deadline_is() {
        let retried = given(awaiting_payment_and([failed(1, 2)]))
            .when(charge_requested(2, 3))
            .then_nothing();
        // Not the first retry's time, which has passed: every tick would pick the saga up again,
        // and a tick's commands are named after the deadline it acts on.
        assert_eq!(
            retried.next_due_at(),
            Some(at(1) + Timing::default().payment_deadline())
        );
    }

    #[test]
    fn ticks_at_one_deadline_that_decide_other_commands_have_other_names() {
        let failed_once = given(awaiting_payment_and([failed(1, 2)]))
            .when(tick(2))
            .then_nothing();
        let due = failed_once.next_due_at().unwrap();
        let retried = folded(&awaiting_payment_and([
            failed(1, 2),
            charge_requested(2, 3),
        ]));
        // A tick at the retry's time sends the retry; one on a state that already holds the
        // retry (say the first crashed before it was stored) sends the cancel at the deadline.
        assert_ne!(failed_once.tick_name(due), retried.tick_name(due));
        // The state as stored, read back after a crash: the same tick, the same names.
        let stored: FulfilmentState =
            serde_json::from_str(&serde_json::to_string(&failed_once).unwrap()).unwrap();
        assert_eq!(stored.tick_name(due), failed_once.tick_name(due));
    }

    #[test]
    fn each_further_failure_waits_longer_up_to_four_times_the_backoff() {
        let second = given(awaiting_payment_and([failed(1, 2), charge_requested(2, 3)]))
            .when(failed(2, 4))
            .then_nothing();
        assert_eq!(second.next_due_at(), Some(at(4) + retry_delay(2)));
        // Each wait over its nominal value stays within the jitter's ±20 %.
        for (attempt, growth) in [(1, 1), (2, 2), (3, 4), (4, 4), (9, 4)] {
            let nominal = RETRY_AFTER * growth;
            let delay = retry_delay(attempt);
            assert!(
                delay >= nominal * 4 / 5 && delay <= nominal * 6 / 5,
                "attempt {attempt}: {delay} for a nominal {nominal}"
            );
        }
    }

    #[test]
    fn retries_of_orders_that_failed_together_are_spread_over_the_jitter() {
        let timing = Timing::default();
        let delays: Vec<TimeDelta> = (1..=200u128)
            .map(|n| timing.retry_delay(order_id(n), 1))
            .collect();
        let (low, high) = (RETRY_AFTER * 4 / 5, RETRY_AFTER * 6 / 5);
        assert!(
            delays.iter().all(|d| (low..=high).contains(d)),
            "{delays:?}"
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 150, "{} distinct waits", distinct.len());
        // Both ends of the window are used, not a narrow band around the middle.
        let early = delays.iter().filter(|d| **d < RETRY_AFTER * 9 / 10).count();
        let late = delays
            .iter()
            .filter(|d| **d > RETRY_AFTER * 11 / 10)
            .count();
        assert!(early > 20 && late > 20, "{early} early, {late} late");
        // The same order and attempt always wait the same, whichever `Timing` value with the
        // same settings computes it (a rebuilt state, another process): a pure function of the
        // order and the attempt. Attempt 3 waits four times the base, moved by at most ±20 %.
        let copied = timing;
        for n in [7u128, 8, 9, u128::MAX] {
            let delay = timing.retry_delay(order_id(n), 3);
            assert_eq!(delay, Timing::default().retry_delay(order_id(n), 3));
            assert_eq!(delay, copied.retry_delay(order_id(n), 3));
            let nominal = RETRY_AFTER * 4;
            assert!(
                delay >= nominal * 4 / 5 && delay <= nominal * 6 / 5,
                "order {n}: {delay} for a nominal {nominal}"
            );
        }
        // ... and another order, same attempt, waits otherwise (for some pair at least).
        assert!(
            [8u128, 9, u128::MAX]
                .iter()
                .any(|n| timing.retry_delay(order_id(*n), 3) != timing.retry_delay(order_id(7), 3)),
            "the jitter ignores the order"
        );
        assert_ne!(
            timing.retry_delay(order_id(7), 1),
            timing.retry_delay(order_id(7), 2)
        );
    }

    #[test]
    fn a_retry_already_requested_is_not_requested_again() {
        given(awaiting_payment_and([failed(1, 2), charge_requested(2, 3)]))
            .when(tick(4))
            .then_nothing();
    }

    #[test]
    fn a_payment_still_failing_at_its_deadline_releases_everything_and_cancels() {
        given(awaiting_payment_and([
            failed(1, 2),
            charge_requested(2, 3),
            failed(2, 4),
        ]))
        .when(tick(16))
        .then([
            cancel("payment not completed before the deadline", 16),
            release(mug(), 16),
            release(tea(), 16),
        ]);
    }

    /// A crash can lose the saga's record of a charge whose commands (paid, confirm) went out:
    /// the order may be confirmed and shipped while the saga still waits for the payment.
    #[test]
    fn a_deadline_cancel_with_an_unanswered_charge_releases_only_once_the_order_is_cancelled() {
        given(awaiting_payment())
            .when(tick(16))
            .then([cancel("payment not completed before the deadline", 16)]);
        let cancelled = OrderCancelled {
            order_id: order_id(ORDER),
            cancellation_reason: reason("payment not completed before the deadline"),
            cancelled_by: CancelledBy::Fulfilment,
            cancelled_at: at(17),
        };
        given(awaiting_payment_and([tick(16)]))
            .when(cancelled)
            .then([release(mug(), 17), release(tea(), 17)]);
    }

    #[test]
    fn a_deadline_cancel_refused_because_the_order_shipped_ships_the_stock_and_refunds_nothing() {
        given(awaiting_payment_and([tick(16)]))
            .when(shipped(17))
            .then([ship(mug(), 17), ship(tea(), 17)]);
    }

    fn stock_checked<const N: usize>(minute: i64, holds: [(Sku, Hold); N]) -> Step {
        Step::StockChecked(at(minute), holds.to_vec())
    }

    fn held(quantity: u32) -> Hold {
        Hold::Reserved {
            quantity: qty(quantity),
        }
    }

    /// Minutes after placement (and sending the reservations) at which the stock deadline
    /// passes.
    const STOCK_DUE: i64 = STOCK_DEADLINE.num_minutes();

    #[test]
    fn an_unanswered_reservation_is_asked_of_its_product_once_the_stock_deadline_passes() {
        let waiting = given([placed()]).when(reserved(tea(), 2)).then_nothing();
        assert_eq!(waiting.next_due_at(), Some(at(STOCK_DUE)));
        assert!(waiting.stock_to_check(at(STOCK_DUE - 1)).is_empty());
        assert_eq!(waiting.stock_to_check(at(STOCK_DUE)), vec![mug()]);
        let charging = given(awaiting_payment()).when(tick(2)).then_nothing();
        assert!(charging.stock_to_check(at(STOCK_DUE)).is_empty());
    }

    #[test]
    fn a_reservation_found_at_its_product_after_the_stock_deadline_goes_on_to_the_charge() {
        given([placed(), reserved(tea(), 2)])
            .when(stock_checked(STOCK_DUE, [(mug(), held(1))]))
            .then([
                order(OrderCommand::MarkStockReserved {
                    stock_reserved_at: at(STOCK_DUE),
                }),
                request_charge(1, STOCK_DUE),
            ]);
    }

    #[test]
    fn a_refusal_found_at_its_product_after_the_stock_deadline_cancels_out_of_stock() {
        given([placed(), reserved(tea(), 2)])
            .when(stock_checked(STOCK_DUE, [(mug(), Hold::Rejected)]))
            .then([cancel("out of stock", STOCK_DUE), release(tea(), STOCK_DUE)]);
    }

    #[test]
    fn a_reservation_no_product_answered_by_the_stock_deadline_cancels_and_releases_the_rest() {
        let cancelled = given([placed(), reserved(tea(), 2)])
            .when(stock_checked(STOCK_DUE, []))
            .then([
                cancel("stock not reserved in time", STOCK_DUE),
                release(tea(), STOCK_DUE),
            ]);
        assert_eq!(cancelled.next_due_at(), None);
        // The answer that comes after all is given back.
        given([placed(), reserved(tea(), 2), stock_checked(STOCK_DUE, [])])
            .when(reserved(mug(), 1))
            .then([release(mug(), STOCK_DUE)]);
    }

    #[test]
    fn a_reservation_answered_unseen_while_cancelling_is_released_at_the_stock_deadline() {
        let cancelling = given([placed()])
            .when(rejected(mug()))
            .then([cancel("out of stock", 1)]);
        assert!(!cancelling.is_settled(), "the tea may be held");
        assert_eq!(cancelling.next_due_at(), Some(at(STOCK_DUE)));
        given([placed(), rejected(mug())])
            .when(stock_checked(STOCK_DUE, [(tea(), held(2))]))
            .then([release(tea(), STOCK_DUE)]);
    }

    #[test]
    fn a_cancelled_order_whose_products_never_answered_is_settled_once_they_are_asked() {
        let asked = given([placed(), cancelled_by_customer(1)])
            .when(stock_checked(STOCK_DUE, []))
            .then_nothing();
        assert!(asked.is_settled());
        assert_eq!(asked.next_due_at(), None);
        assert!(asked.stock_to_check(at(STOCK_DUE + 1)).is_empty());
    }

    #[test]
    fn the_stock_deadline_runs_from_when_the_reservations_are_sent() {
        let (reserving, commands) =
            super::step_at(FulfilmentState::default(), &placed().input(), at(60));
        assert_eq!(commands, [reserve(mug(), 1, 60), reserve(tea(), 2, 60)]);
        assert_eq!(reserving.next_due_at(), Some(at(60) + STOCK_DEADLINE));
    }

    #[test]
    fn a_placement_whose_step_failed_waits_for_the_stock_deadline_as_if_it_had_reserved() {
        let parked = given([]).when(placed().parked_at(at(0))).then_nothing();
        assert_eq!(parked.next_due_at(), Some(at(STOCK_DUE)));
        assert!(!parked.is_settled());
        assert_eq!(parked.stock_to_check(at(STOCK_DUE)), vec![mug(), tea()]);
    }

    #[test]
    fn a_placement_whose_step_failed_is_cancelled_at_the_stock_deadline_if_a_line_is_not_held() {
        given([placed().parked_at(at(0))])
            .when(stock_checked(STOCK_DUE, [(mug(), held(1))]))
            .then([
                cancel("stock not reserved in time", STOCK_DUE),
                release(mug(), STOCK_DUE),
            ]);
    }

    #[test]
    fn a_placement_whose_step_failed_goes_on_at_the_stock_deadline_if_every_line_is_held() {
        given([placed().parked_at(at(0))])
            .when(stock_checked(
                STOCK_DUE,
                [(mug(), held(1)), (tea(), held(2))],
            ))
            .then([
                order(OrderCommand::MarkStockReserved {
                    stock_reserved_at: at(STOCK_DUE),
                }),
                request_charge(1, STOCK_DUE),
            ]);
    }

    #[test]
    fn a_retried_placement_sends_its_reservations_again_while_one_is_unanswered() {
        // The mug's again too, in its place: its product holds it already and decides nothing.
        given([placed().parked_at(at(0)), reserved(mug(), 1)])
            .when(placed().retried_at(at(3)))
            .then([reserve(mug(), 1, 3), reserve(tea(), 2, 3)]);
        // Answered, charged for, or being cancelled: nothing to send again.
        given(awaiting_payment())
            .when(placed().retried_at(at(3)))
            .then_nothing();
        given([placed(), reserved(mug(), 1), cancelled_by_customer(2)])
            .when(placed().retried_at(at(3)))
            .then_nothing();
        given([placed(), stock_checked(STOCK_DUE, [(mug(), held(1))])])
            .when(placed().retried_at(at(STOCK_DUE + 1)))
            .then_nothing();
    }

    #[test]
    fn a_step_that_failed_after_the_placement_leaves_the_state_as_it_was() {
        let before = folded(&[placed()]);
        let step = reserved(tea(), 2);
        assert_eq!(super::parked(before.clone(), &step.input(), at(1)), before);
    }

    #[test]
    fn a_state_handled_late_equals_one_rebuilt_from_the_log_once_its_stock_is_answered() {
        let log = [
            placed(),
            reserved(tea(), 2),
            reserved(mug(), 1),
            charge_requested(1, 60),
        ];
        let stored = log.iter().fold(FulfilmentState::default(), |state, step| {
            super::step_at(state, &step.input(), at(60)).0
        });
        assert!(stored.same_apart_from_clock(&folded(&log)));
    }

    #[test]
    fn only_the_products_answer_cancels_for_missing_stock_never_the_clock_alone() {
        given([placed(), reserved(tea(), 2)])
            .when(tick(STOCK_DUE + 60))
            .then_nothing();
        given([placed(), reserved(tea(), 2)])
            .when(stock_checked(STOCK_DUE - 1, []))
            .then_nothing();
    }

    #[test]
    fn a_charge_handled_long_after_its_events_starts_its_deadline_when_it_is_sent() {
        let reserving = folded(&[placed(), reserved(tea(), 2)]);
        let (charging, commands) = super::step_at(reserving, &reserved(mug(), 1).input(), at(60));
        assert_eq!(
            commands,
            [
                order(OrderCommand::MarkStockReserved {
                    stock_reserved_at: at(60),
                }),
                request_charge(1, 60),
            ]
        );
        assert_eq!(charging.next_due_at(), Some(at(60) + PAYMENT_DEADLINE));
        // Its echo, stamped at the same time, keeps the deadline (a state rebuilt from the log
        // gets the same).
        let echoed = evolve(charging.clone(), &charge_requested(1, 60).input());
        assert_eq!(echoed.next_due_at(), charging.next_due_at());
    }

    #[test]
    fn an_old_event_handled_late_judges_no_deadline_on_the_handling_time() {
        let waiting = folded(&awaiting_payment());
        let late = at(1) + PAYMENT_DEADLINE + TimeDelta::hours(1);
        let (_, commands) = super::step_at(waiting, &failed(1, 2).input(), late);
        assert_eq!(
            commands,
            [],
            "neither the retry nor the deadline is due at minute 2"
        );
    }

    #[test]
    fn a_tick_before_any_deadline_does_nothing() {
        given(awaiting_payment()).when(tick(10)).then_nothing();
    }

    #[test]
    fn a_customer_cancel_before_payment_releases_the_reservations() {
        given(awaiting_payment())
            .when(cancelled_by_customer(5))
            .then([release(mug(), 5), release(tea(), 5)]);
    }

    #[test]
    fn a_cancelled_order_waits_for_the_answer_to_a_charge_it_sent_before_it_is_settled() {
        // The charge was sent when the stock was reserved; its request is not seen yet.
        let history = [
            placed(),
            reserved(tea(), 2),
            reserved(mug(), 1),
            cancelled_by_customer(5),
            released(tea(), 2, 6),
            released(mug(), 1, 6),
        ];
        let given_back = folded(&history);
        assert!(!given_back.is_settled(), "a charge may still go through");
        let answered = evolve(given_back, &failed(1, 7).input());
        assert!(answered.is_settled());
    }

    #[test]
    fn only_a_charge_attempt_sent_and_not_answered_is_unanswered() {
        let sent = folded(&awaiting_payment());
        assert_eq!(sent.unanswered_charge(), Some(1));
        let failed_once = evolve(sent.clone(), &failed(1, 3).input());
        assert_eq!(failed_once.unanswered_charge(), None);
        let retried = evolve(failed_once, &charge_requested(2, 4).input());
        assert_eq!(retried.unanswered_charge(), Some(2));
        assert_eq!(
            evolve(retried, &charged(5).input()).unanswered_charge(),
            None
        );
        assert_eq!(evolve(sent, &declined().input()).unanswered_charge(), None);
    }

    #[test]
    fn a_customer_cancel_after_payment_refunds_and_releases() {
        given(awaiting_payment_and([charged(2)]))
            .when(cancelled_by_customer(5))
            .then([refund(5), release(mug(), 5), release(tea(), 5)]);
    }

    fn released(sku: Sku, quantity: u32, minute: i64) -> Step {
        StockReservationReleased {
            sku,
            order_id: order_id(ORDER),
            quantity: qty(quantity),
            released_at: at(minute),
        }
        .into()
    }

    fn refunded(minute: i64) -> Step {
        PaymentRefunded {
            order_id: order_id(ORDER),
            amount: eur(2500),
            gateway_reference: reference("ch_1"),
            reason: reason("order cancelled"),
            refunded_at: at(minute),
        }
        .into()
    }

    /// Minutes after which the settle check of an order cancelled at minute 5 is due.
    const SETTLE_DUE: i64 = 5 + STOCK_DEADLINE.num_minutes();

    #[test]
    fn a_release_whose_answer_was_never_seen_is_read_from_its_product_after_the_cancel() {
        // The tea's answer was parked, then skipped: nothing brings it to the saga again.
        let history = awaiting_payment_and([
            charged(2),
            cancelled_by_customer(5),
            refunded(6),
            released(mug(), 1, 6),
        ]);
        let waiting = folded(&history);
        assert!(!waiting.is_settled());
        assert_eq!(waiting.next_due_at(), Some(at(SETTLE_DUE)));
        assert!(waiting.stock_to_check(at(SETTLE_DUE - 1)).is_empty());
        assert_eq!(waiting.stock_to_check(at(SETTLE_DUE)), vec![tea()]);
        let settled = given(history)
            .when(stock_checked(SETTLE_DUE, [(tea(), Hold::Released)]))
            .then_nothing();
        assert!(settled.is_settled());
        assert_eq!(settled.next_due_at(), None);
    }

    #[test]
    fn a_reservation_answer_never_seen_before_the_charge_is_read_and_released_after_a_cancel() {
        // The mug's answer came back to a step that sent the charge and then failed before
        // its state was stored; fed again, the step was parked, and then skipped.
        let history = || {
            vec![
                placed(),
                reserved(tea(), 2),
                charge_requested(1, 1),
                charged(2),
                cancelled_by_customer(5),
                refunded(6),
                released(tea(), 2, 6),
            ]
        };
        let waiting = folded(&history());
        assert!(!waiting.is_settled(), "the mug may be held");
        assert_eq!(waiting.next_due_at(), Some(at(SETTLE_DUE)));
        assert_eq!(waiting.stock_to_check(at(SETTLE_DUE)), vec![mug()]);
        given(history())
            .when(stock_checked(SETTLE_DUE, [(mug(), held(1))]))
            .then([release(mug(), SETTLE_DUE)]);
        // No hold: the mug was never reserved.
        let asked = given(history())
            .when(stock_checked(SETTLE_DUE, []))
            .then_nothing();
        assert!(asked.is_settled());
        assert_eq!(asked.next_due_at(), None);
    }

    #[test]
    fn a_refund_whose_answer_was_never_seen_keeps_the_settle_check_due_until_it_is_read() {
        let history = || {
            awaiting_payment_and([
                charged(2),
                cancelled_by_customer(5),
                released(mug(), 1, 6),
                released(tea(), 2, 6),
            ])
        };
        let waiting = folded(&history());
        assert!(!waiting.is_settled(), "the money is not back");
        assert_eq!(waiting.next_due_at(), Some(at(SETTLE_DUE)));
        // Nothing to ask the products: the runner reads the payment's stream at every tick.
        assert!(waiting.stock_to_check(at(SETTLE_DUE)).is_empty());
        // Not found by this check (a refund still on its way): the next one comes after twice
        // the wait, sending nothing.
        let checked = given(history()).when(tick(SETTLE_DUE)).then_nothing();
        let next = at(SETTLE_DUE) + STOCK_DEADLINE * 2;
        assert_eq!(checked.next_due_at(), Some(next));
        let found = given(history().into_iter().chain([tick(SETTLE_DUE)]))
            .when(refunded(SETTLE_DUE + 1))
            .then_nothing();
        assert!(found.is_settled());
        assert_eq!(found.next_due_at(), None);
    }

    #[test]
    fn a_saga_that_keeps_waiting_is_read_again_after_waits_that_double_up_to_256_deadlines() {
        // A refund that never comes (dead-lettered, say): each check finds nothing.
        let waiting = folded(&awaiting_payment_and([
            charged(2),
            cancelled_by_customer(5),
            released(mug(), 1, 6),
            released(tea(), 2, 6),
        ]));
        let mut due = waiting.next_due_at().unwrap();
        let mut state = waiting;
        let mut waits = Vec::new();
        for _ in 0..11 {
            state = evolve(state, &SagaInput::Tick { now: due });
            let next = state.next_due_at().unwrap();
            waits.push((next - due).num_minutes() / STOCK_DEADLINE.num_minutes());
            due = next;
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 256, 256, 256]);
        assert!(!state.is_settled());
    }

    #[test]
    fn a_shipment_whose_answer_was_never_seen_is_read_from_its_product_a_stock_deadline_later() {
        let shipped_of = |sku: Sku, quantity: u32| -> Step {
            ReservedStockShipped {
                sku,
                order_id: order_id(ORDER),
                quantity: qty(quantity),
                shipped_at: at(61),
            }
            .into()
        };
        let history = awaiting_payment_and([charged(2), shipped(60), shipped_of(mug(), 1)]);
        let due = at(60) + STOCK_DEADLINE;
        let waiting = folded(&history);
        assert!(!waiting.is_settled());
        assert_eq!(waiting.next_due_at(), Some(due));
        assert_eq!(waiting.stock_to_check(due), vec![tea()]);
        let delivered = given(history)
            .when(Step::StockChecked(due, vec![(tea(), Hold::Shipped)]))
            .then_nothing();
        assert!(delivered.is_settled());
        assert_eq!(delivered.next_due_at(), None);
        // Given back by something else: nothing a later read could bring ships it. The saga
        // stays open for an operator, and reads no more.
        let lost = given(awaiting_payment_and([charged(2), shipped(60)]))
            .when(Step::StockChecked(
                due,
                vec![(tea(), Hold::Shipped), (mug(), Hold::Released)],
            ))
            .then_nothing();
        assert!(!lost.is_settled());
        assert_eq!(lost.next_due_at(), None);
    }

    #[test]
    fn an_order_that_goes_on_or_settles_at_once_has_no_settle_check() {
        assert_eq!(
            folded(&awaiting_payment_and([charged(2)])).next_due_at(),
            None
        );
        let settled = folded(&awaiting_payment_and([
            declined(),
            cancelled_by_customer(5),
            released(mug(), 1, 6),
            released(tea(), 2, 6),
        ]));
        assert!(settled.is_settled());
        assert_eq!(settled.next_due_at(), None);
    }

    #[test]
    fn a_customer_cancel_whose_step_was_parked_is_acted_on_at_the_next_tick_after_a_pause() {
        let parked = given(awaiting_payment_and([charged(2)]))
            .when(cancelled_by_customer(5).parked_at(at(5)))
            .then_nothing();
        // A confirmed order has no other deadline.
        assert_eq!(parked.next_due_at(), Some(at(5) + retry_delay(1)));
        assert!(!parked.is_settled());
        given(awaiting_payment_and([
            charged(2),
            cancelled_by_customer(5).parked_at(at(5)),
        ]))
        .when(tick(6))
        .then([refund(6), release(mug(), 6), release(tea(), 6)]);
    }

    #[test]
    fn a_shipment_whose_step_was_parked_ships_the_stock_at_the_next_tick_after_a_pause() {
        let parked = given(awaiting_payment_and([charged(2)]))
            .when(shipped(60).parked_at(at(60)))
            .then_nothing();
        assert_eq!(parked.next_due_at(), Some(at(60) + retry_delay(1)));
        given(awaiting_payment_and([
            charged(2),
            shipped(60).parked_at(at(60)),
        ]))
        .when(tick(61))
        .then([ship(mug(), 61), ship(tea(), 61)]);
    }

    #[test]
    fn a_parked_fact_is_acted_on_by_itself_under_a_name_of_its_own() {
        let parked = folded(&[
            placed(),
            reserved(tea(), 2),
            reserved(mug(), 1),
            charge_requested(1, 1),
            charged(2),
            cancelled_by_customer(5).parked_at(at(5)),
        ]);
        let name = parked.parked_name().expect("a fact waits");
        let (acted, commands) = super::act_on_parked(parked, at(6));
        assert_eq!(commands, [refund(6), release(mug(), 6), release(tea(), 6)]);
        assert_eq!(acted.parked_name(), None);
        // What is left due is the check of the answers, a stock deadline on.
        assert_eq!(acted.next_due_at(), Some(at(6) + STOCK_DEADLINE));
        // Nothing waits: nothing to send.
        let (_, nothing) = super::act_on_parked(acted, at(7));
        assert!(nothing.is_empty());
        assert!(name.starts_with("parked/"));
    }

    #[test]
    fn a_parked_fact_is_sent_by_the_next_step_whatever_it_is_and_then_due_no_more() {
        let sent = given(awaiting_payment_and([
            cancelled_by_customer(5).parked_at(at(5))
        ]))
        .when(charged(6))
        .then([refund(6), release(mug(), 6), release(tea(), 6)]);
        assert_eq!(sent.parked_name(), None);
        assert_eq!(sent.next_due_at(), Some(at(6) + STOCK_DEADLINE));
    }

    #[test]
    fn a_charge_that_succeeds_after_the_order_was_cancelled_is_refunded() {
        given(awaiting_payment_and([cancelled_by_customer(5)]))
            .when(charged(6))
            .then([refund(6)]);
    }

    /// A timed-out attempt is recorded as failed; after the deadline cancel the outbox asks
    /// the provider, which says it charged after all.
    #[test]
    fn a_charge_found_after_a_deadline_cancel_is_refunded() {
        let cancelled = OrderCancelled {
            order_id: order_id(ORDER),
            cancellation_reason: reason("payment not completed before the deadline"),
            cancelled_by: CancelledBy::Fulfilment,
            cancelled_at: at(17),
        };
        given(awaiting_payment_and([
            failed(1, 2),
            tick(16),
            cancelled.into(),
        ]))
        .when(charged(18))
        .then([refund(18)]);
    }

    #[test]
    fn shipping_the_order_ships_the_reserved_stock() {
        given(awaiting_payment_and([charged(2)]))
            .when(shipped(60))
            .then([ship(mug(), 60), ship(tea(), 60)]);
    }

    fn shipped(minute: i64) -> Step {
        OrderShipped {
            order_id: order_id(ORDER),
            carrier: crate::values::Carrier::parse("DHL").unwrap(),
            tracking_number: crate::values::TrackingNumber::parse("JD0146").unwrap(),
            shipped_at: at(minute),
        }
        .into()
    }

    fn ship(sku: Sku, minute: i64) -> Command {
        Command::Product {
            sku,
            command: ProductCommand::ShipReservedStock {
                order_id: order_id(ORDER),
                shipped_at: at(minute),
            },
        }
    }

    #[test]
    fn a_redelivered_event_sends_nothing() {
        given([placed()]).when(placed()).then_nothing();
        given(awaiting_payment())
            .when(reserved(mug(), 1))
            .then_nothing();
        given(awaiting_payment_and([charged(2)]))
            .when(charged(2))
            .then_nothing();
    }

    #[test]
    fn events_of_another_order_leave_the_state_alone() {
        let before = given([placed()]).when(tick(0)).then_nothing();
        let other = StockReserved {
            sku: tea(),
            order_id: order_id(2),
            quantity: qty(1),
            reserved_at: at(1),
        };
        let after = given([placed()]).when(other).then_nothing();
        assert_eq!(before, after);
    }

    #[test]
    fn reservations_recorded_before_the_order_arrives_are_counted_when_it_does() {
        given([reserved(tea(), 2), reserved(mug(), 1)])
            .when(placed())
            .then([
                reserve(mug(), 1, 1),
                reserve(tea(), 2, 1),
                order(OrderCommand::MarkStockReserved {
                    stock_reserved_at: at(1),
                }),
                request_charge(1, 1),
            ]);
    }

    fn folded(history: &[Step]) -> FulfilmentState {
        history
            .iter()
            .fold(FulfilmentState::default(), |state, step| {
                step.apply(state).0
            })
    }

    #[test]
    fn times_at_the_end_of_the_calendar_do_not_panic_a_step() {
        // A corrupt or extreme time: its deadline saturates instead of overflowing.
        let end = DateTime::<Utc>::MAX_UTC;
        let failed_at_the_end: Step = PaymentFailed {
            order_id: order_id(ORDER),
            reason: reason("gateway timed out"),
            attempt: 1,
            failed_at: end,
        }
        .into();
        let state = folded(&awaiting_payment_and([failed_at_the_end]));
        assert_eq!(state.retry_due_at, Some(end));
        let placed_at_the_end = Step::Tick(end);
        let state = folded(&[placed(), placed_at_the_end, reserved(tea(), 2)]);
        assert!(state.next_due_at().is_some());
    }

    #[test]
    fn the_echoes_of_its_own_commands_move_only_the_clock() {
        let all_reserved = folded(&[placed(), reserved(tea(), 2), reserved(mug(), 1)]);
        let paid = folded(&awaiting_payment_and([charged(2)]));
        let echoes: [(&FulfilmentState, Step); 2] = [
            (
                &all_reserved,
                OrderStockReserved {
                    order_id: order_id(ORDER),
                    stock_reserved_at: at(3),
                }
                .into(),
            ),
            (
                &paid,
                OrderPaid {
                    order_id: order_id(ORDER),
                    amount: eur(2500),
                    gateway_reference: reference("ch_1"),
                    paid_at: at(3),
                }
                .into(),
            ),
        ];
        for (before, echo) in echoes {
            let after = evolve(before.clone(), &echo.input());
            assert_ne!(&after, before, "the clock moved");
            assert!(after.same_apart_from_clock(before));
        }
        // The charge request comes back with the time it was sent at, and so its deadline.
        let requested = evolve(all_reserved.clone(), &charge_requested(1, 1).input());
        assert!(requested.same_apart_from_clock(&all_reserved));
        // Every fact, send or deadline counts; a request the saga had not sent too.
        // (`OrderConfirmed` is one: the customer is told only once it is seen.)
        let moves: [(Vec<Step>, Step); 6] = [
            (vec![placed()], reserved(tea(), 2)),
            (vec![placed(), reserved(tea(), 2)], reserved(mug(), 1)),
            (vec![placed()], charge_requested(1, 1)),
            (awaiting_payment(), charged(2)),
            (awaiting_payment(), failed(1, 2)),
            (awaiting_payment_and([charged(2)]), confirmed(3)),
        ];
        for (history, next) in moves {
            let before = folded(&history);
            let after = evolve(before.clone(), &next.input());
            assert!(!after.same_apart_from_clock(&before));
        }
        let waiting = folded(&awaiting_payment());
        let later = evolve(waiting.clone(), &tick(2).input());
        assert!(later.same_apart_from_clock(&waiting));
    }

    #[test]
    fn a_state_stored_with_the_old_copy_of_the_requested_attempt_reads_the_same() {
        let state = given(awaiting_payment()).when(failed(1, 2)).then_nothing();
        let mut json = serde_json::to_value(&state).unwrap();
        json["payment"]["requested"] = serde_json::json!(1);
        assert_eq!(
            serde_json::from_value::<FulfilmentState>(json).unwrap(),
            state
        );
    }

    #[test]
    fn the_state_survives_a_json_round_trip() {
        let state = given(awaiting_payment()).when(failed(1, 2)).then_nothing();
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(
            serde_json::from_str::<FulfilmentState>(&json).unwrap(),
            state
        );
    }

    #[test]
    fn the_next_due_time_is_the_retry_then_the_deadline_and_none_once_settled() {
        let reserving = given([])
            .when(placed())
            .then([reserve(mug(), 1, 0), reserve(tea(), 2, 0)]);
        assert_eq!(reserving.next_due_at(), Some(at(0) + STOCK_DEADLINE));
        let waiting = given(awaiting_payment()).when(tick(1)).then_nothing();
        assert_eq!(waiting.next_due_at(), Some(at(1) + PAYMENT_DEADLINE));
        let failing = given(awaiting_payment()).when(failed(1, 2)).then_nothing();
        assert_eq!(failing.next_due_at(), Some(at(2) + retry_delay(1)));
        // Once the retry is sent, the payment deadline is what is due again.
        let retried = given(awaiting_payment_and([failed(1, 2)]))
            .when(charge_requested(2, 3))
            .then_nothing();
        let deadline = at(1) + PAYMENT_DEADLINE;
        assert_eq!(retried.next_due_at(), Some(deadline));
        assert!(!retried.is_settled());
        // The deadline passes with the retry unanswered: the saga cancels, and compensates
        // only once the order's cancel, the products' releases and the retry's answer are in.
        let history = awaiting_payment_and([failed(1, 2), charge_requested(2, 3)]);
        let deadline_cancel = OrderCancelled {
            order_id: order_id(ORDER),
            cancellation_reason: reason("payment not completed before the deadline"),
            cancelled_by: CancelledBy::Fulfilment,
            cancelled_at: deadline,
        };
        let cancelling = given(history)
            .when(Step::Tick(deadline))
            .then([cancel("payment not completed before the deadline", 16)]);
        assert!(!cancelling.is_settled(), "its cancel has not arrived");
        let compensating = evolve(cancelling, &Step::from(deadline_cancel).input());
        assert!(!compensating.is_settled(), "its stock is still reserved");
        let minutes = PAYMENT_DEADLINE.num_minutes() + 1;
        let given_back = [released(mug(), 1, minutes), released(tea(), 2, minutes)]
            .iter()
            .fold(compensating, |state, step| evolve(state, &step.input()));
        assert!(!given_back.is_settled(), "its retry may still charge");
        let settled = evolve(given_back, &failed(2, 17).input());
        assert!(settled.is_settled());
        assert_eq!(settled.next_due_at(), None);
        // Out of stock: settled once the order's cancel arrives, with nothing left due.
        let refused = after([placed(), rejected(mug()), rejected(tea())]);
        assert!(!refused.is_settled(), "its cancel has not arrived");
        let out_of_stock = OrderCancelled {
            order_id: order_id(ORDER),
            cancellation_reason: reason("out of stock"),
            cancelled_by: CancelledBy::Fulfilment,
            cancelled_at: at(2),
        };
        let cancelled = evolve(refused, &Step::from(out_of_stock).input());
        assert!(cancelled.is_settled());
        assert_eq!(cancelled.next_due_at(), None);
    }

    /// The state after `history`, each input handled as the runner handles it.
    fn after(history: impl IntoIterator<Item = Step>) -> FulfilmentState {
        history
            .into_iter()
            .fold(FulfilmentState::default(), |state, input| {
                super::step(state, &input.input()).0
            })
    }

    #[test]
    fn the_phase_follows_the_saga_from_reservations_to_shipment() {
        assert_eq!(after([placed()]).phase(), Phase::Reserving);
        assert_eq!(after(awaiting_payment()).phase(), Phase::AwaitingPayment);
        assert_eq!(
            after(awaiting_payment_and([charged(2)])).phase(),
            Phase::AwaitingShipment
        );
    }

    #[test]
    fn an_order_out_of_stock_is_compensating_until_its_cancel_arrives() {
        let refused = after([placed(), rejected(mug()), rejected(tea())]);
        assert_eq!(refused.phase(), Phase::Compensating);
    }
}
