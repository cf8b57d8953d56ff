//! The PostgreSQL adapter, the default store: with it the whole product needs only PostgreSQL.
//!
//! - Append is one statement in its own transaction (`Statements::append` below): it reads the stream's last
//!   version, checks the expected version and inserts every event, or inserts nothing. Appends
//!   to several distinct streams at once are one statement too (`Statements::append_streams`). Two
//!   writers racing for the same version collide on the `(stream, version)` unique index; the
//!   loser's error becomes a `Conflict`. A retried append is recognised by its event ids.
//! - Log order is `(tx_id, seq)`, and readers of the whole log stop below the oldest
//!   transaction still in flight (see `migrations/README.md`), so no event is ever skipped.
//! - Wake-ups: a local append wakes this process's subscribers at once; other processes learn
//!   of it by a `NOTIFY` sent *after* the append committed, by a background task that folds
//!   bursts of appends into one notification (at most one per 2 ms, without a WAL flush wait). Keeping the `NOTIFY` out of the append
//!   transaction matters: a transaction that notifies takes a cluster-wide lock at commit and
//!   would serialize all writers. Subscribers also poll, which covers lost notifications.

mod migrations;
#[cfg(test)]
mod plans;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod,
};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{AsyncMessage, NoTls, Row};
use uuid::Uuid;

pub use tokio_postgres::Config as PgConfig;

pub use migrations::{
    LogAheadOfCluster, MIGRATION_TABLE, check_log_clock, fingerprint, migrate,
    migration_fingerprint, rebase_log, run_migrations,
};

use crate::EventStore;
use crate::error::StoreError;
use crate::idempotency::{StoredId, resolve_prior_write};
use crate::model::{
    Append, AppendResult, Direction, EventFilter, ExpectedVersion, NewEvent, Position,
    RawRecordedEvent, RecordedEvent, StreamName, validate_append,
};
use crate::subscription::{self, Page, PageSource, Subscription, SubscriptionOptions};

/// The channel other processes' subscribers listen on.
pub const NOTIFY_CHANNEL: &str = "orderly_events";

/// How `ExpectedVersion` travels as one `bigint` parameter of the append statements.
const EXPECT_ANY: i64 = -1;
const EXPECT_NO_STREAM: i64 = -2;
const EXPECT_STREAM_EXISTS: i64 = -3;

/// Appends with `Any` or `StreamExists` retry this often when a concurrent writer took the
/// version they computed; each failure means another append made progress.
const CONTENDED_APPEND_ATTEMPTS: u32 = 32;

const FIND_IDS: &str = "
select event_id, stream, version, tx_id, seq from events where event_id = any($1::uuid[])";

const STREAM_VERSION: &str = "select max(version) from events where stream = $1";

const COLUMNS: &str =
    "event_id, stream, version, tx_id, seq, event_type, data, metadata, recorded_at";

/// The horizon: every transaction with a lower id has finished, so rows below it are final.
/// On the log's clock, i.e. with its offset (see `migrations/V2__log_clock.sql`).
const HORIZON: &str = "(pg_snapshot_xmin(pg_current_snapshot())::text::bigint
    + (select tx_offset from event_log_clock))";

/// The id the next transaction of this cluster will get, on the log's clock.
const NEXT_TX_ID: &str = "(pg_snapshot_xmax(pg_current_snapshot())::text::bigint
    + (select tx_offset from event_log_clock))";

/// Makes a session's commits wait for their WAL flush where the server's default would not
/// (`synchronous_commit = off`). A position handed out (an append's consistency token, a
/// projection's published checkpoint) must name data a server crash cannot take back. A
/// stronger default (`remote_apply`, say) is kept.
pub const DURABLE_COMMITS: &str = "select set_config('synchronous_commit', 'on', false)
 where current_setting('synchronous_commit') = 'off'";

/// Refuses a new connection of the store's pool that reached a server in recovery (25006,
/// transient): the log is written on the primary, and a connection to a standby (a name a
/// failover manager has not moved yet, a URL without `target_session_attrs=read-write`) would
/// stay in the pool, every write on it refused, until the process restarted. Refused, the
/// pool connects again at the next operation and finds the primary once the name does.
const PRIMARY_ONLY: &str = "do $$ begin if pg_is_in_recovery() then
    raise exception 'the server is a standby (in recovery); the log is written on the primary'
    using errcode = 'read_only_sql_transaction'; end if; end $$";

/// Statements assembled once from the pieces above.
struct Statements {
    /// Appends to one stream: see the module docs.
    append: String,
    /// `append` for several streams at once, all distinct (two appends of one stream would
    /// both start from its last version): each append's expectation is checked against its
    /// stream, and the events of those that hold are inserted in the order sent (the select
    /// has an `order by`, so it is planned below the insert, whose `seq` default is drawn row
    /// by row as the sorted rows arrive). A refused append inserts nothing and leaves the
    /// others; a unique violation (a writer elsewhere took a version, an id reused) fails them
    /// all.
    append_streams: String,
    read_stream_forwards: String,
    read_stream_backwards: String,
    read_streams: String,
    read_all: String,
    read_category: String,
    read_one_stream: String,
    held_back: String,
    head: String,
}

