use orderly_event_schemas::values::{Currency, Money, OrderId, Sku};
use thiserror::Error;

use crate::order::OrderStatus;
use crate::payment::PaymentStatus;

/// Why a command was refused. Nothing was written; the state is unchanged.
///
/// The API edge answers every variant with `extensions.code = REJECTED` and the message as
/// `extensions.reason`. The saga runner logs a rejected saga command and moves on: the saga will
/// see the event that made the aggregate refuse and compensates from there.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejection {
    /// Handling: the SKU is taken; pick another SKU, or restock / change the price instead.
    #[error("product {sku} is already registered")]
    ProductAlreadyRegistered { sku: Sku },

    /// Handling: register the product first; a NOT_FOUND-like answer for the client.
    #[error("product is not registered")]
    ProductNotRegistered,

    /// A product's currency is fixed at registration, so orders never mix currencies by accident.
    ///
    /// Handling: send the new price in the product's currency.
    #[error("price must stay in {current}, not {requested}")]
    CurrencyChange {
        current: Currency,
        requested: Currency,
    },

    /// Stock counts are bounded by GraphQL's 32-bit `Int`.
    ///
    /// Handling: the input is implausible; correct it.
    #[error("stock of {sku} would exceed {max} units")]
    StockLimitExceeded { sku: Sku, max: u32 },

    /// Shipping stock needs a reservation for that order on this product.
    ///
    /// Handling: a bug or a race in the caller (the saga only ships reserved stock); investigate.
    #[error("{sku} holds no reservation for order {order_id}")]
    NoReservation { sku: Sku, order_id: OrderId },

    /// Handling: the order id is taken; a retried placement should reuse its idempotency key.
    #[error("order {order_id} already exists")]
    OrderAlreadyPlaced { order_id: OrderId },

    /// Handling: the order does not exist; answer as not found.
    #[error("order does not exist")]
    OrderNotFound,

    /// The order's state machine does not allow this step from here (for example shipping an
    /// unpaid order, or cancelling one that has shipped).
    ///
    /// Handling: reload the order and show the customer its current status.
    #[error("cannot {action} an order that is {status:?}")]
    IllegalTransition {
        action: &'static str,
        status: OrderStatus,
    },

    /// Handling: the payment does not cover the order total; a bug in the caller.
    #[error("payment of {paid} does not match the order total {total}")]
    PaymentAmountMismatch { paid: Money, total: Money },

    /// Handling: add at least one line.
    #[error("an order needs at least one line")]
    NoLines,

    /// Handling: split the order.
    #[error("an order has at most {max} lines, not {count}")]
    TooManyLines { count: usize, max: usize },

    /// Handling: merge the lines into one with the summed quantity.
    #[error("SKU {sku} appears on more than one line")]
    DuplicateSku { sku: Sku },

    /// Handling: remove the line; the catalog has no such product.
    #[error("unknown SKU {sku}")]
    UnknownSku { sku: Sku },

    /// Handling: place one order per currency.
    #[error("lines are priced in {first} and {other}; an order has one currency")]
    MixedCurrencies { first: Currency, other: Currency },

    /// Handling: the order's amounts would exceed the largest storable amount; split it.
    #[error("order total is too large")]
    AmountOverflow,

    /// Handling: request a charge first (only the saga does).
    #[error("no charge was requested for this payment")]
    PaymentNotRequested,

    /// Attempts are numbered 1, 2, ... so redelivered requests can be recognised.
    ///
    /// Handling: a bug in the caller; ask for attempt `expected`.
    #[error("charge attempt {requested} is out of order; next is {expected}")]
    AttemptOutOfOrder { requested: u32, expected: u32 },

    /// Refused so the customer is never charged twice.
    ///
    /// Handling: wait for the current attempt's outcome, or do nothing when already charged.
    #[error("payment is {status:?}; a new charge attempt is not allowed")]
    ChargeNotAllowed { status: PaymentStatus },

    /// The gateway reported a charge this payment cannot take (a second reference, or after a
    /// decline).
    ///
    /// Handling: page someone: money may have been taken twice; reconcile with the gateway.
    #[error("payment is {status:?}; cannot record a charge")]
    UnexpectedCharge { status: PaymentStatus },

    /// Handling: the outcome arrived for a payment not waiting for one; ignore if it is a
    /// duplicate, otherwise reconcile with the gateway.
    #[error("payment is {status:?}, not waiting for a gateway answer")]
    NotPending { status: PaymentStatus },

    /// Handling: only a charged payment can be refunded; nothing to give back.
    #[error("payment is {status:?}; only a charged payment can be refunded")]
    NotCharged { status: PaymentStatus },
}
