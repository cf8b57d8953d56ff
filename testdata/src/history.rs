//! A product with a long history: registered, then any number of orders each reserved and
//! shipped, for what must not slow down or go wrong as a product ages (snapshots, the cost of
//! a decision).

use chrono::{TimeDelta, Utc};
use orderly_domain::values::{Currency, Money, OrderId, ProductName, Quantity, Sku};
use orderly_event_schemas::products::{ProductRegistered, ReservedStockShipped, StockReserved};
use orderly_event_schemas::{Event, ProductEvent, SchemaError};
use orderly_event_store::{
    AppendResult, EventStore, MAX_EVENTS_PER_APPEND, StoreError, StreamName,
};
use uuid::Uuid;

use crate::workload::Append;

/// Product `sku`'s registration (with stock to spare), then `orders` orders of one unit each,
/// reserved and shipped: `2 * orders + 1` events, all stamped now.
pub fn product_history(sku: &Sku, orders: usize) -> Result<Vec<Event>, SchemaError> {
    product_history_over(sku, orders, TimeDelta::zero())
}

/// [`product_history`] with the orders spread evenly over the `span` up to now (a product
/// forgets what it did for orders settled long before its latest event).
pub fn product_history_over(
    sku: &Sku,
    orders: usize,
    span: TimeDelta,
) -> Result<Vec<Event>, SchemaError> {
    let end = Utc::now();
    let start = end - span;
    let step = span / i32::try_from(orders.max(1)).unwrap_or(i32::MAX);
    let quantity = Quantity::new(1)?;
    let stock = u32::try_from(orders)
        .unwrap_or(u32::MAX)
        .saturating_add(1_000_000);
    let mut events = vec![ProductEvent::from(ProductRegistered {
        sku: sku.clone(),
        name: ProductName::parse("History mug")?,
        description: None,
        price: Money::new(1999, Currency::parse("EUR")?)?,
        initial_stock: stock,
        registered_at: start,
    })];
    let mut at = start;
    for _ in 0..orders {
        at += step;
        let order_id = OrderId(Uuid::now_v7());
        events.push(
            StockReserved {
                sku: sku.clone(),
                order_id,
                quantity,
                reserved_at: at,
            }
            .into(),
        );
        events.push(
            ReservedStockShipped {
                sku: sku.clone(),
                order_id,
                quantity,
                shipped_at: at,
            }
            .into(),
        );
    }
    Ok(events.into_iter().map(Event::from).collect())
}

/// Appends `events` to `stream`, new or at version `expected`, as many per append as the
/// store takes; answers the last append's result.
pub async fn append_all(
    store: &dyn EventStore,
    stream: &StreamName,
    mut expected: Option<u64>,
    events: &[Event],
) -> Result<Option<AppendResult>, StoreError> {
    let mut last = None;
    for chunk in events.chunks(MAX_EVENTS_PER_APPEND) {
        let append = Append {
            stream: stream.as_str().to_owned(),
            expected,
            events: chunk.to_vec(),
        };
        let written = append.append_to(store).await?;
        expected = Some(written.next_expected_version);
        last = Some(written);
    }
    Ok(last)
}
