//! Logs and traces. Logs: JSON lines for machines or readable text for terminals, `RUST_LOG`
//! picking the levels (default `info`); a JSON line carries the fields of the spans it was
//! written in (request id, trace id, command, correlation and causation ids). Traces: every
//! span also goes to OpenTelemetry, exported over OTLP/gRPC when an endpoint is set. Spans get
//! trace ids even without one, so logs and the `traceparent` stored in events always have them.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::LogFormat;

/// Keeps the tracer alive; [`Telemetry::shutdown`] sends the spans still buffered.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports what is buffered now (tests; a process about to stop).
    pub fn flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::debug!(%error, "trace flush failed");
        }
    }

    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::debug!(%error, "tracer shutdown failed");
        }
    }
}

/// Installs the process-wide subscriber. Must run inside a tokio runtime when `otlp_endpoint`
/// is set: the gRPC channel is bound to it. A second call (tests start several apps in one
/// process) keeps the first subscriber.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let mut provider = SdkTracerProvider::builder().with_resource(resource());
    if let Some(endpoint) = otlp_endpoint {
        let exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let tracer = provider.tracer("orderly");
    let traces = tracing_opentelemetry::layer().with_tracer(tracer);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(no_statement_parameters())
        .with(logs)
        .with(traces)
        .try_init();
    Ok(Telemetry { provider })
}

/// Drops tokio-postgres's debug lines that print a statement's parameters, whatever
/// `RUST_LOG` says: they hold payment tokens, addresses and customer ids, which must not reach
/// a log at any level. Its warnings and errors, and its other debug lines, still pass.
fn no_statement_parameters() -> FilterFn<fn(&Metadata<'_>) -> bool> {
    fn keeps(metadata: &Metadata<'_>) -> bool {
        // `Level` orders by verbosity: DEBUG and TRACE are above INFO.
        !(metadata.target() == "tokio_postgres::query" && *metadata.level() > Level::INFO)
    }
    FilterFn::new(keeps)
}

/// `service.name` from `OTEL_SERVICE_NAME` (the deploy files name each role), else `orderly`.
fn resource() -> Resource {
    let builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name("orderly").build()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn statement_parameters_never_reach_the_log_even_at_trace() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("trace"))
            .with(no_statement_parameters())
            .with(tracing_subscriber::fmt::layer().with_writer(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            // What tokio-postgres logs (through the `log` bridge, with its module as target)
            // for every statement it executes.
            tracing::debug!(
                target: "tokio_postgres::query",
                "executing statement s3 with parameters: [\"tok_4242_secret\"]"
            );
            tracing::trace!(target: "tokio_postgres::query", "tok_4242_secret again");
            tracing::warn!(target: "tokio_postgres::query", "a warning still passes");
            tracing::debug!(target: "tokio_postgres::prepare", "preparing query s3");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("tok_4242_secret"), "{text}");
        assert!(text.contains("a warning still passes"), "{text}");
        assert!(text.contains("preparing query s3"), "{text}");
    }
}
