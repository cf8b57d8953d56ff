//! Whether the log may hold orders named the public way, which a keyed placement must look
//! for before it places anew (a retry of such an order is answered from it).
//!
//! The answer lives in `order_id_scheme` (migration V5): written once, by the first keyed
//! placement that asks, from whether the log held any order stream then; set to "possible" by
//! a process that places public ids (no secret) before its first such placement. Each
//! process asks once and keeps the answer. Every way of being wrong here is conservative but
//! one: a process placing public ids that starts *after* keyed processes read "not possible"
//! is not seen by them until they restart, which is why every process placing orders must
//! share the secret (README, `ORDERLY_ORDER_ID_SECRET`).

use std::sync::Arc;

use deadpool_postgres::Pool;
use orderly_event_store::{EventFilter, EventStore, Position};
use tokio::sync::OnceCell;

use crate::CommandError;

const READ: &str = "select public_ids_possible from order_id_scheme";

/// The first answer wins; a concurrent first placement of another process reads it back.
const RECORD: &str = "
insert into order_id_scheme (public_ids_possible) values ($1)
on conflict (one_row) do nothing";

const NOTE_PUBLIC: &str = "
insert into order_id_scheme (public_ids_possible) values (true)
on conflict (one_row) do update set public_ids_possible = true, recorded_at = now()
where not order_id_scheme.public_ids_possible";

/// This process's view of the record. Cheap to clone; clones share what was learnt.
#[derive(Clone)]
pub struct OrderIdScheme {
    pool: Pool,
    possible: Arc<OnceCell<bool>>,
    noted: Arc<OnceCell<()>>,
}

impl OrderIdScheme {
    /// The record in the command side's database behind `pool`.
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            possible: Arc::new(OnceCell::new()),
            noted: Arc::new(OnceCell::new()),
        }
    }

    /// Whether publicly named orders may be in `store`'s log; the first call of a log writes
    /// the answer. A failure is not kept: the next placement asks again.
    pub(crate) async fn public_ids_possible(
        &self,
        store: &dyn EventStore,
    ) -> Result<bool, CommandError> {
        self.possible
            .get_or_try_init(|| async {
                let client = self.pool.get().await?;
                if let Some(row) = client.query_opt(READ, &[]).await? {
                    return Ok(row.get(0));
                }
                let orders = EventFilter::Category(orderly_domain::streams::ORDER_CATEGORY.into());
                let any = store.read_all(Position::START, &orders, 1).await?;
                client.execute(RECORD, &[&!any.is_empty()]).await?;
                Ok(client.query_one(READ, &[]).await?.get(0))
            })
            .await
            .copied()
    }

    /// Records that this process places publicly named orders, before its first one.
    pub(crate) async fn note_public_ids(&self) -> Result<(), CommandError> {
        self.noted
            .get_or_try_init(|| async {
                let client = self.pool.get().await?;
                client.execute(NOTE_PUBLIC, &[]).await?;
                Ok::<(), CommandError>(())
            })
            .await
            .copied()
    }
}
