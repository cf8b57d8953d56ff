//! The API's commands: who may send each, what it needs loaded, and what it answers.
//! Inputs arrive validated (see `graphql`); this layer authorizes, fetches and decides.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use orderly_domain::order::{self, CancelledBy, LineRequest, OrderAggregate, OrderCommand};
use orderly_domain::product::{self, Product, ProductAggregate, ProductCommand};
use orderly_domain::streams;
use orderly_domain::values::{
    Address, Carrier, CustomerId, Description, Money, OrderId, PaymentToken, ProductName, Quantity,
    Reason, Sku, TrackingNumber,
};
use orderly_event_store::{Direction, EventStore, Position, StreamName};
use orderly_graphql::{Actor, Role};
use sha2::Sha256;
use uuid::Uuid;

use crate::CommandError;
use crate::handling::{Envelope, Handler, Loaded, Outcome, stream_name};
use crate::metering::{CommandName, metered};
use crate::order_id_scheme::OrderIdScheme;
use crate::snapshots::Snapshots;

/// Namespace of the ids derived from idempotency keys before they were keyed with a secret
/// (a fixed random UUID). Orders placed then keep these ids, so a retry still finds them.
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x5f0c_1d2e_8a4b_4c6d_9e7f_0a1b_2c3d_4e5f);

/// How placeOrder turns (customer, idempotency key) into the order's id.
#[derive(Clone)]
pub enum OrderIds {
    /// A UUIDv5 in a public namespace: anyone who guesses a customer's key can compute the
    /// order's id. Only for a service without a secret (see `ORDERLY_ORDER_ID_SECRET`).
    Public,
    /// HMAC-SHA256 under a server secret: an id says nothing and cannot be computed outside.
    Keyed(Arc<Hmac<Sha256>>),
}

impl OrderIds {
    /// Ids keyed with `secret`, which every process placing orders must share (a retry may
    /// reach any of them).
    pub fn keyed(secret: &[u8]) -> Self {
        // HMAC takes a key of any length; only an empty one is refused, and that is public.
        match Hmac::<Sha256>::new_from_slice(secret) {
            Ok(mac) if !secret.is_empty() => Self::Keyed(Arc::new(mac)),
            _ => Self::Public,
        }
    }

    /// The UUID the order and command ids of a keyed placement derive from.
    fn base(&self, customer_id: &CustomerId, key: &str) -> Uuid {
        let input = format!("place-order\0{customer_id}\0{key}");
        match self {
            Self::Public => Uuid::new_v5(&KEY_NAMESPACE, input.as_bytes()),
            Self::Keyed(mac) => {
                let mut mac = Hmac::<Sha256>::clone(mac);
                mac.update(input.as_bytes());
                let digest = mac.finalize().into_bytes();
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&digest[..16]);
                uuid::Builder::from_random_bytes(bytes).into_uuid()
            }
        }
    }
}

/// The order and command ids of a placement under `key`, from its `base`.
fn placement_ids(base: Uuid, fingerprint: Uuid) -> (OrderId, Uuid) {
    (
        OrderId(Uuid::new_v5(&base, b"order")),
        Uuid::new_v5(&base, fingerprint.as_bytes()),
    )
}

/// What every command answers (the contract's `CommandResult`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    pub id: String,
    pub version: u64,
    pub token: Position,
    pub events: Vec<String>,
    pub replayed: bool,
}

impl CommandResult {
    fn from_outcome(id: String, outcome: Outcome) -> Self {
        Self {
            id,
            version: outcome.version.unwrap_or(0),
            token: outcome.position,
            replayed: !outcome.appended,
            events: outcome.events,
        }
    }
}

/// placeOrder, validated.
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    pub idempotency_key: Option<String>,
    /// `None`: the caller's own id.
    pub customer_id: Option<CustomerId>,
    pub lines: Vec<LineRequest>,
    pub payment_token: PaymentToken,
    pub shipping_address: Address,
    /// Identifies the request's content, so a key reused for another request is refused.
    pub fingerprint: Uuid,
    /// What identified the same request before a `customerId` naming the caller came to be
    /// fingerprinted as left out: a retry of a placement stored then is still recognised.
    pub earlier_fingerprint: Option<Uuid>,
}

/// registerProduct, validated.
#[derive(Debug, Clone)]
pub struct RegisterProduct {
    pub sku: Sku,
    pub name: ProductName,
    pub description: Option<Description>,
    pub price: Money,
    pub initial_stock: u32,
}

