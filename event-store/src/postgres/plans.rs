//! The log's statements, as the server plans them: reads polled all the time by every reader,
//! and the appends that look up each stream's last version, must read a few pages of an index,
//! never the whole log, whatever plan the server caches for them. A statement that regressed
//! to a scan would cost in proportion to the log's size every time (as `held_back` once did: a
//! sequential scan under the generic plan).

use orderly_test_support::TestDb;
use serde_json::Value;

use super::{SQL, migrate, migration_fingerprint};

/// Events written before the statements are planned: enough pages that a scan of the table
/// stands out from an index descent by two orders of magnitude.
const EVENTS: i64 = 9_000;

/// Pages a read may touch: an index descent and a page of rows.
const MOST_PAGES: i64 = 40;

/// Pages an append may touch: the stream's last version, and a descent of each of the table's
/// four indexes to insert (30 to 32 measured, against 1,200 for a scan of this log).
const MOST_APPEND_PAGES: i64 = 100;

async fn log() -> TestDb {
    let db = TestDb::create("event-store", &migration_fingerprint(), |url| async move {
        migrate(&url.parse()?).await.map_err(Into::into)
    })
    .await
    .expect("a test database (is PostgreSQL up? see deploy/local/ensure-postgres.sh)");
    let client = db.connect().await.expect("connect");
    // 1,125 streams of 8 events in three categories, payloads of about 400 bytes, three events
    // per transaction id, every one of them long below the horizon.
    client
        .batch_execute(&format!(
            "insert into events (event_id, stream, version, event_type, data, metadata, tx_id)
             select gen_random_uuid(),
                    (array['order', 'product', 'payment'])[1 + (g / 8) % 3] || '-' || (g / 8),
                    g % 8, 'Probe', jsonb_build_object('text', repeat('x', 400)), '{{}}',
                    1 + g / 3
             from generate_series(0, {} - 1) g;
             analyze events;",
            EVENTS
        ))
        .await
        .expect("write the log");
    db
}

/// Pages read by `statement` (declared with `types`, run with `arguments` as SQL literals)
/// under the plan `mode` (`force_generic_plan` or `force_custom_plan`).
async fn pages_read(
    client: &tokio_postgres::Client,
    mode: &str,
    statement: &str,
    types: &str,
    arguments: &str,
) -> i64 {
    client
        .batch_execute(&format!(
            "deallocate all; set plan_cache_mode = {mode}; prepare probe{types} as {statement}"
        ))
        .await
        .expect("prepare");
    let explained: Value = client
        .query_one(
            &format!("explain (analyze, buffers, format json) execute probe{arguments}"),
            &[],
        )
        .await
        .expect("explain")
        .get(0);
    let plan = &explained[0]["Plan"];
    let blocks = |name: &str| plan[name].as_i64().expect("buffers in the plan");
    blocks("Shared Hit Blocks") + blocks("Shared Read Blocks")
}

/// The statements of `probes` (name, statement, parameter types, arguments) that read more than
/// `limit` pages under either plan, each with its plan and count.
async fn over_limit(
    client: &tokio_postgres::Client,
    probes: &[(&str, &str, &str, &str)],
    limit: i64,
) -> Vec<String> {
    let mut over = Vec::new();
    for mode in ["force_generic_plan", "force_custom_plan"] {
        for (name, statement, types, arguments) in probes {
            let pages = pages_read(client, mode, statement, types, arguments).await;
            if pages > limit {
                over.push(format!("{name} ({mode}): {pages} pages"));
            }
        }
    }
    over
}

#[tokio::test]
async fn every_read_of_the_log_reads_a_few_index_pages_not_the_log() {
    let db = log().await;
    let client = db.connect().await.expect("connect");
    let row = client
        .query_one(
            "select pg_relation_size('events') / current_setting('block_size')::bigint,
                    max(tx_id), max(seq)
             from events",
            &[],
        )
        .await
        .expect("size of the log");
    let (table_pages, tx, seq): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(
        table_pages > 10 * MOST_PAGES,
        "the log ({table_pages} pages) is too small to tell a scan from an index read"
    );
    let page = "(bigint, bigint, bigint)";
    let filtered = "(bigint, bigint, bigint, text)";
    let at_head = format!("({tx}, {seq}, 100)");
    let from_start = "(0, 0, 100)";
    let reads = [
        ("read_all at the head", &SQL.read_all, page, at_head.clone()),
        (
            "read_all from the start",
            &SQL.read_all,
            page,
            from_start.into(),
        ),
        (
            "read_category at the head",
            &SQL.read_category,
            filtered,
            format!("({tx}, {seq}, 100, 'payment')"),
        ),
        (
            "read_one_stream from the start",
            &SQL.read_one_stream,
            filtered,
            "(0, 0, 100, 'order-8')".into(),
        ),
        (
            "held_back at the head",
            &SQL.held_back,
            "(bigint, bigint)",
            format!("({tx}, {seq})"),
        ),
        ("head", &SQL.head, "", String::new()),
        (
            "read_stream_forwards",
            &SQL.read_stream_forwards,
            "(text, bigint, bigint)",
            "('order-8', 0, 100)".into(),
        ),
        (
            "read_stream_backwards",
            &SQL.read_stream_backwards,
            "(text, bigint, bigint)",
            "('order-8', 7, 100)".into(),
        ),
        (
            "read_streams",
            &SQL.read_streams,
            "(text[], bigint[], bigint)",
            "(array['order-8', 'product-9'], array[0, 2]::bigint[], 100)".into(),
        ),
    ];
    let reads = reads.each_ref().map(|(name, statement, types, arguments)| {
        (*name, statement.as_str(), *types, arguments.as_str())
    });
    let over = over_limit(&client, &reads, MOST_PAGES).await;
    assert!(
        over.is_empty(),
        "reads of the log that touch more than {MOST_PAGES} of its {table_pages} pages: {over:?}"
    );
}

#[tokio::test]
async fn every_append_reads_a_few_index_pages_not_the_log() {
    let db = log().await;
    let client = db.connect().await.expect("connect");
    // Each execution writes: fresh event ids, and `Any` (-1) so that the second goes in too.
    let one = "(text, bigint, uuid[], text[], jsonb[], jsonb[], bigint)";
    let several =
        "(text[], bigint[], bigint[], bigint[], uuid[], text[], jsonb[], jsonb[], bigint)";
    let appends = [
        (
            "append to a stream",
            SQL.append.as_str(),
            one,
            "('order-8', -1, array[gen_random_uuid()], array['Probe'], array['{}'::jsonb],
              array['{}'::jsonb], 0)",
        ),
        (
            "append to several streams",
            SQL.append_streams.as_str(),
            several,
            "(array['order-9', 'product-10'], array[-1, -1]::bigint[], array[1, 2]::bigint[],
              array[1, 1]::bigint[], array[gen_random_uuid(), gen_random_uuid()],
              array['Probe', 'Probe'], array['{}', '{}']::jsonb[], array['{}', '{}']::jsonb[], 0)",
        ),
    ];
    let over = over_limit(&client, &appends, MOST_APPEND_PAGES).await;
    assert!(
        over.is_empty(),
        "appends that touch more than {MOST_APPEND_PAGES} pages of the log: {over:?}"
    );
}
