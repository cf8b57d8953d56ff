//! # Layout
//!
//! The projection runner with its checkpoints and dead letters, the read-model SQL (migrations),
//! rebuilds and live-update notifications. Not built yet: this crate only marks its place in the
//! dependency graph.
