//! Stream names. The category (text before the first `-`) is what subscriptions filter on.

use orderly_event_schemas::values::{OrderId, Sku};

pub const ORDER_CATEGORY: &str = "order";
pub const PRODUCT_CATEGORY: &str = "product";
pub const PAYMENT_CATEGORY: &str = "payment";

pub fn order(order_id: OrderId) -> String {
    format!("{ORDER_CATEGORY}-{order_id}")
}

/// SKUs may contain `-`; the category still ends at the first one.
pub fn product(sku: &Sku) -> String {
    format!("{PRODUCT_CATEGORY}-{sku}")
}

/// One payment per order, so the payment stream is keyed by the order id.
pub fn payment(order_id: OrderId) -> String {
    format!("{PAYMENT_CATEGORY}-{order_id}")
}