static SQL: LazyLock<Statements> = LazyLock::new(|| {
    // Whether an append's expectation (`expected`, coded as `expected_code` does) holds for
    // its stream's last version `last` (null: no stream).
    let holds = |expected: &str, last: &str| {
        format!(
            "case {expected}
                 when {EXPECT_ANY} then true
                 when {EXPECT_NO_STREAM} then {last} is null
                 when {EXPECT_STREAM_EXISTS} then {last} is not null
                 else {last} = {expected}
             end"
        )
    };
    // `extra` narrows a page of the whole log to a category or a stream (parameter `$4`).
    let page = |extra: &str| {
        format!(
            "select {COLUMNS} from events
             where (tx_id, seq) > ($1, $2) and tx_id < {HORIZON} {extra}
             order by tx_id, seq limit $3"
        )
    };
    Statements {
        append: format!(
            "with cur as (
                 select max(version) as v from events where stream = $1
             ), ins as (
                 insert into events (event_id, stream, version, event_type, data, metadata, tx_id)
                 select e.event_id, $1, coalesce(cur.v, -1) + e.n, e.event_type, e.data,
                     e.metadata, pg_current_xact_id()::text::bigint + $7::bigint
                 from cur, unnest($3::uuid[], $4::text[], $5::jsonb[], $6::jsonb[])
                     with ordinality as e(event_id, event_type, data, metadata, n)
                 where {}
                 returning version, tx_id, seq
             )
             select version, tx_id, seq from ins order by seq",
            holds("$2::bigint", "cur.v")
        ),
        append_streams: format!(
            "with want as (
                 select a.n, a.stream,
                     (select max(version) from events where stream = a.stream) as v, a.expected
                 from unnest($1::text[], $2::bigint[]) with ordinality as a(stream, expected, n)
             ), held as (
                 select n, stream, v from want where {}
             ), ins as (
                 insert into events (event_id, stream, version, event_type, data, metadata, tx_id)
                 select e.event_id, held.stream, coalesce(held.v, -1) + e.k, e.event_type,
                     e.data, e.metadata, pg_current_xact_id()::text::bigint + $9::bigint
                 from unnest($3::bigint[], $4::bigint[], $5::uuid[], $6::text[], $7::jsonb[],
                         $8::jsonb[])
                     with ordinality as e(append_n, k, event_id, event_type, data, metadata, sent)
                 join held on held.n = e.append_n
                 order by e.sent
                 returning version, tx_id, seq, stream
             )
             select version, tx_id, seq, stream from ins order by seq",
            holds("expected", "v")
        ),
        read_stream_forwards: format!(
            "select {COLUMNS} from events where stream = $1 and version >= $2 order by version limit $3"
        ),
        read_stream_backwards: format!(
            "select {COLUMNS} from events where stream = $1 and version <= $2 order by version desc limit $3"
        ),
        // One lateral index scan per requested stream, each bounded by the limit.
        read_streams: format!(
            "select e.* from unnest($1::text[], $2::bigint[]) with ordinality as want(stream, from_version, n)
             cross join lateral (
                 select {COLUMNS} from events
                 where stream = want.stream and version >= want.from_version
                 order by version limit $3) e
             order by want.n, e.version"
        ),
        read_all: page(""),
        read_category: page("and category = $4"),
        read_one_stream: page("and stream = $4"),
        // Not `exists (...)`: under a generic plan the planner costs that for its first row
        // and picks a sequential scan, which finds no row before the end of the log: every
        // poll at the horizon then read the whole table. Asked as the first row in index
        // order, it reads a few index pages whatever the log's size (see `plans` tests).
        held_back: format!(
            "select coalesce((select true from events
                              where (tx_id, seq) > ($1, $2) and tx_id >= {HORIZON}
                              order by tx_id, seq limit 1), false)"
        ),
        head: format!(
            "select tx_id, seq from events where tx_id < {HORIZON} order by tx_id desc, seq desc limit 1"
        ),
    }
});

/// Shortest gap between two notifications to other processes.
const NOTIFY_INTERVAL: Duration = Duration::from_millis(2);

/// Longest wait for the notification connections to come up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Tuning for the adapter.
#[derive(Debug, Clone)]
pub struct PgStoreOptions {
    /// Connections in the pool (the LISTEN connection comes on top).
    pub pool_size: usize,
    /// How long an operation waits for a free connection before failing as unavailable.
    pub pool_wait: Duration,
    pub subscription: SubscriptionOptions,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            pool_wait: Duration::from_secs(5),
            subscription: SubscriptionOptions::default(),
        }
    }
}

