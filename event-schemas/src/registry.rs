//! Type names, versions, encoding and the (type, version) -> decoder registry.

use schemars::{JsonSchema, Schema};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use crate::SchemaError;
use crate::metadata::{EventMetadata, StoredMetadata};
use crate::orders::*;
use crate::payments::*;
use crate::products::*;

/// A payload type with its stable name and schema version.
///
/// The name is what the store's event-type column holds and must never change; the version
/// changes (with a new type, a schema file and an upcaster) whenever the shape does.
pub trait EventPayload: Serialize + DeserializeOwned + JsonSchema {
    const EVENT_TYPE: &'static str;
    const SCHEMA_VERSION: u32;
}

/// How one stored (type, version) pair decodes, and the schema it was published with.
pub struct Registration {
    pub event_type: &'static str,
    pub schema_version: u32,
    /// Whether this is the version writers produce today; older ones decode through an upcaster.
    pub current: bool,
    decode: fn(Json<'_>) -> Result<Event, SchemaError>,
    schema: fn() -> Schema,
}

/// A payload as a decoder gets it: a parsed tree, or the stored text, which decodes straight
/// into the payload type without building a tree first.
enum Json<'a> {
    Tree(Value),
    Text(&'a str),
}

impl Json<'_> {
    fn parse<P: DeserializeOwned>(self) -> Result<P, serde_json::Error> {
        match self {
            Json::Tree(value) => serde_json::from_value(value),
            Json::Text(text) => serde_json::from_str(text),
        }
    }
}

impl Registration {
    /// Decodes a payload of this (type, version) into the current event, upcasting if old.
    pub fn decode(&self, data: Value) -> Result<Event, SchemaError> {
        (self.decode)(Json::Tree(data))
    }

    /// [`Registration::decode`] from the payload's JSON text.
    pub fn decode_text(&self, data: &str) -> Result<Event, SchemaError> {
        (self.decode)(Json::Text(data))
    }

    /// The JSON Schema of this version's payload, as committed under `schemas/`.
    pub fn json_schema(&self) -> Schema {
        (self.schema)()
    }

    /// `<Type>.v<version>`, the stem of the schema and sample file names.
    pub fn file_stem(&self) -> String {
        format!("{}.v{}", self.event_type, self.schema_version)
    }
}

fn payload_error<P: EventPayload>(error: impl std::fmt::Display) -> SchemaError {
    SchemaError::InvalidPayload {
        event_type: P::EVENT_TYPE.to_owned(),
        schema_version: P::SCHEMA_VERSION,
        message: error.to_string(),
    }
}

fn decode_current<P: EventPayload + Into<Event>>(data: Json<'_>) -> Result<Event, SchemaError> {
    data.parse::<P>()
        .map(Into::into)
        .map_err(payload_error::<P>)
}

/// Decodes an old version and upcasts it. A chain v1 -> v2 -> v3 is written as
/// `TryFrom<V1> for V3` composing the steps, so every old version has exactly one entry here.
fn decode_upcast<Old, New>(data: Json<'_>) -> Result<Event, SchemaError>
where
    Old: EventPayload,
    New: TryFrom<Old, Error = SchemaError> + Into<Event>,
{
    let old = data.parse::<Old>().map_err(payload_error::<Old>)?;
    New::try_from(old)
        .map(Into::into)
        .map_err(payload_error::<Old>)
}

fn schema_of<P: JsonSchema>() -> Schema {
    schemars::schema_for!(P)
}

fn encode_payload<P: Serialize>(payload: &P) -> Result<Value, SchemaError> {
    serde_json::to_value(payload).map_err(|error| SchemaError::Encode {
        message: error.to_string(),
    })
}

/// Declares every context's event enum, the current (type, version) of each payload, and the
/// registry entries for current and old versions, from one list so they cannot disagree.
macro_rules! events {
    (
        $( $context:ident($enum:ident) { $( $payload:ident = $version:literal ),+ $(,)? } )+
        ; upcasts { $( $old:ident = $old_version:literal => $new:ident ),* $(,)? }
    ) => {
        $(
            #[doc = concat!("Every event of the `", stringify!($context), "` context.")]
            #[derive(Debug, Clone, PartialEq, Eq)]
            pub enum $enum { $( $payload($payload), )+ }

            impl $enum {
                pub fn event_type(&self) -> &'static str {
                    match self { $( Self::$payload(_) => $payload::EVENT_TYPE, )+ }
                }

                pub fn schema_version(&self) -> u32 {
                    match self { $( Self::$payload(_) => $payload::SCHEMA_VERSION, )+ }
                }

                /// The payload as stored in the data column.
                pub fn to_data(&self) -> Result<Value, SchemaError> {
                    match self { $( Self::$payload(payload) => encode_payload(payload), )+ }
                }
            }

            impl From<$enum> for Event {
                fn from(event: $enum) -> Event {
                    Event::$context(event)
                }
            }

            $(
                impl EventPayload for $payload {
                    const EVENT_TYPE: &'static str = stringify!($payload);
                    const SCHEMA_VERSION: u32 = $version;
                }

                impl From<$payload> for $enum {
                    fn from(payload: $payload) -> $enum {
                        $enum::$payload(payload)
                    }
                }

                impl From<$payload> for Event {
                    fn from(payload: $payload) -> Event {
                        Event::$context($enum::$payload(payload))
                    }
                }
            )+
        )+

        $(
            impl EventPayload for $old {
                const EVENT_TYPE: &'static str = $new::EVENT_TYPE;
                const SCHEMA_VERSION: u32 = $old_version;
            }
        )*

        /// Any event of any context, in its current version.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Event { $( $context($enum), )+ }

        impl Event {
            pub fn event_type(&self) -> &'static str {
                match self { $( Self::$context(event) => event.event_type(), )+ }
            }

            pub fn schema_version(&self) -> u32 {
                match self { $( Self::$context(event) => event.schema_version(), )+ }
            }

            pub fn to_data(&self) -> Result<Value, SchemaError> {
                match self { $( Self::$context(event) => event.to_data(), )+ }
            }
        }

        static REGISTRY: &[Registration] = &[
            $( $(
                Registration {
                    event_type: $payload::EVENT_TYPE,
                    schema_version: $payload::SCHEMA_VERSION,
                    current: true,
                    decode: decode_current::<$payload>,
                    schema: schema_of::<$payload>,
                },
            )+ )+
            $(
                Registration {
                    event_type: $old::EVENT_TYPE,
                    schema_version: $old::SCHEMA_VERSION,
                    current: false,
                    decode: decode_upcast::<$old, $new>,
                    schema: schema_of::<$old>,
                },
            )*
        ];
    };
}

