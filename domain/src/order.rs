//! The order aggregate, stream `order-<uuid>`, and pricing at placement.
//!
//! State machine (the contract's `OrderStatus`):
//!
//! ```text
//! PLACED -> STOCK_RESERVED -> PAID -> CONFIRMED -> SHIPPED -> DELIVERED
//!    \____________\____________\_________\-> CANCELLED   (any time before SHIPPED)
//! ```
//!
//! Steps the saga sends (mark stock reserved, mark paid, confirm, cancel) are idempotent: asked
//! again once done, they decide nothing. Steps people send (ship, deliver) are rejected when
//! repeated, so a second click is told the order already moved on.

use chrono::{DateTime, Utc};
use orderly_event_schemas::OrderEvent;
use orderly_event_schemas::orders::*;
use serde::{Deserialize, Serialize};

use crate::Rejection;
use crate::product::Product;
use crate::values::{
    Address, Carrier, CustomerId, GatewayReference, Money, OrderId, PaymentToken, Quantity, Reason,
    Sku, TrackingNumber,
};

pub use orderly_event_schemas::orders::{CancelledBy, OrderLine};

/// The contract's `OrderStatus`, with the same spelling when serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Placed,
    StockReserved,
    Paid,
    Confirmed,
    Shipped,
    Delivered,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shipment {
    pub carrier: Carrier,
    pub tracking_number: TrackingNumber,
    pub shipped_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub shipping_address: Address,
    pub payment_token: PaymentToken,
    pub placed_at: DateTime<Utc>,
    pub status: OrderStatus,
    pub cancellation_reason: Option<Reason>,
    pub shipment: Option<Shipment>,
}

/// The most lines one order may have (the contract says 1 to 100).
pub const MAX_LINES: usize = 100;

/// One requested line, as the client sent it (validated, not yet priced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRequest {
    pub sku: Sku,
    pub quantity: Quantity,
}

/// Lines priced from the catalog. Only [`price_lines`] makes one, so an order's prices always
/// come from product state, never from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLines {
    lines: Vec<OrderLine>,
    total: Money,
}

impl PricedLines {
    pub fn lines(&self) -> &[OrderLine] {
        &self.lines
    }

    pub fn total(&self) -> Money {
        self.total
    }
}

/// Prices requested lines from the current state of their products, which the command handler
/// loads from the `product-<sku>` streams and passes in. Checks 1 to 100 lines, each SKU once,
/// every SKU registered, one currency, and amounts that fit.
pub fn price_lines(
    requested: &[LineRequest],
    products: &[Product],
) -> Result<PricedLines, Rejection> {
    if requested.is_empty() {
        return Err(Rejection::NoLines);
    }
    if requested.len() > MAX_LINES {
        return Err(Rejection::TooManyLines {
            count: requested.len(),
            max: MAX_LINES,
        });
    }
    let mut lines: Vec<OrderLine> = Vec::with_capacity(requested.len());
    // The first line's currency becomes the order's; `None` only before the first line.
    let mut total: Option<Money> = None;
    for request in requested {
        // Quadratic, but over at most 100 lines; a set would cost more than it saves here.
        if lines.iter().any(|line| line.sku == request.sku) {
            return Err(Rejection::DuplicateSku {
                sku: request.sku.clone(),
            });
        }
        let product = products
            .iter()
            .find(|product| product.sku == request.sku)
            .ok_or_else(|| Rejection::UnknownSku {
                sku: request.sku.clone(),
            })?;
        let unit_price = product.price;
        let running = total.unwrap_or(Money::zero(unit_price.currency()));
        if running.currency() != unit_price.currency() {
            return Err(Rejection::MixedCurrencies {
                first: running.currency(),
                other: unit_price.currency(),
            });
        }
        let line_total = unit_price
            .checked_mul(request.quantity)
            .ok_or(Rejection::AmountOverflow)?;
        total = Some(
            running
                .checked_add(line_total)
                .ok_or(Rejection::AmountOverflow)?,
        );
        lines.push(OrderLine {
            sku: request.sku.clone(),
            name: product.name.clone(),
            quantity: request.quantity,
            unit_price,
            line_total,
        });
    }
    // Unreachable after the emptiness check above; a Rejection rather than a panic all the same.
    let total = total.ok_or(Rejection::NoLines)?;
    Ok(PricedLines { lines, total })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    Place {
        order_id: OrderId,
        customer_id: CustomerId,
        lines: PricedLines,
        shipping_address: Address,
        payment_token: PaymentToken,
        placed_at: DateTime<Utc>,
    },
    MarkStockReserved {
        stock_reserved_at: DateTime<Utc>,
    },
    MarkPaid {
        amount: Money,
        gateway_reference: GatewayReference,
        paid_at: DateTime<Utc>,
    },
    Confirm {
        confirmed_at: DateTime<Utc>,
    },
    Cancel {
        cancellation_reason: Reason,
        cancelled_by: CancelledBy,
        cancelled_at: DateTime<Utc>,
    },
    Ship {
        carrier: Carrier,
        tracking_number: TrackingNumber,
        shipped_at: DateTime<Utc>,
    },
    Deliver {
        delivered_at: DateTime<Utc>,
    },
}

