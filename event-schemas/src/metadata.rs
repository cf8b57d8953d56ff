//! The metadata envelope stored beside every event's payload.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Who, why and when, for one event. The writer fills it in; [`crate::encode`] adds the payload's
/// schema version when storing it.
///
/// Unknown fields are accepted on read so a newer writer can add tracing fields without breaking
/// older readers; payloads, by contrast, are strict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EventMetadata {
    /// UUIDv7 chosen by the writer, so a retried append is recognised as the same event.
    pub event_id: Uuid,
    /// Shared by everything that follows from one outside request (an order's whole saga).
    pub correlation_id: Uuid,
    /// The command (its `command_id`) or event (its `event_id`) that directly caused this one.
    pub causation_id: Uuid,
    /// W3C trace context, so one trace covers mutation, append, projection and push.
    pub traceparent: Option<String>,
    /// JWT `sub` of the caller, or `system:<component>` for the saga and workers.
    pub actor: String,
    /// Identity of the command whose decision produced this event.
    pub command_id: Uuid,
    /// The client's idempotency key, when the command came with one.
    pub idempotency_key: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

/// The stored metadata column: [`EventMetadata`] plus the payload's `schema_version`, kept here
/// because the store has no column for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StoredMetadata {
    pub schema_version: u32,
    #[serde(flatten)]
    pub metadata: EventMetadata,
}
