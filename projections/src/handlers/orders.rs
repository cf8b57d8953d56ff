//! The `orders` projection: orders with their lines, status history, payment and shipment, and
//! the aggregates over orders (customers, lifetime value per currency, daily sales).
//!
//! Customer and daily-sales figures, in one place so the read API can say what they mean:
//! `order_count` counts placed orders (cancelled ones included); lifetime value and `revenue`
//! are the totals of orders placed and not cancelled; a day's `orders`, `cancelled` and
//! `revenue` belong to the day (UTC) the order was placed, so cancelling an old order changes
//! that old day.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Transaction;
use orderly_event_schemas::orders::OrderPlaced;
use orderly_event_schemas::{Event, OrderEvent, PaymentEvent};
use orderly_event_store::RecordedEvent;
use uuid::Uuid;

use super::{Decoded, Params, ParkReason, execute_all, fold, params};
use crate::error::ProjectionError;
use crate::model::{DeadLetterPolicy, Outcome};
use crate::tables;
use crate::vocabulary::{OrderStatus, PaymentStatus};

/// What the fold needs of an order: the columns that change, and those a cancellation reads.
#[derive(Debug, Clone)]
struct OrderRow {
    order_id: Uuid,
    customer_id: String,
    status: OrderStatus,
    total_minor: i64,
    currency: String,
    placed_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    cancellation_reason: Option<String>,
    carrier: Option<String>,
    tracking_number: Option<String>,
    shipped_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    version: i64,
    /// Only for an order placed in this batch, which is inserted; a loaded one is updated.
    /// The batch lock makes the load the whole truth about which rows exist, so neither
    /// statement needs `on conflict` (whose extra index probe per row was a good part of a
    /// rebuild).
    placement: Option<Placement>,
    dirty: bool,
}

/// The columns written once, at placement, which the load therefore leaves out.
#[derive(Debug, Clone)]
struct Placement {
    ship_name: String,
    ship_line1: String,
    ship_line2: Option<String>,
    ship_city: String,
    ship_postal_code: String,
    ship_country: String,
    /// The `order_search` document.
    search_text: String,
}

#[derive(Debug, Clone)]
struct PaymentRow {
    order_id: Uuid,
    status: PaymentStatus,
    amount_minor: i64,
    currency: String,
    attempts: i32,
    failure_reason: Option<String>,
    version: i64,
    /// Loaded from the table (updated), or new (inserted); as for [`OrderRow::placement`].
    stored: bool,
    dirty: bool,
}

struct LineRow {
    order_id: Uuid,
    line_no: i32,
    sku: String,
    name: String,
    quantity: i32,
    unit_price_minor: i64,
    line_total_minor: i64,
    currency: String,
}

struct HistoryRow {
    order_id: Uuid,
    version: i64,
    status: OrderStatus,
    at: DateTime<Utc>,
    reason: Option<String>,
}

#[derive(Default)]
struct CustomerDelta {
    order_count: i32,
    last_order_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct SalesDelta {
    orders: i32,
    cancelled: i32,
    revenue_minor: i64,
}

/// One batch's view of the rows it touches, and what it adds to the aggregates.
#[derive(Default)]
struct Fold {
    /// Loaded at the start of the batch, then changed in place; `dirty` ones are written back.
    orders: HashMap<Uuid, OrderRow>,
    payments: HashMap<Uuid, PaymentRow>,
    /// Lines and history rows never change once written, so they are only ever inserted.
    lines: Vec<LineRow>,
    history: Vec<HistoryRow>,
    /// Aggregates are kept as deltas and added in SQL, so no customer or day is loaded.
    customers: HashMap<String, CustomerDelta>,
    lifetime_values: HashMap<(String, String), i64>,
    sales: HashMap<(NaiveDate, String), SalesDelta>,
    /// Orders changed, in the order first touched, for notifications (the set dedupes).
    touched: Vec<Uuid>,
    touched_set: HashSet<Uuid>,
}

fn order_id_of(event: &Event) -> Option<Uuid> {
    Some(match event {
        Event::Order(e) => match e {
            OrderEvent::OrderPlaced(p) => p.order_id.0,
            OrderEvent::OrderStockReserved(p) => p.order_id.0,
            OrderEvent::OrderPaid(p) => p.order_id.0,
            OrderEvent::OrderConfirmed(p) => p.order_id.0,
            OrderEvent::OrderCancelled(p) => p.order_id.0,
            OrderEvent::OrderShipped(p) => p.order_id.0,
            OrderEvent::OrderDelivered(p) => p.order_id.0,
        },
        Event::Payment(e) => match e {
            PaymentEvent::PaymentChargeRequested(p) => p.order_id.0,
            PaymentEvent::PaymentCharged(p) => p.order_id.0,
            PaymentEvent::PaymentDeclined(p) => p.order_id.0,
            PaymentEvent::PaymentFailed(p) => p.order_id.0,
            PaymentEvent::PaymentRefunded(p) => p.order_id.0,
        },
        Event::Product(_) => return None,
    })
}

fn to_i32(value: u32, what: &'static str) -> Result<i32, ParkReason> {
    i32::try_from(value).map_err(|_| ParkReason::TooLarge {
        what,
        value: value.into(),
    })
}

/// The rows a placement writes once: its lines, and the columns of `orders` that never change
/// (shipping address, search document).
fn placement_rows(p: &OrderPlaced) -> Result<(Vec<LineRow>, Placement), ParkReason> {
    let order_id = p.order_id.0;
    let mut lines = Vec::with_capacity(p.lines.len());
    let mut search = vec![p.customer_id.as_str().to_owned()];
    for (index, line) in p.lines.iter().enumerate() {
        lines.push(LineRow {
            order_id,
            line_no: i32::try_from(index).map_err(|_| ParkReason::TooLarge {
                what: "line number",
                value: index as u64,
            })?,
            sku: line.sku.as_str().to_owned(),
            name: line.name.as_str().to_owned(),
            quantity: to_i32(line.quantity.get(), "quantity")?,
            unit_price_minor: line.unit_price.amount_minor(),
            line_total_minor: line.line_total.amount_minor(),
            currency: line.unit_price.currency().to_string(),
        });
        search.push(line.sku.as_str().to_owned());
        search.push(line.name.as_str().to_owned());
    }
    let address = &p.shipping_address;
    let line2 = address.line2.as_ref().map(|l| l.to_string());
    search.extend([
        address.name.to_string(),
        address.line1.to_string(),
        line2.clone().unwrap_or_default(),
        address.city.to_string(),
        address.postal_code.to_string(),
        address.country.to_string(),
    ]);
    let placement = Placement {
        ship_name: address.name.to_string(),
        ship_line1: address.line1.to_string(),
        ship_line2: line2,
        ship_city: address.city.to_string(),
        ship_postal_code: address.postal_code.to_string(),
        ship_country: address.country.to_string(),
        search_text: search.join(" "),
    };
    Ok((lines, placement))
}

impl Fold {
    fn touch(&mut self, order_id: Uuid) {
        if self.touched_set.insert(order_id) {
            self.touched.push(order_id);
        }
    }

