//! Automatic persisted queries, as Apollo's clients (and urql's, and Relay's with a plugin)
//! send them: a request names its query by SHA-256 in `extensions.persistedQuery`; the first
//! time the server has not seen it, the client sends the text once with the hash, and from
//! then on the hash alone. That keeps large queries off the wire, and short enough for GET.
//!
//! The query text is resolved here, before the gate parses anything, so a persisted query
//! goes through exactly the checks, caches and metrics of one sent in full.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::over_http::Params;

/// Query texts by their hash, the most recently used kept.
pub(crate) struct PersistedQueries {
    queries: Mutex<LruCache<String, String>>,
}

/// Why a persisted query was not resolved; each message is the one Apollo's clients look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unresolved {
    /// The client should send the query text with its hash.
    NotFound,
    /// The `persistedQuery` extension is not `{version: 1, sha256Hash}`.
    Malformed,
    /// The text sent does not have the hash sent.
    HashMismatch,
}

impl Unresolved {
    pub(crate) const fn message(self) -> &'static str {
        match self {
            Self::NotFound => "PersistedQueryNotFound",
            Self::Malformed => "the persistedQuery extension must be {version: 1, sha256Hash}",
            Self::HashMismatch => "provided sha does not match query",
        }
    }
}

impl PersistedQueries {
    /// Enough for every query a set of frontends sends; the oldest unused go first.
    const CAPACITY: NonZeroUsize = NonZeroUsize::new(1024).expect("a nonzero capacity");
    /// Texts beyond this are not kept (the client then keeps sending them in full).
    const MAX_QUERY_BYTES: usize = 64 * 1024;

    pub(crate) fn new() -> Self {
        Self {
            queries: Mutex::new(LruCache::new(Self::CAPACITY)),
        }
    }

    /// Fills in `params.query` from the cache when the request names a persisted query
    /// without its text, and remembers the text when it comes with its hash. A request
    /// without the extension is left as it is.
    pub(crate) fn resolve(&self, params: &mut Params) -> Result<(), Unresolved> {
        let Some(persisted) = params.extensions.remove("persistedQuery") else {
            return Ok(());
        };
        let hash = match (&persisted["version"], &persisted["sha256Hash"]) {
            (Value::Number(version), Value::String(hash)) if version.as_u64() == Some(1) => {
                hash.to_ascii_lowercase()
            }
            _ => return Err(Unresolved::Malformed),
        };
        let mut queries = self.queries.lock().unwrap_or_else(|p| p.into_inner());
        match &params.query {
            None => {
                let query = queries.get(&hash).ok_or(Unresolved::NotFound)?;
                params.query = Some(query.clone());
            }
            Some(query) => {
                if sha256_hex(query) != hash {
                    return Err(Unresolved::HashMismatch);
                }
                if query.len() <= Self::MAX_QUERY_BYTES {
                    queries.put(hash, query.clone());
                }
            }
        }
        Ok(())
    }
}

/// The hash as clients send it: 64 lowercase hex digits.
fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn params(query: Option<&str>, persisted: Value) -> Params {
        let mut params = Params {
            query: query.map(str::to_owned),
            ..Params::default()
        };
        params
            .extensions
            .insert("persistedQuery".to_owned(), persisted);
        params
    }

    #[test]
    fn a_hash_is_answered_once_its_text_was_sent_with_it() {
        let cache = PersistedQueries::new();
        let query = "{ __typename }";
        let hash = sha256_hex(query);
        let by_hash = json!({ "version": 1, "sha256Hash": hash });

        let mut first = params(None, by_hash.clone());
        assert_eq!(cache.resolve(&mut first), Err(Unresolved::NotFound));

        let mut registering = params(Some(query), by_hash.clone());
        assert_eq!(cache.resolve(&mut registering), Ok(()));

        let mut again = params(None, by_hash);
        assert_eq!(cache.resolve(&mut again), Ok(()));
        assert_eq!(again.query.as_deref(), Some(query));
        assert!(again.extensions.get("persistedQuery").is_none());
    }

    #[test]
    fn a_wrong_hash_or_version_is_refused() {
        let cache = PersistedQueries::new();
        let wrong = json!({ "version": 1, "sha256Hash": "00" });
        assert_eq!(
            cache.resolve(&mut params(Some("{ a }"), wrong)),
            Err(Unresolved::HashMismatch)
        );
        let version_two = json!({ "version": 2, "sha256Hash": "00" });
        assert_eq!(
            cache.resolve(&mut params(None, version_two)),
            Err(Unresolved::Malformed)
        );
        let mut plain = Params {
            query: Some("{ a }".to_owned()),
            ..Params::default()
        };
        assert_eq!(cache.resolve(&mut plain), Ok(()));
    }
}