/// The command side as the API sees it. Cheap to clone; add it to the GraphQL schema's data.
#[derive(Clone)]
pub struct CommandService {
    handler: Handler,
    /// The request's trace context, copied into every event's metadata.
    traceparent: Option<String>,
    /// How old the product states that price a placement may be; see
    /// [`CommandService::with_price_max_age`].
    price_max_age: Duration,
    order_ids: OrderIds,
    /// Whether keyed placements must look for publicly named orders; without it they always
    /// do (see [`CommandService::with_order_id_scheme`]).
    scheme: Option<OrderIdScheme>,
}

/// [`CommandService::with_price_max_age`] unless told otherwise (`ORDERLY_PRICE_MAX_AGE_MS`).
pub const DEFAULT_PRICE_MAX_AGE: Duration = Duration::from_millis(100);

/// Who may send each command besides admins, who may send every one. The service checks
/// them; the GraphQL layer checks them too, before it reads the input, so that a caller
/// without the role is told FORBIDDEN and nothing about what was wrong with the input.
pub mod may_send {
    use orderly_graphql::Role;

    pub const PLACE_ORDER: &[Role] = &[Role::Customer];
    pub const CANCEL_ORDER: &[Role] = &[Role::Customer];
    pub const SHIP_ORDER: &[Role] = &[Role::Warehouse];
    pub const MARK_DELIVERED: &[Role] = &[Role::Warehouse];
    pub const REGISTER_PRODUCT: &[Role] = &[];
    pub const RESTOCK: &[Role] = &[Role::Warehouse];
    pub const CHANGE_PRICE: &[Role] = &[];
}

/// The caller, who must hold one of `roles` (admins may do everything).
pub fn require<'a>(actor: Option<&'a Actor>, roles: &[Role]) -> Result<&'a Actor, CommandError> {
    let actor = actor.ok_or(CommandError::Unauthenticated)?;
    if actor.is_admin() || roles.iter().any(|role| actor.has(*role)) {
        Ok(actor)
    } else {
        Err(CommandError::Forbidden(
            "your roles do not allow this command",
        ))
    }
}