/// How far along the happy path a status is; `Cancelled` is off the path. Lets a redelivered
/// saga step see that the order is already past it.
fn progress(status: OrderStatus) -> Option<u8> {
    match status {
        OrderStatus::Placed => Some(0),
        OrderStatus::StockReserved => Some(1),
        OrderStatus::Paid => Some(2),
        OrderStatus::Confirmed => Some(3),
        OrderStatus::Shipped => Some(4),
        OrderStatus::Delivered => Some(5),
        OrderStatus::Cancelled => None,
    }
}

/// A saga step from `from` to `to`: decided when the order is exactly at `from`, nothing when it
/// is already at or past `to`, rejected otherwise (behind, or cancelled).
fn saga_step(
    order: &Order,
    from: OrderStatus,
    to: OrderStatus,
    action: &'static str,
) -> Result<bool, Rejection> {
    let illegal = Rejection::IllegalTransition {
        action,
        status: order.status,
    };
    match (progress(order.status), progress(to)) {
        _ if order.status == from => Ok(true),
        (Some(now), Some(target)) if now >= target => Ok(false),
        _ => Err(illegal),
    }
}

/// A step people send, allowed from `from` only: a repeat is rejected, so a second click is told
/// the order already moved on.
fn manual_step(order: &Order, from: OrderStatus, action: &'static str) -> Result<(), Rejection> {
    if order.status != from {
        return Err(Rejection::IllegalTransition {
            action,
            status: order.status,
        });
    }
    Ok(())
}

pub fn decide(state: &Option<Order>, command: &OrderCommand) -> Result<Vec<OrderEvent>, Rejection> {
    match command {
        OrderCommand::Place {
            order_id,
            customer_id,
            lines,
            shipping_address,
            payment_token,
            placed_at,
        } => place(
            state,
            *order_id,
            customer_id,
            lines,
            shipping_address,
            payment_token,
            *placed_at,
        ),
        OrderCommand::MarkStockReserved { stock_reserved_at } => {
            mark_stock_reserved(existing(state)?, *stock_reserved_at)
        }
        OrderCommand::MarkPaid {
            amount,
            gateway_reference,
            paid_at,
        } => mark_paid(existing(state)?, *amount, gateway_reference, *paid_at),
        OrderCommand::Confirm { confirmed_at } => confirm(existing(state)?, *confirmed_at),
        OrderCommand::Cancel {
            cancellation_reason,
            cancelled_by,
            cancelled_at,
        } => cancel(
            existing(state)?,
            cancellation_reason,
            *cancelled_by,
            *cancelled_at,
        ),
        OrderCommand::Ship {
            carrier,
            tracking_number,
            shipped_at,
        } => ship(existing(state)?, carrier, tracking_number, *shipped_at),
        OrderCommand::Deliver { delivered_at } => deliver(existing(state)?, *delivered_at),
    }
}

/// Every command but `Place` acts on an order that has been placed.
fn existing(state: &Option<Order>) -> Result<&Order, Rejection> {
    state.as_ref().ok_or(Rejection::OrderNotFound)
}

