//! W3C trace context between `tracing` spans and the `traceparent` that events carry in their
//! metadata, so that one trace covers a request, the commands and appends it causes, and the
//! projection batches and saga steps that later handle those events. Without the
//! OpenTelemetry layer installed (see the binary's `telemetry`) these do nothing.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

/// Makes the trace named by `traceparent` (`00-<trace id>-<span id>-<flags>`) the parent of
/// `span`. A malformed value is ignored: the span then starts a trace of its own.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        span.set_parent(context);
    }
}

/// Makes the trace an event was written in (its metadata's `traceparent`, when it has one)
/// the parent of `span`, which handles the event.
pub fn follow_event(span: &tracing::Span, metadata: &serde_json::Value) {
    if let Some(traceparent) = metadata.get(TRACEPARENT).and_then(|value| value.as_str()) {
        set_parent(span, traceparent);
    }
}

/// `span`'s own trace context as a `traceparent` value, for the events it writes; `None` when
/// no tracer gives it one.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The trace id of `span` in hex, for logs; `None` without a tracer.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
