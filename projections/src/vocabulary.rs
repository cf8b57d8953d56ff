//! The words the read models store, in one place: the projections write them, the read API
//! reads them back and serves them under the same spelling (the contract's enums).
//!
//! Each is a plain enum stored as its `text` spelling ([`OrderStatus::as_str`]) and parsed back
//! with [`str::parse`]; a stored word this module does not know is an error where it is read
//! ([`UnknownWord`]), never a silent default.

use std::fmt;
use std::str::FromStr;

/// A stored word that names no variant of the type read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {word:?} is not one the read models store")]
pub struct UnknownWord {
    pub kind: &'static str,
    pub word: String,
}

/// Defines a stored vocabulary: the enum and its spellings, both ways.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident, $kind:literal { $($(#[$vmeta:meta])* $variant:ident => $word:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every variant, in the order of its lifecycle.
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            /// The stored spelling, which is the contract's.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $word,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;

            fn from_str(word: &str) -> Result<Self, UnknownWord> {
                match word {
                    $($word => Ok(Self::$variant),)+
                    _ => Err(UnknownWord { kind: $kind, word: word.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary! {
    /// `orders.status` and `order_status_history.status`: where the order is in its lifecycle.
    OrderStatus, "order status" {
        Placed => "PLACED",
        StockReserved => "STOCK_RESERVED",
        Paid => "PAID",
        Confirmed => "CONFIRMED",
        Shipped => "SHIPPED",
        Delivered => "DELIVERED",
        Cancelled => "CANCELLED",
    }
}

vocabulary! {
    /// `order_payments.status`: the latest word on the order's payment.
    PaymentStatus, "payment status" {
        /// Requested, and no outcome recorded yet (or a retry after a transient failure).
        Pending => "PENDING",
        Charged => "CHARGED",
        Declined => "DECLINED",
        /// The last attempt failed transiently; the saga may try again.
        Failed => "FAILED",
        Refunded => "REFUNDED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_reads_back_as_itself_and_no_other() {
        for status in OrderStatus::ALL {
            assert_eq!(status.as_str().parse::<OrderStatus>(), Ok(*status));
        }
        for status in PaymentStatus::ALL {
            assert_eq!(status.as_str().parse::<PaymentStatus>(), Ok(*status));
        }
        let words: std::collections::HashSet<_> =
            OrderStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(words.len(), OrderStatus::ALL.len());
    }

    #[test]
    fn an_unknown_word_is_an_error_that_names_it() {
        let error = "placed".parse::<OrderStatus>().unwrap_err();
        assert_eq!(
            error.to_string(),
            r#"order status "placed" is not one the read models store"#
        );
        assert!("SETTLED".parse::<PaymentStatus>().is_err());
    }
}