/// An order is placed once, with lines priced from the catalog.
fn place(
    state: &Option<Order>,
    order_id: OrderId,
    customer_id: &CustomerId,
    lines: &PricedLines,
    shipping_address: &Address,
    payment_token: &PaymentToken,
    placed_at: DateTime<Utc>,
) -> Result<Vec<OrderEvent>, Rejection> {
    if state.is_some() {
        return Err(Rejection::OrderAlreadyPlaced { order_id });
    }
    Ok(vec![
        OrderPlaced {
            order_id,
            customer_id: customer_id.clone(),
            lines: lines.lines.clone(),
            total: lines.total,
            shipping_address: shipping_address.clone(),
            payment_token: payment_token.clone(),
            placed_at,
        }
        .into(),
    ])
}

fn mark_stock_reserved(
    order: &Order,
    stock_reserved_at: DateTime<Utc>,
) -> Result<Vec<OrderEvent>, Rejection> {
    if !saga_step(
        order,
        OrderStatus::Placed,
        OrderStatus::StockReserved,
        "mark stock reserved for",
    )? {
        return Ok(vec![]);
    }
    Ok(vec![
        OrderStockReserved {
            order_id: order.order_id,
            stock_reserved_at,
        }
        .into(),
    ])
}

/// A reserved order is paid only with exactly its total.
fn mark_paid(
    order: &Order,
    amount: Money,
    gateway_reference: &GatewayReference,
    paid_at: DateTime<Utc>,
) -> Result<Vec<OrderEvent>, Rejection> {
    // Checked after the step test so a redelivery still decides nothing.
    if !saga_step(
        order,
        OrderStatus::StockReserved,
        OrderStatus::Paid,
        "mark paid",
    )? {
        return Ok(vec![]);
    }
    if amount != order.total {
        return Err(Rejection::PaymentAmountMismatch {
            paid: amount,
            total: order.total,
        });
    }
    Ok(vec![
        OrderPaid {
            order_id: order.order_id,
            amount,
            gateway_reference: gateway_reference.clone(),
            paid_at,
        }
        .into(),
    ])
}

fn confirm(order: &Order, confirmed_at: DateTime<Utc>) -> Result<Vec<OrderEvent>, Rejection> {
    if !saga_step(order, OrderStatus::Paid, OrderStatus::Confirmed, "confirm")? {
        return Ok(vec![]);
    }
    Ok(vec![
        OrderConfirmed {
            order_id: order.order_id,
            confirmed_at,
        }
        .into(),
    ])
}

/// An order can be cancelled until it ships; cancelling it again decides nothing.
///
/// The saga cancels only an order it has not marked paid: its cancels are failures (no stock,
/// a declined or overdue payment), and it marks an order paid only once the charge is
/// recorded, after which no failure remains. A saga's cancel that meets a paid order was
/// decided without that charge, by a process paused until its lanes had moved to another (its
/// lease guard stops every append but the one in flight at the pause): taking it would cancel
/// an order the customer paid for. The customer may still cancel it, which refunds the money.
fn cancel(
    order: &Order,
    cancellation_reason: &Reason,
    cancelled_by: CancelledBy,
    cancelled_at: DateTime<Utc>,
) -> Result<Vec<OrderEvent>, Rejection> {
    match order.status {
        OrderStatus::Cancelled => Ok(vec![]),
        OrderStatus::Shipped | OrderStatus::Delivered => Err(Rejection::IllegalTransition {
            action: "cancel",
            status: order.status,
        }),
        OrderStatus::Paid | OrderStatus::Confirmed if cancelled_by == CancelledBy::Fulfilment => {
            Err(Rejection::IllegalTransition {
                action: "fail the fulfilment of",
                status: order.status,
            })
        }
        OrderStatus::Placed
        | OrderStatus::StockReserved
        | OrderStatus::Paid
        | OrderStatus::Confirmed => Ok(vec![
            OrderCancelled {
                order_id: order.order_id,
                cancellation_reason: cancellation_reason.clone(),
                cancelled_by,
                cancelled_at,
            }
            .into(),
        ]),
    }
}

fn ship(
    order: &Order,
    carrier: &Carrier,
    tracking_number: &TrackingNumber,
    shipped_at: DateTime<Utc>,
) -> Result<Vec<OrderEvent>, Rejection> {
    // Only a confirmed order ships: stock is held and the money taken.
    manual_step(order, OrderStatus::Confirmed, "ship")?;
    Ok(vec![
        OrderShipped {
            order_id: order.order_id,
            carrier: carrier.clone(),
            tracking_number: tracking_number.clone(),
            shipped_at,
        }
        .into(),
    ])
}

