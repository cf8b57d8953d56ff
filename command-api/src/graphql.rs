//! The contract's Mutation type. Inputs are validated here, once, into the domain's types;
//! each failure names the offending field (`input.lines[3].quantity`).

use async_graphql::{
    Context, EmptySubscription, ID, InputObject, MergedObject, Object, Schema, SimpleObject,
};
use orderly_domain::order::{LineRequest, MAX_LINES};
use orderly_domain::values::{
    Address, AddressLine, Carrier, CountryCode, Currency, CustomerId, Description, Money, OrderId,
    PaymentToken, PostalCode, ProductName, Quantity, Reason, Sku, TrackingNumber,
};
use orderly_graphql::cost::WRITE;
use orderly_graphql::{Caller, ConsistencyToken, ErrorCode, Long, Role, with_limits};
use serde::Serialize;
use uuid::Uuid;

use crate::CommandError;
use crate::commands::{self, CommandService, PlaceOrder, RegisterProduct};

/// Namespace of request fingerprints (a fixed random UUID).
const FINGERPRINT_NAMESPACE: Uuid = Uuid::from_u128(0x9b1f_4a8e_2c7d_4e3b_a6f5_1d0c_8e7b_2a49);

#[derive(Clone, InputObject, Serialize)]
pub struct OrderLineInput {
    pub sku: String,
    /// 1 or more.
    pub quantity: i32,
}

