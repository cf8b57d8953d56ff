//! # Layout
//!
//! The event store port and its adapters (work in progress).