fn deliver(order: &Order, delivered_at: DateTime<Utc>) -> Result<Vec<OrderEvent>, Rejection> {
    manual_step(order, OrderStatus::Shipped, "deliver")?;
    Ok(vec![
        OrderDelivered {
            order_id: order.order_id,
            delivered_at,
        }
        .into(),
    ])
}

/// Events only ever arrive in an order `decide` allows, so each arm just records its fact.
pub fn evolve(state: Option<Order>, event: &OrderEvent) -> Option<Order> {
    let mut order = match (state, event) {
        (None, OrderEvent::OrderPlaced(placed)) => {
            return Some(Order {
                order_id: placed.order_id,
                customer_id: placed.customer_id.clone(),
                lines: placed.lines.clone(),
                total: placed.total,
                shipping_address: placed.shipping_address.clone(),
                payment_token: placed.payment_token.clone(),
                placed_at: placed.placed_at,
                status: OrderStatus::Placed,
                cancellation_reason: None,
                shipment: None,
            });
        }
        // Nothing but a placement can start a stream; anything else is ignored, not invented.
        (None, _) => return None,
        (Some(order), _) => order,
    };
    match event {
        // A second placement is never decided; the first one stands.
        OrderEvent::OrderPlaced(_) => {}
        OrderEvent::OrderStockReserved(_) => order.status = OrderStatus::StockReserved,
        OrderEvent::OrderPaid(_) => order.status = OrderStatus::Paid,
        OrderEvent::OrderConfirmed(_) => order.status = OrderStatus::Confirmed,
        OrderEvent::OrderCancelled(cancelled) => {
            order.status = OrderStatus::Cancelled;
            order.cancellation_reason = Some(cancelled.cancellation_reason.clone());
        }
        OrderEvent::OrderShipped(shipped) => {
            order.status = OrderStatus::Shipped;
            order.shipment = Some(Shipment {
                carrier: shipped.carrier.clone(),
                tracking_number: shipped.tracking_number.clone(),
                shipped_at: shipped.shipped_at,
                delivered_at: None,
            });
        }
        OrderEvent::OrderDelivered(delivered) => {
            order.status = OrderStatus::Delivered;
            if let Some(shipment) = order.shipment.as_mut() {
                shipment.delivered_at = Some(delivered.delivered_at);
            }
        }
    }
    Some(order)
}

decider!(
    /// The order decider for generic callers (command handling, the test harness).
    OrderAggregate, Option<Order>, OrderCommand, OrderEvent
);

#[cfg(test)]
mod tests {
    use orderly_event_schemas::products::ProductRegistered;

    use super::*;
    use crate::product;
    use crate::testing::fixtures::*;
    use crate::testing::{self, Given};

    fn given(history: impl IntoIterator<Item = OrderEvent>) -> Given<OrderAggregate> {
        testing::given(history)
    }

    fn catalog_product(code: &str, price: Money) -> Product {
        let registered = ProductRegistered {
            sku: sku(code),
            name: name(code),
            description: None,
            price,
            initial_stock: 5,
            registered_at: at(0),
        };
        product::evolve(None, &registered.into()).expect("registered")
    }

    fn catalog() -> Vec<Product> {
        vec![
            catalog_product("TEA", eur(650)),
            catalog_product("MUG", eur(1200)),
        ]
    }

    fn line(code: &str, quantity: u32) -> LineRequest {
        LineRequest {
            sku: sku(code),
            quantity: qty(quantity),
        }
    }

    fn priced() -> PricedLines {
        price_lines(&[line("TEA", 2), line("MUG", 1)], &catalog()).expect("priced")
    }

    fn place() -> OrderCommand {
        OrderCommand::Place {
            order_id: order_id(1),
            customer_id: customer(),
            lines: priced(),
            shipping_address: address(),
            payment_token: token("tok_ok"),
            placed_at: at(0),
        }
    }

    fn placed() -> OrderEvent {
        OrderPlaced {
            order_id: order_id(1),
            customer_id: customer(),
            lines: priced().lines,
            total: eur(2500),
            shipping_address: address(),
            payment_token: token("tok_ok"),
            placed_at: at(0),
        }
        .into()
    }

