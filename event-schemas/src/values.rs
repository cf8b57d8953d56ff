//! Value types that appear in persisted events.
//!
//! They live here rather than in the domain so that a stored event cannot hold a bad value either:
//! deserializing runs the same validation as `parse`/`new`, and the JSON Schemas carry the same
//! rules. The domain re-exports them.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::SchemaError;

/// The largest amount or count that survives a JSON number exactly (2^53 - 1): the GraphQL
/// contract promises `Long` values stay below it, and JavaScript clients read these documents.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

fn invalid(what: &'static str, reason: impl Into<String>) -> SchemaError {
    SchemaError::InvalidValue {
        what,
        reason: reason.into(),
    }
}

/// Free text shared by all text newtypes: not blank, no control characters, bounded length.
fn checked_text(
    value: String,
    what: &'static str,
    max_chars: usize,
) -> Result<String, SchemaError> {
    if value.trim().is_empty() {
        return Err(invalid(what, "must not be blank"));
    }
    if value.chars().count() > max_chars {
        return Err(invalid(
            what,
            format!("must be at most {max_chars} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(what, "must not contain control characters"));
    }
    Ok(value)
}

/// Declares a validated free-text newtype: `parse`, `as_str`, serde through `parse`, a schema.
macro_rules! text_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const MAX_CHARS: usize = $max;

            pub fn parse(value: impl Into<String>) -> Result<Self, SchemaError> {
                checked_text(value.into(), $what, $max).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = SchemaError;
            fn try_from(value: String) -> Result<Self, SchemaError> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": $max,
                    "pattern": "\\S",
                    "description": "Not blank, no control characters.",
                })
            }
        }
    };
}

text_newtype!(
    /// Who placed an order: the JWT `sub` of the customer.
    CustomerId, "customer id", 255
);
text_newtype!(
    /// A product's display name, copied into order lines at placement.
    ProductName, "product name", 200
);
text_newtype!(
    /// A product's optional longer description.
    Description, "description", 2000
);
text_newtype!(
    /// One line of a postal address (also used for the recipient name and the city).
    AddressLine, "address line", 200
);
text_newtype!(
    /// A postal code; its shape varies too much by country to check more than text rules.
    PostalCode, "postal code", 20
);
text_newtype!(
    /// The shipping company, e.g. "DHL".
    Carrier, "carrier", 100
);
text_newtype!(
    /// The carrier's tracking number for a shipment.
    TrackingNumber, "tracking number", 100
);
text_newtype!(
    /// Why something was refused or undone: cancellation, decline, failure, refund.
    Reason, "reason", 500
);
text_newtype!(
    /// Opaque payment-method token handed to the payment gateway (never card data).
    PaymentToken, "payment token", 255
);
text_newtype!(
    /// The gateway's identifier for a successful charge, needed to refund it.
    GatewayReference, "gateway reference", 255
);

