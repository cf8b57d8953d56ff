//! Every statement the read API sends to the read-model database, and the rows they return.
//!
//! Pages are keyset-paginated on columns that never change once written (`placed_at, order_id`
//! for orders, `name, sku` for products), so rows inserted while a client pages never shift
//! the rows it has yet to see: nothing is skipped or repeated. Children of a page (lines,
//! status history) are loaded for all its orders in one statement each, so a page costs the
//! same number of statements whatever its size.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Pool;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use orderly_projections::tables::{
    DAILY_SALES, ORDER_LINES, ORDER_PAYMENTS, ORDER_STATUS_HISTORY, ORDERS, PRODUCTS, position,
};
use orderly_projections::vocabulary::{OrderStatus, PaymentStatus};

use crate::ReadError;

/// The payment columns an order row carries: all of `order_payments` but the key it shares with
/// the order.
const PAYMENT_COLUMNS: [&str; 6] = [
    "status",
    "amount_minor",
    "currency",
    "attempts",
    "failure_reason",
    "version",
];

// Each is a column of `order_payments`: the build stops otherwise.
const _: () = {
    let mut i = 0;
    while i < PAYMENT_COLUMNS.len() {
        ORDER_PAYMENTS.index(PAYMENT_COLUMNS[i]);
        i += 1;
    }
};

/// `orders` joined with its payment, as every order statement selects it: every column of the
/// order, then [`PAYMENT_COLUMNS`] ([`order_row`] reads them by their place in those lists).
static ORDER_COLUMNS: LazyLock<String> = LazyLock::new(|| {
    let payment = PAYMENT_COLUMNS.map(|name| format!("p.{name}")).join(", ");
    format!("{}, {payment}", ORDERS.select_list(Some("o")))
});

const ORDER_FROM: &str = "orders o left join order_payments p on p.order_id = o.order_id";

/// Where payment column `$name` is in a row of [`ORDER_COLUMNS`].
macro_rules! payment_column {
    ($name:literal) => {
        const { ORDERS.columns.len() + position(&PAYMENT_COLUMNS, $name) }
    };
}

/// Where column `$name` of `$table` is in a row that selects the table's whole list (for
/// [`ORDER_COLUMNS`], the order's columns come first).
macro_rules! column {
    ($table:ident, $name:literal) => {
        const { $table.index($name) }
    };
}

/// The texts of the statements most reads send, built once (the statement cache is keyed by
/// the text). Public for the read benchmark, whose bare handler must send the very same SQL.
pub mod statements {
    use std::sync::LazyLock;

    use super::{ORDER_COLUMNS, ORDER_FROM, ORDER_LINES};