    fn stock_reserved() -> OrderEvent {
        OrderStockReserved {
            order_id: order_id(1),
            stock_reserved_at: at(1),
        }
        .into()
    }

    fn paid() -> OrderEvent {
        OrderPaid {
            order_id: order_id(1),
            amount: eur(2500),
            gateway_reference: reference("ch_1"),
            paid_at: at(2),
        }
        .into()
    }

    fn confirmed() -> OrderEvent {
        OrderConfirmed {
            order_id: order_id(1),
            confirmed_at: at(2),
        }
        .into()
    }

    fn shipped() -> OrderEvent {
        OrderShipped {
            order_id: order_id(1),
            carrier: Carrier::parse("DHL").unwrap(),
            tracking_number: TrackingNumber::parse("JD0146").unwrap(),
            shipped_at: at(60),
        }
        .into()
    }

    fn delivered() -> OrderEvent {
        OrderDelivered {
            order_id: order_id(1),
            delivered_at: at(120),
        }
        .into()
    }

    fn cancelled(by: CancelledBy) -> OrderEvent {
        OrderCancelled {
            order_id: order_id(1),
            cancellation_reason: reason("changed my mind"),
            cancelled_by: by,
            cancelled_at: at(5),
        }
        .into()
    }

    fn mark_stock_reserved() -> OrderCommand {
        OrderCommand::MarkStockReserved {
            stock_reserved_at: at(1),
        }
    }

    fn mark_paid(amount: Money) -> OrderCommand {
        OrderCommand::MarkPaid {
            amount,
            gateway_reference: reference("ch_1"),
            paid_at: at(2),
        }
    }

    fn confirm() -> OrderCommand {
        OrderCommand::Confirm {
            confirmed_at: at(2),
        }
    }

    fn cancel() -> OrderCommand {
        cancel_by(CancelledBy::Customer)
    }

    fn cancel_by(cancelled_by: CancelledBy) -> OrderCommand {
        OrderCommand::Cancel {
            cancellation_reason: reason("changed my mind"),
            cancelled_by,
            cancelled_at: at(5),
        }
    }

    fn ship() -> OrderCommand {
        OrderCommand::Ship {
            carrier: Carrier::parse("DHL").unwrap(),
            tracking_number: TrackingNumber::parse("JD0146").unwrap(),
            shipped_at: at(60),
        }
    }

    fn deliver() -> OrderCommand {
        OrderCommand::Deliver {
            delivered_at: at(120),
        }
    }

    #[test]
    fn pricing_copies_names_and_prices_from_the_catalog_and_sums_the_total() {
        let priced = priced();
        assert_eq!(priced.total(), eur(2500));
        assert_eq!(priced.lines()[0].unit_price, eur(650));
        assert_eq!(priced.lines()[0].line_total, eur(1300));
        assert_eq!(priced.lines()[1].name, name("MUG"));
    }

    #[test]
    fn pricing_rejects_no_lines_too_many_lines_duplicates_unknown_skus_and_mixed_currencies() {
        let products = catalog();
        assert_eq!(price_lines(&[], &products), Err(Rejection::NoLines));
        let many: Vec<_> = (0..=MAX_LINES)
            .map(|n| line(&format!("SKU{n}"), 1))
            .collect();
        assert_eq!(
            price_lines(&many, &products),
            Err(Rejection::TooManyLines {
                count: MAX_LINES + 1,
                max: MAX_LINES
            })
        );
        assert_eq!(
            price_lines(&[line("TEA", 1), line("TEA", 2)], &products),
            Err(Rejection::DuplicateSku { sku: sku("TEA") })
        );
        assert_eq!(
            price_lines(&[line("CAKE", 1)], &products),
            Err(Rejection::UnknownSku { sku: sku("CAKE") })
        );
        let mixed = vec![
            catalog_product("TEA", eur(650)),
            catalog_product("MUG", usd(1200)),
        ];
        assert_eq!(
            price_lines(&[line("TEA", 1), line("MUG", 1)], &mixed),
            Err(Rejection::MixedCurrencies {
                first: eur(0).currency(),
                other: usd(0).currency()
            })
        );
    }