    fn handle(&mut self, recorded: &RecordedEvent, event: &Event) -> Result<(), ParkReason> {
        let version = crate::model::to_i64(recorded.version);
        match event {
            Event::Order(e) => self.order_event(version, e),
            Event::Payment(e) => self.payment_event(version, e),
            Event::Product(e) => Err(ParkReason::Foreign {
                event_type: e.event_type(),
                streams: "order or payment",
            }),
        }
    }

    fn order_event(&mut self, version: i64, event: &OrderEvent) -> Result<(), ParkReason> {
        match event {
            OrderEvent::OrderPlaced(placed) => self.place(version, placed),
            _ => self.advance(version, event),
        }
    }

    /// A new order: its row, lines and first history entry, and what it adds to its
    /// customer and to the day it was placed.
    fn place(&mut self, version: i64, p: &OrderPlaced) -> Result<(), ParkReason> {
        let order_id = p.order_id.0;
        if let Some(row) = self.orders.get(&order_id) {
            // At or below the row's version: a replay, already in. Above it: a stream that
            // places the same order twice, which no decider writes.
            return if row.version >= version {
                Ok(())
            } else {
                Err(ParkReason::PlacedTwice(order_id))
            };
        }
        let (lines, placement) = placement_rows(p)?;
        let currency = p.total.currency().to_string();
        let total = p.total.amount_minor();
        self.lines.extend(lines);
        self.history.push(HistoryRow {
            order_id,
            version,
            status: OrderStatus::Placed,
            at: p.placed_at,
            reason: None,
        });
        let customer = self
            .customers
            .entry(p.customer_id.as_str().to_owned())
            .or_default();
        customer.order_count += 1;
        customer.last_order_at = customer.last_order_at.max(Some(p.placed_at));
        *self
            .lifetime_values
            .entry((p.customer_id.as_str().to_owned(), currency.clone()))
            .or_default() += total;
        let day = self
            .sales
            .entry((p.placed_at.date_naive(), currency.clone()))
            .or_default();
        day.orders += 1;
        day.revenue_minor += total;
        self.orders.insert(
            order_id,
            OrderRow {
                order_id,
                customer_id: p.customer_id.as_str().to_owned(),
                status: OrderStatus::Placed,
                total_minor: total,
                currency,
                placed_at: p.placed_at,
                updated_at: p.placed_at,
                cancellation_reason: None,
                carrier: None,
                tracking_number: None,
                shipped_at: None,
                delivered_at: None,
                version,
                placement: Some(placement),
                dirty: true,
            },
        );
        self.touch(order_id);
        Ok(())
    }

