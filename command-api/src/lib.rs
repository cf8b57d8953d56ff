//! # Layout
//!
//! Command handling (load, decide, append, retry on conflict), idempotency, authentication, the
//! saga runner with the payment-gateway port, and the GraphQL mutations. Not built yet: this crate
//! only marks its place in the dependency graph.