    #[test]
    fn pricing_an_order_too_large_to_store_is_rejected() {
        let products = vec![catalog_product(
            "GOLD",
            eur(orderly_event_schemas::values::MAX_SAFE_INTEGER),
        )];
        assert_eq!(
            price_lines(&[line("GOLD", 2)], &products),
            Err(Rejection::AmountOverflow)
        );
    }

    #[test]
    fn placing_an_order_records_the_priced_lines() {
        let order = given([]).when(place()).then([placed()]).expect("placed");
        assert_eq!(order.status, OrderStatus::Placed);
        assert_eq!(order.total, eur(2500));
    }

    #[test]
    fn placing_an_order_twice_is_rejected() {
        given([placed()])
            .when(place())
            .then_rejected(Rejection::OrderAlreadyPlaced {
                order_id: order_id(1),
            });
    }

    #[test]
    fn any_step_on_an_order_that_does_not_exist_is_rejected() {
        // Which variant a command is; exhaustive, so a new command must be added below.
        fn variant(command: &OrderCommand) -> usize {
            match command {
                OrderCommand::Place { .. } => 0,
                OrderCommand::MarkStockReserved { .. } => 1,
                OrderCommand::MarkPaid { .. } => 2,
                OrderCommand::Confirm { .. } => 3,
                OrderCommand::Cancel { .. } => 4,
                OrderCommand::Ship { .. } => 5,
                OrderCommand::Deliver { .. } => 6,
            }
        }
        let steps = [
            mark_stock_reserved(),
            mark_paid(eur(2500)),
            confirm(),
            cancel_by(CancelledBy::Customer),
            cancel_by(CancelledBy::Fulfilment),
            ship(),
            deliver(),
        ];
        crate::testing::each_refused_before_creation::<OrderAggregate>(
            steps,
            variant,
            6,
            Rejection::OrderNotFound,
        );
    }

    #[test]
    fn marking_stock_reserved_moves_a_placed_order_on() {
        let order = given([placed()])
            .when(mark_stock_reserved())
            .then([stock_reserved()]);
        assert_eq!(order.map(|o| o.status), Some(OrderStatus::StockReserved));
    }

    #[test]
    fn marking_stock_reserved_again_records_nothing() {
        given([placed(), stock_reserved()])
            .when(mark_stock_reserved())
            .then_nothing();
        given([placed(), stock_reserved(), paid()])
            .when(mark_stock_reserved())
            .then_nothing();
    }

    #[test]
    fn marking_stock_reserved_on_a_cancelled_order_is_rejected() {
        given([placed(), cancelled(CancelledBy::Customer)])
            .when(mark_stock_reserved())
            .then_rejected(Rejection::IllegalTransition {
                action: "mark stock reserved for",
                status: OrderStatus::Cancelled,
            });
    }

    #[test]
    fn marking_paid_moves_a_reserved_order_on() {
        given([placed(), stock_reserved()])
            .when(mark_paid(eur(2500)))
            .then([paid()]);
    }

    #[test]
    fn marking_paid_before_stock_is_reserved_is_rejected() {
        given([placed()])
            .when(mark_paid(eur(2500)))
            .then_rejected(Rejection::IllegalTransition {
                action: "mark paid",
                status: OrderStatus::Placed,
            });
    }

    #[test]
    fn marking_paid_with_the_wrong_amount_is_rejected() {
        given([placed(), stock_reserved()])
            .when(mark_paid(eur(1)))
            .then_rejected(Rejection::PaymentAmountMismatch {
                paid: eur(1),
                total: eur(2500),
            });
    }

    #[test]
    fn marking_paid_again_records_nothing() {
        given([placed(), stock_reserved(), paid()])
            .when(mark_paid(eur(2500)))
            .then_nothing();
    }

    #[test]
    fn confirming_a_paid_order_confirms_it() {
        let order = given([placed(), stock_reserved(), paid()])
            .when(confirm())
            .then([confirmed()]);
        assert_eq!(order.map(|o| o.status), Some(OrderStatus::Confirmed));
    }

    #[test]
    fn confirming_an_unpaid_order_is_rejected() {
        given([placed(), stock_reserved()])
            .when(confirm())
            .then_rejected(Rejection::IllegalTransition {
                action: "confirm",
                status: OrderStatus::StockReserved,
            });
    }

