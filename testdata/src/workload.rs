//! Realistic event histories, made through the domain's deciders so that every event is one
//! the domain could have decided: products registered, restocked and repriced; orders placed
//! with 1 to 5 lines, stock reserved or refused, paid (sometimes after a failed attempt),
//! declined, cancelled by customers, shipped and delivered.
//!
//! A [`Workload`] yields one [`Append`] at a time (one decision on one stream, with the
//! expected version to append at), so a caller can write millions of events in constant memory:
//! orders leave the generator's state once delivered or cancelled.

use std::collections::HashMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use orderly_domain::order::{self, LineRequest, Order, OrderCommand};
use orderly_domain::payment::{self, Payment, PaymentCommand};
use orderly_domain::product::{self, Product, ProductCommand};
use orderly_domain::streams;
use orderly_domain::values::*;
use orderly_event_schemas::orders::CancelledBy;
use orderly_event_schemas::{EncodedEvent, Event, EventMetadata, encode};
use orderly_event_store::{
    AppendResult, EventStore, ExpectedVersion, NewEvent, StoreError, StreamName,
};
use uuid::Uuid;

/// One decision: events for one stream, appended at `expected` (`None`: the stream is new).
#[derive(Debug, Clone)]
pub struct Append {
    pub stream: String,
    pub expected: Option<u64>,
    pub events: Vec<Event>,
}

impl Append {
    /// Appends this decision through the store port at its expected version.
    pub async fn append_to(&self, store: &dyn EventStore) -> Result<AppendResult, StoreError> {
        let events = self
            .encoded()
            .into_iter()
            .map(|e| NewEvent {
                id: e.event_id,
                event_type: e.event_type.to_owned(),
                data: e.data,
                metadata: e.metadata,
            })
            .collect();
        let expected = self
            .expected
            .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        let stream = StreamName::parse(self.stream.clone()).map_err(StoreError::from)?;
        store.append(&stream, expected, events).await
    }

    /// The events as the store wants them, with a metadata envelope each.
    pub fn encoded(&self) -> Vec<EncodedEvent> {
        self.events
            .iter()
            .filter_map(|event| {
                let id = Uuid::now_v7();
                let metadata = EventMetadata {
                    event_id: id,
                    correlation_id: id,
                    causation_id: id,
                    traceparent: None,
                    actor: "system:workload".to_owned(),
                    command_id: id,
                    idempotency_key: None,
                    occurred_at: Utc::now(),
                };
                encode(event, &metadata).ok()
            })
            .collect()
    }
}

/// Shape of the generated history.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    pub seed: u64,
    pub products: usize,
    pub customers: usize,
    /// Orders open at once (placed and not yet delivered or cancelled).
    pub open_orders: usize,
    /// Put before SKUs and customer ids, so that several workloads can write to one log
    /// without colliding (uppercase letters, digits and `-`, e.g. `W1-`).
    pub prefix: String,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        Self {
            seed: 7,
            prefix: String::new(),
            products: 50,
            customers: 40,
            open_orders: 30,
        }
    }
}

/// The generator's draws, reproducible from a seed: fastrand's, as `orderly seed` uses.
struct Rng(fastrand::Rng);

impl Rng {
    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        self.0.usize(..n.max(1))
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.0.u64(..100) < percent
    }
}

/// Where an open order is on the fulfilment saga's path; the generator plays the saga's part.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    Placed,
    Reserved,
    Charging,
    Failed,
    Confirmed,
    Shipped,
}

/// An order's and its payment's state and stream versions, for the next decision's expected
/// version.
struct OpenOrder {
    order: Option<Order>,
    order_version: u64,
    payment: Option<Payment>,
    payment_version: Option<u64>,
    stage: Stage,
}

