//! Settings: built-in defaults, overridden by an optional TOML file, overridden by `ORDERLY_*`
//! environment variables.
//!
//! In code they are typed sections (`settings.saga.lease` is a [`Duration`]); in the file and
//! the environment every setting keeps its flat name (`saga_lease_ms`, `ORDERLY_SAGA_LEASE_MS`),
//! as the README's table lists them. A setting is declared once: a field of its section, with
//! that name (the field's own, or its `rename`), its unit and its default next to it. Secrets
//! are [`SecretString`]s and URLs that may carry a password are [`MaskedUrl`]s, so `Debug`
//! is derived and never shows either.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
pub use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

/// Each section reads its own keys from the same flat set (see [`Settings::load`]).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub store: StoreSettings,
    pub telemetry: TelemetrySettings,
    pub http: HttpSettings,
    pub auth: AuthSettings,
    pub orders: OrderSettings,
    pub payment: PaymentSettings,
    pub saga: SagaSettings,
    pub mail: MailSettings,
}

/// Where the log and the read models live.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StoreSettings {
    /// The read models, and the event log when `kind` is `postgres`.
    pub database_url: MaskedUrl,
    #[serde(rename = "event_store")]
    pub kind: EventStoreKind,
    /// Only read when `kind` is `kurrentdb`.
    pub kurrentdb_url: Option<MaskedUrl>,
    /// Connections the event store may hold open (and as many for the read models).
    #[serde(rename = "db_pool_size")]
    pub pool_size: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            database_url: MaskedUrl::from("postgres://postgres@127.0.0.1:5432/orderly"),
            kind: EventStoreKind::Postgres,
            kurrentdb_url: None,
            pool_size: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// OTLP/gRPC collector for traces (`http://jaeger:4317`); none exported when unset.
    pub otlp_endpoint: Option<MaskedUrl>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            otlp_endpoint: None,
        }
    }
}

/// The HTTP and WebSocket edge: GraphQL limits, rate limits, consistency waits, subscriptions.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    #[serde(rename = "http_addr")]
    pub addr: SocketAddr,
    /// Requests per second per caller (token subject, else client IP); 0 turns limiting off.
    pub rate_limit_per_second: u32,
    /// Requests a caller may send at once before the per-second rate applies.
    pub rate_limit_burst: u32,
    /// Largest GraphQL request body, in bytes.
    #[serde(rename = "graphql_body_limit")]
    pub body_limit: usize,
    /// Longest a GraphQL request may run.
    #[serde(rename = "graphql_timeout_ms", deserialize_with = "unit::millis")]
    pub timeout: Duration,
    /// The server's cap on a query's `consistency.timeoutMs`.
    #[serde(rename = "consistency_max_wait_ms", deserialize_with = "unit::millis")]
    pub consistency_max_wait: Duration,
    /// Messages a subscription may hold for a client that does not read them.
    pub subscription_buffer: usize,
    /// How long a subscription's buffer may stay full before it ends with an error.
    #[serde(rename = "subscription_patience_ms", deserialize_with = "unit::millis")]
    pub subscription_patience: Duration,
    /// Subscriptions one WebSocket may hold open at once.
    pub subscriptions_per_socket: usize,
    /// Subscriptions one caller (token subject, else client IP) may hold open at once over
    /// all its WebSockets to one process.
    pub subscriptions_per_subject: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            rate_limit_per_second: 50,
            rate_limit_burst: 100,
            body_limit: 256 * 1024,
            timeout: Duration::from_secs(10),
            consistency_max_wait: Duration::from_secs(5),
            subscription_buffer: 256,
            subscription_patience: Duration::from_secs(5),
            subscriptions_per_socket: 20,
            subscriptions_per_subject: 100,
        }
    }
}

/// Bearer tokens.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// HS256 shared secret for bearer tokens; wins over the RS256 keys when both are set.
    pub jwt_secret: Option<SecretString>,
    /// RS256 public key (PEM) that verifies bearer tokens.
    pub jwt_public_key: Option<String>,
    /// RS256 private key (PEM); only `orderly token` reads it, to sign tokens.
    pub jwt_private_key: Option<SecretString>,
    /// Required `iss` claim, when set.
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    pub jwt_audience: Option<String>,
}

