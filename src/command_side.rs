//! The command side's operator commands: the saga's outbox dead letters (list, retry, skip).

use orderly_command_api::saga::maintenance::{self, OutboxState};
use orderly_event_store::postgres::PgConfig;
use uuid::Uuid;

use crate::read_side::connect;

/// `orderly saga outbox list`: dead letters waiting for an operator; with `all`, pending and
/// skipped messages too.
pub async fn print_outbox(pg_config: &PgConfig, all: bool) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    let entries = maintenance::list(&client, all).await?;
    if entries.is_empty() {
        println!(
            "{}",
            if all {
                "no undelivered outbox messages"
            } else {
                "no dead-lettered outbox messages"
            }
        );
    }
    for e in entries {
        let since = match (e.state, e.dead_lettered_at) {
            (OutboxState::Pending, _) | (_, None) => {
                format!("created {}", e.created_at.to_rfc3339())
            }
            (_, Some(at)) => format!("dead-lettered {}", at.to_rfc3339()),
        };
        println!(
            "{} {} order {} {} after {} attempts, {}\n  {}",
            e.outbox_id,
            e.kind,
            e.order_id,
            e.state.as_str(),
            e.attempts,
            since,
            e.last_error.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// `orderly saga outbox retry ID`: back in line for the running saga runner's outbox worker.
pub async fn retry_outbox(pg_config: &PgConfig, id: Uuid) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    maintenance::retry(&client, id).await?;
    println!("outbox message {id} queued again; a running saga runner delivers it");
    Ok(())
}

/// `orderly saga outbox skip ID`.
pub async fn skip_outbox(pg_config: &PgConfig, id: Uuid) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    maintenance::skip(&client, id).await?;
    println!("outbox message {id} skipped");
    Ok(())
}
