//! [`ReadApi`]: what every resolver reaches through the schema's data, and the page builders
//! the queries share.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::Context;
use async_graphql::Lookahead;
use orderly_event_store::EventStore;
use orderly_graphql::{Actor, Caller, ErrorCode, Role};
use orderly_projections::ProjectionHub;

use crate::ReadError;
use crate::consistency::LagGauge;
use crate::cursor;
use crate::rebuilds::Rebuilds;
use crate::sql::{OrderKey, OrderQuery, ProductKey, ReadStore};
use crate::types::{
    Order, OrderConnection, OrderEdge, PageInfo, Product, ProductConnection, ProductEdge,
};

/// Largest `first` any list accepts: a bigger page is refused, not silently cut.
pub const MAX_PAGE: i32 = 100;

/// Tuning an operator may want to change; the defaults suit most deployments.
#[derive(Debug, Clone)]
pub struct ReadLimits {
    /// The server's cap on `consistency.timeoutMs`.
    pub max_consistency_wait: Duration,
    /// Messages a subscription may have waiting for a client that does not read them.
    pub subscription_buffer: usize,
    /// How long a full buffer may stay full before the subscription ends with an error.
    pub subscription_patience: Duration,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_consistency_wait: Duration::from_secs(5),
            subscription_buffer: 256,
            subscription_patience: Duration::from_secs(5),
        }
    }
}

/// The read side as the resolvers see it. Cheap to clone.
#[derive(Clone)]
pub struct ReadApi {
    store: ReadStore,
    events: Arc<dyn EventStore>,
    hub: ProjectionHub,
    gauge: Arc<LagGauge>,
    limits: ReadLimits,
    /// Where admins start rebuilds; none where this process may not run them (a schema built
    /// only to print its SDL, tests of the read models alone).
    rebuilds: Option<Rebuilds>,
}

impl ReadApi {
    pub fn new(
        store: ReadStore,
        events: Arc<dyn EventStore>,
        hub: ProjectionHub,
        limits: ReadLimits,
    ) -> Self {
        // A head sampled 20 ms ago is fresh enough to say "caught up" with; fresher would cost
        // a statement on nearly every request under load.
        let gauge = Arc::new(LagGauge::new(events.clone(), Duration::from_millis(20)));
        Self {
            store,
            events,
            hub,
            gauge,
            limits,
            rebuilds: None,
        }
    }

    /// Lets admins start projection rebuilds in this process.
    pub fn with_rebuilds(self, rebuilds: Rebuilds) -> Self {
        Self {
            rebuilds: Some(rebuilds),
            ..self
        }
    }

    pub fn rebuilds(&self) -> Result<&Rebuilds, ReadError> {
        self.rebuilds
            .as_ref()
            .ok_or_else(|| ReadError::Unavailable("this process runs no rebuilds".into()))
    }