    /// `order(id)`: one order with its payment, `$1` its id.
    pub fn order() -> &'static str {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "select {} from {ORDER_FROM} where o.order_id = $1",
                *ORDER_COLUMNS
            )
        });
        &SQL
    }

    /// A page of orders, newest first: `join` and `filter` (a `where` clause or nothing) narrow
    /// it, `$limit_param` is the page size's parameter.
    pub fn orders_page(join: &str, filter: &str, limit_param: usize) -> String {
        format!(
            "select {} from {ORDER_FROM}{join}{filter}
             order by o.placed_at desc, o.order_id desc limit ${limit_param}",
            *ORDER_COLUMNS
        )
    }

    /// The lines of the orders in `$1`, by order then line.
    pub fn lines() -> &'static str {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "select {} from order_lines where order_id = any($1) order by order_id, line_no",
                ORDER_LINES.select_list(None)
            )
        });
        &SQL
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderRow {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: OrderStatus,
    pub total_minor: i64,
    pub currency: String,
    pub ship_name: String,
    pub ship_line1: String,
    pub ship_line2: Option<String>,
    pub ship_city: String,
    pub ship_postal_code: String,
    pub ship_country: String,
    pub placed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub cancellation_reason: Option<String>,
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub shipped_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub payment: Option<PaymentRow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PaymentRow {
    pub status: PaymentStatus,
    pub amount_minor: i64,
    pub currency: String,
    pub attempts: i32,
    pub failure_reason: Option<String>,
    /// The payment stream's version the row is at: what tells an `orderUpdated` follower that
    /// the payment changed while the order's own version did not.
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LineRow {
    pub sku: String,
    pub name: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
    pub line_total_minor: i64,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatusRow {
    /// Version of the order-stream event that made this change.
    pub version: i64,
    pub status: OrderStatus,
    pub at: DateTime<Utc>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProductRow {
    pub sku: String,
    pub name: String,
    pub description: Option<String>,
    pub price_minor: i64,
    pub currency: String,
    pub on_hand: i32,
    pub reserved: i32,
    pub available: i32,
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CustomerRow {
    pub customer_id: String,
    pub order_count: i32,
    pub last_order_at: Option<DateTime<Utc>>,
    /// (currency, amount in minor units), by currency.
    pub lifetime_values: Vec<(String, i64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DailySalesRow {
    pub date: NaiveDate,
    pub currency: String,
    pub orders: i32,
    pub cancelled: i32,
    pub revenue_minor: i64,
}

/// Which orders a page holds. All filters are optional and combine with `and`.
#[derive(Debug, Clone, Default)]
pub struct OrderQuery {
    pub customer_id: Option<String>,
    pub statuses: Option<Vec<OrderStatus>>,
    pub placed_from: Option<DateTime<Utc>>,
    pub placed_to: Option<DateTime<Utc>>,
    /// Full-text query over the order's search document (`websearch_to_tsquery` syntax).
    pub text: Option<String>,
}

/// `at`, when PostgreSQL can store and compare it: `timestamptz` starts at 4714-11-24 BC
/// (chrono's years end long before PostgreSQL's do). An earlier time would fail the statement
/// with SQLSTATE 22008, so it is refused as the caller's input naming `field`.
pub fn storable(field: &str, at: DateTime<Utc>) -> Result<DateTime<Utc>, ReadError> {
    // Year -4713 is 4714 BC: chrono counts a year 0, as ISO 8601 does.
    let earliest = NaiveDate::from_ymd_opt(-4713, 11, 24)
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|at| at.and_utc());
    match earliest {
        Some(earliest) if at >= earliest => Ok(at),
        _ => Err(ReadError::invalid(
            field,
            "must be a time PostgreSQL can store (4714-11-24 BC or later)",
        )),
    }
}

/// Where a page of orders starts: after this row of the order `placed_at desc, order_id desc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderKey {
    pub placed_at: DateTime<Utc>,
    pub order_id: Uuid,
}

/// Where a page of products starts: after this row of the order `name, sku`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductKey {
    pub name: String,
    pub sku: String,
}

/// The read-model database. Cheap to clone.
#[derive(Clone)]
pub struct ReadStore {
    pool: Pool,
    /// Statements sent so far: what the N+1 tests count.
    statements: Arc<AtomicU64>,
}

type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;

impl ReadStore {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            statements: Arc::default(),
        }
    }

    /// How many statements this store has sent since it was made.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// The one way statements are sent: prepared once per connection, counted.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, ReadError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        self.statements.fetch_add(1, Ordering::Relaxed);
        Ok(client.query(&statement, params).await?)
    }

    /// A connection for the few reads that live in other crates (projection status).
    pub async fn client(&self) -> Result<deadpool_postgres::Object, ReadError> {
        Ok(self.pool.get().await?)
    }

    pub async fn order(&self, order_id: Uuid) -> Result<Option<OrderRow>, ReadError> {
        let rows = self.query(statements::order(), &[&order_id]).await?;
        rows.first().map(order_row).transpose()
    }

    /// Up to `limit` orders matching `filter` after `after`, newest first.
    pub async fn orders(
        &self,
        filter: &OrderQuery,
        after: Option<OrderKey>,
        limit: i64,
    ) -> Result<Vec<OrderRow>, ReadError> {
        let mut conditions: Vec<String> = Vec::new();
        let mut params: Params<'_> = Vec::new();
        let mut join = "";
        // Each filter adds its own condition, so the statement text (and its plan) is one of a
        // few shapes, each able to use the index that fits it.
        if let Some(customer_id) = &filter.customer_id {
            params.push(customer_id);
            conditions.push(format!("o.customer_id = ${}", params.len()));
        }
        let statuses: Option<Vec<&str>> = filter
            .statuses
            .as_ref()
            .map(|s| s.iter().map(|s| s.as_str()).collect());
        if let Some(statuses) = &statuses {
            params.push(statuses);
            conditions.push(format!("o.status = any(${})", params.len()));
        }
        if let Some(from) = &filter.placed_from {
            params.push(from);
            conditions.push(format!("o.placed_at >= ${}", params.len()));
        }
        if let Some(to) = &filter.placed_to {
            params.push(to);
            conditions.push(format!("o.placed_at <= ${}", params.len()));
        }
        if let Some(text) = &filter.text {
            join = " join order_search s on s.order_id = o.order_id";
            params.push(text);
            conditions.push(format!(
                "s.search_document @@ websearch_to_tsquery('simple', ${})",
                params.len()
            ));
        }
        let key = after.map(|key| (key.placed_at, key.order_id));
        if let Some((placed_at, order_id)) = &key {
            params.push(placed_at);
            params.push(order_id);
            conditions.push(format!(
                "(o.placed_at, o.order_id) < (${}, ${})",
                params.len() - 1,
                params.len()
            ));
        }
        params.push(&limit);
        let filter_sql = where_clause(&conditions);
        let sql = statements::orders_page(join, &filter_sql, params.len());
        self.query(&sql, &params)
            .await?
            .iter()
            .map(order_row)
            .collect()
    }

    /// The lines of every order in `order_ids`, in line order, in one statement.
    pub async fn lines(
        &self,
        order_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<LineRow>>, ReadError> {
        let rows = self.query(statements::lines(), &[&order_ids]).await?;
        let mut by_order: HashMap<Uuid, Vec<LineRow>> = HashMap::new();
        for row in rows {
            by_order
                .entry(row.try_get(column!(ORDER_LINES, "order_id"))?)
                .or_default()
                .push(LineRow {
                    sku: row.try_get(column!(ORDER_LINES, "sku"))?,
                    name: row.try_get(column!(ORDER_LINES, "name"))?,
                    quantity: row.try_get(column!(ORDER_LINES, "quantity"))?,
                    unit_price_minor: row.try_get(column!(ORDER_LINES, "unit_price_minor"))?,
                    line_total_minor: row.try_get(column!(ORDER_LINES, "line_total_minor"))?,
                    currency: row.try_get(column!(ORDER_LINES, "currency"))?,
                });
        }
        Ok(by_order)
    }

    /// The status history of every order in `order_ids`, oldest first, in one statement.
    pub async fn history(
        &self,
        order_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<StatusRow>>, ReadError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "select {} from order_status_history where order_id = any($1)
                 order by order_id, version",
                ORDER_STATUS_HISTORY.select_list(None)
            )
        });
        let rows = self.query(&SQL, &[&order_ids]).await?;
        let mut by_order: HashMap<Uuid, Vec<StatusRow>> = HashMap::new();
        for row in rows {
            by_order
                .entry(row.try_get(column!(ORDER_STATUS_HISTORY, "order_id"))?)
                .or_default()
                .push(StatusRow {
                    version: row.try_get(column!(ORDER_STATUS_HISTORY, "version"))?,
                    status: row
                        .try_get::<_, &str>(column!(ORDER_STATUS_HISTORY, "status"))?
                        .parse()?,
                    at: row.try_get(column!(ORDER_STATUS_HISTORY, "at"))?,
                    reason: row.try_get(column!(ORDER_STATUS_HISTORY, "reason"))?,
                });
        }
        Ok(by_order)
    }

    pub async fn product(&self, sku: &str) -> Result<Option<ProductRow>, ReadError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "select {} from products where sku = $1",
                PRODUCTS.select_list(None)
            )
        });
        let rows = self.query(&SQL, &[&sku]).await?;
        rows.first().map(product_row).transpose()
    }

    /// Up to `limit` products after `after`, by name then SKU; `search` matches words of the
    /// name or the SKU.
    pub async fn products(
        &self,
        search: Option<&str>,
        after: Option<&ProductKey>,
        limit: i64,
    ) -> Result<Vec<ProductRow>, ReadError> {
        let mut conditions: Vec<String> = Vec::new();
        let mut params: Params<'_> = Vec::new();
        if let Some(search) = &search {
            params.push(search);
            // The same expression as the GIN index, so the index answers it.
            conditions.push(format!(
                "to_tsvector('simple', name || ' ' || sku) @@ websearch_to_tsquery('simple', ${})",
                params.len()
            ));
        }
        if let Some(key) = after {
            params.push(&key.name);
            params.push(&key.sku);
            conditions.push(format!(
                "(name, sku) > (${}, ${})",
                params.len() - 1,
                params.len()
            ));
        }
        params.push(&limit);
        let filter_sql = where_clause(&conditions);
        let sql = format!(
            "select {} from products{filter_sql} order by name, sku limit ${}",
            PRODUCTS.select_list(None),
            params.len()
        );
        self.query(&sql, &params)
            .await?
            .iter()
            .map(product_row)
            .collect()
    }

    pub async fn customer(&self, customer_id: &str) -> Result<Option<CustomerRow>, ReadError> {
        let rows = self
            .query(
                "select c.customer_id, c.order_count, c.last_order_at,
                        coalesce(array_agg(v.currency order by v.currency)
                                 filter (where v.currency is not null), '{}'),
                        coalesce(array_agg(v.amount_minor order by v.currency)
                                 filter (where v.currency is not null), '{}')
                 from customers c
                 left join customer_lifetime_values v on v.customer_id = c.customer_id
                 where c.customer_id = $1
                 group by c.customer_id",
                &[&customer_id],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let currencies: Vec<String> = row.try_get(3)?;
        let amounts: Vec<i64> = row.try_get(4)?;
        Ok(Some(CustomerRow {
            customer_id: row.try_get(0)?,
            order_count: row.try_get(1)?,
            last_order_at: row.try_get(2)?,
            lifetime_values: currencies.into_iter().zip(amounts).collect(),
        }))
    }

    /// Daily sales from `from` to `to`, both included, by date then currency.
    pub async fn sales_by_day(
        &self,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DailySalesRow>, ReadError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "select {} from daily_sales where date between $1 and $2 order by date, currency",
                DAILY_SALES.select_list(None)
            )
        });
        let rows = self.query(&SQL, &[&from, &to]).await?;
        rows.iter()
            .map(|row| {
                Ok(DailySalesRow {
                    date: row.try_get(column!(DAILY_SALES, "date"))?,
                    currency: row.try_get(column!(DAILY_SALES, "currency"))?,
                    orders: row.try_get(column!(DAILY_SALES, "orders"))?,
                    cancelled: row.try_get(column!(DAILY_SALES, "cancelled"))?,
                    revenue_minor: row.try_get(column!(DAILY_SALES, "revenue_minor"))?,
                })
            })
            .collect()
    }
}