#[derive(Clone)]
pub struct PgEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    pg_config: PgConfig,
    options: PgStoreOptions,
    wake: Arc<watch::Sender<u64>>,
    /// Signals the notifier task that appends happened since its last `NOTIFY`.
    peers: Arc<Notify>,
    listener_started: AtomicBool,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// See [`PgEventStore::tx_offset`].
    tx_offset: tokio::sync::OnceCell<i64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|p| p.into_inner());
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

impl PgEventStore {
    /// Connects lazily: no connection is made until the first operation. Must be called inside
    /// a tokio runtime (it starts the notifier task).
    pub fn new(pg_config: PgConfig, options: PgStoreOptions) -> Result<Self, StoreError> {
        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .wait_timeout(Some(options.pool_wait))
            .create_timeout(Some(options.pool_wait))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .post_create(Hook::async_fn(|client, _| {
                Box::pin(async move {
                    client
                        .batch_execute(&format!("{DURABLE_COMMITS}; {PRIMARY_ONLY}"))
                        .await
                        .map_err(HookError::Backend)
                })
            }))
            .build()
            .map_err(|e| StoreError::Internal(Box::new(e)))?;
        let peers = Arc::new(Notify::new());
        let notifier = tokio::spawn(notify_peers(pg_config.clone(), peers.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                pg_config,
                options,
                wake: Arc::new(watch::channel(0).0),
                peers,
                listener_started: AtomicBool::new(false),
                tasks: std::sync::Mutex::new(vec![notifier]),
                tx_offset: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// `url` is a libpq-style connection string or URL.
    pub fn connect(url: &str, options: PgStoreOptions) -> Result<Self, StoreError> {
        let pg_config: PgConfig = url.parse().map_err(|e| StoreError::Internal(Box::new(e)))?;
        Self::new(pg_config, options)
    }

    /// The pool, for checks that need raw SQL (readiness, tests).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.inner.pool.get().await.map_err(pool_error)
    }

    /// The log clock's offset (`migrations/V2__log_clock.sql`), read once per process: it only
    /// changes by `rebase_log`, with every process stopped. Reading it in every append instead
    /// cost a quarter to half of the single-event append rate (BENCHMARKS.md).
    async fn tx_offset(&self, client: &Object) -> Result<i64, StoreError> {
        self.inner
            .tx_offset
            .get_or_try_init(|| async {
                let row = client
                    .query_one("select tx_offset from event_log_clock", &[])
                    .await
                    .map_err(pg_error)?;
                row.try_get::<_, i64>(0).map_err(pg_error)
            })
            .await
            .copied()
    }

    fn woke(&self) {
        self.inner.wake.send_modify(|n| *n = n.wrapping_add(1));
        self.inner.peers.notify_one();
    }

    fn start_listener(&self) {
        if self.inner.listener_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let task = tokio::spawn(listen(
            self.inner.pg_config.clone(),
            self.inner.wake.clone(),
        ));
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Why an append inserted nothing: a retry of an earlier success, a reused id, or a
    /// conflict with the stream's current version.
    async fn explain_refusal(
        &self,
        client: &Object,
        stream: &StreamName,
        expected: ExpectedVersion,
        ids: &[Uuid],
    ) -> Result<AppendResult, StoreError> {
        let rows = client.query(FIND_IDS, &[&ids]).await.map_err(pg_error)?;
        let found = rows
            .iter()
            .map(|row| {
                Ok(StoredId {
                    id: row.try_get(0)?,
                    stream: row.try_get(1)?,
                    version: to_u64(row.try_get(2)?),
                    position: Position::new(to_u64(row.try_get(3)?), to_u64(row.try_get(4)?)),
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg_error)?;
        let current = self.current_version(client, stream).await?;
        match resolve_prior_write(stream, expected, ids, found, current)? {
            Some(replayed) => Ok(replayed),
            None => Err(StoreError::Conflict {
                stream: stream.clone(),
                expected,
                actual: current,
            }),
        }
    }

    /// Writes every append of `appends` at once, with one commit: in one statement when they
    /// name distinct streams (the common case: a saga's commands for many orders), else in one
    /// transaction of pipelined statements, so that a later append of a stream sees the
    /// earlier ones. An append the database refuses (it inserts nothing: its stream is not where
    /// it expects, or it is a retry of an earlier write) leaves the others to commit when no
    /// other append of the call names its stream, so one lane's conflict does not send every
    /// append beside it one by one; its place holds `None`, for the caller to explain as if it
    /// had been sent alone. `None` for the whole call when the others cannot go in as sent (an
    /// invalid append, a refused one whose stream another append names, an error, a commit
    /// whose outcome is unknown): the caller then sends them one by one, which tells each
    /// apart (a replay of a commit that did happen is recognised by its event ids).
    async fn append_together(&self, appends: &[Append]) -> Option<Vec<Option<AppendResult>>> {
        if appends
            .iter()
            .any(|append| validate_append(&append.events).is_err())
        {
            return None;
        }
        let distinct = {
            let mut streams: Vec<&str> = appends.iter().map(|a| a.stream.as_str()).collect();
            streams.sort_unstable();
            streams.windows(2).all(|pair| pair[0] != pair[1])
        };
        let written = if distinct {
            self.append_in_one_statement(appends).await
        } else {
            self.append_in_one_transaction(appends).await
        };
        match written {
            Ok(Some(results)) => {
                if results.iter().any(Option::is_some) {
                    self.woke();
                }
                Some(results)
            }
            Ok(None) => None,
            Err(error) => {
                tracing::debug!(%error, appends = appends.len(), "appends not written together");
                None
            }
        }
    }

    /// `append_streams`: appends to distinct streams as one statement, its own transaction,
    /// instead of one statement per append between `BEGIN` and `COMMIT`: a saga's burst sends
    /// a quarter fewer statements (the server's CPU barely moved: the rows cost more than the
    /// statements, see BENCHMARKS.md).
    async fn append_in_one_statement(
        &self,
        appends: &[Append],
    ) -> Result<Option<Vec<Option<AppendResult>>>, StoreError> {
        let streams: Vec<&str> = appends.iter().map(|a| a.stream.as_str()).collect();
        let expected: Vec<i64> = appends.iter().map(|a| expected_code(a.expected)).collect();
        let events = appends.iter().map(|a| a.events.len()).sum();
        let (mut of_append, mut within, mut ids, mut types, mut data, mut metadata) = (
            Vec::with_capacity(events),
            Vec::with_capacity(events),
            Vec::with_capacity(events),
            Vec::with_capacity(events),
            Vec::with_capacity(events),
            Vec::with_capacity(events),
        );
        for (index, append) in appends.iter().enumerate() {
            for (k, event) in append.events.iter().enumerate() {
                // 1-based, as `with ordinality` numbers the appends and `append` the events.
                of_append.push(to_i64(index as u64 + 1));
                within.push(to_i64(k as u64 + 1));
                ids.push(event.id);
                types.push(event.event_type.as_str());
                data.push(&event.data);
                metadata.push(&event.metadata);
            }
        }
        let client = self.client().await?;
        let tx_offset = self.tx_offset(&client).await?;
        let statement = client
            .prepare_cached(&SQL.append_streams)
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(
                &statement,
                &[
                    &streams, &expected, &of_append, &within, &ids, &types, &data, &metadata,
                    &tx_offset,
                ],
            )
            .await
            .map_err(pg_error)?;
        // Rows come in log order; each stream's rows are one append's, its events in order.
        let mut by_stream: HashMap<String, Vec<Row>> = HashMap::new();
        for row in rows {
            let stream: String = row.try_get(3).map_err(pg_error)?;
            by_stream.entry(stream).or_default().push(row);
        }
        let mut results = Vec::with_capacity(appends.len());
        for append in appends {
            results.push(match by_stream.remove(append.stream.as_str()) {
                Some(rows) => Some(appended(&rows).map_err(pg_error)?),
                None => None,
            });
        }
        Ok(Some(results))
    }

    /// Appends in one transaction of pipelined `append` statements, for calls that name a stream twice.
    async fn append_in_one_transaction(
        &self,
        appends: &[Append],
    ) -> Result<Option<Vec<Option<AppendResult>>>, StoreError> {
        let mut client = self.client().await?;
        let tx_offset = self.tx_offset(&client).await?;
        let statement = client.prepare_cached(&SQL.append).await.map_err(pg_error)?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let columns: Vec<_> = appends.iter().map(Columns::of).collect();
        let params: Vec<[&(dyn ToSql + Sync); 7]> = columns
            .iter()
            .map(|columns| columns.params(&tx_offset))
            .collect();
        let outcomes =
            futures::future::join_all(params.iter().map(|params| tx.query(&statement, params)))
                .await;
        let mut results = Vec::with_capacity(appends.len());
        for (index, rows) in outcomes.into_iter().enumerate() {
            let rows = rows.map_err(pg_error)?;
            if !rows.is_empty() {
                results.push(Some(appended(&rows).map_err(pg_error)?));
                continue;
            }
            // Alone in its stream, the refusal is the same whatever the others did; with
            // another append of the same stream, their order decides, so all go alone.
            let stream = &appends[index].stream;
            if appends
                .iter()
                .enumerate()
                .any(|(other, append)| other != index && append.stream == *stream)
            {
                return Ok(None);
            }
            results.push(None);
        }
        if results.iter().any(Option::is_some) {
            tx.commit().await.map_err(pg_error)?;
        }
        Ok(Some(results))
    }

    /// The answer an append refused inside [`Self::append_together`] would have got alone.
    async fn explain_refused(&self, append: &Append) -> Result<AppendResult, StoreError> {
        let client = self.client().await?;
        let ids: Vec<Uuid> = append.events.iter().map(|event| event.id).collect();
        self.explain_refusal(&client, &append.stream, append.expected, &ids)
            .await
    }

    async fn current_version(
        &self,
        client: &Object,
        stream: &StreamName,
    ) -> Result<Option<u64>, StoreError> {
        let row = client
            .query_one(STREAM_VERSION, &[&stream.as_str()])
            .await
            .map_err(pg_error)?;
        let version: Option<i64> = row.try_get(0).map_err(pg_error)?;
        Ok(version.map(to_u64))
    }
}

#[async_trait]
impl EventStore for PgEventStore {
    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>> {
        if appends.len() > 1
            && let Some(written) = self.append_together(&appends).await
        {
            let mut answers = Vec::with_capacity(appends.len());
            for (append, written) in appends.iter().zip(written) {
                answers.push(match written {
                    Some(result) => Ok(result),
                    None => self.explain_refused(append).await,
                });
            }
            return answers;
        }
        // Written one by one, each append gets the answer it would have got alone: a conflict,
        // a replay of an earlier success, a retry of a contended version.
        crate::append_each(self, appends).await
    }

    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(&events)?;
        let columns = Columns::new(stream, expected, &events);
        let client = self.client().await?;
        let tx_offset = self.tx_offset(&client).await?;
        let statement = client.prepare_cached(&SQL.append).await.map_err(pg_error)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = client.query(&statement, &columns.params(&tx_offset)).await;
            match outcome {
                Ok(rows) if !rows.is_empty() => {
                    let result = appended(&rows).map_err(pg_error)?;
                    self.woke();
                    return Ok(result);
                }
                Ok(_) => {
                    return self
                        .explain_refusal(&client, stream, expected, &columns.ids)
                        .await;
                }
                Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    let version_taken = error
                        .as_db_error()
                        .and_then(|db| db.constraint())
                        .is_some_and(|c| c == "events_stream_version_key");
                    let recomputes = matches!(
                        expected,
                        ExpectedVersion::Any | ExpectedVersion::StreamExists
                    );
                    if version_taken && recomputes && attempt < CONTENDED_APPEND_ATTEMPTS {
                        continue;
                    }
                    return self
                        .explain_refusal(&client, stream, expected, &columns.ids)
                        .await;
                }
                Err(error) => return Err(pg_error(error)),
            }
        }
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let client = self.client().await?;
        let (sql, from) = match direction {
            Direction::Forwards => (&SQL.read_stream_forwards, from.map_or(0, to_i64)),
            Direction::Backwards => (&SQL.read_stream_backwards, from.map_or(i64::MAX, to_i64)),
        };
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        let rows = client
            .query(
                &statement,
                &[&stream.as_str(), &from, &to_i64(limit as u64)],
            )
            .await
            .map_err(pg_error)?;
        rows.iter().map(recorded).collect()
    }

    async fn read_streams(
        &self,
        requests: &[(StreamName, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
        let streams: Vec<&str> = requests.iter().map(|(s, _)| s.as_str()).collect();
        let froms: Vec<i64> = requests.iter().map(|(_, from)| to_i64(*from)).collect();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&SQL.read_streams)
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(&statement, &[&streams, &froms, &to_i64(limit as u64)])
            .await
            .map_err(pg_error)?;
        let mut pages: HashMap<StreamName, Vec<RecordedEvent>> = HashMap::new();
        for row in &rows {
            let event = recorded(row)?;
            pages.entry(event.stream.clone()).or_default().push(event);
        }
        Ok(requests
            .iter()
            .map(|(stream, _)| pages.remove(stream).unwrap_or_default())
            .collect())
    }

    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        Ok(self.read_page(after, filter, limit).await?.events)
    }

    async fn read_all_raw(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RawRecordedEvent>, StoreError> {
        let client = self.client().await?;
        let rows = page_rows(&client, after, filter, limit).await?;
        rows.iter().map(recorded).collect()
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(&SQL.head).await.map_err(pg_error)?;
        let row = client.query_opt(&statement, &[]).await.map_err(pg_error)?;
        match row {
            None => Ok(Position::START),
            Some(row) => Ok(Position::new(
                to_u64(row.try_get(0).map_err(pg_error)?),
                to_u64(row.try_get(1).map_err(pg_error)?),
            )),
        }
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        self.start_listener();
        let wakeups = self.inner.wake.subscribe();
        Ok(subscription::spawn(
            self.clone(),
            wakeups,
            after,
            filter,
            self.inner.options.subscription.clone(),
        ))
    }
}

#[async_trait]
impl PageSource for PgEventStore {
    async fn read_page(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let client = self.client().await?;
        let rows = page_rows(&client, after, filter, limit).await?;
        let events: Vec<RecordedEvent> = rows.iter().map(recorded).collect::<Result<_, _>>()?;
        // Only a short page means the reader is at the horizon; only then is it worth asking
        // whether committed events wait behind a transaction still in flight.
        let held_back = if events.len() < limit {
            let last = events.last().map_or(after, |e| e.position);
            let statement = client
                .prepare_cached(&SQL.held_back)
                .await
                .map_err(pg_error)?;
            let row = client
                .query_one(&statement, &[&to_i64(last.commit), &to_i64(last.prepare)])
                .await
                .map_err(pg_error)?;
            row.try_get(0).map_err(pg_error)?
        } else {
            false
        };
        Ok(Page { events, held_back })
    }
}

fn appended(rows: &[Row]) -> Result<AppendResult, tokio_postgres::Error> {
    let position = |row: &Row| -> Result<Position, tokio_postgres::Error> {
        Ok(Position::new(
            to_u64(row.try_get(1)?),
            to_u64(row.try_get(2)?),
        ))
    };
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    Ok(AppendResult {
        next_expected_version: to_u64(last.try_get(0)?),
        first_position: position(first)?,
        position: position(last)?,
        deduplicated: false,
    })
}

/// An event from one of the log's rows, its JSON columns read as `J`: parsed trees
/// (`serde_json::Value`) or the stored text (`Box<RawValue>`).
fn recorded<J: DeserializeOwned>(row: &Row) -> Result<RecordedEvent<J>, StoreError> {
    let stream: String = row.try_get(1).map_err(pg_error)?;
    let json = |index: usize| {
        row.try_get::<_, Json<J>>(index)
            .map(|json| json.0)
            .map_err(pg_error)
    };
    Ok(RecordedEvent {
        id: row.try_get(0).map_err(pg_error)?,
        stream: StreamName::parse(stream).map_err(|e| StoreError::Internal(Box::new(e)))?,
        version: to_u64(row.try_get(2).map_err(pg_error)?),
        position: Position::new(
            to_u64(row.try_get(3).map_err(pg_error)?),
            to_u64(row.try_get(4).map_err(pg_error)?),
        ),
        event_type: row.try_get(5).map_err(pg_error)?,
        data: json(6)?,
        metadata: json(7)?,
        recorded_at: row.try_get(8).map_err(pg_error)?,
    })
}

/// The rows of one page of the log, with the columns [`recorded`] reads.
async fn page_rows(
    client: &Object,
    after: Position,
    filter: &EventFilter,
    limit: usize,
) -> Result<Vec<Row>, StoreError> {
    let commit = to_i64(after.commit);
    let prepare = to_i64(after.prepare);
    let limit_param = to_i64(limit as u64);
    let (sql, stream) = match filter {
        EventFilter::All => (&SQL.read_all, None),
        EventFilter::Category(category) => (&SQL.read_category, Some(category.as_str())),
        EventFilter::Stream(stream) => (&SQL.read_one_stream, Some(stream.as_str())),
    };
    let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
    match stream {
        None => {
            client
                .query(&statement, &[&commit, &prepare, &limit_param])
                .await
        }
        Some(name) => {
            client
                .query(&statement, &[&commit, &prepare, &limit_param, &name])
                .await
        }
    }
    .map_err(pg_error)
}

/// Stored numbers are never negative (versions, sequence values, transaction ids).
fn to_u64(v: i64) -> u64 {
    v.max(0) as u64
}

/// How the append statement reads an expected version (`$2`).
fn expected_code(expected: ExpectedVersion) -> i64 {
    match expected {
        ExpectedVersion::Any => EXPECT_ANY,
        ExpectedVersion::NoStream => EXPECT_NO_STREAM,
        ExpectedVersion::StreamExists => EXPECT_STREAM_EXISTS,
        // No stream reaches i64::MAX, so a saturated expectation still conflicts.
        ExpectedVersion::Exact(v) => to_i64(v),
    }
}

/// An append's parameters as the append statement takes them, borrowed from the append.
struct Columns<'a> {
    stream: &'a str,
    expected: i64,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    data: Vec<&'a serde_json::Value>,
    metadata: Vec<&'a serde_json::Value>,
}

impl<'a> Columns<'a> {
    fn of(append: &'a Append) -> Self {
        Self::new(&append.stream, append.expected, &append.events)
    }

    fn new(stream: &'a StreamName, expected: ExpectedVersion, events: &'a [NewEvent]) -> Self {
        Self {
            stream: stream.as_str(),
            expected: expected_code(expected),
            ids: events.iter().map(|event| event.id).collect(),
            types: events
                .iter()
                .map(|event| event.event_type.as_str())
                .collect(),
            data: events.iter().map(|event| &event.data).collect(),
            metadata: events.iter().map(|event| &event.metadata).collect(),
        }
    }

    fn params<'b>(&'b self, tx_offset: &'b i64) -> [&'b (dyn ToSql + Sync); 7] {
        [
            &self.stream,
            &self.expected,
            &self.ids,
            &self.types,
            &self.data,
            &self.metadata,
            tx_offset,
        ]
    }
}

/// Positions and versions handed in by callers may exceed `i64`; saturate rather than wrap.
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Sends one `NOTIFY` per burst of local appends, outside their transactions, on a connection
/// of its own so that it never takes a pooled connection from a writer. The notification need
/// not survive a crash (subscribers poll too), so its transaction commits without waiting for
/// the WAL flush; and at most one goes out per `NOTIFY_INTERVAL`, which bounds the extra
/// transactions however fast appends come.
async fn notify_peers(pg_config: PgConfig, signal: Arc<Notify>) {
    let sql = format!("notify {NOTIFY_CHANNEL}");
    let mut connection: Option<tokio_postgres::Client> = None;
    loop {
        signal.notified().await;
        if connection.as_ref().is_none_or(|c| c.is_closed()) {
            connection = connect_notifier(&pg_config).await;
        }
        if let Some(client) = &connection
            && let Err(error) = client.batch_execute(&sql).await
        {
            // Subscribers elsewhere still poll; a lost notification only delays them.
            tracing::debug!(error = %describe(&error), "could not notify other processes of new events");
        }
        tokio::time::sleep(NOTIFY_INTERVAL).await;
    }
}

async fn connect_notifier(pg_config: &PgConfig) -> Option<tokio_postgres::Client> {
    let connected = async {
        let (client, connection) = pg_config.connect(NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute("set synchronous_commit = off").await?;
        Ok::<_, tokio_postgres::Error>(client)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connected).await {
        Ok(Ok(client)) => Some(client),
        Ok(Err(error)) => {
            tracing::debug!(error = %describe(&error), "could not connect to notify other processes");
            None
        }
        Err(_) => None,
    }
}

/// Keeps a LISTEN connection up and turns each notification into a local wake-up.
async fn listen(pg_config: PgConfig, wake: Arc<watch::Sender<u64>>) {
    let bump = || wake.send_modify(|n| *n = n.wrapping_add(1));
    let mut pause = Duration::from_millis(100);
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, pg_config.connect(NoTls)).await {
            Err(_) => tracing::warn!("timed out connecting to listen for event notifications"),
            Ok(Err(error)) => {
                tracing::warn!(error = %describe(&error), "could not connect to listen for event notifications")
            }
            Ok(Ok((client, mut connection))) => {
                let local = wake.clone();
                let mut drive = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) => {
                                local.send_modify(|n| *n = n.wrapping_add(1));
                            }
                            Ok(_) => {}
                            Err(error) => {
                                tracing::warn!(error = %describe(&error), "event notification connection failed");
                                break;
                            }
                        }
                    }
                });
                match client
                    .batch_execute(&format!("listen {NOTIFY_CHANNEL}"))
                    .await
                {
                    Ok(()) => {
                        pause = Duration::from_millis(100);
                        // Notifications sent while we were not listening are lost: look again.
                        bump();
                        let _ = (&mut drive).await;
                    }
                    Err(error) => {
                        tracing::warn!(error = %describe(&error), "could not listen for event notifications")
                    }
                }
                drive.abort();
                drop(client);
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// [`describe`] for a pool's error, whose own text is as bare for a refused connection.
pub fn describe_pool(error: &PoolError) -> String {
    match error {
        PoolError::Backend(error) | PoolError::PostCreateHook(HookError::Backend(error)) => {
            describe(error)
        }
        other => other.to_string(),
    }
}