#[derive(Clone, InputObject, Serialize)]
pub struct AddressInput {
    pub name: String,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

#[derive(Clone, InputObject, Serialize)]
pub struct PlaceOrderInput {
    /// Retrying with the same key returns the first result and appends nothing (replayed = true).
    pub idempotency_key: Option<String>,
    /// Admins may order for any customer; for customers it defaults to, and must equal, the token's sub.
    pub customer_id: Option<String>,
    /// 1 to 100 lines, each SKU at most once. Prices come from the catalog, never from the client.
    pub lines: Vec<OrderLineInput>,
    /// Payment method token handed to the payment gateway.
    pub payment_token: String,
    pub shipping_address: AddressInput,
}

#[derive(InputObject)]
pub struct RegisterProductInput {
    pub sku: String,
    pub name: String,
    pub description: Option<String>,
    pub price_minor: Long,
    pub currency: String,
    pub initial_stock: i32,
}

#[derive(SimpleObject)]
pub struct CommandResult {
    /// The aggregate written to: an order id or a SKU.
    pub id: ID,
    /// The aggregate's stream version after the command.
    pub version: i32,
    /// Pass as consistency.atLeast to read your own write.
    pub token: ConsistencyToken,
    /// Types of the events appended, in order.
    pub events: Vec<String>,
    /// True when this was an idempotent retry and nothing new was appended.
    pub replayed: bool,
}

impl From<commands::CommandResult> for CommandResult {
    fn from(result: commands::CommandResult) -> Self {
        Self {
            id: ID(result.id),
            // Streams stay far below 2^31 events; saturate rather than wrap if one did not.
            version: i32::try_from(result.version).unwrap_or(i32::MAX),
            token: ConsistencyToken(result.token),
            events: result.events,
            replayed: result.replayed,
        }
    }
}

/// The contract's Mutation root. Needs a [`CommandService`] in the schema's data and a
/// [`Caller`] in each request's data (the GraphQL edge's HTTP handler adds it).
#[derive(Default)]
pub struct MutationRoot;

fn parse<T, E: std::fmt::Display>(field: &str, parsed: Result<T, E>) -> Result<T, CommandError> {
    parsed.map_err(|e| CommandError::invalid(field, e))
}

/// GraphQL's `Int` is signed; stream versions are not.
fn version_of(value: Option<i32>) -> Result<Option<u64>, CommandError> {
    value
        .map(|v| {
            parse(
                "expectedVersion",
                u64::try_from(v).map_err(|_| "must be 0 or more"),
            )
        })
        .transpose()
}

/// Zero and negative quantities fail here, naming the field, before anything is loaded.
fn quantity(field: &str, value: i32) -> Result<Quantity, CommandError> {
    let value = parse(field, u32::try_from(value).map_err(|_| "must be 1 or more"))?;
    parse(field, Quantity::new(value))
}

fn address(input: &AddressInput) -> Result<Address, CommandError> {
    let field = "input.shippingAddress";
    Ok(Address {
        name: parse(
            &format!("{field}.name"),
            AddressLine::parse(input.name.clone()),
        )?,
        line1: parse(
            &format!("{field}.line1"),
            AddressLine::parse(input.line1.clone()),
        )?,
        line2: input
            .line2
            .clone()
            .map(|line| parse(&format!("{field}.line2"), AddressLine::parse(line)))
            .transpose()?,
        city: parse(
            &format!("{field}.city"),
            AddressLine::parse(input.city.clone()),
        )?,
        postal_code: parse(
            &format!("{field}.postalCode"),
            PostalCode::parse(input.postal_code.clone()),
        )?,
        country: parse(
            &format!("{field}.country"),
            CountryCode::parse(&input.country),
        )?,
    })
}

/// Longest idempotency key accepted.
const MAX_KEY_CHARS: usize = 255;

/// `input` as a command; `caller` is the token's subject, if any.
fn place_order(input: &PlaceOrderInput, caller: Option<&str>) -> Result<PlaceOrder, CommandError> {
    // Checked here as well as by the domain's pricing so the answer names the field before
    // any product is loaded.
    if input.lines.is_empty() || input.lines.len() > MAX_LINES {
        return Err(CommandError::invalid(
            "input.lines",
            format!(
                "must hold 1 to {MAX_LINES} lines, not {}",
                input.lines.len()
            ),
        ));
    }
    let mut lines = Vec::with_capacity(input.lines.len());
    for (i, line) in input.lines.iter().enumerate() {
        let sku = parse(
            &format!("input.lines[{i}].sku"),
            Sku::parse(line.sku.clone()),
        )?;
        if lines.iter().any(|l: &LineRequest| l.sku == sku) {
            return Err(CommandError::invalid(
                format!("input.lines[{i}].sku"),
                format!("{sku} appears on more than one line"),
            ));
        }
        let quantity = quantity(&format!("input.lines[{i}].quantity"), line.quantity)?;
        lines.push(LineRequest { sku, quantity });
    }
    let idempotency_key = match &input.idempotency_key {
        Some(key) if key.trim().is_empty() || key.chars().count() > MAX_KEY_CHARS => {
            return Err(CommandError::invalid(
                "input.idempotencyKey",
                format!("must be 1 to {MAX_KEY_CHARS} characters"),
            ));
        }
        // Stored in every event's metadata and logged with the command: plain text only.
        Some(key) if orderly_graphql::plain_text::has_control(key) => {
            return Err(CommandError::invalid(
                "input.idempotencyKey",
                "must not contain control characters",
            ));
        }
        key => key.clone(),
    };
    // The whole input, key included, identifies the request: the same key with other lines
    // or another address is a different request, refused rather than answered with the old.
    // A customerId naming the caller means what leaving it out means, and is fingerprinted
    // as left out (the fingerprint of a request without one is as it always was).
    // Such a request stored before that change had the raw input's fingerprint: a retry
    // of it is recognised by that one too.
    let fingerprint_of = |input: &PlaceOrderInput| {
        serde_json::to_vec(input)
            .map(|bytes| Uuid::new_v5(&FINGERPRINT_NAMESPACE, &bytes))
            .map_err(|e| CommandError::Internal(e.to_string()))
    };
    let own = |id: &String| caller.is_some_and(|caller| caller == id.as_str());
    let (fingerprint, earlier_fingerprint) = match &input.customer_id {
        Some(id) if own(id) => {
            let left_out = PlaceOrderInput {
                customer_id: None,
                ..input.clone()
            };
            (fingerprint_of(&left_out)?, Some(fingerprint_of(input)?))
        }
        _ => (fingerprint_of(input)?, None),
    };
    Ok(PlaceOrder {
        idempotency_key,
        customer_id: input
            .customer_id
            .clone()
            .map(|id| parse("input.customerId", CustomerId::parse(id)))
            .transpose()?,
        lines,
        payment_token: parse(
            "input.paymentToken",
            PaymentToken::parse(input.payment_token.clone()),
        )?,
        shipping_address: address(&input.shipping_address)?,
        fingerprint,
        earlier_fingerprint,
    })
}

fn register_product(input: &RegisterProductInput) -> Result<RegisterProduct, CommandError> {
    let currency = parse("input.currency", Currency::parse_listed(&input.currency))?;
    Ok(RegisterProduct {
        sku: parse("input.sku", Sku::parse(input.sku.clone()))?,
        name: parse("input.name", ProductName::parse(input.name.clone()))?,
        description: input
            .description
            .clone()
            .map(|d| parse("input.description", Description::parse(d)))
            .transpose()?,
        price: parse(
            "input.priceMinor",
            Money::new(input.price_minor.0, currency),
        )?,
        initial_stock: parse(
            "input.initialStock",
            u32::try_from(input.initial_stock).map_err(|_| "must be 0 or more"),
        )?,
    })
}

/// Runs `command` with the request's caller, who must hold one of `roles` (see
/// [`commands::may_send`]); maps its error to the contract.
async fn run<T, F>(
    ctx: &Context<'_>,
    roles: &[Role],
    command: F,
) -> async_graphql::Result<CommandResult>
where
    F: AsyncFnOnce(&CommandService, Option<&orderly_graphql::Actor>) -> Result<T, CommandError>,
    T: Into<CommandResult>,
{
    // Both are put there by the wiring; a schema built without them is a bug, not bad input.
    let wiring = |_| ErrorCode::Internal.error("internal error");
    let caller = ctx.data::<Caller>().map_err(wiring)?;
    // Every mutation needs a caller with the right role: said before the input is judged,
    // which is not an anonymous or unentitled caller's to learn about. (The service checks
    // the roles again; it has callers other than this API.)
    commands::require(caller.actor.as_ref(), roles)
        .map_err(|error| error.to_graphql(&caller.request_id))?;
    let service = ctx
        .data::<CommandService>()
        .map_err(wiring)?
        .with_traceparent(caller.traceparent.clone());
    command(&service, caller.actor.as_ref())
        .await
        .map(Into::into)
        .map_err(|error| {
            if !matches!(
                error,
                CommandError::Internal(_) | CommandError::Unavailable(_)
            ) {
                tracing::debug!(request_id = %caller.request_id, %error, "command refused");
            }
            error.to_graphql(&caller.request_id)
        })
}

// Named apart from the root it becomes (see `CommandMutation`), so that it can be merged
// with other mutations under the name `Mutation`.
#[Object(name = "CommandMutations")]
impl MutationRoot {
    #[graphql(complexity = "WRITE + child_complexity")]
    async fn place_order(
        &self,
        ctx: &Context<'_>,
        input: PlaceOrderInput,
    ) -> async_graphql::Result<CommandResult> {
        run(
            ctx,
            commands::may_send::PLACE_ORDER,
            async |service, actor| {
                let command = place_order(&input, actor.map(|actor| actor.sub.as_str()))?;
                service.place_order(actor, command).await
            },
        )
        .await
    }