/// A stock-keeping unit: 1 to 64 of `A-Z`, `0-9` and `-`, starting with a letter or digit.
///
/// Uppercase only, so one product cannot hide behind two spellings; the stream name is
/// `product-<sku>`, and stream categories end at the first `-`, which a SKU may contain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(value: impl Into<String>) -> Result<Self, SchemaError> {
        let value = value.into();
        let mut bytes = value.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        let rest_ok = bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-');
        if !first_ok || !rest_ok || value.len() > Self::MAX_CHARS {
            return Err(invalid(
                "sku",
                format!("{value:?} must be 1 to 64 of A-Z, 0-9 and '-', not starting with '-'"),
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sku {
    type Error = SchemaError;
    fn try_from(value: String) -> Result<Self, SchemaError> {
        Self::parse(value)
    }
}

impl From<Sku> for String {
    fn from(value: Sku) -> String {
        value.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for Sku {
    fn schema_name() -> Cow<'static, str> {
        "Sku".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": 64,
            "pattern": "^[A-Z0-9][A-Z0-9-]*$",
        })
    }
}

/// A count of items, at least 1.
///
/// The upper bound is GraphQL's 32-bit `Int`, the widest quantity a client can send or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Quantity(u32);

impl Quantity {
    pub const MAX: u32 = i32::MAX as u32;

    pub fn new(value: u32) -> Result<Self, SchemaError> {
        if value == 0 || value > Self::MAX {
            return Err(invalid(
                "quantity",
                format!("{value} must be 1 to {}", Self::MAX),
            ));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Quantity {
    type Error = SchemaError;
    fn try_from(value: u32) -> Result<Self, SchemaError> {
        Self::new(value)
    }
}

impl From<Quantity> for u32 {
    fn from(value: Quantity) -> u32 {
        value.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "integer", "minimum": 1, "maximum": Quantity::MAX })
    }
}

/// Declares a code of exactly `$len` ASCII uppercase letters, stored inline so it is `Copy`.
macro_rules! code_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal, $len:literal, $pattern:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name([u8; $len]);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, SchemaError> {
                let shape = || invalid($what, format!("{value:?} must be {} uppercase letters", $len));
                let bytes: [u8; $len] = value.as_bytes().try_into().map_err(|_| shape())?;
                if !bytes.iter().all(u8::is_ascii_uppercase) {
                    return Err(shape());
                }
                Ok(Self(bytes))
            }
        }

        impl TryFrom<String> for $name {
            type Error = SchemaError;
            fn try_from(value: String) -> Result<Self, SchemaError> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Only ASCII letters get in through `parse`, so each byte is one char.
                self.0.iter().try_for_each(|&b| fmt::Write::write_char(f, char::from(b)))
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "pattern": $pattern })
            }
        }
    };
}

code_newtype!(
    /// An ISO 4217 currency code such as `EUR`: three uppercase letters.
    ///
    /// Only the shape is checked: the list of codes changes, and an event written under an old
    /// list must still decode.
    Currency, "currency", 3, "^[A-Z]{3}$"
);
impl Currency {
    /// A code on today's ISO 4217 list, for a value entering the system (a product's price).
    /// [`Currency::parse`] checks only the shape, so an event written under an older list
    /// still decodes. `XXX` (no currency) and `XTS` (reserved for tests) are on the list but
    /// name no money a product can cost.
    pub fn parse_listed(value: &str) -> Result<Self, SchemaError> {
        let listed =
            iso_currency::Currency::from_code(value).is_some() && !matches!(value, "XXX" | "XTS");
        if !listed {
            return Err(invalid(
                "currency",
                format!("{value:?} is not an ISO 4217 currency code"),
            ));
        }
        Self::parse(value)
    }
}

code_newtype!(
    /// An ISO 3166-1 alpha-2 country code such as `DE`: two uppercase letters (shape only, as
    /// for [`Currency`]).
    CountryCode, "country", 2, "^[A-Z]{2}$"
);

/// An amount of money in minor units (cents) of one currency. Never a float.
///
/// Named `amount_minor` (not `minor`) because that is the GraphQL contract's word (`amountMinor`).
/// Amounts are never negative: a refund is its own event, not a negative charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "MoneyFields", into = "MoneyFields")]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

/// Money's stored shape, before validation.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct MoneyFields {
    #[schemars(range(min = 0, max = 9_007_199_254_740_991i64))]
    amount_minor: i64,
    currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Result<Self, SchemaError> {
        if !(0..=MAX_SAFE_INTEGER).contains(&amount_minor) {
            return Err(invalid(
                "amount",
                format!("{amount_minor} must be 0 to {MAX_SAFE_INTEGER} minor units"),
            ));
        }
        Ok(Self {
            amount_minor,
            currency,
        })
    }

    pub fn zero(currency: Currency) -> Self {
        Self {
            amount_minor: 0,
            currency,
        }
    }

    pub fn amount_minor(self) -> i64 {
        self.amount_minor
    }

    pub fn currency(self) -> Currency {
        self.currency
    }

    /// `None` when the currencies differ or the sum leaves the safe range.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        if self.currency != other.currency {
            return None;
        }
        let sum = self.amount_minor.checked_add(other.amount_minor)?;
        Money::new(sum, self.currency).ok()
    }

    /// `None` when the product leaves the safe range.
    pub fn checked_mul(self, quantity: Quantity) -> Option<Money> {
        let product = self.amount_minor.checked_mul(i64::from(quantity.get()))?;
        Money::new(product, self.currency).ok()
    }
}

