//! placeOrder idempotency keys, scoped per customer, in PostgreSQL.
//!
//! Insert-first: the row is claimed before the command runs, so of two concurrent calls with
//! one key exactly one owns it. The other does not wait for the owner: it runs the same command
//! with the same order id and event ids (both derived from the key), and the event store's
//! event-id check writes them once. Whoever did not write answers `replayed: true`.

use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::CommandError;

/// The first answer to a keyed placeOrder, as stored and replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResult {
    pub id: String,
    pub version: u64,
    /// The consistency token's text (`Position`'s Display).
    pub token: String,
    pub events: Vec<String>,
}

/// What a call with a key finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This call inserted the key: it runs the command.
    Owned,
    /// The key was used before and its command finished: answer this.
    Done(StoredResult),
    /// The key was claimed but has no result yet (in flight, or its caller crashed): run the
    /// same command; the store's event-id check keeps it from being applied twice.
    Pending,
}

const CLAIM: &str = "
insert into idempotency_keys (customer_id, idempotency_key, request_fingerprint, order_id)
values ($1, $2, $3, $4)
on conflict do nothing";

const LOOK_UP: &str = "
select request_fingerprint, command_result from idempotency_keys
where customer_id = $1 and idempotency_key = $2";

const COMPLETE: &str = "
update idempotency_keys set command_result = $3
where customer_id = $1 and idempotency_key = $2 and command_result is null";

const RELEASE: &str = "
delete from idempotency_keys
where customer_id = $1 and idempotency_key = $2 and command_result is null";

#[derive(Clone)]
pub struct IdempotencyKeys {
    pool: Pool,
}

impl IdempotencyKeys {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Claims `key` for `customer`; `fingerprint` identifies the request, so a key reused for
    /// a different request is refused instead of silently answering the old one.
    pub async fn claim(
        &self,
        customer: &str,
        key: &str,
        fingerprint: Uuid,
        order_id: Uuid,
    ) -> Result<Claim, CommandError> {
        let client = self.pool.get().await?;
        let inserted = client
            .execute(CLAIM, &[&customer, &key, &fingerprint, &order_id])
            .await?;
        if inserted == 1 {
            return Ok(Claim::Owned);
        }
        let row = client.query_one(LOOK_UP, &[&customer, &key]).await?;
        let stored: Uuid = row.get(0);
        if stored != fingerprint {
            return Err(CommandError::invalid(
                "input.idempotencyKey",
                "was already used for a different request",
            ));
        }
        let result: Option<serde_json::Value> = row.get(1);
        match result {
            None => Ok(Claim::Pending),
            Some(value) => serde_json::from_value(value)
                .map(Claim::Done)
                .map_err(|e| CommandError::Internal(format!("stored command result: {e}"))),
        }
    }

    pub async fn complete(
        &self,
        customer: &str,
        key: &str,
        result: &StoredResult,
    ) -> Result<(), CommandError> {
        let value =
            serde_json::to_value(result).map_err(|e| CommandError::Internal(e.to_string()))?;
        let client = self.pool.get().await?;
        client.execute(COMPLETE, &[&customer, &key, &value]).await?;
        Ok(())
    }

    /// Gives the key back after a command that failed for good (bad input, a rejection), so
    /// the customer may correct the request and send it with the same key.
    pub async fn release(&self, customer: &str, key: &str) -> Result<(), CommandError> {
        let client = self.pool.get().await?;
        client.execute(RELEASE, &[&customer, &key]).await?;
        Ok(())
    }
}
