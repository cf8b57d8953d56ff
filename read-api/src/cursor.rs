//! Opaque page cursors. A cursor is the sort key of the last row a client saw, tagged with
//! its kind, in URL-safe base64: clients pass it back unchanged, and one made for products is
//! refused by an orders query instead of being misread.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::DateTime;
use uuid::Uuid;

use orderly_event_schemas::values::Sku;
use orderly_graphql::plain_text::has_control;

use crate::ReadError;
use crate::sql::{OrderKey, ProductKey, storable};

const ORDER_TAG: &str = "o1";
const PRODUCT_TAG: &str = "p1";

pub fn order_cursor(key: OrderKey) -> String {
    let micros = key.placed_at.timestamp_micros();
    URL_SAFE_NO_PAD.encode(format!("{ORDER_TAG}:{micros}:{}", key.order_id))
}

pub fn product_cursor(key: &ProductKey) -> String {
    // The SKU cannot hold a `:` (Sku::parse), so it goes first and the name keeps any text.
    URL_SAFE_NO_PAD.encode(format!("{PRODUCT_TAG}:{}:{}", key.sku, key.name))
}

fn decoded(cursor: &str, field: &str) -> Result<String, ReadError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| not_a_cursor(field))
}

fn not_a_cursor(field: &str) -> ReadError {
    ReadError::invalid(
        field,
        "not a cursor of this list; pass an endCursor this query returned",
    )
}

pub fn parse_order_cursor(cursor: &str, field: &str) -> Result<OrderKey, ReadError> {
    let text = decoded(cursor, field)?;
    let mut parts = text.splitn(3, ':');
    let (Some(ORDER_TAG), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(not_a_cursor(field));
    };
    // Only a time this server wrote can be in a cursor: one PostgreSQL cannot compare is
    // forged.
    let placed_at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .filter(|at| storable(field, *at).is_ok())
        .ok_or_else(|| not_a_cursor(field))?;
    let order_id = Uuid::parse_str(id).map_err(|_| not_a_cursor(field))?;
    Ok(OrderKey {
        placed_at,
        order_id,
    })
}

pub fn parse_product_cursor(cursor: &str, field: &str) -> Result<ProductKey, ReadError> {
    let text = decoded(cursor, field)?;
    let mut parts = text.splitn(3, ':');
    let (Some(PRODUCT_TAG), Some(sku), Some(name)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(not_a_cursor(field));
    };
    // The key goes into the statement as text: a SKU of the catalog's shape and a name
    // without control characters, as every stored product has.
    if Sku::parse(sku).is_err() || has_control(name) {
        return Err(not_a_cursor(field));
    }
    Ok(ProductKey {
        name: name.to_owned(),
        sku: sku.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    #[test]
    fn an_order_cursor_round_trips_to_the_microsecond() {
        let key = OrderKey {
            placed_at: Utc.timestamp_micros(1_764_000_000_123_456).unwrap(),
            order_id: Uuid::now_v7(),
        };
        assert_eq!(
            parse_order_cursor(&order_cursor(key), "after").unwrap(),
            key
        );
    }

    #[test]
    fn a_product_cursor_keeps_names_with_colons() {
        let key = ProductKey {
            name: "Mug: large, 12:00 edition".into(),
            sku: "MUG-L".into(),
        };
        assert_eq!(
            parse_product_cursor(&product_cursor(&key), "after").unwrap(),
            key
        );
    }

    #[test]
    fn cursors_of_another_list_or_garbage_are_bad_input() {
        let product = product_cursor(&ProductKey {
            name: "Mug".into(),
            sku: "MUG".into(),
        });
        let forged = |text: &str| URL_SAFE_NO_PAD.encode(text);
        let far_past = forged(&format!("o1:-8000000000000000000:{}", Uuid::nil()));
        for cursor in [product.as_str(), "", "!!", "bzE6eDp5", &far_past] {
            assert!(
                matches!(
                    parse_order_cursor(cursor, "after"),
                    Err(ReadError::Invalid { .. })
                ),
                "{cursor}"
            );
        }
    }

    #[test]
    fn a_product_cursor_with_a_forged_sku_or_name_is_bad_input() {
        for text in ["p1:mug lower:Mug", "p1:MUG:Mu\u{0}g", "p1::Mug"] {
            let cursor = URL_SAFE_NO_PAD.encode(text);
            assert!(
                matches!(
                    parse_product_cursor(&cursor, "after"),
                    Err(ReadError::Invalid { .. })
                ),
                "{text}"
            );
        }
    }
}
