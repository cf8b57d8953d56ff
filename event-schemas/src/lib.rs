//! # Layout
//!
//! The persisted event contracts of Orderly: one payload type per event and schema version, the
//! metadata envelope every event carries, stable type names, upcasters from old versions to the
//! current ones, and the JSON Schema files under `schemas/` generated from these types.
//!
//! - [`values`]: validated value types used inside payloads (`Sku`, `Quantity`, `Money`, ...).
//!   Deserializing validates, so a decoded event never holds a bad value.
//! - [`orders`], [`products`], [`payments`]: payloads of the streams `order-<uuid>`,
//!   `product-<sku>` and `payment-<order uuid>`.
//! - [`metadata`]: [`EventMetadata`] (ids, trace context, actor, time) and the stored form that
//!   adds `schema_version`, since the store has no column for it.
//! - `registry`: the [`Event`] enums, [`EventPayload`] (type name + version), and the
//!   (type, version) -> decoder table behind [`decode`] and [`decode_recorded`].
//! - `error`: [`SchemaError`], this crate's one error type.
//!
//! Reading a stored event: `decode_recorded(event_type, data, metadata)` looks up
//! (`event_type`, `metadata.schema_version`), decodes the payload with that version's type and
//! upcasts it to the current one. Writing: [`encode`] an [`Event`] with its [`EventMetadata`].
//! How to add a version without breaking stored streams is in this crate's README.

mod error;
pub mod metadata;
pub mod orders;
pub mod payments;
pub mod products;
mod registry;
pub mod values;

pub use error::SchemaError;
pub use metadata::{EventMetadata, StoredMetadata};
pub use registry::{
    EncodedEvent, Event, EventPayload, OrderEvent, PaymentEvent, ProductEvent, RecordedEvent,
    Registration, decode, decode_payload, decode_payload_text, decode_recorded, encode,
    registration, registry,
};
