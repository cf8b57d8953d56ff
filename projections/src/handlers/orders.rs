//! The `orders` projection: orders with their lines, status history, payment and shipment, and
//! the aggregates over orders (customers, lifetime value per currency, daily sales).
//!
//! Customer and daily-sales figures, in one place so the read API can say what they mean:
//! `order_count` counts placed orders (cancelled ones included); lifetime value and `revenue`
//! are the totals of orders placed and not cancelled; a day's `orders`, `cancelled` and
//! `revenue` belong to the day (UTC) the order was placed, so cancelling an old order changes
//! that old day.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Transaction;
use orderly_event_schemas::{Event, OrderEvent, PaymentEvent};
use orderly_event_store::RecordedEvent;
use uuid::Uuid;

use super::{Decoded, Params, execute_all, fold, params};
use crate::error::ProjectionError;
use crate::model::{DeadLetterPolicy, Outcome};

/// What the fold needs of an order: the columns that change, and those a cancellation reads.
#[derive(Debug, Clone)]
struct OrderRow {
    order_id: Uuid,
    customer_id: String,
    status: String,
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
    status: &'static str,
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
    status: &'static str,
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

fn to_i32(v: u32, what: &str) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("{what} {v} does not fit the read model"))
}

impl Fold {
    fn touch(&mut self, order_id: Uuid) {
        if self.touched_set.insert(order_id) {
            self.touched.push(order_id);
        }
    }

    fn handle(&mut self, recorded: &RecordedEvent, event: &Event) -> Result<(), String> {
        let version = crate::model::to_i64(recorded.version);
        match event {
            Event::Order(e) => self.order_event(version, e),
            Event::Payment(e) => self.payment_event(version, e),
            Event::Product(_) => Err("a product event in an order or payment stream".to_owned()),
        }
    }

