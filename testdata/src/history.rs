//! A product with a long history: registered, then any number of orders each reserved and
//! shipped, for what must not slow down or go wrong as a product ages (snapshots, the cost of
//! a decision).

use chrono::Utc;
use orderly_domain::values::{Currency, Money, OrderId, ProductName, Quantity, Sku};
use orderly_event_schemas::products::{ProductRegistered, ReservedStockShipped, StockReserved};
use orderly_event_schemas::{Event, ProductEvent, SchemaError};
use orderly_event_store::{
    AppendResult, EventStore, MAX_EVENTS_PER_APPEND, StoreError, StreamName,
};
use uuid::Uuid;

use crate::workload::Append;

/// Product `sku`'s registration (with stock to spare), then `orders` orders of one unit each,
/// reserved and shipped: `2 * orders + 1` events.
pub fn product_history(sku: &Sku, orders: usize) -> Result<Vec<Event>, SchemaError> {
    let at = Utc::now();
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
        registered_at: at,
    })];
    for _ in 0..orders {
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