/// The generator: every decision goes through a decider over the state the earlier ones made.
pub struct Workload {
    options: WorkloadOptions,
    rng: Rng,
    clock: DateTime<Utc>,
    products: Vec<(Sku, Option<Product>, u64)>,
    orders: HashMap<Uuid, OpenOrder>,
    order_ids: Vec<Uuid>,
    /// Appends decided but not handed out yet (a saga step may decide on several streams).
    queue: std::collections::VecDeque<Append>,
}

fn text<T>(parse: impl Fn(String) -> Result<T, orderly_event_schemas::SchemaError>, s: &str) -> T {
    // Only called with the literals and formats of this module, which are all valid.
    parse(s.to_owned()).unwrap_or_else(|e| panic!("workload value {s:?}: {e}"))
}

impl Workload {
    pub fn new(options: WorkloadOptions) -> Self {
        Self {
            rng: Rng(fastrand::Rng::with_seed(options.seed)),
            clock: Utc
                .with_ymd_and_hms(2026, 1, 1, 8, 0, 0)
                .single()
                .unwrap_or_default(),
            products: Vec::new(),
            orders: HashMap::new(),
            order_ids: Vec::new(),
            queue: std::collections::VecDeque::new(),
            options,
        }
    }

    /// A clock of its own that moves 1 s to 10 min per step, so a history spans days (daily
    /// sales) and the same seed makes the same timestamps.
    fn tick(&mut self) -> DateTime<Utc> {
        self.clock += Duration::seconds(1 + self.rng.below(600) as i64);
        self.clock
    }

    /// The next decision. Never ends.
    pub fn next_append(&mut self) -> Append {
        loop {
            if let Some(append) = self.queue.pop_front() {
                return append;
            }
            self.step();
        }
    }

    fn step(&mut self) {
        if self.products.len() < self.options.products {
            self.register_product();
            return;
        }
        // Mostly orders and their progress; now and then stock and price changes.
        let roll = self.rng.below(100);
        if roll < 4 {
            let i = self.rng.below(self.products.len());
            let quantity = Quantity::new(1 + self.rng.below(40) as u32).ok();
            if let Some(quantity) = quantity {
                let restocked_at = self.tick();
                self.product_command(
                    i,
                    ProductCommand::Restock {
                        quantity,
                        restocked_at,
                    },
                );
            }
        } else if roll < 6 {
            let i = self.rng.below(self.products.len());
            let price_changed_at = self.tick();
            let currency = self.products[i].1.as_ref().map(|p| p.price.currency());
            if let Some(currency) = currency
                && let Ok(price) = Money::new(100 + self.rng.below(5000) as i64, currency)
            {
                self.product_command(
                    i,
                    ProductCommand::ChangePrice {
                        price,
                        price_changed_at,
                    },
                );
            }
        } else if roll < 30 || self.orders.len() < self.options.open_orders / 2 {
            self.place_order();
        } else if !self.order_ids.is_empty() {
            let id = self.order_ids[self.rng.below(self.order_ids.len())];
            self.advance(id);
        }
    }

    fn register_product(&mut self) {
        let n = self.products.len();
        let sku = text(Sku::parse, &format!("{}SKU-{n:05}", self.options.prefix));
        let currency = text(
            |s| Currency::parse(&s),
            if n.is_multiple_of(5) { "USD" } else { "EUR" },
        );
        let registered_at = self.tick();
        let command = ProductCommand::Register {
            sku: sku.clone(),
            name: text(
                ProductName::parse,
                &format!(
                    "Product {n} {}",
                    ["tea", "cup", "jug", "mill", "kettle"][n % 5]
                ),
            ),
            description: n
                .is_multiple_of(2)
                .then(|| text(Description::parse, "A fine thing")),
            price: Money::new(100 + (n as i64 * 37) % 9000, currency)
                .unwrap_or(Money::zero(currency)),
            initial_stock: self.rng.below(60) as u32,
            registered_at,
        };
        self.products.push((sku, None, 0));
        self.product_command(n, command);
    }

