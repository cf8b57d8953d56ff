//! Events of the product (inventory) stream `product-<sku>`.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::values::{Description, Money, OrderId, ProductName, Quantity, Sku};

/// A product entered the catalog with its first stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductRegistered {
    pub sku: Sku,
    pub name: ProductName,
    pub description: Option<Description>,
    pub price: Money,
    /// Units on hand at registration; zero is allowed (listed before the first delivery).
    pub initial_stock: u32,
    pub registered_at: DateTime<Utc>,
}

/// Units arrived at the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductRestocked {
    pub sku: Sku,
    pub quantity: Quantity,
    pub restocked_at: DateTime<Utc>,
}

/// The catalog price changed; orders already placed keep the price they were placed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductPriceChanged {
    pub sku: Sku,
    pub price: Money,
    pub price_changed_at: DateTime<Utc>,
}

/// Units were set aside for an order: `reserved` grows, `available` shrinks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockReserved {
    pub sku: Sku,
    pub order_id: OrderId,
    pub quantity: Quantity,
    pub reserved_at: DateTime<Utc>,
}

/// A reservation was refused for lack of stock. An event, not an error, because the fulfilment
/// saga must react to it durably (cancel the order "out of stock").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockReservationRejected {
    pub sku: Sku,
    pub order_id: OrderId,
    /// What the order asked for.
    pub quantity: Quantity,
    /// What could have been reserved at that moment, for the customer's message.
    pub available: u32,
    pub rejected_at: DateTime<Utc>,
}

/// An order's reservation was given back to available stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockReservationReleased {
    pub sku: Sku,
    pub order_id: OrderId,
    pub quantity: Quantity,
    pub released_at: DateTime<Utc>,
}

/// An order's reserved units left the warehouse: both `on_hand` and `reserved` shrink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservedStockShipped {
    pub sku: Sku,
    pub order_id: OrderId,
    pub quantity: Quantity,
    pub shipped_at: DateTime<Utc>,
}