fn pool_error(error: PoolError) -> StoreError {
    match error {
        PoolError::Backend(e) | PoolError::PostCreateHook(HookError::Backend(e)) => pg_error(e),
        other => StoreError::Unavailable(Box::new(other)),
    }
}

/// Why readers of the log wait, if they do: what [`horizon`] finds.
#[derive(Debug, Clone, PartialEq)]
pub struct Horizon {
    /// Events committed but not yet readable: they sort after a transaction still open
    /// somewhere in the cluster, and every reader of the log waits until it ends.
    pub held_back_events: i64,
    /// How long the oldest of them has waited; 0 when none waits.
    pub held_back_seconds: f64,
    /// The oldest transaction in the cluster holding a transaction id (any database, prepared
    /// transactions included), if any: the one that holds the horizon when events wait.
    pub oldest_transaction: Option<OpenTransaction>,
}

/// A transaction that holds an id, as `pg_stat_activity` or `pg_prepared_xacts` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenTransaction {
    /// The backend's process id; `None` for a prepared (two-phase) transaction, which has none.
    pub pid: Option<i32>,
    pub database: Option<String>,
    /// `application_name`, or the prepared transaction's `gid`.
    pub application_name: String,
    /// `active`, `idle in transaction`, ... or `prepared`.
    pub state: String,
    pub age_seconds: f64,
}