    /// Decides on product `i` and queues the append; returns the events.
    fn product_command(
        &mut self,
        i: usize,
        command: ProductCommand,
    ) -> Vec<orderly_event_schemas::ProductEvent> {
        let (sku, state, version) = &mut self.products[i];
        let Ok(events) = product::decide(state, &command) else {
            return Vec::new();
        };
        if events.is_empty() {
            return events;
        }
        let expected = state.as_ref().map(|_| *version);
        let mut next = state.take();
        for event in &events {
            next = product::evolve(next, event);
        }
        *state = next;
        if expected.is_some() {
            *version += events.len() as u64;
        } else {
            *version = events.len() as u64 - 1;
        }
        self.queue.push_back(Append {
            stream: streams::product(sku),
            expected,
            events: events.iter().cloned().map(Event::Product).collect(),
        });
        events
    }

    fn place_order(&mut self) {
        let count = 1 + self.rng.below(5);
        let mut picked: Vec<usize> = Vec::new();
        let currency_of =
            |p: &(Sku, Option<Product>, u64)| p.1.as_ref().map(|p| p.price.currency());
        let first = self.rng.below(self.products.len());
        picked.push(first);
        for _ in 1..count {
            let i = self.rng.below(self.products.len());
            if !picked.contains(&i)
                && currency_of(&self.products[i]) == currency_of(&self.products[first])
            {
                picked.push(i);
            }
        }
        let requests: Vec<LineRequest> = picked
            .iter()
            .filter_map(|&i| {
                Some(LineRequest {
                    sku: self.products[i].0.clone(),
                    quantity: Quantity::new(1 + (i as u32 % 3)).ok()?,
                })
            })
            .collect();
        let catalog: Vec<Product> = picked
            .iter()
            .filter_map(|&i| self.products[i].1.clone())
            .collect();
        let Ok(lines) = order::price_lines(&requests, &catalog) else {
            return;
        };
        let order_id = OrderId(Uuid::now_v7());
        let customer = self.rng.below(self.options.customers);
        let placed_at = self.tick();
        let command = OrderCommand::Place {
            order_id,
            customer_id: text(
                CustomerId::parse,
                &format!("{}customer-{customer:04}", self.options.prefix),
            ),
            lines,
            shipping_address: Address {
                name: text(AddressLine::parse, &format!("Customer {customer}")),
                line1: text(
                    AddressLine::parse,
                    &format!("{} Harbour Street", 1 + customer),
                ),
                line2: customer
                    .is_multiple_of(3)
                    .then(|| text(AddressLine::parse, "Flat 2")),
                city: text(
                    AddressLine::parse,
                    ["Lisbon", "Ghent", "Turku"][customer % 3],
                ),
                postal_code: text(PostalCode::parse, &format!("{:05}", 1000 + customer)),
                country: text(|s| CountryCode::parse(&s), ["PT", "BE", "FI"][customer % 3]),
            },
            payment_token: text(PaymentToken::parse, "tok_ok"),
            placed_at,
        };
        let mut open = OpenOrder {
            order: None,
            order_version: 0,
            payment: None,
            payment_version: None,
            stage: Stage::Placed,
        };
        if self.order_command(&mut open, command) {
            self.orders.insert(order_id.0, open);
            self.order_ids.push(order_id.0);
        }
    }

    /// Decides on an order and queues the append; whether anything was decided.
    fn order_command(&mut self, open: &mut OpenOrder, command: OrderCommand) -> bool {
        let Ok(events) = order::decide(&open.order, &command) else {
            return false;
        };
        let order_id = match (&open.order, &command) {
            (Some(order), _) => order.order_id,
            (None, OrderCommand::Place { order_id, .. }) => *order_id,
            (None, _) => return false,
        };
        if events.is_empty() {
            return false;
        }
        let expected = open.order.as_ref().map(|_| open.order_version);
        let mut next = open.order.take();
        for event in &events {
            next = order::evolve(next, event);
        }
        open.order = next;
        open.order_version = match expected {
            Some(v) => v + events.len() as u64,
            None => events.len() as u64 - 1,
        };
        self.queue.push_back(Append {
            stream: streams::order(order_id),
            expected,
            events: events.into_iter().map(Event::Order).collect(),
        });
        true
    }