    /// The API from a resolver's context; its absence is a wiring bug.
    pub fn of<'c>(ctx: &Context<'c>) -> async_graphql::Result<&'c ReadApi> {
        ctx.data::<ReadApi>()
            .map_err(|_| ErrorCode::Internal.error("internal error"))
    }

    pub fn store(&self) -> &ReadStore {
        &self.store
    }

    pub fn events(&self) -> &Arc<dyn EventStore> {
        &self.events
    }

    pub fn hub(&self) -> &ProjectionHub {
        &self.hub
    }

    pub fn gauge(&self) -> Arc<LagGauge> {
        self.gauge.clone()
    }

    /// `executor` (a schema holding this API) with `extensions.consistency` on its answers.
    pub fn consistent<E>(&self, executor: E) -> crate::Consistent<E> {
        crate::Consistent::new(executor, self.hub.clone(), self.gauge.clone())
    }

    pub fn limits(&self) -> &ReadLimits {
        &self.limits
    }

    /// A page of orders for the field `ctx` resolves, with the lines and history of all of them
    /// in one statement each when the selection asks for them.
    pub async fn order_page(
        &self,
        ctx: &Context<'_>,
        filter: &OrderQuery,
        first: Option<i32>,
        after: Option<&str>,
    ) -> Result<OrderConnection, ReadError> {
        let first = page_size(first, 20)?;
        let key = after
            .map(|cursor| cursor::parse_order_cursor(cursor, "after"))
            .transpose()?;
        let mut rows = self.store.orders(filter, key, first + 1).await?;
        let has_next_page = rows.len() as i64 > first;
        rows.truncate(usize::try_from(first).unwrap_or(0));
        let selection = ctx.look_ahead();
        let wants = Wants::of_connection(&selection);
        let orders = self
            .with_children(rows.into_iter().map(Order::new).collect(), wants)
            .await?;
        let edges: Vec<OrderEdge> = orders
            .into_iter()
            .map(|order| OrderEdge {
                cursor: cursor::order_cursor(OrderKey {
                    placed_at: order.row.placed_at,
                    order_id: order.row.order_id,
                }),
                node: order,
            })
            .collect();
        Ok(OrderConnection {
            page_info: page_info(after, has_next_page, edges.iter().map(|e| &e.cursor)),
            edges,
        })
    }

    /// Loads the children `wants` names for every order at once.
    pub async fn with_children(
        &self,
        mut orders: Vec<Order>,
        wants: Wants,
    ) -> Result<Vec<Order>, ReadError> {
        if orders.is_empty() || !(wants.lines || wants.history) {
            return Ok(orders);
        }
        let ids: Vec<uuid::Uuid> = orders.iter().map(|o| o.row.order_id).collect();
        let lines = async {
            if wants.lines {
                self.store.lines(&ids).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let history = async {
            if wants.history {
                self.store.history(&ids).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let (mut lines, mut history) = futures::try_join!(lines, history)?;
        for order in &mut orders {
            let id = order.row.order_id;
            if let Some(lines) = &mut lines {
                order.lines = Some(lines.remove(&id).unwrap_or_default());
            }
            if let Some(history) = &mut history {
                order.history = Some(history.remove(&id).unwrap_or_default());
            }
        }
        Ok(orders)
    }

    pub async fn product_page(
        &self,
        search: Option<&str>,
        first: Option<i32>,
        after: Option<&str>,
    ) -> Result<ProductConnection, ReadError> {
        let first = page_size(first, 50)?;
        let key: Option<ProductKey> = after
            .map(|cursor| cursor::parse_product_cursor(cursor, "after"))
            .transpose()?;
        let mut rows = self.store.products(search, key.as_ref(), first + 1).await?;
        let has_next_page = rows.len() as i64 > first;
        rows.truncate(usize::try_from(first).unwrap_or(0));
        let edges: Vec<ProductEdge> = rows
            .into_iter()
            .map(|row| ProductEdge {
                cursor: cursor::product_cursor(&ProductKey {
                    name: row.name.clone(),
                    sku: row.sku.clone(),
                }),
                node: Product::from(row),
            })
            .collect();
        Ok(ProductConnection {
            page_info: page_info(after, has_next_page, edges.iter().map(|e| &e.cursor)),
            edges,
        })
    }
}

/// Which children of `Order` a selection reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wants {
    pub lines: bool,
    pub history: bool,
}

impl Wants {
    /// For a field whose type is `Order`.
    pub fn of_order(selection: &Lookahead<'_>) -> Self {
        Self {
            lines: selection.field("lines").exists(),
            history: selection.field("history").exists(),
        }
    }

    /// For a field whose type is `OrderConnection` (both `nodes` and `edges.node`).
    pub fn of_connection(selection: &Lookahead<'_>) -> Self {
        let nodes = Self::of_order(&selection.field("nodes"));
        let edges = Self::of_order(&selection.field("edges").field("node"));
        Self {
            lines: nodes.lines || edges.lines,
            history: nodes.history || edges.history,
        }
    }
}

fn page_info<'a>(
    after: Option<&str>,
    has_next_page: bool,
    mut cursors: impl DoubleEndedIterator<Item = &'a String>,
) -> PageInfo {
    let start_cursor = cursors.next().cloned();
    let end_cursor = cursors
        .next_back()
        .cloned()
        .or_else(|| start_cursor.clone());
    PageInfo {
        has_previous_page: after.is_some(),
        has_next_page,
        start_cursor,
        end_cursor,
    }
}

/// `first` checked against the contract's bounds, with its default.
fn page_size(first: Option<i32>, default: i32) -> Result<i64, ReadError> {
    let first = first.unwrap_or(default);
    if !(0..=MAX_PAGE).contains(&first) {
        return Err(ReadError::invalid(
            "first",
            format!("must be 0 to {MAX_PAGE}, not {first}"),
        ));
    }
    Ok(i64::from(first))
}

/// The request id to quote in errors; "-" outside the HTTP handler (tests of the schema).
pub fn request_id<'c>(ctx: &Context<'c>) -> &'c str {
    ctx.data::<Caller>()
        .map(|caller| caller.request_id.as_str())
        .unwrap_or("-")
}

/// The caller's identity, if the request carried a token.
pub fn actor<'c>(ctx: &Context<'c>) -> Option<&'c Actor> {
    ctx.data::<Caller>().ok().and_then(|c| c.actor.as_ref())
}

/// The caller, who must have a token.
pub fn signed_in<'c>(ctx: &Context<'c>) -> Result<&'c Actor, ReadError> {
    actor(ctx).ok_or(ReadError::Unauthenticated)
}

/// The caller of a read that is not public: a token holding a role. A token without one
/// (`roles: []`, or only roles of other services) reads nothing, its subject's orders
/// included: the subject alone proves no one is a customer here.
pub fn reader<'c>(ctx: &Context<'c>) -> Result<&'c Actor, ReadError> {
    let actor = signed_in(ctx)?;
    if actor.roles.is_empty() {
        return Err(ReadError::Forbidden(
            "this read needs a token with the customer, warehouse or admin role",
        ));
    }
    Ok(actor)
}

/// Admins and the warehouse (which ships them) see every order; customers their own.
pub fn sees_all_orders(actor: &Actor) -> bool {
    actor.is_admin() || actor.has(Role::Warehouse)
}

pub fn may_read_order(actor: &Actor, customer_id: &str) -> bool {
    sees_all_orders(actor) || actor.sub == customer_id
}