    /// A placed order moves on: its new status with a history entry, the columns the event
    /// fills, and for a first cancellation, the placement's sales taken back.
    fn advance(&mut self, version: i64, event: &OrderEvent) -> Result<(), ParkReason> {
        let Some(order_id) = order_id_of(&Event::Order(event.clone())) else {
            return Ok(());
        };
        // No row to apply to (its placement was parked, or the stream is corrupt): park this
        // one too rather than invent an order.
        let Some(row) = self.orders.get_mut(&order_id) else {
            return Err(ParkReason::NoOrder {
                order_id,
                event_type: event.event_type(),
            });
        };
        if row.version >= version {
            return Ok(());
        }
        let (status, at, reason) = match event {
            OrderEvent::OrderPlaced(_) => return Ok(()),
            OrderEvent::OrderStockReserved(p) => {
                (OrderStatus::StockReserved, p.stock_reserved_at, None)
            }
            OrderEvent::OrderPaid(p) => (OrderStatus::Paid, p.paid_at, None),
            OrderEvent::OrderConfirmed(p) => (OrderStatus::Confirmed, p.confirmed_at, None),
            OrderEvent::OrderCancelled(p) => (
                OrderStatus::Cancelled,
                p.cancelled_at,
                Some(p.cancellation_reason.to_string()),
            ),
            OrderEvent::OrderShipped(p) => {
                row.carrier = Some(p.carrier.to_string());
                row.tracking_number = Some(p.tracking_number.to_string());
                row.shipped_at = Some(p.shipped_at);
                (OrderStatus::Shipped, p.shipped_at, None)
            }
            OrderEvent::OrderDelivered(p) => {
                row.delivered_at = Some(p.delivered_at);
                (OrderStatus::Delivered, p.delivered_at, None)
            }
        };
        // A cancellation takes back what the placement added to the customer and the day.
        if status == OrderStatus::Cancelled && row.status != OrderStatus::Cancelled {
            *self
                .lifetime_values
                .entry((row.customer_id.clone(), row.currency.clone()))
                .or_default() -= row.total_minor;
            let day = self
                .sales
                .entry((row.placed_at.date_naive(), row.currency.clone()))
                .or_default();
            day.cancelled += 1;
            day.revenue_minor -= row.total_minor;
            row.cancellation_reason = reason.clone();
        }
        row.status = status;
        row.updated_at = at;
        row.version = version;
        row.dirty = true;
        self.history.push(HistoryRow {
            order_id,
            version,
            status,
            at,
            reason,
        });
        self.touch(order_id);
        Ok(())
    }

    fn payment_event(&mut self, version: i64, event: &PaymentEvent) -> Result<(), ParkReason> {
        let Some(order_id) = order_id_of(&Event::Payment(event.clone())) else {
            return Ok(());
        };
        if let Some(row) = self.payments.get(&order_id)
            && row.version >= version
        {
            return Ok(());
        }
        let existing = self.payments.get(&order_id).cloned();
        let row = match (event, existing) {
            (PaymentEvent::PaymentChargeRequested(p), None) => PaymentRow {
                order_id,
                status: PaymentStatus::Pending,
                amount_minor: p.amount.amount_minor(),
                currency: p.amount.currency().to_string(),
                attempts: to_i32(p.attempt, "attempt")?,
                failure_reason: None,
                version,
                stored: false,
                dirty: true,
            },
            // A retry after a transient failure; redelivered requests repeat an attempt number,
            // hence the max.
            (PaymentEvent::PaymentChargeRequested(p), Some(mut row)) => {
                row.status = PaymentStatus::Pending;
                row.attempts = row.attempts.max(to_i32(p.attempt, "attempt")?);
                row
            }
            // Every other payment event follows a request, which carries the amount.
            (_, None) => {
                return Err(ParkReason::NoPayment {
                    order_id,
                    event_type: event.event_type(),
                });
            }
            (PaymentEvent::PaymentCharged(p), Some(mut row)) => {
                row.status = PaymentStatus::Charged;
                row.amount_minor = p.amount.amount_minor();
                row.failure_reason = None;
                row
            }
            (PaymentEvent::PaymentDeclined(p), Some(mut row)) => {
                row.status = PaymentStatus::Declined;
                row.failure_reason = Some(p.reason.to_string());
                row
            }
            (PaymentEvent::PaymentFailed(p), Some(mut row)) => {
                row.status = PaymentStatus::Failed;
                row.attempts = row.attempts.max(to_i32(p.attempt, "attempt")?);
                row.failure_reason = Some(p.reason.to_string());
                row
            }
            (PaymentEvent::PaymentRefunded(_), Some(mut row)) => {
                row.status = PaymentStatus::Refunded;
                row
            }
        };
        self.payments.insert(
            order_id,
            PaymentRow {
                version,
                dirty: true,
                ..row
            },
        );
        self.touch(order_id);
        Ok(())
    }
}

const LOAD_ORDERS: &str = "
select order_id, customer_id, status, total_minor, currency, placed_at, updated_at,
       cancellation_reason, carrier, tracking_number, shipped_at, delivered_at, version
from orders where order_id = any($1)";

const LOAD_PAYMENTS: &str = "
select order_id, status, amount_minor, currency, attempts, failure_reason, version
from order_payments where order_id = any($1)";

// New rows are inserted and loaded ones updated (see `OrderRow::placement`); rows that only ever
// get inserted (search documents, lines, history) belong to a newly placed order or carry the
// version of an event the fold admitted, so they cannot be there yet either.
static INSERT_ORDERS: LazyLock<String> = LazyLock::new(|| tables::ORDERS.insert_from_arrays());

/// The columns after `order_id` are those of [`changing`], in its order.
const UPDATE_ORDERS: &str = "
update orders o set
    status = u.status, updated_at = u.updated_at, cancellation_reason = u.cancellation_reason,
    carrier = u.carrier, tracking_number = u.tracking_number, shipped_at = u.shipped_at,
    delivered_at = u.delivered_at, version = u.version
from unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
    $7::timestamptz[], $8::timestamptz[], $9::bigint[])
    as u(order_id, status, updated_at, cancellation_reason, carrier, tracking_number,
         shipped_at, delivered_at, version)