impl std::fmt::Display for OpenTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}")?,
            None => f.write_str("a prepared transaction")?,
        }
        write!(
            f,
            " (database {}, application {:?}, {}) open for {:.1} s",
            self.database.as_deref().unwrap_or("?"),
            self.application_name,
            self.state,
            self.age_seconds
        )
    }
}

/// What holds the log's horizon back: events waiting behind an open transaction, and the
/// oldest such transaction in the cluster. Two reads of the catalog and an index range scan
/// of the waiting events; for monitoring, every few seconds.
pub async fn horizon(client: &tokio_postgres::Client) -> Result<Horizon, tokio_postgres::Error> {
    let waiting = client
        .query_one(
            &format!(
                "select count(*), coalesce(extract(epoch from now() - min(recorded_at))::float8, 0)
                 from events where tx_id >= {HORIZON}"
            ),
            &[],
        )
        .await?;
    let oldest = client
        .query_opt(
            "select pid, datname::text, coalesce(application_name, ''), coalesce(state, ''),
                    extract(epoch from now() - xact_start)::float8 as age
             from pg_stat_activity
             where backend_xid is not null and pid <> pg_backend_pid()
             union all
             select null, database::text, gid, 'prepared',
                    extract(epoch from now() - prepared)::float8
             from pg_prepared_xacts
             order by age desc nulls last limit 1",
            &[],
        )
        .await?;
    let oldest_transaction = oldest
        .map(|row| -> Result<OpenTransaction, tokio_postgres::Error> {
            Ok(OpenTransaction {
                pid: row.try_get(0)?,
                database: row.try_get(1)?,
                application_name: row.try_get(2)?,
                state: row.try_get(3)?,
                age_seconds: row.try_get::<_, Option<f64>>(4)?.unwrap_or(0.0),
            })
        })
        .transpose()?;
    Ok(Horizon {
        held_back_events: waiting.try_get(0)?,
        held_back_seconds: waiting.try_get::<_, f64>(1)?.max(0.0),
        oldest_transaction,
    })
}

