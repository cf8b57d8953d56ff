use thiserror::Error;

/// Everything that can go wrong turning values or stored events into typed ones.
///
/// `PartialEq` so tests can compare outcomes; the serde error is kept as text for the same reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchemaError {
    /// A value broke its type's rule (a lowercase SKU, a zero quantity, an unknown currency shape).
    ///
    /// Handling: at the API edge answer `BAD_USER_INPUT` with this message; the input is wrong
    /// and retrying it unchanged will fail again.
    #[error("invalid {what}: {reason}")]
    InvalidValue { what: &'static str, reason: String },

    /// No payload type is registered under this name.
    ///
    /// Handling: this reader is older than the writer. Stop or park the event (dead letter) and
    /// deploy a reader that knows the type; never skip it silently.
    #[error("unknown event type {event_type:?}")]
    UnknownEventType { event_type: String },

    /// The type is known but this schema version is not.
    ///
    /// Handling: as for `UnknownEventType`; a newer writer produced a version this reader lacks.
    #[error("event type {event_type} has no schema version {schema_version}")]
    UnknownSchemaVersion {
        event_type: String,
        schema_version: u32,
    },

    /// The stored data does not match the schema of its (type, version), or an upcast of it failed.
    ///
    /// Handling: the stored event breaks its published contract. Park it as a dead letter and
    /// alert; retrying cannot help.
    #[error("{event_type} v{schema_version} does not decode: {message}")]
    InvalidPayload {
        event_type: String,
        schema_version: u32,
        message: String,
    },

    /// The metadata column is not a valid envelope (for example it lacks `schema_version`).
    ///
    /// Handling: as for `InvalidPayload`.
    #[error("event metadata does not decode: {message}")]
    InvalidMetadata { message: String },

    /// A payload could not be turned into JSON.
    ///
    /// Handling: a bug in this crate (every payload serializes); report it, do not retry.
    #[error("event does not encode: {message}")]
    Encode { message: String },
}
