//! The crate's one error type: what can be wrong with the plumbing's configuration or a token
//! request. Request-time failures are answered as contract errors instead (see `errors`).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EdgeError {
    /// Neither a JWT secret nor a public key (or, for issuing, no signing key) is configured.
    ///
    /// Handling: set `ORDERLY_JWT_SECRET` (HS256) or `ORDERLY_JWT_PUBLIC_KEY` /
    /// `ORDERLY_JWT_PRIVATE_KEY` (RS256); the service refuses every token until then.
    #[error("no JWT key configured: {0}")]
    NoKey(&'static str),

    /// A configured key does not parse (bad PEM, wrong kind of key).
    ///
    /// Handling: fix the setting; retrying cannot help.
    #[error("invalid JWT key: {0}")]
    InvalidKey(#[source] jsonwebtoken::errors::Error),

    /// A token could not be signed (the signing key does not fit the algorithm).
    ///
    /// Handling: fix the key setting.
    #[error("cannot sign a token: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),

    /// A rate limit of zero requests, or another setting that cannot work.
    ///
    /// Handling: fix the setting.
    #[error("invalid setting {name}: {reason}")]
    InvalidSetting { name: &'static str, reason: String },
}