where o.order_id = u.order_id and o.version < u.version";

const INSERT_SEARCH: &str = "
insert into order_search (order_id, search_document)
select s.order_id, to_tsvector('simple', s.text)
from unnest($1::uuid[], $2::text[]) as s(order_id, text)";

static INSERT_LINES: LazyLock<String> = LazyLock::new(|| tables::ORDER_LINES.insert_from_arrays());

static INSERT_HISTORY: LazyLock<String> =
    LazyLock::new(|| tables::ORDER_STATUS_HISTORY.insert_from_arrays());

static INSERT_PAYMENTS: LazyLock<String> =
    LazyLock::new(|| tables::ORDER_PAYMENTS.insert_from_arrays());

const UPDATE_PAYMENTS: &str = "
update order_payments p set
    status = u.status, amount_minor = u.amount_minor, currency = u.currency,
    attempts = u.attempts, failure_reason = u.failure_reason, version = u.version
from unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::int[], $6::text[],
    $7::bigint[])
    as u(order_id, status, amount_minor, currency, attempts, failure_reason, version)
where p.order_id = u.order_id and p.version < u.version";

static WRITE_CUSTOMERS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} on conflict (customer_id) do update set
            order_count = customers.order_count + excluded.order_count,
            last_order_at = greatest(customers.last_order_at, excluded.last_order_at)",
        tables::CUSTOMERS.insert_from_arrays()
    )
});

static WRITE_LIFETIME_VALUES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} on conflict (customer_id, currency) do update set
            amount_minor = customer_lifetime_values.amount_minor + excluded.amount_minor",
        tables::CUSTOMER_LIFETIME_VALUES.insert_from_arrays()
    )
});

static WRITE_SALES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} on conflict (date, currency) do update set
            orders = daily_sales.orders + excluded.orders,
            cancelled = daily_sales.cancelled + excluded.cancelled,
            revenue_minor = daily_sales.revenue_minor + excluded.revenue_minor",
        tables::DAILY_SALES.insert_from_arrays()
    )
});

pub(crate) async fn apply(
    tx: &Transaction<'_>,
    batch: Decoded,
    policy: DeadLetterPolicy,
    skipped: &HashSet<Uuid>,
) -> Result<Outcome, ProjectionError> {
    // Orders are loaded for order events and payments for payment events: a batch holds many
    // streams of one kind only (an order's payment ends in the next batch, say).
    let (mut order_ids, mut payment_ids) = (HashSet::new(), HashSet::new());
    for (_, decoded) in &batch.events {
        let Ok(event) = decoded else { continue };
        let ids = match event {
            Event::Payment(_) => &mut payment_ids,
            _ => &mut order_ids,
        };
        ids.extend(order_id_of(event));
    }
    let mut state = Fold::default();
    load(
        tx,
        &Vec::from_iter(order_ids),
        &Vec::from_iter(payment_ids),
        &mut state,
    )
    .await?;
    let mut outcome = fold(&batch, policy, skipped, |recorded, event| {
        state.handle(recorded, event)
    });
    write(tx, &state).await?;
    outcome.changed = !state.touched.is_empty();
    outcome.order_ids = state.touched;
    Ok(outcome)
}

/// Plain reads, no `for update`: the batch already holds its projection's batch lock, and
/// every writer of these tables takes that lock first.
async fn load(
    tx: &Transaction<'_>,
    order_ids: &[Uuid],
    payment_ids: &[Uuid],
    state: &mut Fold,
) -> Result<(), ProjectionError> {
    // Both reads in one round trip (see `execute_all`); none for no ids.
    let read = async |sql: &str, ids: &[Uuid]| {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let statement = tx.prepare_cached(sql).await?;
        tx.query(&statement, &[&ids]).await
    };
    let (orders, payments) = futures::try_join!(
        read(LOAD_ORDERS, order_ids),
        read(LOAD_PAYMENTS, payment_ids)
    )?;
    for row in orders {
        let order = OrderRow {
            order_id: row.try_get(0)?,
            customer_id: row.try_get(1)?,
            status: row.try_get::<_, &str>(2)?.parse()?,
            total_minor: row.try_get(3)?,
            currency: row.try_get(4)?,
            placed_at: row.try_get(5)?,
            updated_at: row.try_get(6)?,
            cancellation_reason: row.try_get(7)?,
            carrier: row.try_get(8)?,
            tracking_number: row.try_get(9)?,
            shipped_at: row.try_get(10)?,
            delivered_at: row.try_get(11)?,
            version: row.try_get(12)?,
            placement: None,
            dirty: false,
        };
        state.orders.insert(order.order_id, order);
    }
    for row in payments {
        let payment = PaymentRow {
            order_id: row.try_get(0)?,
            status: row.try_get::<_, &str>(1)?.parse()?,
            amount_minor: row.try_get(2)?,
            currency: row.try_get(3)?,
            attempts: row.try_get(4)?,
            failure_reason: row.try_get(5)?,
            version: row.try_get(6)?,
            stored: true,
            dirty: false,
        };
        state.payments.insert(payment.order_id, payment);
    }
    Ok(())
}

