//! Decoding stored rows: lookups, upcasting from committed old samples, and the envelope.

use std::path::Path;

use chrono::{TimeZone, Utc};
use orderly_event_schemas::orders::OrderPlaced;
use orderly_event_schemas::{
    Event, EventMetadata, OrderEvent, SchemaError, decode, decode_payload, decode_payload_text,
    decode_recorded, encode, registry,
};
use serde_json::{Value, json};
use uuid::Uuid;

fn sample(stem: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("samples/{stem}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("sample exists")).expect("JSON")
}

fn placed(event: Event) -> OrderPlaced {
    match event {
        Event::Order(OrderEvent::OrderPlaced(placed)) => placed,
        other => panic!("expected OrderPlaced, got {other:?}"),
    }
}

#[test]
fn a_v1_order_placed_upcasts_to_the_current_shape() {
    let upcast = placed(decode("OrderPlaced", 1, sample("OrderPlaced.v1")).expect("decodes"));
    let current = placed(decode("OrderPlaced", 2, sample("OrderPlaced.v2")).expect("decodes"));
    // The two committed samples describe the same order in the two shapes.
    assert_eq!(upcast, current);
    assert_eq!(upcast.total.amount_minor(), 2500);
    assert_eq!(upcast.lines[0].line_total.amount_minor(), 1300);
}

#[test]
fn a_v1_order_whose_total_overflows_does_not_decode() {
    let mut data = sample("OrderPlaced.v1");
    data["lines"][0]["unit_price_minor"] = json!(orderly_event_schemas::values::MAX_SAFE_INTEGER);
    let error = decode("OrderPlaced", 1, data).expect_err("overflow");
    assert!(matches!(
        error,
        SchemaError::InvalidPayload {
            schema_version: 1,
            ..
        }
    ));
}

#[test]
fn an_unknown_type_and_an_unknown_version_are_told_apart() {
    assert_eq!(
        decode("OrderTeleported", 1, json!({})),
        Err(SchemaError::UnknownEventType {
            event_type: "OrderTeleported".into()
        })
    );
    assert_eq!(
        decode("OrderPlaced", 9, json!({})),
        Err(SchemaError::UnknownSchemaVersion {
            event_type: "OrderPlaced".into(),
            schema_version: 9
        })
    );
}

#[test]
fn a_payload_with_a_bad_value_does_not_decode() {
    let mut data = sample("StockReserved.v1");
    data["quantity"] = json!(0);
    assert!(matches!(
        decode("StockReserved", 1, data),
        Err(SchemaError::InvalidPayload { .. })
    ));
}

#[test]
fn a_payload_with_an_unknown_field_breaks_both_decoder_and_schema() {
    let mut data = sample("OrderDelivered.v1");
    data["courier_mood"] = json!("happy");
    assert!(decode("OrderDelivered", 1, data.clone()).is_err());
    let registration = registry()
        .iter()
        .find(|r| r.event_type == "OrderDelivered")
        .expect("registered");
    let schema = serde_json::to_value(registration.json_schema()).expect("JSON");
    assert!(
        !jsonschema::validator_for(&schema)
            .expect("compiles")
            .is_valid(&data)
    );
}

#[test]
fn an_encoded_event_decodes_back_with_its_schema_version_in_the_metadata() {
    let event = decode("OrderPlaced", 2, sample("OrderPlaced.v2")).expect("decodes");
    let metadata = EventMetadata {
        event_id: Uuid::now_v7(),
        correlation_id: Uuid::now_v7(),
        causation_id: Uuid::now_v7(),
        traceparent: None,
        actor: "auth0|ada".into(),
        command_id: Uuid::now_v7(),
        idempotency_key: Some("checkout-1".into()),
        occurred_at: Utc.with_ymd_and_hms(2025, 11, 3, 9, 15, 0).unwrap(),
    };
    let encoded = encode(&event, &metadata).expect("encodes");
    assert_eq!(encoded.event_type, "OrderPlaced");
    assert_eq!(encoded.metadata["schema_version"], json!(2));
    let recorded =
        decode_recorded(encoded.event_type, encoded.data, encoded.metadata).expect("decodes");
    assert_eq!(recorded.event, event);
    assert_eq!(recorded.metadata, metadata);
    assert_eq!(recorded.stored_schema_version, 2);
}

#[test]
fn metadata_without_a_schema_version_is_refused() {
    let mut metadata = sample("metadata");
    metadata
        .as_object_mut()
        .expect("object")
        .remove("schema_version");
    assert!(matches!(
        decode_recorded("OrderDelivered", sample("OrderDelivered.v1"), metadata),
        Err(SchemaError::InvalidMetadata { .. })
    ));
}

#[test]
fn the_payload_alone_decodes_by_the_metadatas_schema_version_upcasting_old_ones() {
    let metadata = |version: u32| {
        let mut metadata = sample("metadata");
        metadata["schema_version"] = json!(version);
        metadata
    };
    let current = decode_payload("OrderPlaced", sample("OrderPlaced.v2"), &metadata(2));
    assert_eq!(
        current.expect("v2 decodes"),
        decode("OrderPlaced", 2, sample("OrderPlaced.v2")).expect("v2")
    );
    let upcast = decode_payload("OrderPlaced", sample("OrderPlaced.v1"), &metadata(1));
    assert_eq!(
        upcast.expect("v1 decodes"),
        decode("OrderPlaced", 1, sample("OrderPlaced.v1")).expect("v1")
    );
    // Read as v1, a v2 payload is refused rather than misread.
    assert!(decode_payload("OrderPlaced", sample("OrderPlaced.v2"), &metadata(1)).is_err());
    assert!(matches!(
        decode_payload("OrderDelivered", sample("OrderDelivered.v1"), &json!({})),
        Err(SchemaError::InvalidMetadata { .. })
    ));
}

#[test]
fn from_the_stored_text_every_version_decodes_as_from_the_parsed_tree() {
    for registration in registry() {
        let data = sample(&registration.file_stem());
        let mut metadata = sample("metadata");
        metadata["schema_version"] = json!(registration.schema_version);
        let text = decode_payload_text(
            registration.event_type,
            &data.to_string(),
            &metadata.to_string(),
        );
        assert_eq!(
            text.expect("decodes from text"),
            decode_payload(registration.event_type, data, &metadata).expect("decodes from tree"),
            "{}",
            registration.file_stem()
        );
    }
    let metadata = |version: u32| json!({ "schema_version": version, "actor": "x" }).to_string();
    let v2 = sample("OrderPlaced.v2").to_string();
    assert!(decode_payload_text("OrderPlaced", &v2, &metadata(1)).is_err());
    assert!(matches!(
        decode_payload_text("OrderPlaced", &v2, &metadata(7)),
        Err(SchemaError::UnknownSchemaVersion { .. })
    ));
    for bad in [
        "{}",
        r#"{"schema_version": "2"}"#,
        r#"{"schema_version": -1}"#,
        "[]",
    ] {
        assert!(
            matches!(
                decode_payload_text("OrderPlaced", &v2, bad),
                Err(SchemaError::InvalidMetadata { .. })
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        decode_payload_text("OrderPaid", r#"{"order_id": 3}"#, &metadata(1)),
        Err(SchemaError::InvalidPayload { .. })
    ));
}

#[test]
fn every_type_name_has_exactly_one_current_version() {
    let mut names: Vec<_> = registry()
        .iter()
        .filter(|r| r.current)
        .map(|r| r.event_type)
        .collect();
    let count = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), count);
    for registration in registry() {
        let newest = registry()
            .iter()
            .filter(|r| r.event_type == registration.event_type)
            .map(|r| r.schema_version)
            .max();
        assert_eq!(
            registration.current,
            newest == Some(registration.schema_version)
        );
    }
}
