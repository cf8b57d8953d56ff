//! # Layout
//!
//! Pure business logic: the Order, Product (inventory) and Payment aggregates as `decide`/`evolve`
//! functions over plain data, validated newtypes, and the order-fulfilment saga as a pure state
//! machine. No IO, no async runtime, no SQL: callers fetch what a decision needs and pass it in.