impl TryFrom<MoneyFields> for Money {
    type Error = SchemaError;
    fn try_from(fields: MoneyFields) -> Result<Self, SchemaError> {
        Money::new(fields.amount_minor, fields.currency)
    }
}

impl From<Money> for MoneyFields {
    fn from(money: Money) -> Self {
        MoneyFields {
            amount_minor: money.amount_minor,
            currency: money.currency,
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount_minor, self.currency)
    }
}

impl JsonSchema for Money {
    fn schema_name() -> Cow<'static, str> {
        "Money".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        MoneyFields::json_schema(generator)
    }
}

/// An order's identity; also names its streams `order-<uuid>` and `payment-<uuid>`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct OrderId(pub Uuid);

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A postal address; every part is validated text and the country an ISO 3166-1 alpha-2 code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// The recipient.
    pub name: AddressLine,
    pub line1: AddressLine,
    pub line2: Option<AddressLine>,
    pub city: AddressLine,
    pub postal_code: PostalCode,
    pub country: CountryCode,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sku_is_uppercase_letters_digits_and_dashes() {
        assert!(Sku::parse("TEA-GREEN-100G").is_ok());
        for bad in ["", "tea", "-TEA", "TEA_1", "TÉA", &"A".repeat(65)] {
            assert!(Sku::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_quantity_is_at_least_one() {
        assert!(Quantity::new(0).is_err());
        assert_eq!(Quantity::new(3).map(Quantity::get), Ok(3));
        assert!(Quantity::new(Quantity::MAX + 1).is_err());
    }

    #[test]
    fn currency_and_country_are_uppercase_codes() {
        assert!(Currency::parse("EUR").is_ok());
        assert!(Currency::parse("eur").is_err());
        assert!(Currency::parse("EURO").is_err());
        assert!(CountryCode::parse("DE").is_ok());
        assert!(CountryCode::parse("DEU").is_err());
    }

    #[test]
    fn a_new_currency_must_be_on_the_iso_4217_list_while_old_events_still_decode() {
        assert!(Currency::parse_listed("EUR").is_ok());
        assert!(Currency::parse_listed("JPY").is_ok());
        for refused in ["ZZZ", "XXX", "XTS", "eur", "EURO"] {
            assert!(Currency::parse_listed(refused).is_err(), "{refused}");
        }
        assert!(Currency::parse("ZZZ").is_ok());
    }

    #[test]
    fn money_stays_in_the_json_safe_range_and_one_currency() {
        let eur = Currency::parse("EUR").unwrap();
        let usd = Currency::parse("USD").unwrap();
        assert!(Money::new(-1, eur).is_err());
        assert!(Money::new(MAX_SAFE_INTEGER + 1, eur).is_err());
        let price = Money::new(250, eur).unwrap();
        assert_eq!(
            price.checked_mul(Quantity::new(4).unwrap()),
            Money::new(1000, eur).ok()
        );
        assert_eq!(price.checked_add(Money::zero(usd)), None);
        assert_eq!(
            Money::new(MAX_SAFE_INTEGER, eur)
                .unwrap()
                .checked_add(price),
            None
        );
    }

    #[test]
    fn text_must_not_be_blank_or_hold_control_characters() {
        assert!(Reason::parse("changed my mind").is_ok());
        assert!(Reason::parse("  ").is_err());
        assert!(Reason::parse("a\u{0}b").is_err());
        assert!(Carrier::parse("x".repeat(Carrier::MAX_CHARS + 1)).is_err());
    }

    #[test]
    fn deserializing_validates_like_parsing() {
        assert!(serde_json::from_str::<Sku>("\"tea\"").is_err());
        assert!(serde_json::from_str::<Quantity>("0").is_err());
        assert!(
            serde_json::from_str::<Money>(r#"{"amount_minor": -5, "currency": "EUR"}"#).is_err()
        );
        let money: Money =
            serde_json::from_str(r#"{"amount_minor": 5, "currency": "EUR"}"#).unwrap();
        assert_eq!(money.amount_minor(), 5);
    }
}