/// placeOrder.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OrderSettings {
    /// How old the product states that price a placement may be (zero: read every time).
    #[serde(rename = "price_max_age_ms", deserialize_with = "unit::millis")]
    pub price_max_age: Duration,
    /// Key of the HMAC that turns a placeOrder idempotency key into the order's id, shared by
    /// every process placing orders; unset: derived from `jwt_secret`, else ids stay public.
    pub order_id_secret: Option<SecretString>,
}

impl Default for OrderSettings {
    fn default() -> Self {
        Self {
            price_max_age: orderly_command_api::DEFAULT_PRICE_MAX_AGE,
            order_id_secret: None,
        }
    }
}

/// The payment gateway, and the saga's patience with it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PaymentSettings {
    #[serde(rename = "payment_gateway")]
    pub gateway: PaymentGatewayKind,
    /// Base URL of the external payment provider; read when `gateway` is `http`.
    #[serde(rename = "payment_gateway_url")]
    pub gateway_url: Option<MaskedUrl>,
    /// Longest one gateway call may take before it counts as failed.
    #[serde(rename = "payment_timeout_ms", deserialize_with = "unit::millis")]
    pub timeout: Duration,
    /// Gateway calls in flight at once, over all orders.
    #[serde(rename = "payment_concurrency")]
    pub concurrency: usize,
    /// How long an order may stay unpaid after its first charge request.
    #[serde(rename = "payment_deadline_secs", deserialize_with = "unit::secs")]
    pub deadline: Duration,
    /// How long after a call the provider may still be finishing a charge with its key: the
    /// saga asks about an unknown outcome only once this long has passed since the call
    /// failed, since an answer of "no such charge" sooner may be overtaken by the charge.
    #[serde(rename = "payment_settle_secs", deserialize_with = "unit::secs")]
    pub settle: Duration,
    /// How long after a transient payment failure the saga asks for another attempt.
    #[serde(rename = "payment_retry_after_secs", deserialize_with = "unit::secs")]
    pub retry_after: Duration,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        Self {
            gateway: PaymentGatewayKind::Simulator,
            gateway_url: None,
            timeout: Duration::from_secs(5),
            concurrency: 16,
            deadline: Duration::from_secs(15 * 60),
            settle: Duration::from_secs(120),
            retry_after: Duration::from_secs(30),
        }
    }
}

/// The fulfilment saga and its outbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SagaSettings {
    /// How often the saga runner checks for due deadlines and the outbox for work.
    #[serde(rename = "saga_tick_ms", deserialize_with = "unit::millis")]
    pub tick: Duration,
    /// Delivery attempts of an outbox message before it is dead-lettered.
    pub outbox_max_attempts: u32,
    /// How long delivered outbox messages and settled sagas are kept; `None` (0 days in the
    /// file or the environment) keeps them forever.
    #[serde(
        rename = "saga_retention_days",
        deserialize_with = "unit::days_or_forever"
    )]
    pub retention: Option<Duration>,
    /// How long a saga process's lane leases hold without renewal: a crashed process's lanes
    /// move to the others after this long.
    #[serde(rename = "saga_lease_ms", deserialize_with = "unit::millis")]
    pub lease: Duration,
    /// Orders one saga lane handles at once within a batch.
    #[serde(rename = "saga_orders_in_flight")]
    pub orders_in_flight: usize,
    /// Connections of the saga runner's own pool, and as many for its event-store commands
    /// (which write as many rounds of appends at once): several saga processes must fit in the
    /// server's `max_connections` beside the APIs.
    #[serde(rename = "saga_pool_size")]
    pub pool_size: usize,
    /// How long after sending its reservations the saga waits for the products to answer
    /// before it reads their answers itself, and cancels an order that has none; also how
    /// long after a cancelled or shipped order's saga is left waiting it reads again what it
    /// waits for (then after waits that double each time).
    #[serde(rename = "saga_stock_deadline_secs", deserialize_with = "unit::secs")]
    pub stock_deadline: Duration,
}

impl Default for SagaSettings {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            outbox_max_attempts: orderly_command_api::saga::DEFAULT_OUTBOX_MAX_ATTEMPTS,
            retention: Some(Duration::from_secs(7 * unit::SECONDS_PER_DAY)),
            lease: Duration::from_secs(5),
            orders_in_flight: 32,
            pool_size: 8,
            stock_deadline: Duration::from_secs(5 * 60),
        }
    }
}