/// ` where a and b ...`, or nothing without conditions.
fn where_clause(conditions: &[String]) -> String {
    if conditions.is_empty() {
        String::new()
    } else {
        format!(" where {}", conditions.join(" and "))
    }
}

/// An order and its payment from a row of [`ORDER_COLUMNS`]. The projection maps the same
/// tables to its own row type, for folding events over them rather than answering queries.
fn order_row(row: &Row) -> Result<OrderRow, ReadError> {
    let payment_status: Option<&str> = row.try_get(payment_column!("status"))?;
    let payment = match payment_status {
        None => None,
        Some(status) => Some(PaymentRow {
            status: status.parse()?,
            amount_minor: row.try_get(payment_column!("amount_minor"))?,
            currency: row.try_get(payment_column!("currency"))?,
            attempts: row.try_get(payment_column!("attempts"))?,
            failure_reason: row.try_get(payment_column!("failure_reason"))?,
            version: row.try_get(payment_column!("version"))?,
        }),
    };
    Ok(OrderRow {
        order_id: row.try_get(column!(ORDERS, "order_id"))?,
        customer_id: row.try_get(column!(ORDERS, "customer_id"))?,
        status: row.try_get::<_, &str>(column!(ORDERS, "status"))?.parse()?,
        total_minor: row.try_get(column!(ORDERS, "total_minor"))?,
        currency: row.try_get(column!(ORDERS, "currency"))?,
        ship_name: row.try_get(column!(ORDERS, "ship_name"))?,
        ship_line1: row.try_get(column!(ORDERS, "ship_line1"))?,
        ship_line2: row.try_get(column!(ORDERS, "ship_line2"))?,
        ship_city: row.try_get(column!(ORDERS, "ship_city"))?,
        ship_postal_code: row.try_get(column!(ORDERS, "ship_postal_code"))?,
        ship_country: row.try_get(column!(ORDERS, "ship_country"))?,
        placed_at: row.try_get(column!(ORDERS, "placed_at"))?,
        updated_at: row.try_get(column!(ORDERS, "updated_at"))?,
        cancellation_reason: row.try_get(column!(ORDERS, "cancellation_reason"))?,
        carrier: row.try_get(column!(ORDERS, "carrier"))?,
        tracking_number: row.try_get(column!(ORDERS, "tracking_number"))?,
        shipped_at: row.try_get(column!(ORDERS, "shipped_at"))?,
        delivered_at: row.try_get(column!(ORDERS, "delivered_at"))?,
        version: row.try_get(column!(ORDERS, "version"))?,
        payment,
    })
}

fn product_row(row: &Row) -> Result<ProductRow, ReadError> {
    Ok(ProductRow {
        sku: row.try_get(column!(PRODUCTS, "sku"))?,
        name: row.try_get(column!(PRODUCTS, "name"))?,
        description: row.try_get(column!(PRODUCTS, "description"))?,
        price_minor: row.try_get(column!(PRODUCTS, "price_minor"))?,
        currency: row.try_get(column!(PRODUCTS, "currency"))?,
        on_hand: row.try_get(column!(PRODUCTS, "on_hand"))?,
        reserved: row.try_get(column!(PRODUCTS, "reserved"))?,
        available: row.try_get(column!(PRODUCTS, "available"))?,
        version: row.try_get(column!(PRODUCTS, "version"))?,
    })
}
