//! The contract's output types, built from the rows of `sql`.

use async_graphql::{Context, Enum, Json, Object, SimpleObject};
use chrono::{DateTime, Utc};
use orderly_event_store::RecordedEvent;
use orderly_graphql::{ConsistencyToken, Date, Long};
use uuid::Uuid;

use crate::context::{ReadApi, request_id};
use crate::sql::{
    CustomerRow, DailySalesRow, LineRow, OrderRow, PaymentRow, ProductRow, StatusRow,
};

/// Stream versions and counters stay far below 2^31; saturate rather than wrap if one did not.
pub(crate) fn int(value: i64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// The contract's enums are the read models' words ([`orderly_projections::vocabulary`]),
/// converted both ways by the derive.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "orderly_projections::vocabulary::OrderStatus")]
pub enum OrderStatus {
    Placed,
    StockReserved,
    Paid,
    Confirmed,
    Shipped,
    Delivered,
    Cancelled,
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "orderly_projections::vocabulary::PaymentStatus")]
pub enum PaymentStatus {
    Pending,
    Charged,
    Declined,
    Failed,
    Refunded,
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionState {
    Running,
    CatchingUp,
    Rebuilding,
    Stopped,
    Failed,
}

impl From<orderly_projections::ProjectionState> for ProjectionState {
    fn from(state: orderly_projections::ProjectionState) -> Self {
        use orderly_projections::ProjectionState as S;
        match state {
            S::Running => Self::Running,
            S::CatchingUp => Self::CatchingUp,
            S::Rebuilding => Self::Rebuilding,
            S::Stopped => Self::Stopped,
            S::Failed => Self::Failed,
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Money {
    pub amount_minor: Long,
    pub currency: String,
}

impl Money {
    fn new(amount_minor: i64, currency: &str) -> Self {
        Self {
            amount_minor: Long(amount_minor),
            currency: currency.to_owned(),
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Address {
    pub name: String,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct OrderLine {
    pub sku: String,
    pub name: String,
    pub quantity: i32,
    pub unit_price: Money,
    pub line_total: Money,
}

impl From<&LineRow> for OrderLine {
    fn from(row: &LineRow) -> Self {
        Self {
            sku: row.sku.clone(),
            name: row.name.clone(),
            quantity: row.quantity,
            unit_price: Money::new(row.unit_price_minor, &row.currency),
            line_total: Money::new(row.line_total_minor, &row.currency),
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct OrderStatusChange {
    pub status: OrderStatus,
    pub at: DateTime<Utc>,
    pub reason: Option<String>,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Payment {
    pub status: PaymentStatus,
    pub amount: Money,
    pub attempts: i32,
    pub failure_reason: Option<String>,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Shipment {
    pub carrier: String,
    pub tracking_number: String,
    pub shipped_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// An order's read model. Lines and history come preloaded for a whole page when the query
/// selects them (one statement per page); otherwise they are loaded when asked for.
#[derive(Debug, Clone)]
pub struct Order {
    pub row: OrderRow,
    pub lines: Option<Vec<LineRow>>,
    pub history: Option<Vec<StatusRow>>,
}

impl Order {
    pub fn new(row: OrderRow) -> Self {
        Self {
            row,
            lines: None,
            history: None,
        }
    }
}

#[Object]
impl Order {
    async fn id(&self) -> Uuid {
        self.row.order_id
    }

    async fn customer_id(&self) -> &str {
        &self.row.customer_id
    }

    async fn status(&self) -> OrderStatus {
        self.row.status.into()
    }

    async fn lines(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<OrderLine>> {
        let loaded;
        let rows = match &self.lines {
            Some(rows) => rows,
            None => {
                let api = ReadApi::of(ctx)?;
                let mut by_order = api
                    .store()
                    .lines(&[self.row.order_id])
                    .await
                    .map_err(|e| e.to_graphql(request_id(ctx)))?;
                loaded = by_order.remove(&self.row.order_id).unwrap_or_default();
                &loaded
            }
        };
        Ok(rows.iter().map(OrderLine::from).collect())
    }

    async fn total(&self) -> Money {
        Money::new(self.row.total_minor, &self.row.currency)
    }

    async fn shipping_address(&self) -> Address {
        let row = &self.row;
        Address {
            name: row.ship_name.clone(),
            line1: row.ship_line1.clone(),
            line2: row.ship_line2.clone(),
            city: row.ship_city.clone(),
            postal_code: row.ship_postal_code.clone(),
            country: row.ship_country.clone(),
        }
    }

    async fn placed_at(&self) -> DateTime<Utc> {
        self.row.placed_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.row.updated_at
    }

    /// Version of the order's own event stream that this view reflects.
    async fn version(&self) -> i32 {
        int(self.row.version)
    }

    async fn history(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<OrderStatusChange>> {
        let loaded;
        let rows = match &self.history {
            Some(rows) => rows,
            None => {
                let api = ReadApi::of(ctx)?;
                let mut by_order = api
                    .store()
                    .history(&[self.row.order_id])
                    .await
                    .map_err(|e| e.to_graphql(request_id(ctx)))?;
                loaded = by_order.remove(&self.row.order_id).unwrap_or_default();
                &loaded
            }
        };
        Ok(rows
            .iter()
            .map(|row| OrderStatusChange {
                status: row.status.into(),
                at: row.at,
                reason: row.reason.clone(),
            })
            .collect())
    }

    async fn payment(&self) -> Option<Payment> {
        let Some(PaymentRow {
            status,
            amount_minor,
            currency,
            attempts,
            failure_reason,
            version: _,
        }) = &self.row.payment
        else {
            return None;
        };
        Some(Payment {
            status: (*status).into(),
            amount: Money::new(*amount_minor, currency),
            attempts: *attempts,
            failure_reason: failure_reason.clone(),
        })
    }

    async fn shipment(&self) -> Option<Shipment> {
        let row = &self.row;
        match (&row.carrier, &row.tracking_number, row.shipped_at) {
            (Some(carrier), Some(tracking_number), Some(shipped_at)) => Some(Shipment {
                carrier: carrier.clone(),
                tracking_number: tracking_number.clone(),
                shipped_at,
                delivered_at: row.delivered_at,
            }),
            _ => None,
        }
    }

    async fn cancellation_reason(&self) -> Option<&str> {
        self.row.cancellation_reason.as_deref()
    }
}

#[derive(SimpleObject, Debug, Clone, Default)]
pub struct PageInfo {
    /// True when the page was asked for with `after`: rows come before it.
    pub has_previous_page: bool,
    pub has_next_page: bool,
    pub start_cursor: Option<String>,
    pub end_cursor: Option<String>,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct OrderEdge {
    pub node: Order,
    pub cursor: String,
}

pub struct OrderConnection {
    pub edges: Vec<OrderEdge>,
    pub page_info: PageInfo,
}

#[Object]
impl OrderConnection {
    async fn edges(&self) -> &[OrderEdge] {
        &self.edges
    }

    async fn nodes(&self) -> Vec<&Order> {
        self.edges.iter().map(|edge| &edge.node).collect()
    }

    async fn page_info(&self) -> &PageInfo {
        &self.page_info
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub description: Option<String>,
    pub price: Money,
    pub on_hand: i32,
    pub reserved: i32,
    pub available: i32,
    pub version: i32,
}

impl From<ProductRow> for Product {
    fn from(row: ProductRow) -> Self {
        Self {
            price: Money::new(row.price_minor, &row.currency),
            sku: row.sku,
            name: row.name,
            description: row.description,
            on_hand: row.on_hand,
            reserved: row.reserved,
            available: row.available,
            version: int(row.version),
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct ProductEdge {
    pub node: Product,
    pub cursor: String,
}

pub struct ProductConnection {
    pub edges: Vec<ProductEdge>,
    pub page_info: PageInfo,
}

#[Object]
impl ProductConnection {
    async fn edges(&self) -> &[ProductEdge] {
        &self.edges
    }

    async fn nodes(&self) -> Vec<&Product> {
        self.edges.iter().map(|edge| &edge.node).collect()
    }

    async fn page_info(&self) -> &PageInfo {
        &self.page_info
    }
}

pub struct Customer {
    pub row: CustomerRow,
}

#[Object]
impl Customer {
    async fn id(&self) -> &str {
        &self.row.customer_id
    }

    async fn order_count(&self) -> i32 {
        self.row.order_count
    }

    /// One entry per currency.
    async fn lifetime_value(&self) -> Vec<Money> {
        self.row
            .lifetime_values
            .iter()
            .map(|(currency, amount)| Money::new(*amount, currency))
            .collect()
    }

    async fn last_order_at(&self) -> Option<DateTime<Utc>> {
        self.row.last_order_at
    }

    /// Weighed like the root `orders`: a page read per appearance, aliases included.
    #[graphql(complexity = "orderly_graphql::cost::page(first, 20, child_complexity)")]
    async fn orders(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<OrderConnection> {
        let api = ReadApi::of(ctx)?;
        let filter = crate::sql::OrderQuery {
            customer_id: Some(self.row.customer_id.clone()),
            ..Default::default()
        };
        api.order_page(ctx, &filter, first, after.as_deref())
            .await
            .map_err(|e| e.to_graphql(request_id(ctx)))
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct DailySales {
    pub date: Date,
    pub currency: String,
    pub orders: i32,
    pub cancelled: i32,
    pub revenue: Money,
}

impl From<DailySalesRow> for DailySales {
    fn from(row: DailySalesRow) -> Self {
        Self {
            date: Date(row.date),
            revenue: Money::new(row.revenue_minor, &row.currency),
            currency: row.currency,
            orders: row.orders,
            cancelled: row.cancelled,
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct EventRecord {
    pub id: Uuid,
    pub stream: String,
    #[graphql(name = "type")]
    pub event_type: String,
    /// Version of the event within its stream, from 0.
    pub version: i32,
    /// Global position of the event; usable as a ConsistencyToken.
    pub position: ConsistencyToken,
    pub recorded_at: DateTime<Utc>,
    pub data: Json<serde_json::Value>,
    pub metadata: Json<serde_json::Value>,
}

/// Payload fields no reader of the API may see, whatever their role: a payment token is
/// handed to the gateway and is of no use to anyone else, so it leaves only there.
const REDACTED_FIELDS: [&str; 1] = ["payment_token"];

/// `data` with every field of [`REDACTED_FIELDS`], at any depth, replaced by a marker that
/// says it was there.
fn redacted(mut data: serde_json::Value) -> serde_json::Value {
    fn walk(value: &mut serde_json::Value, depth: usize) {
        // Event payloads nest a few levels; the bound only guards the recursion.
        if depth > 32 {
            return;
        }
        match value {
            serde_json::Value::Object(fields) => {
                for (name, field) in fields.iter_mut() {
                    if REDACTED_FIELDS.contains(&name.as_str()) {
                        *field = serde_json::Value::String("[redacted]".to_owned());
                    } else {
                        walk(field, depth + 1);
                    }
                }
            }
            serde_json::Value::Array(items) => {
                items.iter_mut().for_each(|item| walk(item, depth + 1));
            }
            _ => {}
        }
    }
    walk(&mut data, 0);
    data
}

impl From<RecordedEvent> for EventRecord {
    fn from(event: RecordedEvent) -> Self {
        Self {
            id: event.id,
            stream: event.stream.as_str().to_owned(),
            event_type: event.event_type,
            version: i32::try_from(event.version).unwrap_or(i32::MAX),
            position: ConsistencyToken(event.position),
            recorded_at: event.recorded_at,
            data: Json(redacted(event.data)),
            metadata: Json(event.metadata),
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct ProjectionStatus {
    pub name: String,
    pub state: ProjectionState,
    pub position: Option<ConsistencyToken>,
    pub lag_events: Option<Long>,
    pub lag_ms: Option<Long>,
    pub dead_letters: i32,
}

impl From<orderly_projections::ProjectionStatus> for ProjectionStatus {
    fn from(status: orderly_projections::ProjectionStatus) -> Self {
        Self {
            name: status.name.as_str().to_owned(),
            state: status.state.into(),
            position: Some(ConsistencyToken(status.position)),
            lag_events: status.lag_events.map(Long),
            lag_ms: status.lag_ms.map(Long),
            dead_letters: int(status.dead_letters),
        }
    }
}
