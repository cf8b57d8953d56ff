//! # Layout
//!
//! GraphQL queries and subscriptions over the read models, with consistency tokens. Not built yet:
//! this crate only marks its place in the dependency graph.