/// One column of `rows` as an array parameter.
fn col<'r, R, T>(rows: &[&'r R], f: impl Fn(&'r R) -> T) -> Vec<T> {
    rows.iter().map(|o| f(o)).collect()
}

/// The columns of `orders` that change after placement, as array parameters.
fn changing<'r>(o: &[&'r OrderRow]) -> Params<'r> {
    params![
        col(o, |o| o.status.as_str()),
        col(o, |o| o.updated_at),
        col(o, |o| o.cancellation_reason.as_deref()),
        col(o, |o| o.carrier.as_deref()),
        col(o, |o| o.tracking_number.as_deref()),
        col(o, |o| o.shipped_at),
        col(o, |o| o.delivered_at),
        col(o, |o| o.version),
    ]
}

/// One statement per table, each row as arrays through `unnest`; only what changed; all sent
/// together (see [`execute_all`]).
async fn write(tx: &Transaction<'_>, state: &Fold) -> Result<(), ProjectionError> {
    let mut statements: Statements<'_> = Vec::with_capacity(10);
    write_orders(state, &mut statements);
    write_lines_and_history(state, &mut statements);
    write_payments(state, &mut statements);
    write_aggregates(state, &mut statements);
    execute_all(tx, &statements).await
}

/// Write-back statements with their parameters, in the order they run.
type Statements<'a> = Vec<(&'static str, Params<'a>)>;

/// New orders inserted with their search documents; changed ones updated.
fn write_orders<'s>(state: &'s Fold, statements: &mut Statements<'s>) {
    let (mut updated, mut inserted, mut placements) = (Vec::new(), Vec::new(), Vec::new());
    for order in state.orders.values().filter(|o| o.dirty) {
        match &order.placement {
            Some(placement) => {
                inserted.push(order);
                placements.push(placement);
            }
            None => updated.push(order),
        }
    }
    if !inserted.is_empty() {
        let (o, p) = (&inserted, &placements);
        let mut params = params![
            col(o, |o| o.order_id),
            col(o, |o| o.customer_id.as_str()),
            col(o, |o| o.total_minor),
            col(o, |o| o.currency.as_str()),
            col(p, |p| p.ship_name.as_str()),
            col(p, |p| p.ship_line1.as_str()),
            col(p, |p| p.ship_line2.as_deref()),
            col(p, |p| p.ship_city.as_str()),
            col(p, |p| p.ship_postal_code.as_str()),
            col(p, |p| p.ship_country.as_str()),
            col(o, |o| o.placed_at),
        ];
        params.extend(changing(o));
        statements.push((&INSERT_ORDERS, params));
        statements.push((
            INSERT_SEARCH,
            params![col(o, |o| o.order_id), col(p, |p| p.search_text.as_str()),],
        ));
    }
    if !updated.is_empty() {
        let mut params = params![col(&updated, |o| o.order_id)];
        params.extend(changing(&updated));
        statements.push((UPDATE_ORDERS, params));
    }
}

/// Rows that are only ever inserted.
fn write_lines_and_history<'s>(state: &'s Fold, statements: &mut Statements<'s>) {
    if !state.lines.is_empty() {
        let l = &state.lines;
        statements.push((
            &INSERT_LINES,
            params![
                l.iter().map(|x| x.order_id).collect::<Vec<_>>(),
                l.iter().map(|x| x.line_no).collect::<Vec<_>>(),
                l.iter().map(|x| x.sku.as_str()).collect::<Vec<_>>(),
                l.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
                l.iter().map(|x| x.quantity).collect::<Vec<_>>(),
                l.iter().map(|x| x.unit_price_minor).collect::<Vec<_>>(),
                l.iter().map(|x| x.line_total_minor).collect::<Vec<_>>(),
                l.iter().map(|x| x.currency.as_str()).collect::<Vec<_>>(),
            ],
        ));
    }
    if !state.history.is_empty() {
        let h = &state.history;
        statements.push((
            &INSERT_HISTORY,
            params![
                h.iter().map(|x| x.order_id).collect::<Vec<_>>(),
                h.iter().map(|x| x.version).collect::<Vec<_>>(),
                h.iter().map(|x| x.status.as_str()).collect::<Vec<_>>(),
                h.iter().map(|x| x.at).collect::<Vec<_>>(),
                h.iter().map(|x| x.reason.as_deref()).collect::<Vec<_>>(),
            ],
        ));
    }
}