    #[graphql(complexity = "WRITE + child_complexity")]
    async fn cancel_order(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
        reason: String,
        expected_version: Option<i32>,
    ) -> async_graphql::Result<CommandResult> {
        run(
            ctx,
            commands::may_send::CANCEL_ORDER,
            async |service, actor| {
                let reason = parse("reason", Reason::parse(reason))?;
                let expected = version_of(expected_version)?;
                service
                    .cancel_order(actor, OrderId(order_id), reason, expected)
                    .await
            },
        )
        .await
    }

    #[graphql(complexity = "WRITE + child_complexity")]
    async fn ship_order(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
        carrier: String,
        tracking_number: String,
        expected_version: Option<i32>,
    ) -> async_graphql::Result<CommandResult> {
        run(
            ctx,
            commands::may_send::SHIP_ORDER,
            async |service, actor| {
                let carrier = parse("carrier", Carrier::parse(carrier))?;
                let tracking = parse("trackingNumber", TrackingNumber::parse(tracking_number))?;
                let expected = version_of(expected_version)?;
                service
                    .ship_order(actor, OrderId(order_id), carrier, tracking, expected)
                    .await
            },
        )
        .await
    }

    #[graphql(complexity = "WRITE + child_complexity")]
    async fn mark_delivered(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
        expected_version: Option<i32>,
    ) -> async_graphql::Result<CommandResult> {
        run(
            ctx,
            commands::may_send::MARK_DELIVERED,
            async |service, actor| {
                let expected = version_of(expected_version)?;
                service
                    .mark_delivered(actor, OrderId(order_id), expected)
                    .await
            },
        )
        .await
    }