impl CommandService {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            handler: Handler::new(store),
            traceparent: None,
            price_max_age: DEFAULT_PRICE_MAX_AGE,
            order_ids: OrderIds::Public,
            scheme: None,
        }
    }

    /// Order ids of keyed placements derived as `order_ids` says. Orders placed under the
    /// public derivation keep their ids: a retry of one is answered from it.
    pub fn with_order_ids(self, order_ids: OrderIds) -> Self {
        Self { order_ids, ..self }
    }

    /// Loads products (whose streams grow with every order) from their latest snapshot in
    /// `snapshots` when it has none cached, and snapshots them as they grow (see [`Snapshots`]).
    pub fn with_snapshots(self, snapshots: Snapshots) -> Self {
        Self {
            handler: self.handler.with_snapshots(snapshots),
            ..self
        }
    }

    /// Keyed placements look for the order their key named publicly only while `scheme`
    /// says the log may hold such orders, and a service placing public ids says so there
    /// first. Without a scheme a keyed placement always looks: one more read each.
    pub fn with_order_id_scheme(self, scheme: OrderIdScheme) -> Self {
        Self {
            scheme: Some(scheme),
            ..self
        }
    }

    /// Whether the order a key names publicly may exist (see [`OrderIdScheme`]).
    async fn public_ids_possible(&self) -> Result<bool, CommandError> {
        match &self.scheme {
            Some(scheme) => {
                scheme
                    .public_ids_possible(self.handler.store().as_ref())
                    .await
            }
            None => Ok(true),
        }
    }

    /// placeOrder prices its lines from the products' states as this service last read them
    /// from their streams, when that read is less than `max_age` old and this service has
    /// not changed the product since; otherwise it reads the streams' new events first. A
    /// price changed through another process may so take up to `max_age` to reach orders
    /// placed here (a change made here counts at once); stock is not affected, since the
    /// saga reserves it against the product's latest version. Zero reads every time.
    pub fn with_price_max_age(self, max_age: Duration) -> Self {
        Self {
            price_max_age: max_age,
            ..self
        }
    }

    /// This service for one request whose trace context is `traceparent`.
    pub fn with_traceparent(&self, traceparent: Option<String>) -> Self {
        Self {
            traceparent,
            ..self.clone()
        }
    }

    fn envelope(&self, command_id: Uuid, actor: &Actor) -> Envelope {
        Envelope {
            traceparent: self.traceparent.clone(),
            ..Envelope::request(command_id, &actor.sub)
        }
    }

    pub fn handler(&self) -> &Handler {
        &self.handler
    }

    pub async fn place_order(
        &self,
        actor: Option<&Actor>,
        command: PlaceOrder,
    ) -> Result<CommandResult, CommandError> {
        let actor = require(actor, may_send::PLACE_ORDER)?;
        // The contract: customers order for themselves (customerId defaults to, and must
        // equal, the token's sub); admins may order for anyone.
        let customer_id = match command.customer_id.clone() {
            Some(id) if id.as_str() == actor.sub || actor.is_admin() => id,
            Some(_) => {
                return Err(CommandError::Forbidden(
                    "customers place orders for themselves only",
                ));
            }
            None => CustomerId::parse(actor.sub.clone())
                .map_err(|e| CommandError::invalid("input.customerId", e))?,
        };
        // With a key, the order id follows from (customer, key) and the command id (hence
        // the event ids) from (customer, key, request): a retry or a racing duplicate of the
        // same request appends the same ids to the same new stream, which the store writes
        // once; another request under a used key finds the stream taken by ids not its own.
        // The log alone answers both, so a placement is one write transaction.
        let (ids, earlier_command) = match &command.idempotency_key {
            Some(key) => {
                let base = self.order_ids.base(&customer_id, key);
                let earlier = command
                    .earlier_fingerprint
                    .map(|fingerprint| placement_ids(base, fingerprint).1);
                (placement_ids(base, command.fingerprint), earlier)
            }
            None => ((OrderId(Uuid::now_v7()), Uuid::now_v7()), None),
        };
        // A key first used before ids were keyed named its order the public way: when that
        // order exists, this is a retry of it (or a reuse of its key), decided on it.
        let public = match (&command.idempotency_key, &self.order_ids) {
            (Some(key), OrderIds::Keyed(_)) if self.public_ids_possible().await? => {
                Some(placement_ids(
                    OrderIds::Public.base(&customer_id, key),
                    command.fingerprint,
                ))
            }
            (Some(_), OrderIds::Public) => {
                if let Some(scheme) = &self.scheme {
                    scheme.note_public_ids().await?;
                }
                None
            }
            _ => None,
        };
        let (products, earlier) = futures::try_join!(
            self.products(&command.lines),
            self.placed_publicly(public.map(|(order_id, _)| order_id)),
        )?;
        let ids = match (earlier, public) {
            (true, Some(public)) => public,
            _ => ids,
        };
        self.place(
            actor,
            &customer_id,
            ids,
            earlier_command,
            &command,
            products,
        )
        .await
    }

    /// Whether the order `order_id` (named the public way) exists.
    async fn placed_publicly(&self, order_id: Option<OrderId>) -> Result<bool, CommandError> {
        let Some(order_id) = order_id else {
            return Ok(false);
        };
        let stream = stream_name(streams::order(order_id))?;
        let first = self
            .handler
            .store()
            .read_stream(&stream, Direction::Forwards, Some(0), 1)
            .await?;
        Ok(!first.is_empty())
    }

    async fn place(
        &self,
        actor: &Actor,
        customer_id: &CustomerId,
        (order_id, command_id): (OrderId, Uuid),
        earlier_command: Option<Uuid>,
        command: &PlaceOrder,
        products: Vec<Product>,
    ) -> Result<CommandResult, CommandError> {
        let envelope = Envelope {
            idempotency_key: command.idempotency_key.clone(),
            ..self.envelope(command_id, actor)
        };
        // The placement's event id, as this request names it, and as the same request named
        // it before (see `PlaceOrder::earlier_fingerprint`).
        let ours = envelope.event_id(0);
        let earlier = earlier_command.map(|command_id| {
            Envelope {
                command_id,
                ..envelope.clone()
            }
            .event_id(0)
        });
        let is_ours = move |id: Uuid| id == ours || earlier == Some(id);
        let stream = stream_name(streams::order(order_id))?;
        // Prices, names and currency come from the products' streams (as read at most the
        // price max age ago), never from the client; pricing rejects unknown SKUs and mixed
        // currencies, and a total past what money holds. A keyed retry is answered with its
        // first result even where today's prices would refuse it (one changed since).
        let lines = match order::price_lines(&command.lines, &products) {
            Ok(lines) => lines,
            Err(rejection) => {
                if command.idempotency_key.is_some()
                    && let Some(first) = self.first_result(&stream, order_id, is_ours).await?
                {
                    return Ok(first);
                }
                return Err(rejection.into());
            }
        };
        let place = OrderCommand::Place {
            order_id,
            customer_id: customer_id.clone(),
            lines,
            shipping_address: command.shipping_address.clone(),
            payment_token: command.payment_token.clone(),
            placed_at: Utc::now(),
        };
        let decide = |loaded: &Loaded<Option<order::Order>>| {
            match loaded.first_event_id {
                // Our own placement is already stored (a retry): nothing to decide.
                Some(id) if is_ours(id) => Ok(Vec::new()),
                // Only a key names an order that exists before its placement: the key's
                // first request placed it, and this request differs from that one.
                Some(_) if command.idempotency_key.is_some() => Err(CommandError::invalid(
                    "input.idempotencyKey",
                    "was already used for a different request",
                )),
                _ => Ok(order::decide(&loaded.state, &place)?),
            }
        };
        // The order id is new unless a key was used before, so the first attempt appends
        // without reading; a used key conflicts, and the reload above decides.
        let outcome = metered(place.command_name(), async {
            self.handler
                .execute_new::<OrderAggregate, _>(&stream, &envelope, decide)
                .await
        })
        .await?;
        if outcome.appended {
            return Ok(CommandResult::from_outcome(order_id.to_string(), outcome));
        }
        self.first_result(&stream, order_id, |_| true)
            .await?
            .ok_or_else(|| CommandError::Internal("a replayed order has no events".into()))
    }

    /// What the first call of a retried placement answered: the placement event's version and
    /// position, whatever happened to the order since. `None` when the order has no events,
    /// or its first is not `ours`.
    async fn first_result(
        &self,
        stream: &StreamName,
        order_id: OrderId,
        ours: impl Fn(Uuid) -> bool,
    ) -> Result<Option<CommandResult>, CommandError> {
        let first = self
            .handler
            .store()
            .read_stream(stream, Direction::Forwards, Some(0), 1)
            .await?
            .into_iter()
            .next()
            .filter(|first| ours(first.id));
        Ok(first.map(|first| CommandResult {
            id: order_id.to_string(),
            version: first.version,
            token: first.position,
            events: vec![first.event_type],
            replayed: true,
        }))
    }

    /// The registered products among the requested SKUs (unknown ones are left out, and
    /// pricing names them), read in one store call unless all were read a moment ago (see
    /// [`CommandService::with_price_max_age`]); an unknown SKU is always read.
    async fn products(&self, lines: &[LineRequest]) -> Result<Vec<Product>, CommandError> {
        let streams = lines
            .iter()
            .map(|line| stream_name(streams::product(&line.sku)))
            .collect::<Result<Vec<_>, _>>()?;
        let loaded = self
            .handler
            .load_many::<ProductAggregate>(&streams, self.price_max_age)
            .await?;
        Ok(loaded.into_iter().filter_map(|l| l.state).collect())
    }

    pub async fn cancel_order(
        &self,
        actor: Option<&Actor>,
        order_id: OrderId,
        reason: Reason,
        expected: Option<u64>,
    ) -> Result<CommandResult, CommandError> {
        let actor = require(actor, may_send::CANCEL_ORDER)?;
        let command = OrderCommand::Cancel {
            cancellation_reason: reason,
            cancelled_by: CancelledBy::Customer,
            cancelled_at: Utc::now(),
        };
        self.order_command(actor, order_id, expected, command, true)
            .await
    }

    pub async fn ship_order(
        &self,
        actor: Option<&Actor>,
        order_id: OrderId,
        carrier: Carrier,
        tracking_number: TrackingNumber,
        expected: Option<u64>,
    ) -> Result<CommandResult, CommandError> {
        let actor = require(actor, may_send::SHIP_ORDER)?;
        let command = OrderCommand::Ship {
            carrier,
            tracking_number,
            shipped_at: Utc::now(),
        };
        self.order_command(actor, order_id, expected, command, false)
            .await
    }

    pub async fn mark_delivered(
        &self,
        actor: Option<&Actor>,
        order_id: OrderId,
        expected: Option<u64>,
    ) -> Result<CommandResult, CommandError> {
        let actor = require(actor, may_send::MARK_DELIVERED)?;
        let command = OrderCommand::Deliver {
            delivered_at: Utc::now(),
        };
        self.order_command(actor, order_id, expected, command, false)
            .await
    }

    /// `own_only`: a caller without the admin role may act only on their own orders; others'
    /// orders look as if they did not exist, so their ids cannot be probed.
    async fn order_command(
        &self,
        actor: &Actor,
        order_id: OrderId,
        expected: Option<u64>,
        command: OrderCommand,
        own_only: bool,
    ) -> Result<CommandResult, CommandError> {
        let stream = stream_name(streams::order(order_id))?;
        let envelope = self.envelope(Uuid::now_v7(), actor);
        let handled =
            self.handler
                .execute::<OrderAggregate, _>(&stream, expected, &envelope, |loaded| {
                    let order = loaded
                        .state
                        .as_ref()
                        .ok_or(CommandError::NotFound("order"))?;
                    if own_only && !actor.is_admin() && order.customer_id.as_str() != actor.sub {
                        return Err(CommandError::NotFound("order"));
                    }
                    Ok(order::decide(&loaded.state, &command)?)
                });
        let outcome = metered(command.command_name(), handled).await?;
        Ok(CommandResult::from_outcome(order_id.to_string(), outcome))
    }

    pub async fn register_product(
        &self,
        actor: Option<&Actor>,
        command: RegisterProduct,
    ) -> Result<CommandResult, CommandError> {
        let actor = require(actor, may_send::REGISTER_PRODUCT)?;
        let sku = command.sku.clone();
        let decision = ProductCommand::Register {
            sku: command.sku,
            name: command.name,
            description: command.description,
            price: command.price,
            initial_stock: command.initial_stock,
            registered_at: Utc::now(),
        };
        self.product_command("product.register", actor, &sku, None, move |_| {
            Ok(decision.clone())
        })
        .await
    }

    pub async fn restock(
        &self,
        actor: Option<&Actor>,
        sku: Sku,
        quantity: Quantity,
        expected: Option<u64>,
    ) -> Result<CommandResult, CommandError> {
        let actor = require(actor, may_send::RESTOCK)?;
        let restocked_at = Utc::now();
        self.product_command("product.restock", actor, &sku, expected, move |_| {
            Ok(ProductCommand::Restock {
                quantity,
                restocked_at,
            })
        })
        .await
    }

    /// The new price is in the product's own currency (the contract sends only minor units).
    pub async fn change_price(
        &self,
        actor: Option<&Actor>,
        sku: Sku,
        price_minor: i64,
        expected: Option<u64>,
    ) -> Result<CommandResult, CommandError> {
        let actor = require(actor, may_send::CHANGE_PRICE)?;
        let price_changed_at = Utc::now();
        self.product_command(
            "product.change_price",
            actor,
            &sku,
            expected,
            move |product| {
                let product = product.ok_or(CommandError::NotFound("product"))?;
                let price = Money::new(price_minor, product.price.currency())
                    .map_err(|e| CommandError::invalid("priceMinor", e))?;
                Ok(ProductCommand::ChangePrice {
                    price,
                    price_changed_at,
                })
            },
        )
        .await
    }

    async fn product_command(
        &self,
        name: &'static str,
        actor: &Actor,
        sku: &Sku,
        expected: Option<u64>,
        command: impl Fn(Option<&Product>) -> Result<ProductCommand, CommandError>,
    ) -> Result<CommandResult, CommandError> {
        let stream = stream_name(streams::product(sku))?;
        let envelope = self.envelope(Uuid::now_v7(), actor);
        let handled =
            self.handler
                .execute::<ProductAggregate, _>(&stream, expected, &envelope, |loaded| {
                    let command = command(loaded.state.as_ref())?;
                    Ok(product::decide(&loaded.state, &command)?)
                });
        let outcome = metered(name, handled).await?;
        Ok(CommandResult::from_outcome(sku.to_string(), outcome))
    }
}

