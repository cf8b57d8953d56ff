//! Settings: built-in defaults, overridden by an optional TOML file, overridden by `ORDERLY_*`
//! environment variables (`ORDERLY_DATABASE_URL` sets `database_url`, and so on).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The read models, and the event log when `event_store` is `postgres`.
    pub database_url: String,
    pub event_store: EventStoreKind,
    /// Only read when `event_store` is `kurrentdb`.
    pub kurrentdb_url: Option<String>,
    pub http_addr: SocketAddr,
    pub log_format: LogFormat,
    /// Connections the event store may hold open.
    pub db_pool_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStoreKind {
    Postgres,
    Kurrentdb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/orderly".to_owned(),
            event_store: EventStoreKind::Postgres,
            kurrentdb_url: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            log_format: LogFormat::Text,
            db_pool_size: 16,
        }
    }
}

impl Settings {
    /// Defaults < `file` (when given) < `ORDERLY_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            .merge(Env::prefixed("ORDERLY_").only(&Self::KEYS))
            .extract()
            .map_err(Box::new)
    }

    /// The environment variables read, without the `ORDERLY_` prefix; `ORDERLY_CONFIG` and
    /// test-only variables are not settings.
    const KEYS: [&'static str; 6] = [
        "database_url",
        "event_store",
        "kurrentdb_url",
        "http_addr",
        "log_format",
        "db_pool_size",
    ];
}

/// Settings appear in logs; URLs may carry passwords, which never do.
impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("event_store", &self.event_store)
            .field(
                "kurrentdb_url",
                &self.kurrentdb_url.as_deref().map(redact_url),
            )
            .field("http_addr", &self.http_addr)
            .field("log_format", &self.log_format)
            .field("db_pool_size", &self.db_pool_size)
            .finish()
    }
}

/// The URL with any password replaced; a string that is not a URL is hidden whole, since it
/// may be a key=value connection string with a password in it.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparsed connection string>".to_owned(),
    }
}

#[cfg(test)]
// figment's test jail prescribes closures returning its (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_logs() {
        let s = Settings {
            database_url: "postgres://app:hunter2@db:5432/orderly".into(),
            ..Default::default()
        };
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app:***@db"), "{shown}");
        assert_eq!(
            redact_url("host=db password=hunter2"),
            "<unparsed connection string>"
        );
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "orderly.toml",
                "http_addr = \"0.0.0.0:9000\"\nlog_format = \"json\"\n",
            )?;
            jail.set_env("ORDERLY_LOG_FORMAT", "text");
            let s = Settings::load(Some(Path::new("orderly.toml"))).map_err(|e| *e)?;
            assert_eq!(s.http_addr, "0.0.0.0:9000".parse().unwrap());
            assert_eq!(s.log_format, LogFormat::Text);
            assert_eq!(s.event_store, EventStoreKind::Postgres);
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_is_a_clear_error() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ORDERLY_EVENT_STORE", "mongodb");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(
                err.contains("mongodb") || err.contains("event_store"),
                "{err}"
            );
            Ok(())
        });
    }
}
