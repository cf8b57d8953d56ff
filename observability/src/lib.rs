//! # Layout
//!
//! What the process tells its operators, shared by every part that runs in it (projections,
//! the saga, the read API, the GraphQL edge) without any of them pulling in another's
//! plumbing: the projections need no HTTP or GraphQL crate to join a trace.
//!
//! - [`metrics`]: the Prometheus recorder with `deploy/METRICS.md`'s buckets and help texts
//!   (every name, the GraphQL edge's included: the list is one), the scrape text with the
//!   runtime and process figures, the runtime probe, pool gauges, and the gauges of build
//!   info, readiness and the log's horizon.
//! - `metered_store`: [`MeteredStore`], any event store with its appends timed and counted.
//! - [`trace_context`]: a span's W3C `traceparent` for event metadata, and back.
//! - `error`: [`ObservabilityError`], this crate's one error type (the recorder's setup).
//!
//! `GET /metrics` itself is served by `orderly_graphql::metrics::router`, with the rest of
//! the HTTP edge, so that this crate needs no web framework.

mod error;
mod metered_store;
pub mod metrics;
pub mod trace_context;

pub use error::ObservabilityError;
pub use metered_store::MeteredStore;
