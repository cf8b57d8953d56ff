//! # Layout
//!
//! The GraphQL edge that the command API and the read API both stand behind, so that neither
//! imports the other and both speak the contract (`api/schema.graphql`) the same way.
//!
//! - [`scalars`]: the contract's scalars that async-graphql does not provide under the same
//!   name: `Long`, `ConsistencyToken`, `Date` (`UUID`, `DateTime` and `JSON` come from
//!   async-graphql's `uuid`/`chrono` features and `async_graphql::Json`).
//! - [`error_codes`]: [`ErrorCode`], the contract's `extensions.code` values, and the helpers that
//!   turn each case into an `async_graphql::Error` with a safe message.
//! - [`auth`]: JWT bearer authentication (HS256 secret or RS256 public key), the [`Actor`]
//!   with its roles, and token issuing for the CLI.
//! - [`rate_limit`]: a keyed limiter (per subject, else per client IP).
//! - [`cost`]: what an operation costs in database work, the root-field cap, and the
//!   extension that charges the cost to the caller's rate limit.
//! - [`http`]: the /graphql handler for any schema: body limit, authentication, rate
//!   limit, timeout, JSON errors that never turn into a 5xx for bad input.
//! - `over_http`: GraphQL over HTTP: media type negotiation, request parameters from a POST
//!   body or a GET's URL, and the specification's status codes.
//! - `persisted_queries`: automatic persisted queries (query texts by SHA-256).
//! - `socket`: graphql-transport-ws over a WebSocket, behind the same gate as HTTP (message
//!   size, token expiry, rate limit and cost, timeouts, subscription caps, the protocol's close
//!   codes), and [`subscription_ready`], which every subscription resolver calls once it is
//!   set up.
//! - [`metrics`]: the edge's own series (GraphQL requests, open subscriptions, responses by
//!   status class, the read API's consistency waits) and `GET /metrics`; the recorder, the
//!   other series and trace context are `orderly_observability`'s.
//! - [`plain_text`]: the extension that refuses control characters in every string a request
//!   carries, with BAD_USER_INPUT.
//! - `input_shapes`: the input objects of a schema, for the one variable check that fast
//!   validation skips and execution does not make up for.
//! - `error`: [`EdgeError`], this crate's one error type (configuration problems).

pub mod auth;
pub mod cost;
mod error;
pub mod error_codes;
pub mod http;
mod input_shapes;
pub mod metrics;
mod over_http;
mod persisted_queries;
pub mod plain_text;
pub mod rate_limit;
pub mod scalars;
mod socket;

pub use auth::{Actor, Authenticator, JwtConfig, Role, TokenIssuer};
pub use error::EdgeError;
pub use error_codes::ErrorCode;
pub use http::{Caller, GraphqlLimits, graphql_router};
pub use rate_limit::{RateLimit, RateLimiter};
pub use scalars::{ConsistencyToken, Date, Long};
pub use socket::subscription_ready;

/// Deepest query nesting accepted; the contract's deepest useful query is far below it.
pub const MAX_DEPTH: usize = 16;
/// Largest query cost accepted (see [`cost`]): fields counted, database reads and writes
/// weighted by [`cost::READ`] and [`cost::WRITE`], pages by their size, so it bounds round
/// trips and rows times fields, roughly the work an operation may cause.
pub const MAX_COMPLEXITY: usize = 10_000;

/// The depth, root-field and cost limits and the plain-text check every served schema
/// applies, and the charge of each operation's cost to its caller's rate limit.
pub fn with_limits<Q, M, S>(
    builder: async_graphql::SchemaBuilder<Q, M, S>,
) -> async_graphql::SchemaBuilder<Q, M, S> {
    builder
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY)
        .extension(plain_text::PlainText)
        .extension(cost::CostLimit)
}

/// A PostgreSQL connection pool that connects lazily (an unreachable database shows as
/// UNAVAILABLE on use, not as a failed start), for the tables a service keeps beside the log.
pub fn pg_pool(
    config: &tokio_postgres::Config,
    size: usize,
) -> Result<deadpool_postgres::Pool, EdgeError> {
    let manager = deadpool_postgres::Manager::from_config(
        config.clone(),
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    // Waiting longer than this for a connection is an outage to report, not to sit out.
    let wait = std::time::Duration::from_secs(5);
    deadpool_postgres::Pool::builder(manager)
        .max_size(size.max(1))
        .wait_timeout(Some(wait))
        .create_timeout(Some(wait))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| EdgeError::InvalidSetting {
            name: "database_url",
            reason: e.to_string(),
        })
}