fn write_payments<'s>(state: &'s Fold, statements: &mut Statements<'s>) {
    let (updated, inserted): (Vec<&PaymentRow>, Vec<&PaymentRow>) = state
        .payments
        .values()
        .filter(|p| p.dirty)
        .partition(|p| p.stored);
    for (sql, p) in [
        (INSERT_PAYMENTS.as_str(), inserted),
        (UPDATE_PAYMENTS, updated),
    ] {
        if p.is_empty() {
            continue;
        }
        statements.push((
            sql,
            params![
                p.iter().map(|x| x.order_id).collect::<Vec<_>>(),
                p.iter().map(|x| x.status.as_str()).collect::<Vec<_>>(),
                p.iter().map(|x| x.amount_minor).collect::<Vec<_>>(),
                p.iter().map(|x| x.currency.as_str()).collect::<Vec<_>>(),
                p.iter().map(|x| x.attempts).collect::<Vec<_>>(),
                p.iter()
                    .map(|x| x.failure_reason.as_deref())
                    .collect::<Vec<_>>(),
                p.iter().map(|x| x.version).collect::<Vec<_>>(),
            ],
        ));
    }
}

/// The deltas to customers, lifetime values and daily sales, added in SQL.
fn write_aggregates<'s>(state: &'s Fold, statements: &mut Statements<'s>) {
    if !state.customers.is_empty() {
        let c: Vec<(&String, &CustomerDelta)> = state.customers.iter().collect();
        statements.push((
            &WRITE_CUSTOMERS,
            params![
                c.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
                c.iter().map(|x| x.1.order_count).collect::<Vec<_>>(),
                c.iter().map(|x| x.1.last_order_at).collect::<Vec<_>>(),
            ],
        ));
    }
    if !state.lifetime_values.is_empty() {
        let v: Vec<(&(String, String), &i64)> = state.lifetime_values.iter().collect();
        statements.push((
            &WRITE_LIFETIME_VALUES,
            params![
                v.iter().map(|x| x.0.0.as_str()).collect::<Vec<_>>(),
                v.iter().map(|x| x.0.1.as_str()).collect::<Vec<_>>(),
                v.iter().map(|x| *x.1).collect::<Vec<_>>(),
            ],
        ));
    }
    if !state.sales.is_empty() {
        let s: Vec<(&(NaiveDate, String), &SalesDelta)> = state.sales.iter().collect();
        statements.push((
            &WRITE_SALES,
            params![
                s.iter().map(|x| x.0.0).collect::<Vec<_>>(),
                s.iter().map(|x| x.0.1.as_str()).collect::<Vec<_>>(),
                s.iter().map(|x| x.1.orders).collect::<Vec<_>>(),
                s.iter().map(|x| x.1.cancelled).collect::<Vec<_>>(),
                s.iter().map(|x| x.1.revenue_minor).collect::<Vec<_>>(),
            ],
        ));
    }
}

#[cfg(test)]
mod tests {
    //! The fold's rules, given events and then the rows it would write: no database. A batch is
    //! one `Fold`; [`Fold::next_batch`] starts the next one from the rows as stored, so rules
    //! that span batches (cancelling an order placed earlier) are tested as they run.

    use orderly_event_store::{Position, StreamName};
    use serde_json::{Value, json};

    use super::*;
    use crate::model::Parked;

    const ORDER: Uuid = Uuid::from_u128(0x0192_f1c4_7a3e_7b1a_9c2d_4e5f_6071_8293);

    fn day(date: &str) -> NaiveDate {
        date.parse().expect("a date")
    }

    /// An event of `event_type` at its current schema version, for [`ORDER`].
    fn event(event_type: &str, data: Value) -> Event {
        let version = if event_type == "OrderPlaced" { 2 } else { 1 };
        let mut data = data;
        data["order_id"] = json!(ORDER);
        orderly_event_schemas::decode(event_type, version, data).expect("a valid sample")
    }

    fn eur(minor: i64) -> Value {
        json!({ "amount_minor": minor, "currency": "EUR" })
    }

    /// Ada's order of 2 × 6.50 + 1 × 12.00 = 25.00 EUR.
    fn placed(at: &str) -> Event {
        let line = |sku: &str, quantity: i64, price: i64| {
            json!({ "sku": sku, "name": sku, "quantity": quantity,
                    "unit_price": eur(price), "line_total": eur(price * quantity) })
        };
        event(
            "OrderPlaced",
            json!({
                "customer_id": "ada",
                "lines": [line("TEA", 2, 650), line("MUG", 1, 1200)],
                "total": eur(2500),
                "shipping_address": { "name": "Ada", "line1": "12 Row", "line2": null,
                    "city": "London", "postal_code": "N1 9GU", "country": "GB" },
                "payment_token": "tok_ok",
                "placed_at": at,
            }),
        )
    }

