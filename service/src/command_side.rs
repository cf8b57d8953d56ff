//! The command side's operator commands: the saga's lanes, its parked events and its outbox
//! dead letters (list, retry, skip).

use std::sync::Arc;

use orderly_command_api::Handler;
use orderly_command_api::saga::SagaConfig;
use orderly_command_api::saga::maintenance::{self, OutboxState};
pub use orderly_command_api::saga::maintenance::{ParkedOf, SettledElsewhere};
use orderly_event_store::EventStore;
use orderly_event_store::postgres::PgConfig;
use uuid::Uuid;

use crate::read_side::connect;

/// The actor of what an operator records from the command line.
const OPERATOR: &str = "operator:cli";

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

/// `orderly saga outbox skip ID --refunded-elsewhere | --not-charged`: what the operator found
/// recorded in the payment's stream of `store`, then the message skipped.
pub async fn skip_settled_elsewhere(
    pg_config: &PgConfig,
    store: Arc<dyn EventStore>,
    id: Uuid,
    settled: SettledElsewhere,
) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    let handler = Handler::new(store);
    maintenance::skip_settled_elsewhere(&client, &handler, id, settled, OPERATOR).await?;
    let found = match settled {
        SettledElsewhere::Refunded => "refund recorded as made outside Orderly",
        SettledElsewhere::NotCharged => "no charge at the provider recorded",
    };
    println!(
        "outbox message {id} skipped, {found}; the order's saga settles when a running saga \
         runner reads it"
    );
    Ok(())
}

/// `orderly saga status`: who holds which lane, where each lane stands, what is parked.
pub async fn print_saga_status(pg_config: &PgConfig) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    let saga = SagaConfig::default().name;
    let lanes = maintenance::lanes(&client, &saga).await?;
    if lanes.is_empty() {
        println!("saga {saga} has not run yet");
    }
    for lane in &lanes {
        let behind = match lane.behind_seconds {
            Some(Some(seconds)) => format!("oldest unhandled {seconds:.1}s old"),
            Some(None) => "caught up".to_owned(),
            None => "lag unknown (the log is not in this database)".to_owned(),
        };
        println!(
            "lane {:>2}  {:<40} generation {:>4}  checkpoint {}  {}",
            lane.lane,
            lane.owner.as_deref().unwrap_or("(free)"),
            lane.generation,
            lane.checkpoint,
            behind
        );
    }
    let parked = maintenance::parked(&client, &saga).await?;
    println!(
        "{} parked event(s){}",
        parked.len(),
        if parked.is_empty() {
            ""
        } else {
            ": see `orderly saga parked list`"
        }
    );
    let overdue = maintenance::overdue(&client, &saga).await?;
    print!(
        "{} deadline(s) overdue by more than {} s",
        overdue.count,
        maintenance::OVERDUE_AFTER.as_secs()
    );
    match overdue.oldest {
        Some((order_id, due_at)) => println!(
            "; the oldest, order {order_id}, was due {}: its lane's ticks fail for it (the \
             saga's log names the order and the error) or no process serves its lane",
            due_at.to_rfc3339()
        ),
        None => println!(),
    }
    Ok(())
}

/// `orderly saga parked list`.
pub async fn print_parked(pg_config: &PgConfig) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    let parked = maintenance::parked(&client, &SagaConfig::default().name).await?;
    if parked.is_empty() {
        println!("no parked saga events");
    }
    for p in parked {
        println!(
            "{} {} {} order {} parked {} after {} attempt(s){}\n  {}",
            p.event_id,
            p.event_type,
            p.stream,
            p.order_id
                .map_or_else(|| "-".to_owned(), |id| id.to_string()),
            p.parked_at.to_rfc3339(),
            p.attempts,
            if p.retry_requested_at.is_some() {
                ", retry requested"
            } else {
                ""
            },
            p.error
        );
    }
    Ok(())
}

/// `orderly saga parked retry`: the lane that owns the events feeds them again.
pub async fn retry_parked(pg_config: &PgConfig, which: ParkedOf) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    let count = maintenance::retry_parked(&client, &SagaConfig::default().name, which).await?;
    println!(
        "{} queued for a retry: the lane that owns it, in a running saga runner, feeds it again",
        parked_of(which, count)
    );
    Ok(())
}

/// `orderly saga parked skip`.
pub async fn skip_parked(pg_config: &PgConfig, which: ParkedOf) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    let count = maintenance::skip_parked(&client, &SagaConfig::default().name, which).await?;
    println!("{} skipped", parked_of(which, count));
    Ok(())
}

/// What an operator's retry or skip acted on, in words ("it" reads for either).
fn parked_of(which: ParkedOf, count: u64) -> String {
    match which {
        ParkedOf::Event(id) => format!("parked event {id}"),
        ParkedOf::Order(id) => format!("{count} parked event(s) of order {id}: each"),
    }
}