/// Sorts driver errors into "try again later", "the caller's value" and "something is wrong",
/// each carrying the server's message and SQLSTATE (see [`describe`]).
pub(crate) fn pg_error(error: tokio_postgres::Error) -> StoreError {
    let described = describe(&error);
    if is_transient(&error) {
        StoreError::Unavailable(described.into())
    } else if is_data_exception(&error) {
        StoreError::InvalidInput(crate::InvalidInput::Value { reason: described })
    } else {
        StoreError::Internal(described.into())
    }
}

/// What an operator needs from a driver error. Its own text is only "db error"; the
/// server's severity, message and SQLSTATE, or the cause of a failed connection, are in its
/// source chain, which this walks.
pub fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!(
            "{error}: {} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        );
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// SQLSTATE class 22, data exception: a value the server cannot store or compare (a NUL in
/// text, a time out of range, a number too large). The same statement with other values
/// works: the values were the caller's to fix.
pub fn is_data_exception(error: &tokio_postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|code| code.code().starts_with("22"))
}

/// Whether a PostgreSQL error may go away if the same work is tried again later: the one
/// classification the store, the projections and the saga share.
///
/// Transient: a lost or refused connection (class 08, or no SQLSTATE at all because the socket
/// dropped), a serialization failure or deadlock (class 40), the server out of resources
/// (class 53: too many connections, disk full), a lock or statement timeout or a shutdown or
/// crash recovery in progress (55P03, class 57), an idle-in-transaction timeout (25P03), a
/// write that reached a server in recovery (25006: during a failover, until the connection is
/// made again to the new primary). Everything else (a constraint, a syntax error, bad data) fails the same way again.
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        Some(code) => is_transient_sqlstate(code.code()),
        None => {
            error.is_closed()
                || std::error::Error::source(error).is_some_and(|s| s.is::<std::io::Error>())
                || error.to_string().contains("timed out")
        }
    }
}

/// [`is_transient`] for a bare SQLSTATE.
pub fn is_transient_sqlstate(code: &str) -> bool {
    ["08", "40", "53", "57"]
        .iter()
        .any(|class| code.starts_with(class))
        || matches!(code, "55P03" | "25P03" | "25006")
}

#[cfg(test)]
mod tests {
    use super::is_transient_sqlstate;

    #[test]
    fn what_passes_by_itself_is_transient_and_what_fails_again_is_not() {
        // admin shutdown, connection failure, serialization failure, deadlock, too many
        // connections, statement timeout, lock timeout, idle-in-transaction timeout, a write
        // to a standby
        for code in [
            "57P01", "08006", "40001", "40P01", "53300", "57014", "55P03", "25P03", "25006",
        ] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        // unique violation, undefined table, a value out of range, an insufficient privilege,
        // another state of class 55 and of class 25
        for code in ["23505", "42P01", "22003", "42501", "55006", "25001"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
    }
}