    fn cancelled(at: &str) -> Event {
        event(
            "OrderCancelled",
            json!({ "cancellation_reason": "changed my mind", "cancelled_by": "customer",
                    "cancelled_at": at }),
        )
    }

    fn charge_requested(attempt: u32) -> Event {
        event(
            "PaymentChargeRequested",
            json!({ "amount": eur(2500), "payment_token": "tok_ok", "attempt": attempt,
                    "requested_at": "2025-11-03T09:15:02Z" }),
        )
    }

    fn charged() -> Event {
        event(
            "PaymentCharged",
            json!({ "amount": eur(2500), "gateway_reference": "ch_1",
                    "charged_at": "2025-11-03T09:15:04Z" }),
        )
    }

    fn failed(attempt: u32) -> Event {
        event(
            "PaymentFailed",
            json!({ "reason": "gateway unreachable", "attempt": attempt,
                    "failed_at": "2025-11-03T09:15:04Z" }),
        )
    }

    fn refunded() -> Event {
        event(
            "PaymentRefunded",
            json!({ "amount": eur(2500), "gateway_reference": "ch_1",
                    "reason": "cancelled by customer", "refunded_at": "2025-11-04T10:00:00Z" }),
        )
    }

    /// Folds events in log order, numbering each stream's versions from 0 as the store does.
    struct Given {
        fold: Fold,
        versions: HashMap<String, u64>,
    }

    fn given(events: impl IntoIterator<Item = Event>) -> Given {
        let mut given = Given {
            fold: Fold::default(),
            versions: HashMap::new(),
        };
        for event in events {
            given.fold(&event).expect("the event applies");
        }
        given
    }

    impl Given {
        fn fold(&mut self, event: &Event) -> Result<(), ParkReason> {
            let category = match event {
                Event::Order(_) => "order",
                Event::Payment(_) => "payment",
                Event::Product(_) => "product",
            };
            let stream = format!("{category}-{}", ORDER.simple());
            let version = self.versions.entry(stream.clone()).or_default();
            let recorded = RecordedEvent {
                id: Uuid::now_v7(),
                stream: StreamName::parse(stream).expect("a stream name"),
                version: *version,
                position: Position::new(1, *version),
                event_type: event.event_type().to_owned(),
                data: Value::Null,
                metadata: Value::Null,
                recorded_at: Utc::now(),
            };
            *version += 1;
            self.fold.handle(&recorded, event)
        }

        /// Then, in a later batch: the rows as this batch stored them, nothing pending.
        fn next_batch(self) -> Self {
            let mut next = Fold::default();
            for (id, row) in self.fold.orders {
                let stored = OrderRow {
                    placement: None,
                    dirty: false,
                    ..row
                };
                next.orders.insert(id, stored);
            }
            for (id, row) in self.fold.payments {
                let stored = PaymentRow {
                    stored: true,
                    dirty: false,
                    ..row
                };
                next.payments.insert(id, stored);
            }
            Given {
                fold: next,
                versions: self.versions,
            }
        }

        /// The batch's delta to `daily_sales` for the EUR sales of `date`.
        fn sales(&self, date: &str) -> (i32, i32, i64) {
            self.fold
                .sales
                .get(&(day(date), "EUR".to_owned()))
                .map_or((0, 0, 0), |d| (d.orders, d.cancelled, d.revenue_minor))
        }

        fn lifetime_value(&self) -> i64 {
            self.fold.lifetime_values[&("ada".to_owned(), "EUR".to_owned())]
        }

        fn order(&self) -> &OrderRow {
            &self.fold.orders[&ORDER]
        }

        fn payment(&self) -> &PaymentRow {
            &self.fold.payments[&ORDER]
        }

        fn history(&self) -> Vec<OrderStatus> {
            self.fold.history.iter().map(|h| h.status).collect()
        }
    }

    #[test]
    fn a_placement_counts_for_its_customer_and_the_day_it_was_placed() {
        let then = given([placed("2025-11-03T23:59:59Z")]);
        assert_eq!(then.sales("2025-11-03"), (1, 0, 2500));
        assert_eq!(then.lifetime_value(), 2500);
        let customer = &then.fold.customers["ada"];
        assert_eq!(customer.order_count, 1);
        assert_eq!(then.order().status, OrderStatus::Placed);
        assert!(then.order().placement.is_some(), "a new order is inserted");
        let lines: Vec<_> = then.fold.lines.iter().map(|l| l.line_total_minor).collect();
        assert_eq!(lines, [1300, 1200]);
        assert_eq!(then.history(), [OrderStatus::Placed]);
        assert_eq!(then.fold.touched, [ORDER]);
    }