/// Customer notifications.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MailSettings {
    /// SMTP server (`smtp://`, `smtps://`, `?tls=required`); unset: notifications are only
    /// logged.
    pub smtp_url: Option<MaskedUrl>,
    /// The sender of notification mail.
    #[serde(rename = "smtp_from")]
    pub from: String,
    /// A notification's recipient, `{customer_id}` replaced by the order's customer id.
    #[serde(rename = "smtp_recipient")]
    pub recipient: String,
}

impl Default for MailSettings {
    fn default() -> Self {
        Self {
            smtp_url: None,
            from: "Orderly <orderly@localhost>".to_owned(),
            recipient: "{customer_id}".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentGatewayKind {
    /// In-process simulator (tokens tok_ok, tok_declined, tok_unavailable, tok_slow).
    Simulator,
    /// An external provider over HTTP at `payment_gateway_url`.
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStoreKind {
    Postgres,
    Kurrentdb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

impl Settings {
    /// Defaults < `file` (when given) < `ORDERLY_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // Every `ORDERLY_*` variable is offered; those that name no setting (`ORDERLY_CONFIG`,
        // the test suite's) are ignored as unknown keys.
        let figment = figment.merge(EnvText(Env::prefixed("ORDERLY_")));
        // Section by section from the same keys, rather than one struct of flattened
        // sections: serde's flattening loses the key's name, which an error must give.
        // Lossy: numbers and switches are read from the environment's text.
        Ok(Self {
            store: figment.extract_lossy()?,
            telemetry: figment.extract_lossy()?,
            http: figment.extract_lossy()?,
            auth: figment.extract_lossy()?,
            orders: figment.extract_lossy()?,
            payment: figment.extract_lossy()?,
            saga: figment.extract_lossy()?,
            mail: figment.extract_lossy()?,
        })
    }

    /// Defaults, with the read models and the log in the database at `url`.
    pub fn with_database(url: impl Into<String>) -> Self {
        let mut settings = Self::default();
        settings.store.database_url = MaskedUrl(url.into());
        settings
    }
}

/// `ORDERLY_*` variables as the text they hold. figment's `Env` reads each value as data
/// first, so a secret made of digits became a number no text setting takes (the start failed
/// with an error that quoted it) and a leading zero would have been lost; settings that are
/// numbers or switches are read from the text instead (`extract_lossy`).
struct EnvText(Env);

impl Provider for EnvText {
    fn metadata(&self) -> Metadata {
        self.0.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let dict = self
            .0
            .iter()
            .map(|(key, value)| (key.as_str().to_owned(), Value::from(value)))
            .collect();
        Ok(Map::from([(Profile::Default, dict)]))
    }
}

/// A URL that may carry a password (a database, a mail server): `Debug` shows it with the
/// password masked, and a string that is not a URL not at all, since it may be a key=value
/// connection string with a password in it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct MaskedUrl(String);

impl MaskedUrl {
    /// The URL itself, password included: for connecting, never for logging.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for MaskedUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl From<String> for MaskedUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl fmt::Debug for MaskedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// The URL with any password replaced, in its user part and in query parameters whose names
/// suggest a secret (`?password=`, as PostgreSQL takes it, or an `api_key`); a string that is
/// not a URL is hidden whole, since it may be a key=value connection string with a password
/// in it.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            let secret = |key: &str| {
                let key = key.to_ascii_lowercase();
                ["pass", "secret", "token", "key", "auth", "sig", "cred"]
                    .iter()
                    .any(|word| key.contains(word))
            };
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(key, value)| {
                    let value = if secret(&key) { "***".into() } else { value };
                    (key.into_owned(), value.into_owned())
                })
                .collect();
            if !pairs.is_empty() {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "<unparsed connection string>".to_owned(),
    }
}

/// Durations are whole numbers of one unit in the file and the environment, as their names say.
mod unit {
    use super::*;

    pub const SECONDS_PER_DAY: u64 = 24 * 3600;

    pub fn millis<'de, D: Deserializer<'de>>(from: D) -> Result<Duration, D::Error> {
        u64::deserialize(from).map(Duration::from_millis)
    }

    pub fn secs<'de, D: Deserializer<'de>>(from: D) -> Result<Duration, D::Error> {
        u64::deserialize(from).map(Duration::from_secs)
    }

    /// Whole days; 0 is "forever".
    pub fn days_or_forever<'de, D: Deserializer<'de>>(
        from: D,
    ) -> Result<Option<Duration>, D::Error> {
        let days = u64::deserialize(from)?;
        Ok((days > 0).then(|| Duration::from_secs(days.saturating_mul(SECONDS_PER_DAY))))
    }
}

#[cfg(test)]
// figment's test jail prescribes closures returning its (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_secrets_never_reach_the_logs() {
        let mut s = Settings::with_database("postgres://app:hunter2@db:5432/orderly");
        s.auth.jwt_secret = Some("jwt-hunter3".into());
        s.auth.jwt_private_key = Some("-----BEGIN PRIVATE KEY-----hunter4".into());
        s.mail.smtp_url = Some("smtps://mailer:hunter5@mail.example:465".into());
        s.orders.order_id_secret = Some("hunter6".into());
        s.store.kurrentdb_url = Some("esdb://admin:hunter7@kurrent:2113".into());
        s.payment.gateway_url = Some("host=db password=hunter8".into());
        s.telemetry.otlp_endpoint = Some("http://collector:4317/?api_key=hunter10".into());
        let shown = format!("{s:?}");
        let query =
            Settings::with_database("postgres://app@db/orderly?password=hunter9&sslmode=require");
        let query = format!("{query:?}");
        assert!(!query.contains("hunter9"), "{query}");
        assert!(query.contains("sslmode=require"), "{query}");
        assert!(!shown.contains("hunter10"), "{shown}");
        for secret in [
            "hunter2", "hunter3", "hunter4", "hunter5", "hunter6", "hunter7",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(!shown.contains("hunter8"), "{shown}");
        assert!(shown.contains("app:***@db"), "{shown}");
        assert!(shown.contains("<unparsed connection string>"), "{shown}");
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "orderly.toml",
                "http_addr = \"0.0.0.0:9000\"\nlog_format = \"json\"\nsaga_lease_ms = 250\n\
                 payment_deadline_secs = 60\nsaga_retention_days = 0\n",
            )?;
            jail.set_env("ORDERLY_LOG_FORMAT", "text");
            jail.set_env("ORDERLY_ORDER_ID_SECRET", "s3cret");
            // Text settings hold the text as it is, digits and all.
            jail.set_env("ORDERLY_JWT_SECRET", "00123456789012345678901234567890");
            jail.set_env("ORDERLY_JWT_AUDIENCE", "42");
            jail.set_env("ORDERLY_GRAPHQL_TIMEOUT_MS", "750");
            jail.set_env("ORDERLY_SAGA_STOCK_DEADLINE_SECS", "90");
            jail.set_env("ORDERLY_PAYMENT_SETTLE_SECS", "10");
            jail.set_env("ORDERLY_CONFIG", "orderly.toml");
            let s = Settings::load(Some(Path::new("orderly.toml"))).map_err(|e| *e)?;
            let secret = s.orders.order_id_secret.as_ref().map(|s| s.expose_secret());
            assert_eq!(secret, Some("s3cret"));
            let jwt = s.auth.jwt_secret.as_ref().map(|s| s.expose_secret());
            assert_eq!(jwt, Some("00123456789012345678901234567890"));
            assert_eq!(s.auth.jwt_audience.as_deref(), Some("42"));
            assert_eq!(s.http.addr, "0.0.0.0:9000".parse().unwrap());
            assert_eq!(s.telemetry.log_format, LogFormat::Text);
            assert_eq!(s.http.timeout, Duration::from_millis(750));
            assert_eq!(s.saga.lease, Duration::from_millis(250));
            assert_eq!(s.payment.deadline, Duration::from_secs(60));
            assert_eq!(s.saga.stock_deadline, Duration::from_secs(90));
            assert_eq!(s.payment.settle, Duration::from_secs(10));
            assert_eq!(s.saga.retention, None, "0 days keeps forever");
            // Untouched: the defaults.
            assert_eq!(s.store.kind, EventStoreKind::Postgres);
            assert_eq!(s.saga.tick, Duration::from_secs(1));
            assert_eq!(s.mail.recipient, "{customer_id}");
            Ok(())
        });
    }

    #[test]
    fn with_no_file_and_no_environment_the_defaults_hold() {
        figment::Jail::expect_with(|_| {
            let loaded = format!("{:?}", Settings::load(None).map_err(|e| *e)?);
            assert_eq!(loaded, format!("{:?}", Settings::default()));
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
        figment::Jail::expect_with(|jail| {
            jail.set_env("ORDERLY_SAGA_LEASE_MS", "soon");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(
                err.contains("soon") && err.contains("SAGA_LEASE_MS"),
                "{err}"
            );
            Ok(())
        });
    }
}
