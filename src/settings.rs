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
    /// OTLP/gRPC collector for traces (`http://jaeger:4317`); none exported when unset.
    pub otlp_endpoint: Option<String>,
    /// Connections the event store may hold open.
    pub db_pool_size: usize,
    /// HS256 shared secret for bearer tokens; wins over the RS256 keys when both are set.
    pub jwt_secret: Option<String>,
    /// RS256 public key (PEM) that verifies bearer tokens.
    pub jwt_public_key: Option<String>,
    /// RS256 private key (PEM); only `orderly token` reads it, to sign tokens.
    pub jwt_private_key: Option<String>,
    /// Required `iss` claim, when set.
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    pub jwt_audience: Option<String>,
    /// Requests per second per caller (token subject, else client IP); 0 turns limiting off.
    pub rate_limit_per_second: u32,
    /// Requests a caller may send at once before the per-second rate applies.
    pub rate_limit_burst: u32,
    /// Largest GraphQL request body, in bytes.
    pub graphql_body_limit: usize,
    /// Longest a GraphQL request may run, in milliseconds.
    pub graphql_timeout_ms: u64,
    pub payment_gateway: PaymentGatewayKind,
    /// Base URL of the external payment provider; read when `payment_gateway` is `http`.
    pub payment_gateway_url: Option<String>,
    /// Longest one gateway call may take, in milliseconds, before it counts as failed.
    pub payment_timeout_ms: u64,
    /// Gateway calls in flight at once, over all orders.
    pub payment_concurrency: usize,
    /// How long an order may stay unpaid after its first charge request, in seconds.
    pub payment_deadline_secs: u64,
    /// How long after a transient payment failure the saga asks for another attempt, in seconds.
    pub payment_retry_after_secs: u64,
    /// How often the saga runner checks for due deadlines and the outbox for work, in ms.
    pub saga_tick_ms: u64,
    /// Delivery attempts of an outbox message before it is dead-lettered.
    pub outbox_max_attempts: u32,
    /// How old, in ms, the product states that price a placement may be (0: read every time).
    pub price_max_age_ms: u64,
    /// The server's cap on a query's `consistency.timeoutMs`, in milliseconds.
    pub consistency_max_wait_ms: u64,
    /// Messages a subscription may hold for a client that does not read them.
    pub subscription_buffer: usize,
    /// How long, in ms, a subscription's buffer may stay full before it ends with an error.
    pub subscription_patience_ms: u64,
    /// Subscriptions one WebSocket may hold open at once.
    pub subscriptions_per_socket: usize,
    /// Subscriptions one caller (token subject, else client IP) may hold open at once over
    /// all its WebSockets to one process.
    pub subscriptions_per_subject: usize,
    /// SMTP server for customer notifications (`smtp://`, `smtps://`, `?tls=required`);
    /// unset: notifications are only logged.
    pub smtp_url: Option<String>,
    /// The sender of notification mail.
    pub smtp_from: String,
    /// A notification's recipient, `{customer_id}` replaced by the order's customer id.
    pub smtp_recipient: String,
    /// Days delivered outbox messages and settled sagas are kept; 0 keeps them forever.
    pub saga_retention_days: u32,
    /// How long, in ms, a saga process's lane leases hold without renewal: a crashed
    /// process's lanes move to the others after this long.
    pub saga_lease_ms: u64,
    /// Orders one saga lane handles at once within a batch.
    pub saga_orders_in_flight: usize,
    /// Connections of the saga runner's own pool, and as many for its event-store commands:
    /// several saga processes must fit in the server's `max_connections` beside the APIs.
    pub saga_pool_size: usize,
    /// Key of the HMAC that turns a placeOrder idempotency key into the order's id, shared by
    /// every process placing orders; unset: derived from `jwt_secret`, else ids stay public.
    pub order_id_secret: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentGatewayKind {
    /// In-process simulator (tokens tok_ok, tok_declined, tok_unavailable, tok_slow).
    Simulator,
    /// An external provider over HTTP at `payment_gateway_url`.
    Http,
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
            otlp_endpoint: None,
            db_pool_size: 16,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_private_key: None,
            jwt_issuer: None,
            jwt_audience: None,
            rate_limit_per_second: 50,
            rate_limit_burst: 100,
            graphql_body_limit: 256 * 1024,
            graphql_timeout_ms: 10_000,
            payment_gateway: PaymentGatewayKind::Simulator,
            payment_gateway_url: None,
            payment_timeout_ms: 5_000,
            payment_concurrency: 16,
            payment_deadline_secs: 15 * 60,
            payment_retry_after_secs: 30,
            saga_tick_ms: 1_000,
            outbox_max_attempts: 5,
            price_max_age_ms: orderly_command_api::DEFAULT_PRICE_MAX_AGE.as_millis() as u64,
            consistency_max_wait_ms: 5_000,
            subscription_buffer: 256,
            subscription_patience_ms: 5_000,
            subscriptions_per_socket: 20,
            subscriptions_per_subject: 100,
            smtp_url: None,
            smtp_from: "Orderly <orderly@localhost>".to_owned(),
            smtp_recipient: "{customer_id}".to_owned(),
            saga_retention_days: 7,
            saga_lease_ms: 5_000,
            saga_orders_in_flight: 32,
            saga_pool_size: 8,
            order_id_secret: None,
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
    const KEYS: [&'static str; 38] = [
        "database_url",
        "event_store",
        "kurrentdb_url",
        "http_addr",
        "log_format",
        "otlp_endpoint",
        "db_pool_size",
        "jwt_secret",
        "jwt_public_key",
        "jwt_private_key",
        "jwt_issuer",
        "jwt_audience",
        "rate_limit_per_second",
        "rate_limit_burst",
        "graphql_body_limit",
        "graphql_timeout_ms",
        "payment_gateway",
        "payment_gateway_url",
        "payment_timeout_ms",
        "payment_concurrency",
        "payment_deadline_secs",
        "payment_retry_after_secs",
        "saga_tick_ms",
        "outbox_max_attempts",
        "price_max_age_ms",
        "consistency_max_wait_ms",
        "subscription_buffer",
        "subscription_patience_ms",
        "subscriptions_per_socket",
        "subscriptions_per_subject",
        "smtp_url",
        "smtp_from",
        "smtp_recipient",
        "saga_retention_days",
        "saga_lease_ms",
        "saga_orders_in_flight",
        "saga_pool_size",
        "order_id_secret",
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
            .field(
                "otlp_endpoint",
                &self.otlp_endpoint.as_deref().map(redact_url),
            )
            .field("db_pool_size", &self.db_pool_size)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "***"))
            .field(
                "jwt_public_key",
                &self.jwt_public_key.as_ref().map(|_| "<set>"),
            )
            .field(
                "jwt_private_key",
                &self.jwt_private_key.as_ref().map(|_| "***"),
            )
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("rate_limit_per_second", &self.rate_limit_per_second)
            .field("rate_limit_burst", &self.rate_limit_burst)
            .field("graphql_body_limit", &self.graphql_body_limit)
            .field("graphql_timeout_ms", &self.graphql_timeout_ms)
            .field("payment_gateway", &self.payment_gateway)
            .field(
                "payment_gateway_url",
                &self.payment_gateway_url.as_deref().map(redact_url),
            )
            .field("payment_timeout_ms", &self.payment_timeout_ms)
            .field("payment_concurrency", &self.payment_concurrency)
            .field("payment_deadline_secs", &self.payment_deadline_secs)
            .field("payment_retry_after_secs", &self.payment_retry_after_secs)
            .field("saga_tick_ms", &self.saga_tick_ms)
            .field("outbox_max_attempts", &self.outbox_max_attempts)
            .field("price_max_age_ms", &self.price_max_age_ms)
            .field("consistency_max_wait_ms", &self.consistency_max_wait_ms)
            .field("subscription_buffer", &self.subscription_buffer)
            .field("subscription_patience_ms", &self.subscription_patience_ms)
            .field("subscriptions_per_socket", &self.subscriptions_per_socket)
            .field("subscriptions_per_subject", &self.subscriptions_per_subject)
            .field("smtp_url", &self.smtp_url.as_deref().map(redact_url))
            .field("smtp_from", &self.smtp_from)
            .field("smtp_recipient", &self.smtp_recipient)
            .field("saga_retention_days", &self.saga_retention_days)
            .field("saga_lease_ms", &self.saga_lease_ms)
            .field("saga_orders_in_flight", &self.saga_orders_in_flight)
            .field("saga_pool_size", &self.saga_pool_size)
            .field(
                "order_id_secret",
                &self.order_id_secret.as_ref().map(|_| "***"),
            )
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
        let s = Settings {
            jwt_secret: Some("jwt-hunter3".into()),
            jwt_private_key: Some("-----BEGIN PRIVATE KEY-----hunter4".into()),
            smtp_url: Some("smtps://mailer:hunter5@mail.example:465".into()),
            order_id_secret: Some("hunter6".into()),
            ..s
        };
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter6"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("hunter3"), "{shown}");
        assert!(!shown.contains("hunter4"), "{shown}");
        assert!(!shown.contains("hunter5"), "{shown}");
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
            jail.set_env("ORDERLY_ORDER_ID_SECRET", "s3cret");
            let s = Settings::load(Some(Path::new("orderly.toml"))).map_err(|e| *e)?;
            assert_eq!(s.order_id_secret.as_deref(), Some("s3cret"));
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