    fn payment_command(
        &mut self,
        open: &mut OpenOrder,
        order_id: OrderId,
        command: PaymentCommand,
    ) -> bool {
        let Ok(events) = payment::decide(&open.payment, &command) else {
            return false;
        };
        if events.is_empty() {
            return false;
        }
        let expected = open.payment_version;
        let mut next = open.payment.take();
        for event in &events {
            next = payment::evolve(next, event);
        }
        open.payment = next;
        open.payment_version = Some(match expected {
            Some(v) => v + events.len() as u64,
            None => events.len() as u64 - 1,
        });
        self.queue.push_back(Append {
            stream: streams::payment(order_id),
            expected,
            events: events.into_iter().map(Event::Payment).collect(),
        });
        true
    }

    fn product_index(&self, sku: &Sku) -> Option<usize> {
        self.products.iter().position(|p| &p.0 == sku)
    }

    fn release_all(&mut self, order: &Order) {
        for line in &order.lines {
            if let Some(i) = self.product_index(&line.sku) {
                let released_at = self.tick();
                self.product_command(
                    i,
                    ProductCommand::ReleaseReservation {
                        order_id: order.order_id,
                        released_at,
                    },
                );
            }
        }
    }

    /// Forgets a finished order, which keeps the generator's memory flat however long it runs.
    fn close(&mut self, id: Uuid) {
        self.orders.remove(&id);
        self.order_ids.retain(|o| *o != id);
    }

    fn cancel(&mut self, open: &mut OpenOrder, reason: &str, by: CancelledBy) {
        let cancelled_at = self.tick();
        self.order_command(
            open,
            OrderCommand::Cancel {
                cancellation_reason: text(Reason::parse, reason),
                cancelled_by: by,
                cancelled_at,
            },
        );
    }

    /// Moves one open order a step along the saga's path (or off it).
    /// Plays the saga's next step for order `id`, as the stage it is at says.
    fn advance(&mut self, id: Uuid) {
        let Some(mut open) = self.orders.remove(&id) else {
            return;
        };
        let Some(order) = open.order.clone() else {
            self.close(id);
            return;
        };
        let closed = match open.stage {
            Stage::Placed => self.reserve(&mut open, &order),
            Stage::Reserved | Stage::Failed => self.request_charge(&mut open, &order),
            Stage::Charging => self.charge(&mut open, &order),
            Stage::Confirmed => self.ship_or_cancel(&mut open, &order),
            Stage::Shipped => self.deliver(&mut open),
        };
        if closed {
            self.close(id);
        } else {
            self.orders.insert(id, open);
        }
    }

    /// Reserves every line; one refusal releases the others and cancels "out of stock".
    /// Whether the order closed.
    fn reserve(&mut self, open: &mut OpenOrder, order: &Order) -> bool {
        let order_id = order.order_id;
        let mut refused = false;
        for line in &order.lines {
            let Some(i) = self.product_index(&line.sku) else {
                continue;
            };
            let reserved_at = self.tick();
            let events = self.product_command(
                i,
                ProductCommand::ReserveStock {
                    order_id,
                    quantity: line.quantity,
                    reserved_at,
                    placed_at: None,
                },
            );
            refused |= events.iter().any(|e| {
                matches!(
                    e,
                    orderly_event_schemas::ProductEvent::StockReservationRejected(_)
                )
            });
        }
        if refused {
            self.release_all(order);
            self.cancel(open, "out of stock", CancelledBy::Fulfilment);
            return true;
        }
        let stock_reserved_at = self.tick();
        self.order_command(open, OrderCommand::MarkStockReserved { stock_reserved_at });
        open.stage = Stage::Reserved;
        false
    }