    fn order_event(&mut self, version: i64, event: &OrderEvent) -> Result<(), String> {
        if let OrderEvent::OrderPlaced(p) = event {
            let order_id = p.order_id.0;
            if let Some(row) = self.orders.get(&order_id) {
                // At or below the row's version: a replay, already in. Above it: a stream that
                // places the same order twice, which no decider writes.
                return if row.version >= version {
                    Ok(())
                } else {
                    Err(format!("order {order_id} was already placed"))
                };
            }
            let mut lines = Vec::with_capacity(p.lines.len());
            let mut search = vec![p.customer_id.as_str().to_owned()];
            for (index, line) in p.lines.iter().enumerate() {
                lines.push(LineRow {
                    order_id,
                    line_no: i32::try_from(index).map_err(|_| "too many lines".to_owned())?,
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
            search.extend([
                address.name.to_string(),
                address.line1.to_string(),
                address
                    .line2
                    .as_ref()
                    .map(|l| l.to_string())
                    .unwrap_or_default(),
                address.city.to_string(),
                address.postal_code.to_string(),
                address.country.to_string(),
            ]);
            let currency = p.total.currency().to_string();
            let total = p.total.amount_minor();
            self.lines.extend(lines);
            self.history.push(HistoryRow {
                order_id,
                version,
                status: "PLACED",
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
                    status: "PLACED".to_owned(),
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
                    placement: Some(Placement {
                        ship_name: address.name.to_string(),
                        ship_line1: address.line1.to_string(),
                        ship_line2: address.line2.as_ref().map(|l| l.to_string()),
                        ship_city: address.city.to_string(),
                        ship_postal_code: address.postal_code.to_string(),
                        ship_country: address.country.to_string(),
                        search_text: search.join(" "),
                    }),
                    dirty: true,
                },
            );
            self.touch(order_id);
            return Ok(());
        }
        let Some(order_id) = order_id_of(&Event::Order(event.clone())) else {
            return Ok(());
        };
        // No row to apply to (its placement was parked, or the stream is corrupt): park this
        // one too rather than invent an order.
        let Some(row) = self.orders.get_mut(&order_id) else {
            return Err(format!(
                "no order {order_id} to apply {} to",
                event.event_type()
            ));
        };
        if row.version >= version {
            return Ok(());
        }
        let (status, at, reason) = match event {
            OrderEvent::OrderPlaced(_) => return Ok(()),
            OrderEvent::OrderStockReserved(p) => ("STOCK_RESERVED", p.stock_reserved_at, None),
            OrderEvent::OrderPaid(p) => ("PAID", p.paid_at, None),
            OrderEvent::OrderConfirmed(p) => ("CONFIRMED", p.confirmed_at, None),
            OrderEvent::OrderCancelled(p) => (
                "CANCELLED",
                p.cancelled_at,
                Some(p.cancellation_reason.to_string()),
            ),
            OrderEvent::OrderShipped(p) => {
                row.carrier = Some(p.carrier.to_string());
                row.tracking_number = Some(p.tracking_number.to_string());
                row.shipped_at = Some(p.shipped_at);
                ("SHIPPED", p.shipped_at, None)
            }
            OrderEvent::OrderDelivered(p) => {
                row.delivered_at = Some(p.delivered_at);
                ("DELIVERED", p.delivered_at, None)
            }
        };
        // A cancellation takes back what the placement added to the customer and the day.
        if status == "CANCELLED" && row.status != "CANCELLED" {
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
        row.status = status.to_owned();
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

    fn payment_event(&mut self, version: i64, event: &PaymentEvent) -> Result<(), String> {
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
                status: "PENDING",
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
                row.status = "PENDING";
                row.attempts = row.attempts.max(to_i32(p.attempt, "attempt")?);
                row
            }
            // Every other payment event follows a request, which carries the amount.
            (_, None) => {
                return Err(format!(
                    "no payment for order {order_id} to apply {} to",
                    event.event_type()
                ));
            }
            (PaymentEvent::PaymentCharged(p), Some(mut row)) => {
                row.status = "CHARGED";
                row.amount_minor = p.amount.amount_minor();
                row.failure_reason = None;
                row
            }
            (PaymentEvent::PaymentDeclined(p), Some(mut row)) => {
                row.status = "DECLINED";
                row.failure_reason = Some(p.reason.to_string());
                row
            }
            (PaymentEvent::PaymentFailed(p), Some(mut row)) => {
                row.status = "FAILED";
                row.attempts = row.attempts.max(to_i32(p.attempt, "attempt")?);
                row.failure_reason = Some(p.reason.to_string());
                row
            }
            (PaymentEvent::PaymentRefunded(_), Some(mut row)) => {
                row.status = "REFUNDED";
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
const INSERT_ORDERS: &str = "
insert into orders (order_id, customer_id, total_minor, currency, ship_name, ship_line1,
    ship_line2, ship_city, ship_postal_code, ship_country, placed_at, status, updated_at,
    cancellation_reason, carrier, tracking_number, shipped_at, delivered_at, version)
select * from unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::text[],
    $13::timestamptz[], $14::text[], $15::text[], $16::text[], $17::timestamptz[],
    $18::timestamptz[], $19::bigint[])";

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

const INSERT_LINES: &str = "
insert into order_lines (order_id, line_no, sku, name, quantity, unit_price_minor,
    line_total_minor, currency)
select * from unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::int[], $6::bigint[],
    $7::bigint[], $8::text[])";

const INSERT_HISTORY: &str = "
insert into order_status_history (order_id, version, status, at, reason)
select * from unnest($1::uuid[], $2::bigint[], $3::text[], $4::timestamptz[], $5::text[])";

const INSERT_PAYMENTS: &str = "
insert into order_payments (order_id, status, amount_minor, currency, attempts, failure_reason,
    version)
select * from unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::int[], $6::text[],
    $7::bigint[])";

const UPDATE_PAYMENTS: &str = "
update order_payments p set
    status = u.status, amount_minor = u.amount_minor, currency = u.currency,
    attempts = u.attempts, failure_reason = u.failure_reason, version = u.version
from unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::int[], $6::text[],
    $7::bigint[])
    as u(order_id, status, amount_minor, currency, attempts, failure_reason, version)
where p.order_id = u.order_id and p.version < u.version";

const WRITE_CUSTOMERS: &str = "
insert into customers (customer_id, order_count, last_order_at)
select * from unnest($1::text[], $2::int[], $3::timestamptz[])
on conflict (customer_id) do update set
    order_count = customers.order_count + excluded.order_count,
    last_order_at = greatest(customers.last_order_at, excluded.last_order_at)";

const WRITE_LIFETIME_VALUES: &str = "
insert into customer_lifetime_values (customer_id, currency, amount_minor)
select * from unnest($1::text[], $2::text[], $3::bigint[])
on conflict (customer_id, currency) do update set
    amount_minor = customer_lifetime_values.amount_minor + excluded.amount_minor";

const WRITE_SALES: &str = "
insert into daily_sales (date, currency, orders, cancelled, revenue_minor)
select * from unnest($1::date[], $2::text[], $3::int[], $4::int[], $5::bigint[])
on conflict (date, currency) do update set
    orders = daily_sales.orders + excluded.orders,
    cancelled = daily_sales.cancelled + excluded.cancelled,
    revenue_minor = daily_sales.revenue_minor + excluded.revenue_minor";

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
            status: row.try_get(2)?,
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
        let status: String = row.try_get(1)?;
        let payment = PaymentRow {
            order_id: row.try_get(0)?,
            status: payment_status(&status),
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

/// Statuses are written by this module only, from the same five words.
fn payment_status(stored: &str) -> &'static str {
    match stored {
        "CHARGED" => "CHARGED",
        "DECLINED" => "DECLINED",
        "FAILED" => "FAILED",
        "REFUNDED" => "REFUNDED",
        _ => "PENDING",
    }
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
    let mut statements: Vec<(&str, Params<'_>)> = Vec::with_capacity(10);
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
        statements.push((INSERT_ORDERS, params));
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
    if !state.lines.is_empty() {
        let l = &state.lines;
        statements.push((
            INSERT_LINES,
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
            INSERT_HISTORY,
            params![
                h.iter().map(|x| x.order_id).collect::<Vec<_>>(),
                h.iter().map(|x| x.version).collect::<Vec<_>>(),
                h.iter().map(|x| x.status).collect::<Vec<_>>(),
                h.iter().map(|x| x.at).collect::<Vec<_>>(),
                h.iter().map(|x| x.reason.as_deref()).collect::<Vec<_>>(),
            ],
        ));
    }
    let (updated, inserted): (Vec<&PaymentRow>, Vec<&PaymentRow>) = state
        .payments
        .values()
        .filter(|p| p.dirty)
        .partition(|p| p.stored);
    for (sql, p) in [(INSERT_PAYMENTS, inserted), (UPDATE_PAYMENTS, updated)] {
        if p.is_empty() {
            continue;
        }
        statements.push((
            sql,
            params![
                p.iter().map(|x| x.order_id).collect::<Vec<_>>(),
                p.iter().map(|x| x.status).collect::<Vec<_>>(),
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
    if !state.customers.is_empty() {
        let c: Vec<(&String, &CustomerDelta)> = state.customers.iter().collect();
        statements.push((
            WRITE_CUSTOMERS,
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
            WRITE_LIFETIME_VALUES,
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
            WRITE_SALES,
            params![
                s.iter().map(|x| x.0.0).collect::<Vec<_>>(),
                s.iter().map(|x| x.0.1.as_str()).collect::<Vec<_>>(),
                s.iter().map(|x| x.1.orders).collect::<Vec<_>>(),
                s.iter().map(|x| x.1.cancelled).collect::<Vec<_>>(),
                s.iter().map(|x| x.1.revenue_minor).collect::<Vec<_>>(),
            ],
        ));
    }
    execute_all(tx, &statements).await
}
