//! Scalars of the contract whose names async-graphql does not provide as they are.
//!
//! `UUID` (uuid::Uuid), `DateTime` (chrono::DateTime<Utc>) and `JSON` (async_graphql::Json)
//! already carry the contract's names in async-graphql 7; these fill in the rest.

use async_graphql::{InputValueError, InputValueResult, Scalar, ScalarType, Value};
use chrono::NaiveDate;
use orderly_event_store::Position;

/// The contract's largest exact JSON integer: `Long` values stay below 2^53.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// 64-bit signed integer, serialized as a JSON number (values stay below 2^53).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Long(pub i64);

#[Scalar(name = "Long")]
impl ScalarType for Long {
    fn parse(value: Value) -> InputValueResult<Self> {
        // A float such as 1.5 or 1e300 is refused rather than rounded: money is never a float.
        let Value::Number(number) = &value else {
            return Err(InputValueError::expected_type(value));
        };
        match number.as_i64() {
            Some(n) if n.unsigned_abs() <= MAX_SAFE_INTEGER.unsigned_abs() => Ok(Long(n)),
            _ => Err(InputValueError::custom(
                "expected an integer between -(2^53 - 1) and 2^53 - 1",
            )),
        }
    }

    fn to_value(&self) -> Value {
        Value::Number(self.0.into())
    }
}

/// Opaque position in the event log. Returned by every mutation; accepted by queries and
/// subscriptions. On the wire it is `Position`'s 32 hex digits, which compare like positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsistencyToken(pub Position);

#[Scalar(name = "ConsistencyToken")]
impl ScalarType for ConsistencyToken {
    fn parse(value: Value) -> InputValueResult<Self> {
        let Value::String(text) = &value else {
            return Err(InputValueError::expected_type(value));
        };
        text.parse::<Position>()
            .map(ConsistencyToken)
            .map_err(|_| InputValueError::custom("not a consistency token"))
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

impl From<Position> for ConsistencyToken {
    fn from(position: Position) -> Self {
        Self(position)
    }
}

/// Calendar date, YYYY-MM-DD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date(pub NaiveDate);

#[Scalar(name = "Date")]
impl ScalarType for Date {
    fn parse(value: Value) -> InputValueResult<Self> {
        let Value::String(text) = &value else {
            return Err(InputValueError::expected_type(value));
        };
        NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .map(Date)
            .map_err(|_| InputValueError::custom("expected a date as YYYY-MM-DD"))
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.format("%Y-%m-%d").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_is_a_json_number_and_refuses_floats_and_unsafe_integers() {
        assert_eq!(Long(42).to_value(), Value::Number(42.into()));
        assert!(matches!(Long::parse(Value::Number(7.into())), Ok(Long(7))));
        assert!(Long::parse(Value::from(1.5)).is_err());
        assert!(Long::parse(Value::Number((1i64 << 53).into())).is_err());
        assert!(Long::parse(Value::String("7".into())).is_err());
        // Both ends of the safe range, and i64's own ends (whose absolute value once
        // overflowed: a panic in a debug build, and i64::MIN let through in a release one).
        let safe = (1i64 << 53) - 1;
        for n in [safe, -safe] {
            assert!(matches!(Long::parse(Value::Number(n.into())), Ok(Long(m)) if m == n));
        }
        for n in [i64::MIN, i64::MAX, -(1i64 << 53)] {
            assert!(Long::parse(Value::Number(n.into())).is_err(), "{n}");
        }
    }

    #[test]
    fn a_consistency_token_round_trips_as_the_position_text() {
        let token = ConsistencyToken(Position::new(3, 9));
        let value = token.to_value();
        assert_eq!(value, Value::String(Position::new(3, 9).to_string()));
        assert_eq!(ConsistencyToken::parse(value).ok(), Some(token));
        assert!(ConsistencyToken::parse(Value::String("nope".into())).is_err());
    }

    #[test]
    fn a_date_is_year_month_day() {
        let value = Value::String("2026-11-25".into());
        let date = Date::parse(value.clone()).ok();
        assert_eq!(date.map(|d| d.to_value()), Some(value));
        assert!(Date::parse(Value::String("25.11.2026".into())).is_err());
    }
}