#[cfg(test)]
mod tests {
    use orderly_domain::values::{AddressLine, CountryCode, Currency, PostalCode};
    use orderly_event_store::memory::MemoryEventStore;

    use super::*;

    fn actor(sub: &str, role: Role) -> Actor {
        Actor {
            sub: sub.into(),
            roles: vec![role],
        }
    }

    fn placement(key: &str, fingerprint: u128) -> PlaceOrder {
        let line = |text: &str| AddressLine::parse(text).unwrap();
        PlaceOrder {
            idempotency_key: Some(key.into()),
            customer_id: None,
            lines: vec![LineRequest {
                sku: Sku::parse("MUG").unwrap(),
                quantity: Quantity::new(1).unwrap(),
            }],
            payment_token: PaymentToken::parse("tok_ok").unwrap(),
            shipping_address: Address {
                name: line("Ada"),
                line1: line("1 Main St"),
                line2: None,
                city: line("Berlin"),
                postal_code: PostalCode::parse("10115").unwrap(),
                country: CountryCode::parse("DE").unwrap(),
            },
            fingerprint: Uuid::from_u128(fingerprint),
            earlier_fingerprint: None,
        }
    }

    /// A store with the product MUG, and a service on it deriving ids as `order_ids` says.
    async fn service(store: Arc<MemoryEventStore>, order_ids: OrderIds) -> CommandService {
        let service = CommandService::new(store).with_order_ids(order_ids);
        let register = RegisterProduct {
            sku: Sku::parse("MUG").unwrap(),
            name: ProductName::parse("Mug").unwrap(),
            description: None,
            price: Money::new(1250, Currency::parse_listed("EUR").unwrap()).unwrap(),
            initial_stock: 10,
        };
        // Registered once per store; a second service on it finds the product there.
        let _ = service
            .register_product(Some(&actor("admin", Role::Admin)), register)
            .await;
        service
    }