    /// Requests the next charge attempt.
    fn request_charge(&mut self, open: &mut OpenOrder, order: &Order) -> bool {
        let order_id = order.order_id;
        let attempt = open.payment.as_ref().map_or(1, |p| p.attempts + 1);
        let requested_at = self.tick();
        self.payment_command(
            open,
            order_id,
            PaymentCommand::RequestCharge {
                order_id,
                amount: order.total,
                payment_token: order.payment_token.clone(),
                attempt,
                requested_at,
            },
        );
        open.stage = Stage::Charging;
        false
    }

    /// The gateway's answer: 10% declined (cancelled), up to 10% a transient failure
    /// (retried), the rest charged, paid and confirmed. Whether the order closed.
    fn charge(&mut self, open: &mut OpenOrder, order: &Order) -> bool {
        let order_id = order.order_id;
        let roll = self.rng.below(100);
        let at = self.tick();
        if roll < 10 {
            self.payment_command(
                open,
                order_id,
                PaymentCommand::RecordDecline {
                    reason: text(Reason::parse, "card declined"),
                    declined_at: at,
                },
            );
            self.release_all(order);
            self.cancel(open, "payment declined", CancelledBy::Fulfilment);
            return true;
        } else if roll < 20 && open.payment.as_ref().is_some_and(|p| p.attempts < 3) {
            let attempt = open.payment.as_ref().map_or(1, |p| p.attempts);
            self.payment_command(
                open,
                order_id,
                PaymentCommand::RecordFailure {
                    reason: text(Reason::parse, "gateway timeout"),
                    attempt,
                    failed_at: at,
                },
            );
            open.stage = Stage::Failed;
        } else {
            let reference = text(
                GatewayReference::parse,
                &format!("ch_{}", order_id.0.simple()),
            );
            self.payment_command(
                open,
                order_id,
                PaymentCommand::RecordCharge {
                    gateway_reference: reference.clone(),
                    charged_at: at,
                },
            );
            self.order_command(
                open,
                OrderCommand::MarkPaid {
                    amount: order.total,
                    gateway_reference: reference,
                    paid_at: at,
                },
            );
            let confirmed_at = self.tick();
            self.order_command(open, OrderCommand::Confirm { confirmed_at });
            open.stage = Stage::Confirmed;
        }
        false
    }

    /// 10% cancelled by the customer (refund, release), the rest shipped. Whether the order
    /// closed.
    fn ship_or_cancel(&mut self, open: &mut OpenOrder, order: &Order) -> bool {
        let order_id = order.order_id;
        if self.rng.chance(10) {
            let refunded_at = self.tick();
            self.cancel(open, "changed my mind", CancelledBy::Customer);
            self.payment_command(
                open,
                order_id,
                PaymentCommand::Refund {
                    reason: text(Reason::parse, "cancelled by customer"),
                    refunded_at,
                },
            );
            self.release_all(order);
            return true;
        } else {
            for line in &order.lines {
                if let Some(i) = self.product_index(&line.sku) {
                    let shipped_at = self.tick();
                    self.product_command(
                        i,
                        ProductCommand::ShipReservedStock {
                            order_id,
                            shipped_at,
                        },
                    );
                }
            }
            let shipped_at = self.tick();
            self.order_command(
                open,
                OrderCommand::Ship {
                    carrier: text(Carrier::parse, "DHL"),
                    tracking_number: text(
                        TrackingNumber::parse,
                        &format!("TRK{}", order_id.0.simple()),
                    ),
                    shipped_at,
                },
            );
            open.stage = Stage::Shipped;
        }
        false
    }

    /// Delivered: the order's last step.
    fn deliver(&mut self, open: &mut OpenOrder) -> bool {
        let delivered_at = self.tick();
        self.order_command(open, OrderCommand::Deliver { delivered_at });
        true
    }
}
