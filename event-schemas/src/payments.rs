//! Events of the payment stream `payment-<order uuid>`: one payment per order.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::values::{GatewayReference, Money, OrderId, PaymentToken, Reason};

/// A charge attempt was requested; the gateway worker reacts to this event by calling the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentChargeRequested {
    pub order_id: OrderId,
    pub amount: Money,
    pub payment_token: PaymentToken,
    /// 1 for the first request, +1 for each retry after a transient failure; redelivered
    /// requests carry the same number, which is how they are recognised.
    pub attempt: u32,
    pub requested_at: DateTime<Utc>,
}

/// The gateway took the money.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentCharged {
    pub order_id: OrderId,
    pub amount: Money,
    pub gateway_reference: GatewayReference,
    pub charged_at: DateTime<Utc>,
}

/// The gateway refused the payment method for good (retrying will not help).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentDeclined {
    pub order_id: OrderId,
    pub reason: Reason,
    pub declined_at: DateTime<Utc>,
}

/// A charge attempt failed transiently (gateway down, timeout); the saga may retry until the
/// payment deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentFailed {
    pub order_id: OrderId,
    pub reason: Reason,
    pub attempt: u32,
    pub failed_at: DateTime<Utc>,
}

/// A charged payment was paid back in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentRefunded {
    pub order_id: OrderId,
    pub amount: Money,
    pub gateway_reference: GatewayReference,
    pub reason: Reason,
    pub refunded_at: DateTime<Utc>,
}
