//! The contract's Query type. Every resolver checks who asks before it waits or reads, then
//! waits for its consistency token (see `consistency`), then reads.

use async_graphql::{Context, InputObject, Object};
use chrono::{DateTime, Utc};
use orderly_event_schemas::{Event, OrderEvent, decode_recorded};
use orderly_event_store::{Direction, EventStore, RecordedEvent, StreamName};
use orderly_graphql::{Date, cost};
use orderly_projections::ProjectionName;
use uuid::Uuid;

use crate::ReadError;
use crate::consistency::{ConsistencyInput, read_point};
use crate::context::{ReadApi, Wants, may_read_order, reader, request_id, sees_all_orders};
use crate::sql::{OrderQuery, storable};
use crate::types::{
    Customer, DailySales, EventRecord, Order, OrderConnection, OrderStatus, Product,
    ProductConnection, ProjectionStatus,
};

/// Longest accepted search text, in characters.
const MAX_SEARCH_CHARS: usize = 200;
/// Longest `salesByDay` range, in days: a few years of daily rows is still a small answer.
const MAX_SALES_DAYS: i64 = 3 * 366;
/// Most events `orderEvents` returns: an order's stream holds a handful.
const MAX_ORDER_EVENTS: usize = 1000;

#[derive(InputObject, Debug, Clone, Default)]
pub struct OrderFilter {
    pub customer_id: Option<String>,
    pub status: Option<Vec<OrderStatus>>,
    pub placed_from: Option<DateTime<Utc>>,
    pub placed_to: Option<DateTime<Utc>>,
}

#[derive(Default)]
pub struct QueryRoot;

/// Runs one resolver's body and turns its error into the contract's.
async fn answer<T>(
    ctx: &Context<'_>,
    body: impl AsyncFnOnce(&ReadApi) -> Result<T, ReadError>,
) -> async_graphql::Result<T> {
    let api = ReadApi::of(ctx)?;
    body(api).await.map_err(|error| {
        if !matches!(error, ReadError::Internal(_) | ReadError::Unavailable(_)) {
            tracing::debug!(request_id = %request_id(ctx), %error, "query refused");
        }
        error.to_graphql(request_id(ctx))
    })
}

async fn wait(
    ctx: &Context<'_>,
    api: &ReadApi,
    projection: ProjectionName,
    consistency: Option<&ConsistencyInput>,
) -> Result<(), ReadError> {
    read_point(
        ctx,
        api.hub(),
        api.limits().max_consistency_wait,
        projection,
        consistency,
    )
    .await
}

/// Search text: trimmed, not blank, not huge.
fn search_text(field: &str, text: &str) -> Result<String, ReadError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ReadError::invalid(field, "must not be blank"));
    }
    if text.chars().count() > MAX_SEARCH_CHARS {
        return Err(ReadError::invalid(
            field,
            format!("must be at most {MAX_SEARCH_CHARS} characters"),
        ));
    }
    Ok(text.to_owned())
}

/// The customer who placed `order_id`, from the first event of its stream; `None` when the
/// order does not exist.
pub async fn order_owner(
    events: &dyn EventStore,
    order_id: Uuid,
) -> Result<Option<String>, ReadError> {
    let stream = order_stream(order_id)?;
    let first = events
        .read_stream(&stream, Direction::Forwards, None, 1)
        .await?;
    first.into_iter().next().map(placed_by).transpose()
}

/// The customer id of an order stream's first event, its `OrderPlaced` (of any version).
fn placed_by(first: RecordedEvent) -> Result<String, ReadError> {
    let stream = first.stream.clone();
    let decoded = decode_recorded(&first.event_type, first.data, first.metadata)
        .map_err(|e| ReadError::Internal(format!("{stream}: {e}")))?;
    match decoded.event {
        Event::Order(OrderEvent::OrderPlaced(placed)) => Ok(placed.customer_id.as_str().to_owned()),
        _ => Err(ReadError::Internal(format!(
            "{stream} does not start with OrderPlaced"
        ))),
    }
}

pub fn order_stream(order_id: Uuid) -> Result<StreamName, ReadError> {
    StreamName::parse(format!("order-{order_id}")).map_err(|e| ReadError::Internal(e.to_string()))
}

// Served as part of `ReadQuery`, which carries the name `Query`.
#[Object(name = "ContractQuery")]
impl QueryRoot {
    #[graphql(complexity = "cost::READ + child_complexity")]
    async fn order(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        consistency: Option<ConsistencyInput>,
    ) -> async_graphql::Result<Option<Order>> {
        answer(ctx, async |api| {
            let actor = reader(ctx)?;
            wait(ctx, api, ProjectionName::Orders, consistency.as_ref()).await?;
            let Some(row) = api.store().order(id).await? else {
                return Ok(None);
            };
            // Someone else's order reads as absent, as the command side treats it: an order
            // id says nothing about whether it exists.
            if !may_read_order(actor, &row.customer_id) {
                return Ok(None);
            }
            let wants = Wants::of_order(&ctx.look_ahead());
            Ok(api.with_children(vec![Order::new(row)], wants).await?.pop())
        })
        .await
    }