events! {
    Order(OrderEvent) {
        OrderPlaced = 2,
        OrderStockReserved = 1,
        OrderPaid = 1,
        OrderConfirmed = 1,
        OrderCancelled = 1,
        OrderShipped = 1,
        OrderDelivered = 1,
    }
    Product(ProductEvent) {
        ProductRegistered = 1,
        ProductRestocked = 1,
        ProductPriceChanged = 1,
        StockReserved = 1,
        StockReservationRejected = 1,
        StockReservationReleased = 1,
        ReservedStockShipped = 1,
    }
    Payment(PaymentEvent) {
        PaymentChargeRequested = 1,
        PaymentCharged = 1,
        PaymentDeclined = 1,
        PaymentFailed = 1,
        PaymentRefunded = 1,
    };
    upcasts {
        OrderPlacedV1 = 1 => OrderPlaced,
    }
}

/// Every (type, version) this build can read, current versions first. Old versions are never
/// removed: streams written with them live forever.
pub fn registry() -> &'static [Registration] {
    REGISTRY
}

/// Finds the registration for a stored (type, version). A linear scan: the table is a few dozen
/// entries and decoding the JSON costs far more.
pub fn registration(
    event_type: &str,
    schema_version: u32,
) -> Result<&'static Registration, SchemaError> {
    let mut known_type = false;
    for registration in REGISTRY {
        if registration.event_type == event_type {
            if registration.schema_version == schema_version {
                return Ok(registration);
            }
            known_type = true;
        }
    }
    Err(if known_type {
        SchemaError::UnknownSchemaVersion {
            event_type: event_type.to_owned(),
            schema_version,
        }
    } else {
        SchemaError::UnknownEventType {
            event_type: event_type.to_owned(),
        }
    })
}

/// Decodes a payload of the given (type, version) into the current event type.
pub fn decode(event_type: &str, schema_version: u32, data: Value) -> Result<Event, SchemaError> {
    registration(event_type, schema_version)?.decode(data)
}

/// An event as read back from the store: current payload plus its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    pub event: Event,
    pub metadata: EventMetadata,
    /// The version the payload was stored with (the event itself is always current).
    pub stored_schema_version: u32,
}

/// Decodes a stored row: the event-type column, the data column and the metadata column (which
/// carries `schema_version`).
pub fn decode_recorded(
    event_type: &str,
    data: Value,
    metadata: Value,
) -> Result<RecordedEvent, SchemaError> {
    let stored: StoredMetadata =
        serde_json::from_value(metadata).map_err(|error| SchemaError::InvalidMetadata {
            message: error.to_string(),
        })?;
    Ok(RecordedEvent {
        event: decode(event_type, stored.schema_version, data)?,
        metadata: stored.metadata,
        stored_schema_version: stored.schema_version,
    })
}

/// Decodes only the payload of a stored row, reading nothing of its metadata but
/// `schema_version`: for readers that never use the envelope (the projections), which then do
/// not parse its ids and times for every event they replay.
pub fn decode_payload(
    event_type: &str,
    data: Value,
    metadata: &Value,
) -> Result<Event, SchemaError> {
    let schema_version = metadata
        .get("schema_version")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| SchemaError::InvalidMetadata {
            message: "schema_version is missing or not a 32-bit number".to_owned(),
        })?;
    decode(event_type, schema_version, data)
}

/// [`decode_payload`] from the stored JSON text of the two columns, for readers that get the
/// text (a rebuild): the payload decodes without a tree in between, and of the metadata only
/// `schema_version` is read.
pub fn decode_payload_text(
    event_type: &str,
    data: &str,
    metadata: &str,
) -> Result<Event, SchemaError> {
    #[derive(serde::Deserialize)]
    struct Version {
        schema_version: u32,
    }
    let Version { schema_version } =
        serde_json::from_str(metadata).map_err(|_| SchemaError::InvalidMetadata {
            message: "schema_version is missing or not a 32-bit number".to_owned(),
        })?;
    registration(event_type, schema_version)?.decode_text(data)
}

/// What an append writes for one event: its id, the type column, and the two JSON columns.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEvent {
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub data: Value,
    pub metadata: Value,
}

/// Encodes an event for the store; the metadata gets the payload's current `schema_version`, so
/// writers cannot record a version that does not match the payload.
pub fn encode(event: &Event, metadata: &EventMetadata) -> Result<EncodedEvent, SchemaError> {
    let stored = StoredMetadata {
        schema_version: event.schema_version(),
        metadata: metadata.clone(),
    };
    Ok(EncodedEvent {
        event_id: metadata.event_id,
        event_type: event.event_type(),
        data: event.to_data()?,
        metadata: encode_payload(&stored)?,
    })
}
