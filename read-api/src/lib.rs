//! # Layout
//!
//! The read side's GraphQL: the contract's Query and Subscription types over the read models
//! the projections keep, with explicit eventual consistency.
//!
//! - `consistency`: `consistency: {atLeast, timeoutMs, mode}` waits (woken by the
//!   [`ProjectionHub`], never polling) and [`Consistent`], the executor wrapper that adds
//!   `extensions.consistency {token, stale, lagMs}` to every query response.
//! - `query`: [`QueryRoot`]; who may read what is checked first in each resolver.
//! - `admin`: [`AdminQuery`] and [`AdminMutation`], the operator's additions to the contract
//!   (the log page by page, dead letters listed, retried, skipped, rebuilds started and
//!   followed), for admins only.
//!   [`ReadQuery`] and [`ReadMutation`] are what a schema serving reads is built from.
//! - `subscription`: [`SubscriptionRoot`] (`orderUpdated`, `events`), each behind a bounded
//!   buffer that cuts off a subscriber who stops reading.
//! - `rebuilds`: [`Rebuilds`], projection rebuilds run in a task of the serving process, with
//!   their progress.
//! - `context`: [`ReadApi`], what resolvers share (read store, event store, hub, limits), and
//!   the page builders that load a page's children in one statement each.
//! - `sql`: [`ReadStore`], every statement sent to the read models, counted, their column lists
//!   from `orderly_projections::tables`; [`statements`], the texts of the most used ones.
//! - `types`: the contract's output types. `cursor`: opaque keyset cursors.
//! - `error`: [`ReadError`], this crate's one error type, and its contract codes.

mod admin;
mod consistency;
mod context;
mod cursor;
mod error;
mod query;
mod rebuilds;
mod sql;
mod subscription;
mod types;

pub use admin::{AdminMutation, AdminQuery};
use async_graphql::{
    MergedObject, ObjectType, Schema, SchemaBuilder, SubscriptionType, ValidationMode,
};
pub use consistency::{ConsistencyInput, ConsistencyMode, Consistent, LagGauge};
pub use context::{MAX_PAGE, ReadApi, ReadLimits};
pub use error::ReadError;
use orderly_projections::ProjectionHub;
pub use query::QueryRoot;
pub use rebuilds::{ProjectionRebuild, RebuildState, Rebuilds};
pub use sql::{ReadStore, statements};
pub use subscription::{SubscriptionRoot, bounded};

/// The contract's queries and the operator's.
#[derive(MergedObject, Default)]
#[graphql(name = "Query")]
pub struct ReadQuery(QueryRoot, AdminQuery);

/// The read API alone (`orderly read-api`) has only the operator's mutations.
#[derive(MergedObject, Default)]
#[graphql(name = "Mutation")]
pub struct ReadMutation(AdminMutation);

/// The read API alone (`orderly read-api`).
pub type ReadSchema = Schema<ReadQuery, ReadMutation, SubscriptionRoot>;

/// The read API's schema alone, validating requests as `validation` says. Serve it wrapped in
/// [`ReadApi::consistent`], which adds `extensions.consistency` to query answers.
pub fn schema(api: ReadApi, validation: ValidationMode) -> ReadSchema {
    install(
        builder(ReadMutation::default()).validation_mode(validation),
        api,
    )
    .finish()
}

/// A schema of the read API's queries and subscriptions with `mutation` (the operator's
/// alone, or merged with the command API's).
pub fn builder<M: ObjectType + 'static>(
    mutation: M,
) -> SchemaBuilder<ReadQuery, M, SubscriptionRoot> {
    Schema::build(ReadQuery::default(), mutation, SubscriptionRoot)
}

/// Adds what the read API's roots need to a schema being built (alone, or merged with the
/// command API's mutations): the shared [`ReadApi`] and the limits.
pub fn install<Q, M, S>(builder: SchemaBuilder<Q, M, S>, api: ReadApi) -> SchemaBuilder<Q, M, S>
where
    Q: ObjectType + 'static,
    M: ObjectType + 'static,
    S: SubscriptionType + 'static,
{
    orderly_graphql::with_limits(builder).data(api)
}

/// The hub a read API process needs when the projection runners live in other processes: it
/// follows their notifications and checkpoints. Abort the task to stop following.
pub fn follow_projections(
    pg_config: orderly_event_store::postgres::PgConfig,
) -> (ProjectionHub, tokio::task::JoinHandle<()>) {
    let hub = ProjectionHub::new();
    let task = hub.follow(pg_config);
    (hub, task)
}
