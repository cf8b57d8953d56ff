//! `orderly events tail`: follow the log in a terminal, catching up first.

use std::io::Write;

use futures::StreamExt;
use orderly_event_store::{EventFilter, EventStore, Position, RecordedEvent};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::error::ProjectionError;

#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    pub filter: EventFilter,
    /// Start strictly after this position (`Position::START`: from the beginning).
    pub from: Position,
    /// One JSON object per line, shaped like the contract's `EventRecord`.
    pub json: bool,
    /// Stop after this many events (for scripts and tests); `None` follows forever.
    pub limit: Option<u64>,
}

/// One line for an event: `position stream@version type recorded_at data`, or JSON.
pub fn format_event(event: &RecordedEvent, as_json: bool) -> String {
    if as_json {
        json!({
            "id": event.id,
            "stream": event.stream,
            "type": event.event_type,
            "version": event.version,
            "position": event.position,
            "recordedAt": event.recorded_at,
            "data": event.data,
            "metadata": event.metadata,
        })
        .to_string()
    } else {
        format!(
            "{} {}@{} {} {} {}",
            event.position,
            event.stream,
            event.version,
            event.event_type,
            event.recorded_at.to_rfc3339(),
            event.data
        )
    }
}

/// Writes every event matching `options` to `out`, one line each, until `shutdown`, the limit,
/// or an error. Returns how many were written.
pub async fn tail(
    store: &dyn EventStore,
    options: &TailOptions,
    out: &mut (dyn Write + Send),
    shutdown: CancellationToken,
) -> Result<u64, ProjectionError> {
    let mut subscription = store
        .subscribe(options.from, options.filter.clone())
        .await?;
    let mut written = 0u64;
    while options.limit.is_none_or(|limit| written < limit) {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = subscription.next() => next,
        };
        let Some(event) = next else { break };
        let line = format_event(&event?, options.json);
        // A closed pipe (`| head`) ends the tail quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
        written += 1;
    }
    Ok(written)
}
