//! Rebuild: replay N events into every read model, next to the raw-SQL floor over the same rows.
//!
//! 1. Write N valid domain events (a seeded workload through the domain's deciders) with
//!    batched multi-row INSERTs straight into `events`, 10,000 per transaction.
//! 2. Floors, same run, same rows: `copy (select * from events order by tx_id, seq) to stdout`
//!    read to nowhere; `insert into scratch select * from events` (set-based, one statement).
//! 3. Reading the whole log through the store port alone, for scale.
//! 4. `rebuild --all` as the CLI runs it (library call `rebuild_many`, on the event store the
//!    CLI builds): one pass over the log into the shadow tables of both projections, verify,
//!    swap. Then each projection alone.
//!    Reported: log events per second of wall time, and the peak RSS of this process during
//!    the rebuilds (VmHWM, reset through /proc/self/clear_refs before they start).

use std::time::Instant;

use anyhow::{Context, anyhow};
use futures::{StreamExt, pin_mut};
use orderly_projections::{ProjectionName, RebuildOptions, rebuild, rebuild_many};
use orderly_testdata::workload::{Workload, WorkloadOptions};
use serde_json::Value;
use uuid::Uuid;

use crate::report;

#[derive(clap::Args)]
pub struct Args {
    /// Events in the log to rebuild from.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Events per rebuild transaction.
    #[arg(long, default_value_t = RebuildOptions::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
}

const INSERT: &str = "
insert into events (event_id, stream, version, event_type, data, metadata)
select * from unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[], $6::jsonb[])";

/// Peak resident memory of this process, in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let db = report::read_side_database("bench-rebuild").await?;
    let client = db.connect().await.map_err(|e| anyhow!("{e}"))?;
    println!("# rebuild benchmark\n");
    println!("- machine: {}", report::machine());
    let version: String = client.query_one("select version()", &[]).await?.get(0);
    println!("- server: {version}");

    let started = Instant::now();
    let options = WorkloadOptions {
        seed: 42,
        products: 2000,
        customers: 20_000,
        open_orders: 2000,
        prefix: String::new(),
    };
    let written = write_events(&client, args.events, options).await?;
    client.batch_execute("vacuum analyze events").await?;
    let bytes: i64 = client
        .query_one("select pg_total_relation_size('events')", &[])
        .await?
        .get(0);
    println!(
        "- log: {written} events ({:.0} MiB with indexes), written in {:.1}s\n",
        bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );
    client
        .batch_execute("checkpoint")
        .await
        .context("checkpoint (needs a superuser)")?;

    println!("| what | seconds | events/s |\n|---|---|---|");
    let row = |what: &str, secs: f64| {
        println!("| {what} | {secs:.2} | {:.0} |", written as f64 / secs);
    };

    let t = Instant::now();
    let copy = client
        .copy_out("copy (select * from events order by tx_id, seq) to stdout")
        .await?;
    pin_mut!(copy);
    let mut copied = 0usize;
    while let Some(chunk) = copy.next().await {
        copied += chunk?.len();
    }
    row(
        &format!(
            "raw: COPY events out ({:.0} MiB)",
            copied as f64 / 1048576.0
        ),
        t.elapsed().as_secs_f64(),
    );

    client
        .batch_execute("create table scratch as select * from events with no data")
        .await?;
    let t = Instant::now();
    client
        .batch_execute("insert into scratch select * from events")
        .await?;
    row(
        "raw: INSERT ... SELECT into a scratch table",
        t.elapsed().as_secs_f64(),
    );
    client
        .batch_execute("drop table scratch; checkpoint")
        .await?;

    // The store as `orderly projections rebuild` gets it (the adapter inside its metrics
    // wrapper), so that what is timed is what an operator runs.
    let store = orderly_service::app::event_store(
        &orderly_service::settings::Settings::with_database(db.url()),
    )?;
    let options = RebuildOptions {
        batch_size: args.batch_size,
        ..RebuildOptions::default()
    };
    // What reading alone costs through the store port, pages of the rebuild's size: parsed
    // into JSON trees (what subscribers get), then as the stored text (what a rebuild reads).
    let all = orderly_event_store::EventFilter::All;
    let t = Instant::now();
    let mut after = orderly_event_store::Position::START;
    while let Some(last) = store.read_all(after, &all, args.batch_size).await?.last() {
        after = last.position;
    }
    row(
        "orderly: read the log through the store port, parsed",
        t.elapsed().as_secs_f64(),
    );
    let t = Instant::now();
    let mut after = orderly_event_store::Position::START;
    while let Some(last) = store
        .read_all_raw(after, &all, args.batch_size)
        .await?
        .last()
    {
        after = last.position;
    }
    row(
        "orderly: read the log through the store port, as text (what a rebuild reads)",
        t.elapsed().as_secs_f64(),
    );

    // Writing 5 to clear_refs resets the peak to the current RSS (Linux 4.0+).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss_before = peak_rss_mib();
    let all = Instant::now();
    let reports = rebuild_many(
        db.config(),
        store.clone(),
        &ProjectionName::ALL,
        &options,
        |_| {},
    )
    .await?;
    let rows: i64 = reports
        .iter()
        .flat_map(|r| r.rows.iter().map(|(_, n)| *n))
        .sum();
    let replay = reports.first().map_or(0.0, |r| r.replay.as_secs_f64());
    row(
        &format!("orderly: rebuild --all, one pass, both projections ({rows} rows)"),
        all.elapsed().as_secs_f64(),
    );
    row("- of which the replay into the shadow tables", replay);
    for name in ProjectionName::ALL {
        let t = Instant::now();
        let report = rebuild(db.config(), store.clone(), name, &options, |_| {}).await?;
        let rows: i64 = report.rows.iter().map(|(_, n)| *n).sum();
        row(
            &format!("orderly: rebuild {name} alone ({rows} rows)"),
            t.elapsed().as_secs_f64(),
        );
    }
    println!(
        "\n- peak RSS during the rebuild: {:.0} MiB (before it: {:.0} MiB{})",
        peak_rss_mib(),
        rss_before,
        if reset {
            ""
        } else {
            "; peak not reset, includes the writing phase"
        }
    );
    Ok(())
}

/// Writes `n` events of a seeded workload; returns how many were written (whole decisions).
pub(crate) async fn write_events(
    client: &tokio_postgres::Client,
    n: usize,
    options: WorkloadOptions,
) -> anyhow::Result<usize> {
    let statement = client.prepare(INSERT).await?;
    let mut workload = Workload::new(options);
    let mut written = 0;
    while written < n {
        let (mut ids, mut streams, mut versions, mut types, mut data, mut meta) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::<Value>::new(),
            Vec::<Value>::new(),
        );
        while ids.len() < 10_000 && written + ids.len() < n {
            let append = workload.next_append();
            let first = append.expected.map_or(0, |v| v + 1);
            for (i, event) in append.encoded().into_iter().enumerate() {
                ids.push(event.event_id);
                streams.push(append.stream.clone());
                versions.push((first + i as u64) as i64);
                types.push(event.event_type);
                data.push(event.data);
                meta.push(event.metadata);
            }
        }
        let ids: Vec<Uuid> = ids;
        client
            .execute(
                &statement,
                &[&ids, &streams, &versions, &types, &data, &meta],
            )
            .await?;
        written += ids.len();
    }
    Ok(written)
}
