//! The `products` projection: catalog data and stock (on hand, reserved, available) per SKU.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::Transaction;
use orderly_event_schemas::{Event, ProductEvent};
use orderly_event_store::RecordedEvent;
use uuid::Uuid;

use super::{Decoded, ParkReason, fold};
use crate::error::ProjectionError;
use crate::model::{DeadLetterPolicy, Outcome};

/// A `products` row as the batch sees it; stock in i64 so a bad stream cannot overflow before
/// the range check.
#[derive(Debug, Clone)]
struct ProductRow {
    sku: String,
    name: String,
    description: Option<String>,
    price_minor: i64,
    currency: String,
    on_hand: i64,
    reserved: i64,
    version: i64,
    dirty: bool,
}

fn sku_of(event: &ProductEvent) -> &str {
    match event {
        ProductEvent::ProductRegistered(p) => p.sku.as_str(),
        ProductEvent::ProductRestocked(p) => p.sku.as_str(),
        ProductEvent::ProductPriceChanged(p) => p.sku.as_str(),
        ProductEvent::StockReserved(p) => p.sku.as_str(),
        ProductEvent::StockReservationRejected(p) => p.sku.as_str(),
        ProductEvent::StockReservationReleased(p) => p.sku.as_str(),
        ProductEvent::ReservedStockShipped(p) => p.sku.as_str(),
    }
}

fn handle(
    rows: &mut HashMap<String, ProductRow>,
    recorded: &RecordedEvent,
    event: &Event,
) -> Result<(), ParkReason> {
    let Event::Product(event) = event else {
        return Err(ParkReason::Foreign {
            event_type: event.event_type(),
            streams: "product",
        });
    };
    let version = crate::model::to_i64(recorded.version);
    let sku = sku_of(event);
    if let ProductEvent::ProductRegistered(p) = event {
        // Already there: a replay when at or below the row's version, else a second
        // registration, which the decider never writes.
        if let Some(row) = rows.get(sku) {
            return if row.version >= version {
                Ok(())
            } else {
                Err(ParkReason::RegisteredTwice(sku.to_owned()))
            };
        }
        rows.insert(
            sku.to_owned(),
            ProductRow {
                sku: sku.to_owned(),
                name: p.name.as_str().to_owned(),
                description: p.description.as_ref().map(|d| d.as_str().to_owned()),
                price_minor: p.price.amount_minor(),
                currency: p.price.currency().to_string(),
                on_hand: i64::from(p.initial_stock),
                reserved: 0,
                version,
                dirty: true,
            },
        );
        return Ok(());
    }
    let Some(row) = rows.get_mut(sku) else {
        return Err(ParkReason::NoProduct {
            sku: sku.to_owned(),
            event_type: event.event_type(),
        });
    };
    if row.version >= version {
        return Ok(());
    }
    // Computed aside and stored only after the check below, so a parked event changes nothing.
    let (mut on_hand, mut reserved) = (row.on_hand, row.reserved);
    match event {
        ProductEvent::ProductRegistered(_) | ProductEvent::StockReservationRejected(_) => {}
        ProductEvent::ProductRestocked(p) => on_hand += i64::from(p.quantity.get()),
        ProductEvent::ProductPriceChanged(p) => {
            row.price_minor = p.price.amount_minor();
            row.currency = p.price.currency().to_string();
        }
        ProductEvent::StockReserved(p) => reserved += i64::from(p.quantity.get()),
        ProductEvent::StockReservationReleased(p) => reserved -= i64::from(p.quantity.get()),
        ProductEvent::ReservedStockShipped(p) => {
            on_hand -= i64::from(p.quantity.get());
            reserved -= i64::from(p.quantity.get());
        }
    }
    // The domain keeps 0 <= reserved <= on hand; a stream that breaks it is parked, not stored.
    if reserved < 0 || reserved > on_hand || on_hand > i64::from(i32::MAX) {
        return Err(ParkReason::StockOutOfBounds {
            event_type: event.event_type(),
            sku: sku.to_owned(),
            on_hand,
            reserved,
        });
    }
    row.on_hand = on_hand;
    row.reserved = reserved;
    row.version = version;
    row.dirty = true;
    Ok(())
}

const LOAD: &str = "
select sku, name, description, price_minor, currency, on_hand, reserved, version
from products where sku = any($1)";

const WRITE: &str = "
insert into products (sku, name, description, price_minor, currency, on_hand, reserved,
    available, version)
select p.sku, p.name, p.description, p.price_minor, p.currency, p.on_hand, p.reserved,
    p.on_hand - p.reserved, p.version
from unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::int[], $7::int[],
    $8::bigint[]) as p(sku, name, description, price_minor, currency, on_hand, reserved, version)
on conflict (sku) do update set
    price_minor = excluded.price_minor, currency = excluded.currency,
    on_hand = excluded.on_hand, reserved = excluded.reserved, available = excluded.available,
    version = excluded.version
where products.version < excluded.version";

pub(crate) async fn apply(
    tx: &Transaction<'_>,
    batch: Decoded,
    policy: DeadLetterPolicy,
    skipped: &HashSet<Uuid>,
) -> Result<Outcome, ProjectionError> {
    let skus: Vec<String> = batch
        .events
        .iter()
        .filter_map(|(_, d)| match d {
            Ok(Event::Product(e)) => Some(sku_of(e).to_owned()),
            _ => None,
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // As for orders: load what the batch touches, fold in memory, write back what changed.
    let mut rows: HashMap<String, ProductRow> = HashMap::with_capacity(skus.len());
    if !skus.is_empty() {
        let load = tx.prepare_cached(LOAD).await?;
        for row in tx.query(&load, &[&skus]).await? {
            let on_hand: i32 = row.try_get(5)?;
            let reserved: i32 = row.try_get(6)?;
            let product = ProductRow {
                sku: row.try_get(0)?,
                name: row.try_get(1)?,
                description: row.try_get(2)?,
                price_minor: row.try_get(3)?,
                currency: row.try_get(4)?,
                on_hand: i64::from(on_hand),
                reserved: i64::from(reserved),
                version: row.try_get(7)?,
                dirty: false,
            };
            rows.insert(product.sku.clone(), product);
        }
    }
    let mut outcome = fold(&batch, policy, skipped, |recorded, event| {
        handle(&mut rows, recorded, event)
    });
    let dirty: Vec<&ProductRow> = rows.values().filter(|r| r.dirty).collect();
    outcome.changed = !dirty.is_empty();
    if !dirty.is_empty() {
        // Checked against i32::MAX in `handle`, and reserved <= on hand.
        let narrow = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
        let write = tx.prepare_cached(WRITE).await?;
        tx.execute(
            &write,
            &[
                &dirty.iter().map(|r| r.sku.as_str()).collect::<Vec<_>>(),
                &dirty.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
                &dirty
                    .iter()
                    .map(|r| r.description.as_deref())
                    .collect::<Vec<_>>(),
                &dirty.iter().map(|r| r.price_minor).collect::<Vec<_>>(),
                &dirty
                    .iter()
                    .map(|r| r.currency.as_str())
                    .collect::<Vec<_>>(),
                &dirty.iter().map(|r| narrow(r.on_hand)).collect::<Vec<_>>(),
                &dirty.iter().map(|r| narrow(r.reserved)).collect::<Vec<_>>(),
                &dirty.iter().map(|r| r.version).collect::<Vec<_>>(),
            ],
        )
        .await?;
    }
    Ok(outcome)
}