    #[tokio::test]
    async fn a_keyed_order_id_cannot_be_computed_from_the_customer_and_the_key() {
        let store = Arc::new(MemoryEventStore::new());
        let alice = actor("alice", Role::Customer);
        let keyed = service(store.clone(), OrderIds::keyed(b"server secret")).await;
        let placed = keyed
            .place_order(Some(&alice), placement("k1", 1))
            .await
            .unwrap();
        let customer = CustomerId::parse("alice").unwrap();
        let (public_id, _) = placement_ids(OrderIds::Public.base(&customer, "k1"), Uuid::nil());
        assert_ne!(placed.id, public_id.to_string());
        // Another secret, another id; the same secret, the same id (a retry).
        let other = OrderIds::keyed(b"another secret").base(&customer, "k1");
        assert_ne!(placed.id, placement_ids(other, Uuid::nil()).0.to_string());
        let again = keyed
            .place_order(Some(&alice), placement("k1", 1))
            .await
            .unwrap();
        assert_eq!((again.id, again.replayed), (placed.id, true));
    }

    #[tokio::test]
    async fn an_order_placed_before_ids_were_keyed_is_found_by_its_key() {
        let store = Arc::new(MemoryEventStore::new());
        let alice = actor("alice", Role::Customer);
        let public = service(store.clone(), OrderIds::Public).await;
        let first = public
            .place_order(Some(&alice), placement("old", 7))
            .await
            .unwrap();
        let keyed = service(store.clone(), OrderIds::keyed(b"server secret")).await;
        let retry = keyed
            .place_order(Some(&alice), placement("old", 7))
            .await
            .unwrap();
        assert_eq!(
            (retry.id.as_str(), retry.replayed),
            (first.id.as_str(), true)
        );
        // The old key for another request is still refused, not placed anew.
        let reused = keyed.place_order(Some(&alice), placement("old", 8)).await;
        assert!(
            matches!(reused, Err(CommandError::InvalidInput { ref field, .. }) if field == "input.idempotencyKey"),
            "{reused:?}"
        );
    }

