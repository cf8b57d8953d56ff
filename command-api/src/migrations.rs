//! Schema migrations for the command side, embedded in the binary (see `migrations/README.md`).

use orderly_event_store::postgres::{fingerprint, run_migrations};
use tokio_postgres::Config;

use crate::CommandError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where refinery records which command-side migrations ran.
pub const MIGRATION_TABLE: &str = "orderly_command_api_migrations";

/// Brings the command-side schema of the database `config` names up to date.
pub async fn migrate(config: &Config) -> Result<(), CommandError> {
    run_migrations(config, embedded::migrations::runner(), MIGRATION_TABLE)
        .await
        .map_err(|e| CommandError::Internal(format!("command-side migrations failed: {e}")))
}

/// Changes whenever a migration is added or edited; test templates are keyed by it.
pub fn migration_fingerprint() -> String {
    fingerprint(&embedded::migrations::runner())
}

/// A database of its own with the command side's tables (and not the event store's), for the
/// crate's unit tests.
#[cfg(test)]
pub(crate) async fn test_database() -> orderly_test_support::TestDb {
    orderly_test_support::TestDb::create(
        "command-api",
        &migration_fingerprint(),
        |url| async move { migrate(&url.parse()?).await.map_err(Into::into) },
    )
    .await
    .expect("a test database (is PostgreSQL up? see deploy/local/ensure-postgres.sh)")
}

#[cfg(test)]
mod tests {
    /// V11 makes due only the open states of orders that ended and wait for no deadline:
    /// before it, such a saga was never ticked again.
    #[tokio::test]
    async fn the_settle_check_migration_makes_only_ended_open_sagas_without_a_deadline_due() {
        let db = super::test_database().await;
        let client = db.connect().await.unwrap();
        // (state, settled, due in a day): only the first becomes due.
        let states = [
            (
                r#"{"order": {"cancelled": true, "shipped": false}}"#,
                false,
                false,
            ),
            (
                r#"{"order": {"cancelled": false, "shipped": true}}"#,
                true,
                false,
            ),
            (
                r#"{"order": {"cancelled": false, "shipped": false}}"#,
                false,
                false,
            ),
            (
                r#"{"order": {"cancelled": true, "shipped": false}}"#,
                false,
                true,
            ),
        ];
        for (state, settled, due) in states {
            client
                .execute(
                    "insert into saga_states (saga_name, order_id, state, correlation_id,
                                              settled, due_at)
                     values ('fulfilment', gen_random_uuid(), $1::text::jsonb, gen_random_uuid(),
                             $2, case when $3 then now() + interval '1 day' end)",
                    &[&state, &settled, &due],
                )
                .await
                .unwrap();
        }

        client
            .batch_execute(include_str!("../migrations/V11__settle_checks.sql"))
            .await
            .unwrap();
        let due = client
            .query_one(
                "select count(*) filter (where due_at <= now()),
                        count(*) filter (where due_at > now())
                 from saga_states",
                &[],
            )
            .await
            .unwrap();
        let (now, later): (i64, i64) = (due.get(0), due.get(1));
        assert_eq!((now, later), (1, 1));
    }
}