    #[graphql(complexity = "cost::page(first, 20, child_complexity)")]
    async fn orders(
        &self,
        ctx: &Context<'_>,
        filter: Option<OrderFilter>,
        #[graphql(default = 20)] first: Option<i32>,
        after: Option<String>,
        consistency: Option<ConsistencyInput>,
    ) -> async_graphql::Result<OrderConnection> {
        answer(ctx, async |api| {
            let actor = reader(ctx)?;
            let filter = filter.unwrap_or_default();
            let customer_id = if sees_all_orders(actor) {
                filter.customer_id
            } else {
                match filter.customer_id {
                    Some(id) if id != actor.sub => {
                        return Err(ReadError::Forbidden("customers see their own orders only"));
                    }
                    _ => Some(actor.sub.clone()),
                }
            };
            let query = OrderQuery {
                customer_id,
                statuses: filter.status.map(|s| s.iter().map(|&s| s.into()).collect()),
                placed_from: filter
                    .placed_from
                    .map(|at| storable("filter.placedFrom", at))
                    .transpose()?,
                placed_to: filter
                    .placed_to
                    .map(|at| storable("filter.placedTo", at))
                    .transpose()?,
                text: None,
            };
            wait(ctx, api, ProjectionName::Orders, consistency.as_ref()).await?;
            api.order_page(ctx, &query, first, after.as_deref()).await
        })
        .await
    }

    /// Full-text search over order lines, product names, customer ids and addresses.
    #[graphql(complexity = "cost::page(first, 20, child_complexity)")]
    async fn search_orders(
        &self,
        ctx: &Context<'_>,
        query: String,
        #[graphql(default = 20)] first: Option<i32>,
        after: Option<String>,
        consistency: Option<ConsistencyInput>,
    ) -> async_graphql::Result<OrderConnection> {
        answer(ctx, async |api| {
            let actor = reader(ctx)?;
            let text = search_text("query", &query)?;
            let filter = OrderQuery {
                customer_id: (!sees_all_orders(actor)).then(|| actor.sub.clone()),
                text: Some(text),
                ..Default::default()
            };
            wait(ctx, api, ProjectionName::Orders, consistency.as_ref()).await?;
            api.order_page(ctx, &filter, first, after.as_deref()).await
        })
        .await
    }

    #[graphql(complexity = "cost::READ + child_complexity")]
    async fn product(
        &self,
        ctx: &Context<'_>,
        sku: String,
        consistency: Option<ConsistencyInput>,
    ) -> async_graphql::Result<Option<Product>> {
        answer(ctx, async |api| {
            wait(ctx, api, ProjectionName::Products, consistency.as_ref()).await?;
            Ok(api.store().product(&sku).await?.map(Product::from))
        })
        .await
    }

    #[graphql(complexity = "cost::page(first, 50, child_complexity)")]
    async fn products(
        &self,
        ctx: &Context<'_>,
        search: Option<String>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
        consistency: Option<ConsistencyInput>,
    ) -> async_graphql::Result<ProductConnection> {
        answer(ctx, async |api| {
            // An empty search box lists everything rather than nothing.
            let search = match search.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(text) => Some(search_text("search", text)?),
            };
            wait(ctx, api, ProjectionName::Products, consistency.as_ref()).await?;
            api.product_page(search.as_deref(), first, after.as_deref())
                .await
        })
        .await
    }

    #[graphql(complexity = "cost::READ + child_complexity")]
    async fn customer(
        &self,
        ctx: &Context<'_>,
        id: String,
        consistency: Option<ConsistencyInput>,
    ) -> async_graphql::Result<Option<Customer>> {
        answer(ctx, async |api| {
            let actor = reader(ctx)?;
            if !actor.is_admin() && actor.sub != id {
                return Err(ReadError::Forbidden(
                    "customers see their own customer record only",
                ));
            }
            wait(ctx, api, ProjectionName::Orders, consistency.as_ref()).await?;
            Ok(api.store().customer(&id).await?.map(|row| Customer { row }))
        })
        .await
    }

    #[graphql(complexity = "cost::READ + child_complexity")]
    async fn sales_by_day(
        &self,
        ctx: &Context<'_>,
        from: Date,
        to: Date,
        consistency: Option<ConsistencyInput>,
    ) -> async_graphql::Result<Vec<DailySales>> {
        answer(ctx, async |api| {
            let actor = reader(ctx)?;
            if !actor.is_admin() {
                return Err(ReadError::Forbidden("sales figures are for admins"));
            }
            if from.0 > to.0 {
                return Err(ReadError::invalid("to", "must not be before `from`"));
            }
            if (to.0 - from.0).num_days() >= MAX_SALES_DAYS {
                return Err(ReadError::invalid(
                    "to",
                    format!("the range may span at most {MAX_SALES_DAYS} days"),
                ));
            }
            wait(ctx, api, ProjectionName::Orders, consistency.as_ref()).await?;
            let rows = api.store().sales_by_day(from.0, to.0).await?;
            Ok(rows.into_iter().map(DailySales::from).collect())
        })
        .await
    }

    /// The order's own events, read from the event store (an audit trail, always current).
    #[graphql(complexity = "cost::READ + child_complexity")]
    async fn order_events(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
    ) -> async_graphql::Result<Vec<EventRecord>> {
        answer(ctx, async |api| {
            let actor = reader(ctx)?;
            let events = api
                .events()
                .read_stream(
                    &order_stream(order_id)?,
                    Direction::Forwards,
                    None,
                    MAX_ORDER_EVENTS,
                )
                .await?;
            if !sees_all_orders(actor) {
                // As `order`: someone else's order reads as one that does not exist.
                let owner = events.first().cloned().map(placed_by).transpose()?;
                if owner.as_deref() != Some(actor.sub.as_str()) {
                    return Ok(Vec::new());
                }
            }
            Ok(events.into_iter().map(EventRecord::from).collect())
        })
        .await
    }

    /// Admin only.
    #[graphql(complexity = "cost::READ + child_complexity")]
    async fn projections(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ProjectionStatus>> {
        answer(ctx, async |api| {
            let actor = reader(ctx)?;
            if !actor.is_admin() {
                return Err(ReadError::Forbidden("projection status is for admins"));
            }
            let client = api.store().client().await?;
            let all = orderly_projections::status(&client).await?;
            Ok(all.into_iter().map(ProjectionStatus::from).collect())
        })
        .await
    }
}