    /// A placement stored under the fingerprint its request had before (a customerId naming
    /// the caller, fingerprinted raw) is recognised by a retry fingerprinted the new way.
    #[tokio::test]
    async fn a_retry_of_a_placement_fingerprinted_the_earlier_way_is_recognised() {
        let store = Arc::new(MemoryEventStore::new());
        let alice = actor("alice", Role::Customer);
        let keyed = service(store.clone(), OrderIds::keyed(b"server secret")).await;
        let first = keyed
            .place_order(Some(&alice), placement("k1", 1))
            .await
            .unwrap();
        let retry = PlaceOrder {
            earlier_fingerprint: Some(Uuid::from_u128(1)),
            ..placement("k1", 2)
        };
        let again = keyed.place_order(Some(&alice), retry).await.unwrap();
        assert_eq!((again.id, again.replayed), (first.id, true));
        // Without it, the new fingerprint is another request under the key.
        let other = keyed.place_order(Some(&alice), placement("k1", 2)).await;
        assert!(
            matches!(other, Err(CommandError::InvalidInput { ref field, .. }) if field == "input.idempotencyKey"),
            "{other:?}"
        );
    }

    /// A scheme of its own (as a new process would have) on `db`.
    fn scheme(db: &orderly_test_support::TestDb) -> OrderIdScheme {
        OrderIdScheme::new(orderly_graphql::pg_pool(db.config(), 2).unwrap())
    }