    #[test]
    fn confirming_again_records_nothing() {
        given([placed(), stock_reserved(), paid(), confirmed()])
            .when(confirm())
            .then_nothing();
    }

    #[test]
    fn cancelling_before_shipping_cancels_with_the_reason() {
        for history in [
            vec![placed()],
            vec![placed(), stock_reserved()],
            vec![placed(), stock_reserved(), paid()],
            vec![placed(), stock_reserved(), paid(), confirmed()],
        ] {
            let order = given(history)
                .when(cancel())
                .then([cancelled(CancelledBy::Customer)])
                .expect("order");
            assert_eq!(order.status, OrderStatus::Cancelled);
            assert_eq!(order.cancellation_reason, Some(reason("changed my mind")));
        }
    }

    #[test]
    fn the_saga_cannot_cancel_an_order_it_marked_paid() {
        for (history, status) in [
            (vec![placed(), stock_reserved(), paid()], OrderStatus::Paid),
            (
                vec![placed(), stock_reserved(), paid(), confirmed()],
                OrderStatus::Confirmed,
            ),
        ] {
            given(history)
                .when(cancel_by(CancelledBy::Fulfilment))
                .then_rejected(Rejection::IllegalTransition {
                    action: "fail the fulfilment of",
                    status,
                });
        }
    }

    #[test]
    fn the_saga_cancels_an_order_that_is_not_paid() {
        for history in [vec![placed()], vec![placed(), stock_reserved()]] {
            given(history)
                .when(cancel_by(CancelledBy::Fulfilment))
                .then([cancelled(CancelledBy::Fulfilment)]);
        }
    }

    #[test]
    fn cancelling_a_cancelled_order_records_nothing() {
        given([placed(), cancelled(CancelledBy::Fulfilment)])
            .when(cancel())
            .then_nothing();
    }

    #[test]
    fn cancelling_a_shipped_order_is_rejected() {
        given([placed(), stock_reserved(), paid(), confirmed(), shipped()])
            .when(cancel())
            .then_rejected(Rejection::IllegalTransition {
                action: "cancel",
                status: OrderStatus::Shipped,
            });
    }

    #[test]
    fn cancelling_a_delivered_order_is_rejected() {
        given([
            placed(),
            stock_reserved(),
            paid(),
            confirmed(),
            shipped(),
            delivered(),
        ])
        .when(cancel())
        .then_rejected(Rejection::IllegalTransition {
            action: "cancel",
            status: OrderStatus::Delivered,
        });
    }

    #[test]
    fn shipping_a_confirmed_order_records_carrier_and_tracking_number() {
        let order = given([placed(), stock_reserved(), paid(), confirmed()])
            .when(ship())
            .then([shipped()]);
        let shipment = order.and_then(|o| o.shipment).expect("shipment");
        assert_eq!(shipment.tracking_number.as_str(), "JD0146");
    }

    #[test]
    fn shipping_an_unconfirmed_order_is_rejected() {
        given([placed(), stock_reserved(), paid()])
            .when(ship())
            .then_rejected(Rejection::IllegalTransition {
                action: "ship",
                status: OrderStatus::Paid,
            });
    }

    #[test]
    fn shipping_twice_is_rejected() {
        given([placed(), stock_reserved(), paid(), confirmed(), shipped()])
            .when(ship())
            .then_rejected(Rejection::IllegalTransition {
                action: "ship",
                status: OrderStatus::Shipped,
            });
    }

    #[test]
    fn delivering_a_shipped_order_records_the_delivery() {
        let order = given([placed(), stock_reserved(), paid(), confirmed(), shipped()])
            .when(deliver())
            .then([delivered()])
            .expect("order");
        assert_eq!(order.shipment.and_then(|s| s.delivered_at), Some(at(120)));
    }

    #[test]
    fn delivering_an_order_that_has_not_shipped_is_rejected() {
        given([placed(), stock_reserved(), paid(), confirmed()])
            .when(deliver())
            .then_rejected(Rejection::IllegalTransition {
                action: "deliver",
                status: OrderStatus::Confirmed,
            });
    }

    #[test]
    fn order_status_serializes_as_the_contract_spells_it() {
        assert_eq!(
            serde_json::to_string(&OrderStatus::StockReserved).unwrap(),
            "\"STOCK_RESERVED\""
        );
    }
}
