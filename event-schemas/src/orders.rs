//! Events of the order stream `order-<uuid>`.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::SchemaError;
use crate::values::{
    Address, Carrier, Currency, CustomerId, GatewayReference, Money, OrderId, PaymentToken,
    ProductName, Quantity, Reason, Sku, TrackingNumber,
};

/// One priced line of an order, frozen at placement: later price changes do not touch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    pub sku: Sku,
    /// Copied from the product so the order reads the same after the product is renamed.
    pub name: ProductName,
    pub quantity: Quantity,
    pub unit_price: Money,
    /// `unit_price * quantity`, stored so readers never recompute money.
    pub line_total: Money,
}

/// An order was accepted with prices taken from the catalog (schema v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderPlaced {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    /// 1 to 100 lines, each SKU at most once (checked at placement).
    #[schemars(length(min = 1, max = 100))]
    pub lines: Vec<OrderLine>,
    /// Sum of the line totals, in the single currency all lines share.
    pub total: Money,
    pub shipping_address: Address,
    /// Kept on the order because the fulfilment saga charges it only after stock is reserved.
    pub payment_token: PaymentToken,
    pub placed_at: DateTime<Utc>,
}

/// One line of an [`OrderPlacedV1`]: a bare minor-unit price, currency held by the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLineV1 {
    pub sku: Sku,
    pub name: ProductName,
    pub quantity: Quantity,
    pub unit_price_minor: i64,
}

/// The first shape of `OrderPlaced` (schema v1): one order-level `currency`, bare minor-unit
/// prices and no totals. Kept forever so old streams still decode; upcast into [`OrderPlaced`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderPlacedV1 {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub lines: Vec<OrderLineV1>,
    pub shipping_address: Address,
    pub payment_token: PaymentToken,
    pub placed_at: DateTime<Utc>,
}

/// v1 -> v2: every amount becomes `Money` in the order's currency; totals are derived exactly as
/// placement computes them, so a v1 order and a v2 order read the same.
impl TryFrom<OrderPlacedV1> for OrderPlaced {
    type Error = SchemaError;

    fn try_from(old: OrderPlacedV1) -> Result<Self, SchemaError> {
        let overflow = || SchemaError::InvalidValue {
            what: "order total",
            reason: "exceeds the largest storable amount".into(),
        };
        let mut total = Money::zero(old.currency);
        let mut lines = Vec::with_capacity(old.lines.len());
        for line in old.lines {
            let unit_price = Money::new(line.unit_price_minor, old.currency)?;
            let line_total = unit_price.checked_mul(line.quantity).ok_or_else(overflow)?;
            total = total.checked_add(line_total).ok_or_else(overflow)?;
            lines.push(OrderLine {
                sku: line.sku,
                name: line.name,
                quantity: line.quantity,
                unit_price,
                line_total,
            });
        }
        Ok(OrderPlaced {
            order_id: old.order_id,
            customer_id: old.customer_id,
            lines,
            total,
            shipping_address: old.shipping_address,
            payment_token: old.payment_token,
            placed_at: old.placed_at,
        })
    }
}

/// Every line of the order holds a stock reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderStockReserved {
    pub order_id: OrderId,
    pub stock_reserved_at: DateTime<Utc>,
}

/// The order's payment was charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderPaid {
    pub order_id: OrderId,
    pub amount: Money,
    pub gateway_reference: GatewayReference,
    pub paid_at: DateTime<Utc>,
}

/// Stock is held and money taken: the order will be shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderConfirmed {
    pub order_id: OrderId,
    pub confirmed_at: DateTime<Utc>,
}

/// Who cancelled an order; the person behind a customer cancel is the metadata's `actor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelledBy {
    /// The customer (or an admin on their behalf) through the API.
    Customer,
    /// The fulfilment saga: out of stock, payment declined, or payment deadline passed.
    Fulfilment,
}

/// The order will not be fulfilled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderCancelled {
    pub order_id: OrderId,
    pub cancellation_reason: Reason,
    pub cancelled_by: CancelledBy,
    pub cancelled_at: DateTime<Utc>,
}

/// The order left the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderShipped {
    pub order_id: OrderId,
    pub carrier: Carrier,
    pub tracking_number: TrackingNumber,
    pub shipped_at: DateTime<Utc>,
}

/// The carrier delivered the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderDelivered {
    pub order_id: OrderId,
    pub delivered_at: DateTime<Utc>,
}