    #[test]
    fn a_cancellation_takes_back_the_revenue_of_the_day_the_order_was_placed() {
        let mut then = given([placed("2025-11-03T09:15:00Z")]).next_batch();
        then.fold(&cancelled("2025-11-05T08:00:00Z")).unwrap();
        // The old day loses the revenue and counts a cancellation; the day of the
        // cancellation is untouched; the placement still counts as an order.
        assert_eq!(then.sales("2025-11-03"), (0, 1, -2500));
        assert_eq!(then.sales("2025-11-05"), (0, 0, 0));
        assert_eq!(then.lifetime_value(), -2500);
        assert!(
            !then.fold.customers.contains_key("ada"),
            "order count unchanged"
        );
        let order = then.order();
        assert_eq!(order.status, OrderStatus::Cancelled);
        assert_eq!(
            order.cancellation_reason.as_deref(),
            Some("changed my mind")
        );
        assert!(
            order.dirty && order.placement.is_none(),
            "a stored order is updated"
        );
    }

    #[test]
    fn an_order_is_taken_back_once_however_often_it_is_cancelled() {
        let then = given([
            placed("2025-11-03T09:15:00Z"),
            cancelled("2025-11-03T09:16:00Z"),
            cancelled("2025-11-03T09:17:00Z"),
        ]);
        assert_eq!(then.sales("2025-11-03"), (1, 1, 0));
        assert_eq!(then.lifetime_value(), 0);
        assert_eq!(
            then.history(),
            [
                OrderStatus::Placed,
                OrderStatus::Cancelled,
                OrderStatus::Cancelled
            ]
        );
    }

    #[test]
    fn a_refund_changes_the_payment_and_not_the_sales() {
        // Revenue follows the order (a cancellation takes it back), not the money: a refund
        // of a cancelled order must not take it back a second time.
        let then = given([
            placed("2025-11-03T09:15:00Z"),
            charge_requested(1),
            charged(),
            cancelled("2025-11-04T09:00:00Z"),
            refunded(),
        ]);
        assert_eq!(then.sales("2025-11-03"), (1, 1, 0));
        assert_eq!(then.lifetime_value(), 0);
        let payment = then.payment();
        assert_eq!(payment.status, PaymentStatus::Refunded);
        assert_eq!(payment.amount_minor, 2500, "the amount charged stays");
        assert_eq!(payment.failure_reason, None);
    }

    #[test]
    fn a_retried_charge_keeps_the_highest_attempt_and_clears_the_failure_once_charged() {
        let then = given([
            placed("2025-11-03T09:15:00Z"),
            charge_requested(1),
            failed(1),
        ]);
        assert_eq!(then.payment().status, PaymentStatus::Failed);
        assert_eq!(
            then.payment().failure_reason.as_deref(),
            Some("gateway unreachable")
        );
        let mut then = then.next_batch();
        // A redelivered request repeats its attempt number.
        for event in [charge_requested(2), charge_requested(2), charged()] {
            then.fold(&event).unwrap();
        }
        let payment = then.payment();
        assert_eq!(payment.status, PaymentStatus::Charged);
        assert_eq!(payment.attempts, 2);
        assert_eq!(payment.failure_reason, None);
        assert!(
            payment.stored && payment.dirty,
            "a stored payment is updated"
        );
    }

    #[test]
    fn events_at_or_below_a_rows_version_change_nothing() {
        let events = [
            placed("2025-11-03T09:15:00Z"),
            cancelled("2025-11-03T10:00:00Z"),
        ];
        let mut then = given(events.clone()).next_batch();
        // Redelivered from the start of the stream: every version is already in the row.
        then.versions.clear();
        for event in &events {
            then.fold(event).unwrap();
        }
        assert!(then.fold.sales.is_empty() && then.fold.lifetime_values.is_empty());
        assert!(then.fold.history.is_empty() && then.fold.lines.is_empty());
        assert!(!then.order().dirty);
        assert!(then.fold.touched.is_empty());
    }

    #[test]
    fn what_cannot_be_applied_is_parked_with_a_typed_reason() {
        let mut then = given([]);
        assert_eq!(
            then.fold(&cancelled("2025-11-03T10:00:00Z")),
            Err(ParkReason::NoOrder {
                order_id: ORDER,
                event_type: "OrderCancelled"
            })
        );
        assert_eq!(
            then.fold(&charged()),
            Err(ParkReason::NoPayment {
                order_id: ORDER,
                event_type: "PaymentCharged"
            })
        );
        then.fold(&placed("2025-11-03T09:15:00Z")).unwrap();
        assert_eq!(
            then.fold(&placed("2025-11-03T09:15:00Z")),
            Err(ParkReason::PlacedTwice(ORDER))
        );
        let parked = Parked::new(
            &RecordedEvent {
                id: Uuid::nil(),
                stream: StreamName::parse("order-x").unwrap(),
                version: 0,
                position: Position::START,
                event_type: "OrderPlaced".to_owned(),
                data: Value::Null,
                metadata: Value::Null,
                recorded_at: Utc::now(),
            },
            ParkReason::PlacedTwice(ORDER),
        );
        assert_eq!(parked.error, format!("order {ORDER} was already placed"));
        // Nothing of the refused events reached the rows.
        assert_eq!(then.sales("2025-11-03"), (1, 0, 2500));
        assert!(then.fold.payments.is_empty());
    }
}
