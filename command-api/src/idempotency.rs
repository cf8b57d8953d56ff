//! placeOrder idempotency keys, scoped per customer, in PostgreSQL.
//!
//! Insert-first: the row is claimed before the command runs, so of two concurrent calls with
//! one key exactly one owns it. The other does not wait for the owner: it runs the same command
//! with the same order id and event ids (both derived from the key), and the event store's
//! event-id check writes them once. Whoever did not write answers `replayed: true`, with the
//! first result read back from the order's first event (so the result is not stored here:
//! the log already holds it, and a write per order is saved).

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::CommandError;

/// What a call with a key finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This call inserted the key: nobody used it before, so its order does not exist yet.
    Owned,
    /// The key was used before for the same request (finished, in flight, or its caller
    /// crashed): run the same command; the store's event-id check keeps it from being applied
    /// twice, and a finished one is answered from the log.
    Seen,
}

const CLAIM: &str = "
insert into idempotency_keys (customer_id, idempotency_key, request_fingerprint, order_id)
values ($1, $2, $3, $4)
on conflict do nothing";

const LOOK_UP: &str = "
select request_fingerprint from idempotency_keys
where customer_id = $1 and idempotency_key = $2";

const RELEASE: &str = "
delete from idempotency_keys where customer_id = $1 and idempotency_key = $2";

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
        // Prepared once per connection: a claim is on every keyed order's path.
        let claim = client.prepare_cached(CLAIM).await?;
        let inserted = client
            .execute(&claim, &[&customer, &key, &fingerprint, &order_id])
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
        Ok(Claim::Seen)
    }

    /// Gives the key back after a command that failed for good (bad input, a rejection) and
    /// wrote nothing, so the customer may correct the request and send it with the same key.
    pub async fn release(&self, customer: &str, key: &str) -> Result<(), CommandError> {
        let client = self.pool.get().await?;
        client.execute(RELEASE, &[&customer, &key]).await?;
        Ok(())
    }
}