    /// A keyed service with a scheme of its own on `db`, as a process started now has.
    async fn keyed_process(
        store: &Arc<MemoryEventStore>,
        db: &orderly_test_support::TestDb,
    ) -> CommandService {
        service(store.clone(), OrderIds::keyed(b"server secret"))
            .await
            .with_order_id_scheme(scheme(db))
    }

    /// Alice retries `placement` through `service`: answered from `first`, nothing placed.
    async fn assert_retry_answered_from(
        service: &CommandService,
        placement: PlaceOrder,
        first: &CommandResult,
    ) {
        let alice = actor("alice", Role::Customer);
        let retry = service.place_order(Some(&alice), placement).await.unwrap();
        assert_eq!(
            (retry.id.as_str(), retry.replayed),
            (first.id.as_str(), true)
        );
    }

    async fn recorded(db: &orderly_test_support::TestDb) -> Option<bool> {
        let client = db.connect().await.unwrap();
        client
            .query_opt("select public_ids_possible from order_id_scheme", &[])
            .await
            .unwrap()
            .map(|row| row.get(0))
    }

    #[tokio::test]
    async fn a_log_begun_with_keyed_ids_records_that_no_public_order_can_exist() {
        let db = crate::migrations::test_database().await;
        let store = Arc::new(MemoryEventStore::new());
        let alice = actor("alice", Role::Customer);
        // Products registered, no order yet: the first keyed placement decides.
        let keyed = keyed_process(&store, &db).await;
        assert_eq!(recorded(&db).await, None);
        let placed = keyed
            .place_order(Some(&alice), placement("k1", 1))
            .await
            .unwrap();
        assert_eq!(recorded(&db).await, Some(false));
        // Retries are still answered from the keyed order.
        assert_retry_answered_from(&keyed, placement("k1", 1), &placed).await;
    }

    #[tokio::test]
    async fn a_log_that_held_orders_before_the_first_keyed_placement_keeps_finding_them() {
        let db = crate::migrations::test_database().await;
        let store = Arc::new(MemoryEventStore::new());
        let alice = actor("alice", Role::Customer);
        // Placed before this version: public ids, no scheme.
        let old = service(store.clone(), OrderIds::Public).await;
        let first = old
            .place_order(Some(&alice), placement("old", 7))
            .await
            .unwrap();
        let keyed = keyed_process(&store, &db).await;
        assert_retry_answered_from(&keyed, placement("old", 7), &first).await;
        assert_eq!(recorded(&db).await, Some(true));
    }

    #[tokio::test]
    async fn a_process_placing_public_ids_says_so_before_its_first_placement() {
        let db = crate::migrations::test_database().await;
        let store = Arc::new(MemoryEventStore::new());
        let alice = actor("alice", Role::Customer);
        keyed_process(&store, &db)
            .await
            .place_order(Some(&alice), placement("k1", 1))
            .await
            .unwrap();
        assert_eq!(recorded(&db).await, Some(false));
        // A process without a secret (against the rule) turns the record over first ...
        let public = service(store.clone(), OrderIds::Public)
            .await
            .with_order_id_scheme(scheme(&db));
        let first = public
            .place_order(Some(&alice), placement("p1", 2))
            .await
            .unwrap();
        assert_eq!(recorded(&db).await, Some(true));
        // ... so a keyed process that starts after it finds that order by its key.
        let restarted = keyed_process(&store, &db).await;
        assert_retry_answered_from(&restarted, placement("p1", 2), &first).await;
    }
}