    #[graphql(complexity = "WRITE + child_complexity")]
    async fn register_product(
        &self,
        ctx: &Context<'_>,
        input: RegisterProductInput,
    ) -> async_graphql::Result<CommandResult> {
        run(
            ctx,
            commands::may_send::REGISTER_PRODUCT,
            async |service, actor| {
                let command = register_product(&input)?;
                service.register_product(actor, command).await
            },
        )
        .await
    }

    #[graphql(complexity = "WRITE + child_complexity")]
    async fn restock(
        &self,
        ctx: &Context<'_>,
        sku: String,
        quantity: i32,
        expected_version: Option<i32>,
    ) -> async_graphql::Result<CommandResult> {
        run(ctx, commands::may_send::RESTOCK, async |service, actor| {
            let sku = parse("sku", Sku::parse(sku))?;
            let quantity = self::quantity("quantity", quantity)?;
            let expected = version_of(expected_version)?;
            service.restock(actor, sku, quantity, expected).await
        })
        .await
    }

    #[graphql(complexity = "WRITE + child_complexity")]
    async fn change_price(
        &self,
        ctx: &Context<'_>,
        sku: String,
        price_minor: Long,
        expected_version: Option<i32>,
    ) -> async_graphql::Result<CommandResult> {
        run(
            ctx,
            commands::may_send::CHANGE_PRICE,
            async |service, actor| {
                let sku = parse("sku", Sku::parse(sku))?;
                let expected = version_of(expected_version)?;
                service
                    .change_price(actor, sku, price_minor.0, expected)
                    .await
            },
        )
        .await
    }
}

/// The Query root of the command API when it runs alone (`orderly command-api`): GraphQL
/// needs one. The root binary replaces it with the read API's Query.
#[derive(Default)]
pub struct PlaceholderQuery;

#[Object(name = "Query")]
impl PlaceholderQuery {
    /// Always "ok": the command API answers; read models are served by the read API.
    async fn command_api_status(&self) -> &'static str {
        "ok"
    }
}

/// [`MutationRoot`] as the `Mutation` root of the command API alone.
#[derive(MergedObject, Default)]
#[graphql(name = "Mutation")]
pub struct CommandMutation(MutationRoot);

pub type CommandSchema = Schema<PlaceholderQuery, CommandMutation, EmptySubscription>;

/// The command API alone, with [`PlaceholderQuery`] as its Query root.
pub fn schema(service: CommandService) -> CommandSchema {
    with_limits(Schema::build(
        PlaceholderQuery,
        CommandMutation::default(),
        EmptySubscription,
    ))
    .data(service)
    .finish()
}
