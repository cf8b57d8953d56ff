//! Faults injected on purpose into a running `orderly`: PostgreSQL restarted and crashed under
//! a burst of orders or under `orderly seed`, saga processes killed with SIGKILL, a transaction
//! that holds the log's horizon back while a payment lands, a lock that times the saga's writes
//! out, a crash that takes back commits that did not wait for their flush, a low
//! `statement_timeout`, a failover to a synchronous standby. Each test runs the binary as child
//! processes against a private PostgreSQL cluster of its own (a restart or a held horizon would
//! disturb every other test on the shared server) and judges the outcome by reading the event
//! log itself, through SQL:
//!
//! - every order placed ends confirmed or cancelled (and, when shipped or delivered, was
//!   confirmed first and delivered only once shipped); only its customer may cancel an order
//!   once confirmed, and nothing confirms a cancelled one;
//! - no order is charged twice, a confirmed order once, a cancelled one that was charged is
//!   refunded;
//! - for each product, the stock the log holds reserved (reserved, minus released, minus
//!   shipped) is what the confirmed orders not shipped yet hold, and nothing else;
//! - no saga step "failed for good".
//!
//! The tests wait for those to hold for a bounded time, and give up early when the log has
//! been quiet for a while with orders still open: a live saga with deadlines of seconds never
//! is.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Api, SECRET, admin, customer, order_input, register};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions};
use orderly_event_store::{
    EventFilter, EventStore, ExpectedVersion, NewEvent, Position, StreamName,
};
use orderly_projections::ProjectionName;
use orderly_test_support::cluster::{PrivateCluster, free_port};
use orderly_test_support::process::Subprocess;
use serde_json::{Value, json};
use uuid::Uuid;

const ORDERLY: &str = env!("CARGO_BIN_EXE_orderly");

/// What a saga that misses a step logs; never acceptable, whatever the fault.
const STEP_LOST: &str = "failed for good";

/// How an error line of the JSON log starts its level.
const ERROR: &str = "\"level\":\"ERROR\"";

/// How long one order may take to be accepted while PostgreSQL restarts under it.
const PLACE_PATIENCE: Duration = Duration::from_secs(60);

/// PostgreSQL restarted cleanly twice and crashed once while 16 clients place 200 orders, with
/// the saga's lanes shared by `serve` and an `orderly saga run` beside it. Each restart cuts
/// saga statements in flight, which are to be retried (SQLSTATE class 57 is transient), never
/// skipped; the server carries on and is ready again afterwards. Then every lane has one live
/// owner and both processes hold a share; stopping one hands its lanes to the other, which
/// settles the orders placed after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_finishes_every_order_through_three_postgres_restarts() {
    let cluster = PrivateCluster::create().await.expect("a private cluster");
    migrate(&cluster.url()).await;
    let mut server = Orderly::start("serve", &cluster.url(), &["serve"], &timing(10)).await;
    let saga_url = with_application_name(&cluster.url(), "saga-1");
    let mut runner = Orderly::start("saga-1", &saga_url, &["saga", "run"], &timing(10)).await;
    let skus = ["FAULT-A", "FAULT-B", "FAULT-C", "FAULT-SCARCE"];
    for sku in skus {
        // Scarce enough that some orders are cancelled out of stock and give back what
        // they had reserved of the other products.
        let stock = if sku == "FAULT-SCARCE" { 40 } else { 1_000 };
        register(&server.api, sku, 300, "EUR", stock).await;
    }

    let placed = AtomicUsize::new(0);
    let burst = place_burst(&server.api, 0..200, 16, &placed, |i| {
        let first = skus[i % 3];
        if i % 3 == 0 {
            json!([{ "sku": first, "quantity": 1 + i % 2 },
                   { "sku": "FAULT-SCARCE", "quantity": 1 + i % 3 }])
        } else {
            json!([{ "sku": first, "quantity": 1 + i % 3 }])
        }
    });
    let faults = async {
        let mut cut = 0;
        for (after, crash) in [(50, false), (100, true), (150, false)] {
            while placed.load(Ordering::Relaxed) < after {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // A restart answers a statement in flight (SQLSTATE 57P01) unlike an idle
            // connection (closed): make sure the saga has one in flight, every time, by
            // holding its tables until one of its writes waits. The holder dies with the
            // restart.
            let _holder = lock_saga_tables(&cluster).await;
            if saga_waits_for_a_lock(&cluster, Duration::from_secs(3)).await {
                cut += 1;
            }
            if crash {
                cluster.restart_immediate().await.expect("crash and start");
            } else {
                cluster.restart_fast().await.expect("restart");
            }
        }
        // Timing may leave the saga idle at one restart, never at all three.
        assert!(cut > 0, "no restart cut a saga write in flight");
    };
    let (mut ids, ()) = tokio::join!(burst, faults);

    server.assert_settles(&cluster, &ids).await;
    runner.assert_no_step_lost();
    for process in [&mut server.process, &mut runner.process] {
        let status = process.exit_status();
        assert!(status.is_none(), "{} exited: {status:?}", process.name());
    }
    server.assert_ready(Duration::from_secs(10)).await;
    let db = cluster.connect().await.expect("a connection");
    let owners = lanes_owned_by_live_members(&db, 2).await;
    eprintln!("after the restarts, lanes per owner: {owners:?}");

    // A clean stop hands its lanes over at once; the one left holds them all and settles
    // what is placed next.
    stop(&mut runner.process).await;
    let owners = lanes_owned_by_live_members(&db, 1).await;
    eprintln!("after saga-1 stopped, lanes per owner: {owners:?}");
    let placed = AtomicUsize::new(0);
    ids.extend(
        place_burst(
            &server.api,
            200..220,
            4,
            &placed,
            |i| json!([{ "sku": skus[i % 3], "quantity": 1 }]),
        )
        .await,
    );
    server.assert_settles(&cluster, &ids).await;
}

/// Saga runner processes killed with SIGKILL twice during a burst (the leading one, where one
/// leads), and new ones started: the others finish every order from the durable checkpoints,
/// and a killed step done again charges nobody twice and leaves no stock held. The charges a
/// killed process had in flight go out again within seconds (its claims are given back when
/// its membership lease runs out), well before the orders' payment deadline: every order is
/// confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_saga_processes_mid_burst_loses_no_step_and_charges_once() {
    let cluster = PrivateCluster::create().await.expect("a private cluster");
    migrate(&cluster.url()).await;
    // Every saga process charges through one provider outside them, which outlives the kills.
    let provider = Provider::start().await;
    // The deadline far above the membership lease (5 s), far below an outbox claim's (60 s).
    let mut settings = timing(20);
    settings.extend(provider.settings());
    // `serve` always runs a saga runner of its own, so the API runs alone here. No projection
    // runner: nothing asserted reads a read model.
    let api = Orderly::start("command-api", &cluster.url(), &["command-api"], &settings).await;
    let saga = |n: usize| {
        let url = with_application_name(&cluster.url(), &format!("saga-{n}"));
        let settings = settings.clone();
        async move { Orderly::start(&format!("saga-{n}"), &url, &["saga", "run"], &settings).await }
    };
    let mut sagas = vec![saga(1).await, saga(2).await];
    register(&api.api, "KILL-A", 250, "EUR", 1_000).await;
    register(&api.api, "KILL-B", 250, "EUR", 1_000).await;

    let placed = AtomicUsize::new(0);
    let burst = place_burst(
        &api.api,
        0..150,
        16,
        &placed,
        |i| json!([{ "sku": if i % 2 == 0 { "KILL-A" } else { "KILL-B" }, "quantity": 1 + i % 2 }]),
    );
    let kills = async {
        for (after, replacement) in [(50, 3), (100, 4)] {
            while placed.load(Ordering::Relaxed) < after {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The leader, where one runner leads; else any runner still alive.
            let leader = leading_saga(&cluster).await;
            let victim = sagas
                .iter_mut()
                .filter_map(|s| s.process.is_running().then_some(s))
                .min_by_key(|s| Some(s.process.name()) != leader.as_deref())
                .expect("a saga process alive");
            victim.process.kill();
            eprintln!(
                "killed {} (leader: {})",
                victim.process.name(),
                leader.as_deref().unwrap_or("none found")
            );
            sagas.push(saga(replacement).await);
        }
    };
    let (ids, ()) = tokio::join!(burst, kills);

    let watched: Vec<&Orderly> = sagas.iter().collect();
    // Longer quiet than elsewhere: what a killed runner held (lanes, outbox claims) may wait
    // for its lease to run out before anyone moves.
    let log = settle(
        &cluster,
        &ids,
        Duration::from_secs(120),
        Duration::from_secs(45),
        &watched,
    )
    .await;
    log.assert_sound(&ids);
    for runner in &sagas {
        runner.assert_no_step_lost();
    }
    provider.assert_charged_once(&ids, &log).await;
    let cancelled: Vec<(&Uuid, &Option<String>)> = log
        .orders
        .iter()
        .filter(|(_, order)| !order.confirmed)
        .map(|(id, order)| (id, &order.cancelled))
        .collect();
    assert!(cancelled.is_empty(), "orders not confirmed: {cancelled:?}");
}

/// Readers of the log stop at the oldest transaction in flight (the horizon). A payment that
/// commits before its deadline behind an open transaction becomes visible only after the
/// deadline by the wall clock; the order must still be confirmed, since in log time the
/// deadline had not passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_lands_behind_an_open_transaction_is_not_overtaken_by_its_deadline() {
    // Five seconds: the simulator charges tok_slow after two, and the answer reaches the log
    // about 0.1 s later here; the rest is margin for a machine loaded by other tests.
    let deadline = Duration::from_secs(5);
    let cluster = PrivateCluster::create().await.expect("a private cluster");
    migrate(&cluster.url()).await;
    let server = Orderly::start(
        "serve",
        &cluster.url(),
        &["serve"],
        &timing(deadline.as_secs()),
    )
    .await;
    register(&server.api, "SLOW", 900, "EUR", 10).await;
    let db = cluster.connect().await.expect("a connection");
    let id = place_order(
        &server.api,
        "slow-customer",
        "slow-1",
        json!([{ "sku": "SLOW", "quantity": 1 }]),
        "tok_slow",
    )
    .await;
    let payment = format!("payment-{id}");

    // The charge is on its way to the gateway once its request is in the log. From then on a
    // transaction holds the horizon: the payment commits behind it, readers of the log do not
    // see it until the transaction ends, and it is kept open until the deadline is past.
    let requested_at = time_in_log(
        &db,
        "select (data->>'requested_at')::timestamptz from events
         where stream = $1 and event_type = 'PaymentChargeRequested'",
        &payment,
        Duration::from_secs(30),
    )
    .await
    .expect("the charge requested within 30 s");
    let holder = cluster.connect().await.expect("a connection");
    holder
        .batch_execute("begin; select pg_current_xact_id()")
        .await
        .expect("a transaction with an xid");
    let due = requested_at + chrono::Duration::from_std(deadline).expect("a duration");
    // When the payment was written (`charged_at` is when the gateway was called).
    let landed_at = time_in_log(
        &db,
        "select recorded_at from events
         where stream = $1 and event_type = 'PaymentCharged'",
        &payment,
        Duration::from_secs(20),
    )
    .await
    .expect("the slow payment charged within 20 s");
    while Utc::now() < due + chrono::Duration::milliseconds(1_500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder
        .batch_execute("commit")
        .await
        .expect("the transaction ends");
    assert!(
        landed_at < due,
        "premise not met: the payment landed at {landed_at}, after its deadline {due}; the \
         machine was too slow for this test"
    );

    let log = settle(
        &cluster,
        &[id],
        Duration::from_secs(30),
        Duration::from_secs(15),
        &[&server],
    )
    .await;
    let order = &log.orders[&id];
    assert!(
        order.confirmed && order.cancelled.is_none(),
        "order {id}, its payment in the log at {landed_at} before its deadline {due}, ended \
         {order:?} (a deadline judged by the wall clock while the payment waited behind the \
         log's horizon?)"
    );
    log.assert_sound(&[id]);
    server.assert_no_step_lost();
}

/// A saga write that hits `lock_timeout` (SQLSTATE 55P03) failed transiently: the step is
/// tried again once the lock is gone, never skipped, and the order confirmed and charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_on_the_saga_tables_does_not_skip_a_step() {
    let cluster = PrivateCluster::create().await.expect("a private cluster");
    migrate(&cluster.url()).await;
    let db = cluster.connect().await.expect("a connection");
    // Every session from now on, the server's included, gives up on a lock after 300 ms.
    db.batch_execute("alter database postgres set lock_timeout = '300ms'")
        .await
        .expect("lock_timeout set");
    let server = Orderly::start("serve", &cluster.url(), &["serve"], &timing(10)).await;
    register(&server.api, "LOCKED", 500, "EUR", 10).await;
    // The lanes held first: locked out of claiming them, the saga would step the order only
    // after the lock is gone, and the fault would not meet a step at all.
    lanes_owned_by_live_members(&db, 1).await;

    let holder = lock_saga_tables(&cluster).await;
    let id = place_order(
        &server.api,
        "locked-out",
        "locked-1",
        json!([{ "sku": "LOCKED", "quantity": 2 }]),
        "tok_ok",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    holder.batch_execute("commit").await.expect("unlocked");

    let log = settle(
        &cluster,
        &[id],
        Duration::from_secs(30),
        Duration::from_secs(15),
        &[&server],
    )
    .await;
    log.assert_sound(&[id]);
    let order = &log.orders[&id];
    assert!(order.confirmed, "order {id} ended {order:?}");
    server.assert_no_step_lost();
    // The fault did happen: saga work failed transiently while the tables were locked.
    let scraped = server.api.metrics().await;
    let transient = scraped
        .lines()
        .find_map(|line| line.strip_prefix(r#"orderly_saga_retries_total{failure="transient"} "#))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert!(
        transient.is_some_and(|retries| retries >= 1.0),
        "no transient saga retry on /metrics: {transient:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The binary as a child process.

/// Settings for quick fulfilment: a payment deadline of `deadline_secs`, a retry after a
/// failed charge within a second, deadlines checked ten times a second.
/// SIGTERM while the saga is busy: `serve` stops in the order the data flows (HTTP, then the
/// saga, then the projections once they have applied the log to its end), so the read models
/// are not left behind events the saga appended after the projection runners had stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_leaves_its_read_models_at_the_end_of_the_log() {
    let cluster = PrivateCluster::create().await.expect("a private cluster");
    migrate(&cluster.url()).await;
    let mut server = Orderly::start("serve", &cluster.url(), &["serve"], &timing(10)).await;
    register(&server.api, "STOP-A", 300, "EUR", 1_000).await;
    let placed = AtomicUsize::new(0);
    place_burst(
        &server.api,
        0..60,
        16,
        &placed,
        |_| json!([{ "sku": "STOP-A", "quantity": 1 }]),
    )
    .await;
    stop(&mut server.process).await;

    let db = cluster.connect().await.expect("a connection");
    let behind: i64 = db
        .query_one(
            "select count(*) from events e, projection_checkpoints c
             where c.projection = 'orders'
               and (e.tx_id, e.seq) > (c.position_commit, c.position_prepare)",
            &[],
        )
        .await
        .expect("the checkpoint read")
        .get(0);
    assert_eq!(behind, 0, "events the orders read model never applied");
    let lanes_held: i64 = db
        .query_one(
            "select count(*) from saga_lanes where owner is not null and lease_until > now()",
            &[],
        )
        .await
        .expect("the lanes read")
        .get(0);
    assert_eq!(lanes_held, 0, "a clean stop hands every saga lane back");
}

/// A consistency token read STRICT answers data that includes it, or STALE_READ; never older
/// data, whatever crashed. PostgreSQL is stopped immediately right after a STRICT read saw a
/// restock, with the WAL writer slowed to 10 s, so that a commit that did not wait for its
/// flush is lost. The parts run as separate processes, as in a scaled deployment: the read
/// API learns where the projections are from the database, and must forget what it knew when
/// it reconnects. No saga runs: its writes would flush the WAL and hide a lost commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_read_never_answers_data_older_than_its_token_after_a_crash() {
    let cluster = PrivateCluster::create().await.expect("a private cluster");
    slow_wal_writer(&cluster).await;
    migrate(&cluster.url()).await;
    let writer = Orderly::start("command-api", &cluster.url(), &["command-api"], &[]).await;
    let _runners =
        Orderly::start("projections", &cluster.url(), &["projections", "run"], &[]).await;
    let reader = Orderly::start("read-api", &cluster.url(), &["read-api"], &[]).await;
    register(&writer.api, "CRASH-A", 300, "EUR", 10).await;

    let restocked = writer
        .api
        .gql(
            Some(&admin()),
            RESTOCK_WITH_TOKEN,
            json!({ "sku": "CRASH-A", "q": 5 }),
        )
        .await;
    let restock = restocked.data("restock").clone();
    let (token, version) = (restock["token"].clone(), restock["version"].as_i64());
    let seen = strict_product(&reader.api, "CRASH-A", &token).await;
    assert_eq!(seen.expect("a product")["onHand"], 15, "before the crash");

    cluster.restart_immediate().await.expect("crash and start");
    let started = Instant::now();
    let mut answered = 0;
    let mut refused = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        match strict_product(&reader.api, "CRASH-A", &token).await {
            Err(refusal) => refused.push(refusal),
            Ok(answer) => {
                assert!(
                    answer["version"].as_i64() >= version && answer["onHand"] == 15,
                    "a STRICT read at the restock's token answered older data: {answer}"
                );
                answered += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        answered > 0,
        "no STRICT read answered within 10 s of the crash: {:?}",
        refused.last()
    );
}

/// The read path under the faults a database has at peak, in five rounds. In each,
/// `orderly seed` writes a workload (placements, cancellations, then shipments and deliveries)
/// while every new session times its statements out after 200 ms, and one fault strikes it:
/// PostgreSQL restarted fast, and again; a transaction holding the log's horizon for longer
/// than a batch waits; a crash (an immediate stop and a start); a fast restart during the
/// shipments. A probe restocks and reads its restock back STRICT all along, and no answer may
/// be older than its token. After each fault the server is ready again within 30 s, a STRICT
/// read is answered again and no runner has given up; after each round the seed rode the fault
/// out and finished, every order in the log settled soundly, and the read models equal what a
/// rebuild from the log makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_path_rides_out_restarts_crashes_held_horizons_and_timeouts() {
    let cluster = PrivateCluster::create().await.expect("a private cluster");
    slow_wal_writer(&cluster).await;
    migrate(&cluster.url()).await;
    let server = Orderly::start("serve", &cluster.url(), &["serve"], &timing(10)).await;
    register(&server.api, "PEAK-PROBE", 300, "EUR", 100_000).await;
    let faults_done = AtomicBool::new(false);
    let answered = AtomicUsize::new(0);
    let probe = probe_strict_reads(&server.api, "PEAK-PROBE", &faults_done, &answered);
    let rounds = async {
        // Each fault once the log holds so many more events of a type than at the round's
        // start: four while orders are placed, the last while they are shipped.
        let rounds = [
            ("fast", "OrderPlaced", 15),
            ("fast", "OrderPlaced", 15),
            ("hold", "OrderPlaced", 15),
            ("immediate", "OrderPlaced", 15),
            ("fast", "OrderShipped", 5),
        ];
        let mut resent = 0;
        for (round, (fault, event_type, count)) in (1..).zip(rounds) {
            // Sessions opened from here on (every pool refills after a restart) time out
            // statements after 200 ms: the runners must retry those (SQLSTATE 57014).
            statement_timeout(&cluster, Some("200ms")).await;
            let due = count_events(&cluster, event_type)
                .await
                .expect("the log counted")
                + count;
            let seed_exited = AtomicBool::new(false);
            let seeded = wait_for_exit(
                spawn_seed(&cluster, round),
                Duration::from_secs(120),
                &seed_exited,
            );
            let strike = async {
                // A seed that is gone writes nothing more: its exit status tells why.
                if !events_written(&cluster, event_type, due, &seed_exited).await {
                    return false;
                }
                eprintln!("fault {round} ({fault}) at {due} {event_type} events");
                match fault {
                    "fast" => cluster.restart_fast().await.expect("restart"),
                    "immediate" => cluster.restart_immediate().await.expect("crash and start"),
                    _ => hold_horizon(&cluster, Duration::from_secs(2)).await,
                }
                server
                    .assert_serving_again(&answered, &format!("fault {round} ({fault})"))
                    .await;
                true
            };
            let ((seed, status), struck) = tokio::join!(seeded, strike);
            resent += assert_seed_finished(&seed, status);
            assert!(struck, "round {round}: the seed finished before the fault");
            // The checks of the round run at the server's own statement_timeout.
            statement_timeout(&cluster, None).await;
            let ids = Log::read(&cluster.connect().await.expect("a connection"))
                .await
                .expect("the log read")
                .placed();
            assert_eq!(
                ids.len(),
                50 * round,
                "orders in the log after round {round}"
            );
            server.assert_settles(&cluster, &ids).await;
            // The probe goes on restocking meanwhile: its product's row is left out.
            let db = cluster.connect().await.expect("a connection");
            assert_read_models_equal_a_rebuild(&cluster.url(), &db, &["PEAK-PROBE"]).await;
        }
        assert!(resent > 0, "the faults never reached the seed's commands");
        faults_done.store(true, Ordering::Relaxed);
    };
    let ((), strict) = tokio::join!(rounds, probe);

    assert!(
        strict.after_faults > 0,
        "no STRICT read answered after the faults ({} before)",
        strict.answered
    );
    server.assert_ready(Duration::from_secs(10)).await;
    assert_eq!(
        stopped_projections(&server),
        0,
        "a projection runner gave up:\n{}",
        server.errors()
    );
}

/// `orderly seed` of round `round` (its generator seeded with it, so each round places new
/// orders): 50 orders from 2 clients at a time, so that placing lasts through a fault, over
/// twelve products, the last two scarce (some orders are cancelled out of stock), most of
/// the confirmed ones then shipped. `serve`'s saga runner leads; the seed's own stands by.
fn spawn_seed(cluster: &PrivateCluster, round: usize) -> Subprocess {
    let round = round.to_string();
    let args = [
        "seed",
        "--orders",
        "50",
        "--products",
        "12",
        "--customers",
        "40",
        "--seed",
        &round,
        "--concurrency",
        "2",
    ];
    Subprocess::spawn("seed", orderly(&args, &cluster.url(), &timing(10)))
        .expect("orderly seed started")
}

/// The seed exited successfully and its saga runner lost no step; how many commands it sent
/// again after a transient failure.
fn assert_seed_finished(seed: &Subprocess, status: std::process::ExitStatus) -> usize {
    let output = seed.output();
    let resent = output
        .matches("failed transiently; sending it again")
        .count();
    assert!(
        status.success(),
        "orderly seed failed ({status}):\n{}",
        output
            .lines()
            .filter(|line| !line.contains("\"level\":\"INFO\""))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let lost: Vec<&str> = output.lines().filter(|l| l.contains(STEP_LOST)).collect();
    assert!(
        lost.is_empty(),
        "the seed's saga runner lost steps:\n{}",
        lost.join("\n")
    );
    resent
}

/// Sets (or, with `None`, resets) the `statement_timeout` of sessions opened from now on.
async fn statement_timeout(cluster: &PrivateCluster, timeout: Option<&str>) {
    let db = cluster.connect().await.expect("a connection");
    let sql = match timeout {
        Some(timeout) => format!("alter database postgres set statement_timeout = '{timeout}'"),
        None => "alter database postgres reset statement_timeout".to_owned(),
    };
    db.batch_execute(&sql).await.expect("statement_timeout set");
}

/// The log is written on the primary. A store whose connection lands on a standby (a name a
/// failover manager has not moved yet, a URL without `target_session_attrs`) is refused as
/// unavailable, reads included, and keeps no such connection in its pool: once that server is
/// promoted, the same store writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_store_keeps_no_connection_to_a_standby() {
    let primary = PrivateCluster::create().await.expect("a private cluster");
    let standby = primary
        .synchronous_standby()
        .await
        .expect("a synchronous standby");
    migrate(&primary.url()).await;
    let store = PgEventStore::new(
        standby.url().parse().expect("a URL"),
        PgStoreOptions::default(),
    )
    .expect("a store");
    let stream = StreamName::parse("order-standby").expect("a stream");
    let event = || vec![NewEvent::new("Probe", json!({}))];
    match store.read_all(Position::START, &EventFilter::All, 10).await {
        Err(error) if error.is_unavailable() => {
            assert!(error.to_string().contains("standby"), "{error}")
        }
        other => panic!("a read on a standby answered {other:?}"),
    }
    match store
        .append(&stream, ExpectedVersion::NoStream, event())
        .await
    {
        Err(error) if error.is_unavailable() => {}
        other => panic!("an append on a standby answered {other:?}"),
    }
    primary.stop_immediate().await.expect("the primary stopped");
    standby.promote().await.expect("the standby promoted");
    let started = Instant::now();
    loop {
        match store
            .append(&stream, ExpectedVersion::NoStream, event())
            .await
        {
            Ok(_) => break,
            Err(error) if error.is_unavailable() => {
                assert!(started.elapsed() < Duration::from_secs(30), "{error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("{error}"),
        }
    }
}

/// A failover at peak: the primary crashes under a burst of orders and STRICT reads, and its
/// synchronous standby is promoted. The server, given both hosts and
/// `target_session_attrs=read-write` in its URL (as libpq would be), finds the new primary by
/// itself. Nothing acknowledged is lost: every order accepted settles, every STRICT read
/// answers its token's data or STALE_READ, no runner gives up, and the read models equal a
/// rebuild from the new primary's log. (An asynchronous standby would not do: the commits it
/// had not received are gone, and their transaction ids are handed out again, so positions
/// that clients and outside subscribers hold may name other events; the README says so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_synchronous_standby_loses_no_order_and_no_token() {
    let primary = PrivateCluster::create().await.expect("a private cluster");
    let standby = primary
        .synchronous_standby()
        .await
        .expect("a synchronous standby");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    migrate(&url).await;
    let server = Orderly::start("serve", &url, &["serve"], &timing(10)).await;
    for sku in ["FAILOVER-A", "FAILOVER-B", "FAILOVER-PROBE"] {
        register(&server.api, sku, 300, "EUR", 100_000).await;
    }
    let placed = AtomicUsize::new(0);
    let failed_over = AtomicBool::new(false);
    let answered = AtomicUsize::new(0);
    let burst = place_burst(
        &server.api,
        0..160,
        8,
        &placed,
        |i| json!([{ "sku": if i % 2 == 0 { "FAILOVER-A" } else { "FAILOVER-B" }, "quantity": 1 }]),
    );
    let probe = probe_strict_reads(&server.api, "FAILOVER-PROBE", &failed_over, &answered);
    let failover = async {
        while placed.load(Ordering::Relaxed) < 60 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        primary.stop_immediate().await.expect("the primary crashed");
        standby.promote().await.expect("the standby promoted");
        server
            .assert_serving_again(&answered, "the promotion")
            .await;
        failed_over.store(true, Ordering::Relaxed);
    };
    let (ids, (), strict) = tokio::join!(burst, failover, probe);

    server.assert_settles(&standby, &ids).await;
    assert!(
        strict.after_faults > 0,
        "no STRICT read answered after the failover ({} before)",
        strict.answered
    );
    assert_eq!(
        stopped_projections(&server),
        0,
        "a projection runner gave up:\n{}",
        server.errors()
    );
    let db = standby.connect().await.expect("a connection");
    assert_read_models_equal_a_rebuild(&standby.url(), &db, &[]).await;
}

/// A transaction left open anywhere in the cluster holds every reader of the log back. The
/// operator sees why: `orderly projections status` names the session and `/metrics` how long
/// committed events have waited, while it lasts; both clear once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_horizon_is_named_in_the_status_and_the_metrics() {
    let cluster = PrivateCluster::create().await.expect("a private cluster");
    migrate(&cluster.url()).await;
    let server = Orderly::start("serve", &cluster.url(), &["serve"], &[]).await;
    let forgotten =
        orderly_test_support::connect(&with_application_name(&cluster.url(), "forgotten-session"))
            .await
            .expect("a connection");
    forgotten
        .batch_execute("begin; select pg_current_xact_id()")
        .await
        .expect("a transaction with an id");
    register(&server.api, "HELD-A", 100, "EUR", 5).await;

    let status = poll(Duration::from_secs(15), || async {
        let output = projections_status(&cluster).await;
        output.contains("HELD").then_some(output)
    })
    .await
    .expect("the status says the horizon is held");
    assert!(status.contains("forgotten-session"), "{status}");
    let held = poll(Duration::from_secs(15), || async {
        let scrape = server
            .api
            .http
            .get(format!("{}/metrics", server.api.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let age: f64 = scrape
            .lines()
            .find_map(|line| line.strip_prefix("orderly_log_horizon_age_seconds "))?
            .parse()
            .ok()?;
        (age > 0.0).then_some(age)
    })
    .await;
    assert!(held.is_some(), "no horizon age on /metrics");

    forgotten.batch_execute("commit").await.expect("commit");
    let cleared = poll(Duration::from_secs(15), || async {
        let output = projections_status(&cluster).await;
        output.contains("no committed event waits").then_some(())
    })
    .await;
    assert!(cleared.is_some(), "{}", projections_status(&cluster).await);
}

/// What `orderly projections status` prints for `cluster`.
async fn projections_status(cluster: &PrivateCluster) -> String {
    let mut status = orderly(&["projections", "status"], &cluster.url(), &[]);
    let output = tokio::task::spawn_blocking(move || status.output())
        .await
        .expect("status ran")
        .expect("orderly projections status started");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A log copied into another cluster with pg_dump and pg_restore keeps its transaction ids,
/// which are ahead of a younger cluster's. Start-up refuses to run on it (new events would sort
/// before the copied ones and readers would skip them); `orderly migrate --rebase-log` repairs
/// it, after which new events are read after the old ones, also by a reader that resumes from
/// a position stored before the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_log_is_refused_until_rebased_and_then_read_on() {
    let old = PrivateCluster::create().await.expect("the old cluster");
    migrate(&old.url()).await;
    // The old cluster has handed out a few thousand more transaction ids than a new one.
    old.connect()
        .await
        .expect("a connection")
        .batch_execute(
            "do $$ begin for i in 1..3000 loop perform pg_current_xact_id(); commit; end loop; end $$",
        )
        .await
        .expect("transaction ids used up");
    let old_store = PgEventStore::connect(&old.url(), PgStoreOptions::default()).expect("a store");
    let stream = StreamName::parse("restore-1").expect("a stream name");
    let before = old_store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Written", json!({ "n": 1 }))],
        )
        .await
        .expect("an append")
        .position;
    let dump = std::env::temp_dir().join(format!("orderly-restore-{}.dump", Uuid::new_v4()));
    let mut pg_dump = Command::new(old.program("pg_dump"));
    pg_dump.args(["-Fc", "-f"]).arg(&dump).arg(old.url());
    run_program(pg_dump).await;

    let new = PrivateCluster::create().await.expect("the new cluster");
    let mut pg_restore = Command::new(new.program("pg_restore"));
    pg_restore
        .args(["--no-owner", "-d"])
        .arg(new.url())
        .arg(&dump);
    run_program(pg_restore).await;
    let _ = std::fs::remove_file(&dump);
    let refused = orderly_output(&["migrate"], &new.url()).await;
    assert!(!refused.status.success(), "migrate ran on a restored log");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("--rebase-log"), "{said}");

    let rebased = orderly_output(&["migrate", "--rebase-log"], &new.url()).await;
    assert!(
        rebased.status.success(),
        "{}",
        String::from_utf8_lossy(&rebased.stderr)
    );
    let new_store = PgEventStore::connect(&new.url(), PgStoreOptions::default()).expect("a store");
    let after = new_store
        .append(
            &stream,
            ExpectedVersion::Exact(0),
            vec![NewEvent::new("Written", json!({ "n": 2 }))],
        )
        .await
        .expect("an append after the restore")
        .position;
    assert!(after > before, "{after} is not after {before}");
    let resumed = new_store
        .read_all(before, &EventFilter::All, 10)
        .await
        .expect("the log read on");
    assert_eq!(
        resumed
            .iter()
            .map(|e| e.data["n"].clone())
            .collect::<Vec<_>>(),
        vec![json!(2)],
        "a reader resuming from before the copy"
    );
    let whole = new_store
        .read_all(Position::START, &EventFilter::All, 10)
        .await
        .expect("the whole log");
    assert_eq!(
        whole
            .iter()
            .map(|e| e.data["n"].clone())
            .collect::<Vec<_>>(),
        vec![json!(1), json!(2)]
    );
}

/// Runs `command` to completion off the runtime's workers; panics with its output on failure.
async fn run_program(mut command: Command) {
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the program ran")
        .expect("the program started");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `orderly args` against `database_url`, run to completion.
async fn orderly_output(args: &[&str], database_url: &str) -> std::process::Output {
    let mut command = orderly(args, database_url, &[]);
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("orderly ran")
        .expect("orderly started")
}

const RESTOCK_WITH_TOKEN: &str = "mutation($sku: String!, $q: Int!) {
  restock(sku: $sku, quantity: $q) { version token } }";

/// Commits that do not wait for their WAL flush reach the disk only when the WAL writer runs:
/// every 10 s from now on, so that a crash loses them.
async fn slow_wal_writer(cluster: &PrivateCluster) {
    let db = cluster.connect().await.expect("a connection");
    // Two messages: a multi-statement string runs as one transaction, which ALTER SYSTEM refuses.
    db.batch_execute("alter system set wal_writer_delay = '10s'")
        .await
        .expect("wal_writer_delay set");
    db.batch_execute("select pg_reload_conf()")
        .await
        .expect("configuration reloaded");
}

/// `product(sku)` read STRICT at `token` (waiting up to a second): `Ok` with what the read
/// model answered (`null` for no such product), or `Err` with the error's `extensions`
/// (STALE_READ; UNAVAILABLE or no answer while the database is away).
async fn strict_product(api: &Api, sku: &str, token: &Value) -> Result<Value, Value> {
    let query = "query($sku: String!, $t: ConsistencyToken!) {
      product(sku: $sku, consistency: { atLeast: $t, timeoutMs: 1000, mode: STRICT }) {
        version onHand } }";
    let body = json!({ "query": query, "variables": { "sku": sku, "t": token } });
    let answer = api
        .http
        .post(format!("{}/graphql", api.base))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await;
    let Ok(response) = answer else {
        return Err(json!({ "code": "NO_ANSWER" }));
    };
    let status = response.status();
    let Ok(body) = response.json::<Value>().await else {
        return Err(json!({ "code": "NOT_JSON", "status": status.as_u16() }));
    };
    if let Some(extensions) = body["errors"][0].get("extensions") {
        let code = extensions["code"].as_str().unwrap_or_default();
        assert!(
            ["STALE_READ", "UNAVAILABLE"].contains(&code),
            "a STRICT read failed otherwise: {body}"
        );
        return Err(extensions.clone());
    }
    Ok(body["data"]["product"].clone())
}

/// Projection runners `server` logged as stopped for good.
fn stopped_projections(server: &Orderly) -> usize {
    server
        .process
        .output()
        .lines()
        .filter(|line| line.contains("projection stopped"))
        .count()
}

/// What [`probe_strict_reads`] saw.
struct StrictReads {
    answered: usize,
    after_faults: usize,
}

/// Restocks `sku` by one and reads it back STRICT at the restock's token, over and over, until
/// `done` and then ten times more: every answer with data must show the restock. Counts the
/// answers in `answered` as they come.
async fn probe_strict_reads(
    api: &Api,
    sku: &str,
    done: &AtomicBool,
    answered: &AtomicUsize,
) -> StrictReads {
    let admin = admin();
    let mut reads = StrictReads {
        answered: 0,
        after_faults: 0,
    };
    let mut after = 0;
    while after < 10 {
        if done.load(Ordering::Relaxed) {
            after += 1;
        }
        let body = json!({ "query": RESTOCK_WITH_TOKEN, "variables": { "sku": sku, "q": 1 } });
        let answer = api
            .http
            .post(format!("{}/graphql", api.base))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let restock = match answer {
            Ok(response) => {
                response.json::<Value>().await.unwrap_or(Value::Null)["data"]["restock"].clone()
            }
            Err(_) => Value::Null,
        };
        // A restock the database refused or lost the answer of proves nothing either way.
        if let Some(version) = restock["version"].as_i64()
            && let Ok(seen) = strict_product(api, sku, &restock["token"]).await
        {
            let seen_version = seen["version"].as_i64();
            assert!(
                seen_version >= Some(version),
                "a STRICT read at the token of version {version} answered {seen}"
            );
            reads.answered += 1;
            answered.fetch_add(1, Ordering::Relaxed);
            if done.load(Ordering::Relaxed) {
                reads.after_faults += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reads
}

/// Waits up to `within` for `process` to exit, then sets `exited`; the process and how it
/// ended. Kills it and fails when it outlasts `within`.
async fn wait_for_exit(
    mut process: Subprocess,
    within: Duration,
    exited: &AtomicBool,
) -> (Subprocess, std::process::ExitStatus) {
    let started = Instant::now();
    loop {
        if let Some(status) = process.exit_status() {
            exited.store(true, Ordering::Relaxed);
            return (process, status);
        }
        if started.elapsed() >= within {
            process.kill();
            panic!("{} still running after {within:?}", process.name());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the log holds `count` events of `event_type` (reading it on a new connection
/// each time, so that a restart in between does not matter); `false` when `writer_exited`
/// first.
async fn events_written(
    cluster: &PrivateCluster,
    event_type: &str,
    count: i64,
    writer_exited: &AtomicBool,
) -> bool {
    loop {
        if count_events(cluster, event_type)
            .await
            .is_some_and(|written| written >= count)
        {
            return true;
        }
        if writer_exited.load(Ordering::Relaxed) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many events of `event_type` the log holds, on a new connection; `None` while the
/// server cannot say (restarting).
async fn count_events(cluster: &PrivateCluster, event_type: &str) -> Option<i64> {
    let db = cluster.connect().await.ok()?;
    let row = db
        .query_one(
            "select count(*) from events where event_type = $1",
            &[&event_type],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

/// Holds a transaction with an id open for `hold`: every reader of the log waits behind it.
async fn hold_horizon(cluster: &PrivateCluster, hold: Duration) {
    let db = cluster.connect().await.expect("a connection");
    db.batch_execute("begin; select pg_current_xact_id()")
        .await
        .expect("a transaction with an id");
    tokio::time::sleep(hold).await;
    db.batch_execute("commit").await.expect("commit");
}

/// Waits until every projection's checkpoint has passed the last event of the log.
async fn caught_up(db: &tokio_postgres::Client, within: Duration) {
    let done = poll(within, || async {
        let behind: i64 = db
            .query_one(
                "select count(*) from projection_checkpoints c
                 where exists (select 1 from events e
                               where (e.tx_id, e.seq) > (c.position_commit, c.position_prepare))",
                &[],
            )
            .await
            .expect("the checkpoints read")
            .get(0);
        (behind == 0).then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "the projections did not reach the log's end"
    );
}

/// Every read-model table, row by row, in a fixed order.
async fn read_models(db: &tokio_postgres::Client) -> Vec<(String, Vec<String>)> {
    let mut all = Vec::new();
    for table in ProjectionName::ALL.iter().flat_map(|p| p.tables()) {
        let rows = db
            .query(
                &format!("select t::text from public.{table} t order by 1"),
                &[],
            )
            .await
            .expect("a read-model table");
        all.push(((*table).to_owned(), rows.iter().map(|r| r.get(0)).collect()));
    }
    all
}

/// The read models, once caught up with the log (within 30 s), equal what
/// `orderly projections rebuild --all` makes of it, row for row, but for rows that mention one
/// of `ignoring` (written to meanwhile, so their live and rebuilt copies may differ by what
/// happened in between).
async fn assert_read_models_equal_a_rebuild(
    database_url: &str,
    db: &tokio_postgres::Client,
    ignoring: &[&str],
) {
    let compared = |tables: Vec<(String, Vec<String>)>| {
        tables
            .into_iter()
            .map(|(table, mut rows)| {
                rows.retain(|row| !ignoring.iter().any(|ignored| row.contains(ignored)));
                (table, rows)
            })
            .collect::<Vec<_>>()
    };
    caught_up(db, Duration::from_secs(30)).await;
    let live = compared(read_models(db).await);
    let mut rebuild = orderly(&["projections", "rebuild", "--all"], database_url, &[]);
    let output = tokio::task::spawn_blocking(move || rebuild.output())
        .await
        .expect("rebuild ran")
        .expect("orderly projections rebuild started");
    assert!(
        output.status.success(),
        "rebuild failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rebuilt = compared(read_models(db).await);
    for ((table, a), (_, b)) in live.iter().zip(&rebuilt) {
        let only_live: Vec<_> = a.iter().filter(|r| !b.contains(r)).take(3).collect();
        let only_rebuilt: Vec<_> = b.iter().filter(|r| !a.contains(r)).take(3).collect();
        assert!(
            a == b,
            "{table} differs from a rebuild ({} vs {} rows)\nonly live: {only_live:#?}\nonly rebuilt: {only_rebuilt:#?}",
            a.len(),
            b.len()
        );
    }
}

fn timing(deadline_secs: u64) -> Vec<(&'static str, String)> {
    vec![
        ("ORDERLY_PAYMENT_DEADLINE_SECS", deadline_secs.to_string()),
        ("ORDERLY_PAYMENT_RETRY_AFTER_SECS", "1".into()),
        // The provider below finishes a charge within its answer's pause.
        ("ORDERLY_PAYMENT_SETTLE_SECS", "1".into()),
        ("ORDERLY_SAGA_TICK_MS", "100".into()),
    ]
}

/// `orderly` with `args`, its settings only the ones given here (none inherited from the
/// environment the tests run in) and logs at info, where a lost step shows.
fn orderly(args: &[&str], database_url: &str, settings: &[(&str, String)]) -> Command {
    let mut command = Command::new(ORDERLY);
    command.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("ORDERLY_") {
            command.env_remove(name);
        }
    }
    command
        .env("ORDERLY_DATABASE_URL", database_url)
        .env("ORDERLY_JWT_SECRET", SECRET)
        .env("ORDERLY_RATE_LIMIT_PER_SECOND", "0")
        // Lines a test can match without colour codes in the way.
        .env("ORDERLY_LOG_FORMAT", "json")
        .env("RUST_LOG", "info");
    for (name, value) in settings {
        command.env(name, value);
    }
    command
}

/// Applies the migrations once, before processes that would each try to.
async fn migrate(database_url: &str) {
    let output = orderly_output(&["migrate"], database_url).await;
    assert!(
        output.status.success(),
        "orderly migrate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The database URL with `application_name` set, so that the sessions of one process can be
/// told apart in `pg_stat_activity`.
fn with_application_name(database_url: &str, name: &str) -> String {
    format!("{database_url}?application_name={name}")
}

/// One `orderly` process serving HTTP on a port of its own.
struct Orderly {
    process: Subprocess,
    api: Api,
}

impl Orderly {
    /// Starts `orderly args` and waits until it answers `/healthz`; tries another port when
    /// the one chosen was taken meanwhile.
    async fn start(
        name: &str,
        database_url: &str,
        args: &[&str],
        settings: &[(&str, String)],
    ) -> Self {
        for _ in 0..3 {
            let port = free_port().expect("a free port");
            let mut command = orderly(args, database_url, settings);
            command.env("ORDERLY_HTTP_ADDR", format!("127.0.0.1:{port}"));
            let mut process = Subprocess::spawn(name, command).expect("orderly started");
            let api = Api {
                base: format!("http://127.0.0.1:{port}"),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .build()
                    .expect("an HTTP client"),
            };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                if let Some(status) = process.exit_status() {
                    let output = process.output();
                    if output.contains("in use") {
                        break;
                    }
                    panic!("{name} exited ({status}) at start:\n{}", process.tail(40));
                }
                let health = api.http.get(format!("{}/healthz", api.base)).send().await;
                if health.is_ok_and(|r| r.status().is_success()) {
                    return Self { process, api };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if process.is_running() {
                panic!("{name} did not answer /healthz within 60 s");
            }
        }
        panic!("{name}: no free port after 3 tries");
    }

    /// The first lines the process logged at ERROR, and every lost step, for a report.
    fn errors(&self) -> String {
        let output = self.process.output();
        let errors: Vec<&str> = output
            .lines()
            .filter(|line| line.contains(ERROR) || line.contains(STEP_LOST))
            .take(20)
            .collect();
        format!(
            "{} logged {} error lines, the first ones:\n{}",
            self.process.name(),
            output.lines().filter(|line| line.contains(ERROR)).count(),
            errors.join("\n")
        )
    }

    /// Every order of `ids` settles soundly within two minutes (see [`settle`]), and this
    /// process, the only one running the saga, lost no step on the way.
    async fn assert_settles(&self, cluster: &PrivateCluster, ids: &[Uuid]) {
        let log = settle(
            cluster,
            ids,
            Duration::from_secs(120),
            Duration::from_secs(20),
            &[self],
        )
        .await;
        log.assert_sound(ids);
        self.assert_no_step_lost();
    }

    fn assert_no_step_lost(&self) {
        let output = self.process.output();
        let lost: Vec<&str> = output.lines().filter(|l| l.contains(STEP_LOST)).collect();
        assert!(
            lost.is_empty(),
            "{} lost saga steps:\n{}",
            self.process.name(),
            lost.join("\n")
        );
    }

    /// After a fault (`what`): the server says it is ready again, a STRICT read of
    /// [`probe_strict_reads`] (which checks every answer against its token) is answered again,
    /// each within 30 s, and no projection runner gave up.
    async fn assert_serving_again(&self, answered: &AtomicUsize, what: &str) {
        self.assert_ready(Duration::from_secs(30)).await;
        let before = answered.load(Ordering::Relaxed);
        let read_again = poll(Duration::from_secs(30), || async {
            (answered.load(Ordering::Relaxed) > before).then_some(())
        })
        .await;
        assert!(
            read_again.is_some(),
            "no STRICT read answered within 30 s after {what}"
        );
        assert_eq!(
            stopped_projections(self),
            0,
            "a projection runner gave up after {what}:\n{}",
            self.errors()
        );
    }

    /// `/readyz` says ready within `within` (the pools may take a moment to replace the
    /// connections a restart cut).
    async fn assert_ready(&self, within: Duration) {
        let started = Instant::now();
        loop {
            let answer = self
                .api
                .http
                .get(format!("{}/readyz", self.api.base))
                .send()
                .await;
            let (status, body) = match answer {
                Ok(response) => (
                    response.status().as_u16(),
                    response.text().await.unwrap_or_default(),
                ),
                Err(error) => (0, error.to_string()),
            };
            if status == 200 && body.contains("\"ready\"") {
                return;
            }
            assert!(
                started.elapsed() < within,
                "/readyz after {within:?}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits, up to 30 s, until every saga lane is held (lease running) by a live member and the
/// lanes are spread over `members` of them; how many lanes each holds.
async fn lanes_owned_by_live_members(
    db: &tokio_postgres::Client,
    members: usize,
) -> BTreeMap<String, i64> {
    let owners = || async {
        let rows = db
            .query(
                "select l.owner, count(*) from saga_lanes l
                 join saga_members m on m.saga_name = l.saga_name and m.member_id = l.owner
                 where l.lease_until > now() and m.lease_until > now()
                 group by l.owner",
                &[],
            )
            .await
            .expect("the lanes read");
        let lanes: i64 = db
            .query_one("select count(*) from saga_lanes", &[])
            .await
            .expect("the lanes counted")
            .get(0);
        let owners: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        (owners.len() == members && owners.values().sum::<i64>() == lanes && lanes > 0)
            .then_some(owners)
    };
    if let Some(owners) = poll(Duration::from_secs(30), owners).await {
        return owners;
    }
    let lanes: Vec<String> = db
        .query(
            "select lane, owner, lease_until from saga_lanes order by lane",
            &[],
        )
        .await
        .expect("the lanes read")
        .iter()
        .map(|r| {
            let until: DateTime<Utc> = r.get(2);
            format!(
                "{} {:?} until {until}",
                r.get::<_, i32>(0),
                r.get::<_, Option<String>>(1)
            )
        })
        .collect();
    panic!(
        "the saga's lanes are not all held by {members} live member(s) within 30 s:\n{}",
        lanes.join("\n")
    )
}

/// Stops `process` with SIGTERM and waits up to 30 s for it to exit successfully.
async fn stop(process: &mut Subprocess) {
    let pid = process.id().to_string();
    let signalled = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill ran");
    assert!(signalled.success());
    let exited = poll(Duration::from_secs(30), || {
        let status = process.exit_status();
        async move { status }
    })
    .await
    .unwrap_or_else(|| panic!("{} still running 30 s after SIGTERM", process.name()));
    assert!(exited.success(), "{} exited with {exited}", process.name());
}
/// The `application_name` of the saga process that holds an advisory lock, if one does (the
/// leader, while one runner leads at a time).
async fn leading_saga(cluster: &PrivateCluster) -> Option<String> {
    let db = cluster.connect().await.ok()?;
    db.query_opt(
        "select a.application_name from pg_locks l join pg_stat_activity a on a.pid = l.pid
         where l.locktype = 'advisory' and l.granted and a.application_name like 'saga-%'
         limit 1",
        &[],
    )
    .await
    .ok()
    .flatten()
    .map(|row| row.get(0))
}

/// A connection in a transaction that holds every table of the saga's own (states,
/// checkpoints, lanes, leases: whatever the schema has named `saga_*`) in share mode, which
/// lets the saga read them but makes its writes wait. `commit` (or dropping it) lets go.
async fn lock_saga_tables(cluster: &PrivateCluster) -> tokio_postgres::Client {
    let holder = cluster.connect().await.expect("a connection");
    let tables: Vec<String> = holder
        .query(
            "select format('%I', table_name) from information_schema.tables
             where table_schema = current_schema() and table_type = 'BASE TABLE'
               and table_name like 'saga\\_%' order by table_name",
            &[],
        )
        .await
        .expect("the saga tables")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!tables.is_empty(), "no saga_* tables in the schema");
    // The holder itself waits as long as it takes for the saga's own writes to finish.
    holder
        .batch_execute(&format!(
            "begin; set local lock_timeout = 0; lock table {} in share mode",
            tables.join(", ")
        ))
        .await
        .expect("the saga tables locked");
    holder
}

/// Waits, up to `within`, until some session waits for a lock (the saga, on the tables
/// [`lock_saga_tables`] holds); whether one did.
async fn saga_waits_for_a_lock(cluster: &PrivateCluster, within: Duration) -> bool {
    let db = cluster.connect().await.expect("a connection");
    let waiting = poll(within, || async {
        let row = db
            .query_one(
                "select count(*) from pg_stat_activity
                 where wait_event_type = 'Lock' and pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_activity");
        (row.get::<_, i64>(0) > 0).then_some(())
    })
    .await;
    if waiting.is_none() {
        eprintln!("no saga write waited on its tables within {within:?}; restarting all the same");
    }
    waiting.is_some()
}

// ---------------------------------------------------------------------------------------------
// The payment provider.

/// A payment provider over HTTP as `HttpGateway` calls one (`POST /charges`, `GET
/// /charges/{key}`, `POST /refunds`), served by the test process: the saga processes charge
/// through it, so what they asked survives their kills. Like a real provider, it charges a
/// repeated idempotency key once and answers it with the first outcome. It takes a charge at
/// once and answers it [`PROVIDER_ANSWERS_AFTER`] later, so a process killed meanwhile leaves
/// money taken that its log does not show yet.
struct Provider {
    url: String,
    calls: Arc<std::sync::Mutex<ProviderCalls>>,
}

#[derive(Default)]
struct ProviderCalls {
    /// Charges taken, by idempotency key: the reference and how often the key was sent.
    charges: BTreeMap<String, (String, u32)>,
    /// Refunds asked for, by idempotency key.
    refunds: BTreeMap<String, u32>,
    /// Lookups of a charge whose outcome its caller lost.
    lookups: u32,
}

type Calls = axum::extract::State<Arc<std::sync::Mutex<ProviderCalls>>>;

const PROVIDER_ANSWERS_AFTER: Duration = Duration::from_millis(200);

impl Provider {
    async fn start() -> Self {
        use axum::routing::{get, post};
        let calls = Arc::new(std::sync::Mutex::new(ProviderCalls::default()));
        let router = axum::Router::new()
            .route("/charges", post(provider_charge))
            .route("/charges/{key}", get(provider_lookup))
            .route("/refunds", post(provider_refund))
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the provider");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { url, calls }
    }

    /// The settings that send a process's charges here.
    fn settings(&self) -> [(&'static str, String); 2] {
        [
            ("ORDERLY_PAYMENT_GATEWAY", "http".into()),
            ("ORDERLY_PAYMENT_GATEWAY_URL", self.url.clone()),
        ]
    }

    /// Every charge the provider took is one of `ids` under its own order's key, each
    /// confirmed order was charged, only cancelled orders were refunded, and every cancelled
    /// order the provider charged was refunded (within a minute): however often killed
    /// processes sent a charge again or lost its answer, no order's money was taken twice or
    /// kept.
    async fn assert_charged_once(&self, ids: &[Uuid], log: &Log) {
        let unrefunded = || {
            let calls = self.calls.lock().expect("the provider's calls");
            log.orders
                .iter()
                .filter(|(id, order)| {
                    order.cancelled.is_some()
                        && calls.charges.contains_key(&id.to_string())
                        && !calls.refunds.contains_key(&format!("refund-{id}"))
                })
                .map(|(id, _)| *id)
                .collect::<Vec<_>>()
        };
        let started = Instant::now();
        while !unrefunded().is_empty() && started.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let kept = unrefunded();
        assert!(
            kept.is_empty(),
            "cancelled, charged, never refunded: {kept:?}"
        );
        let calls = self.calls.lock().expect("the provider's calls");
        let orders: BTreeSet<String> = ids.iter().map(Uuid::to_string).collect();
        for key in calls.charges.keys() {
            assert!(
                orders.contains(key),
                "a charge under key {key}, no order's id"
            );
        }
        for (id, order) in &log.orders {
            let charged = calls.charges.contains_key(&id.to_string());
            if order.confirmed {
                assert!(
                    charged,
                    "order {id} confirmed, never charged at the provider"
                );
            }
            let refunded = calls.refunds.contains_key(&format!("refund-{id}"));
            assert!(
                !refunded || order.cancelled.is_some(),
                "order {id} refunded but not cancelled"
            );
        }
        let sent: u32 = calls.charges.values().map(|(_, sent)| sent).sum();
        eprintln!(
            "provider: {} charges taken from {sent} charge calls, {} lookups, {} refunds",
            calls.charges.len(),
            calls.lookups,
            calls.refunds.len()
        );
    }
}

async fn provider_charge(
    axum::extract::State(calls): Calls,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(key) = idempotency_key(&headers) else {
        return axum::http::StatusCode::BAD_REQUEST.into_response();
    };
    let reference = {
        let mut calls = calls.lock().expect("the provider's calls");
        let charge = calls
            .charges
            .entry(key.to_owned())
            .or_insert_with(|| (format!("prov_{}", Uuid::new_v4().simple()), 0));
        charge.1 += 1;
        charge.0.clone()
    };
    tokio::time::sleep(PROVIDER_ANSWERS_AFTER).await;
    axum::Json(json!({ "status": "charged", "reference": reference })).into_response()
}

fn idempotency_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get("idempotency-key")
        .and_then(|key| key.to_str().ok())
}

async fn provider_lookup(
    axum::extract::State(calls): Calls,
    axum::extract::Path(key): axum::extract::Path<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut calls = calls.lock().expect("the provider's calls");
    calls.lookups += 1;
    match calls.charges.get(&key) {
        Some((reference, _)) => {
            axum::Json(json!({ "status": "charged", "reference": reference })).into_response()
        }
        None => (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(json!({ "status": "not_found" })),
        )
            .into_response(),
    }
}

async fn provider_refund(
    axum::extract::State(calls): Calls,
    headers: axum::http::HeaderMap,
) -> axum::http::StatusCode {
    let Some(key) = idempotency_key(&headers) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    *calls
        .lock()
        .expect("the provider's calls")
        .refunds
        .entry(key.to_owned())
        .or_default() += 1;
    axum::http::StatusCode::OK
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// Places the orders numbered `orders` (each number names its customer and idempotency key)
/// from `clients` concurrent clients, lines from `lines(i)`, all paid with tok_ok; counts them
/// in `placed` as they are accepted. Their ids, in order.
async fn place_burst(
    api: &Api,
    orders: std::ops::Range<usize>,
    clients: usize,
    placed: &AtomicUsize,
    lines: impl Fn(usize) -> Value,
) -> Vec<Uuid> {
    let lines = Arc::new(lines);
    futures::stream::iter(orders)
        .map(|i| {
            let lines = lines.clone();
            async move {
                let id = place_order(
                    api,
                    &format!("customer-{i}"),
                    &format!("order-{i}"),
                    lines(i),
                    "tok_ok",
                )
                .await;
                placed.fetch_add(1, Ordering::Relaxed);
                id
            }
        })
        .buffered(clients)
        .collect()
        .await
}

/// Places one order under idempotency key `key`, sending it again (same key, so placed once)
/// while the answer is UNAVAILABLE or does not arrive at all, for up to `PLACE_PATIENCE`.
async fn place_order(api: &Api, customer_id: &str, key: &str, lines: Value, token: &str) -> Uuid {
    let mut variables = order_input(lines, token);
    variables["input"]["idempotencyKey"] = json!(key);
    let body = json!({ "query": crate::common::PLACE, "variables": variables }).to_string();
    let bearer = customer(customer_id);
    let started = Instant::now();
    loop {
        let answer = api
            .http
            .post(format!("{}/graphql", api.base))
            .bearer_auth(&bearer)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let last = match answer {
            Err(error) => format!("no answer: {error}"),
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                match serde_json::from_str::<Value>(&text) {
                    Ok(body) => {
                        if let Some(id) = body["data"]["placeOrder"]["id"].as_str() {
                            return id.parse().expect("an order id");
                        }
                        let code = body["errors"][0]["extensions"]["code"].as_str();
                        assert_eq!(code, Some("UNAVAILABLE"), "placeOrder {key}: {body}");
                        format!("{status} {body}")
                    }
                    Err(_) if status >= 500 => format!("{status} {text}"),
                    Err(_) => panic!("placeOrder {key}: {status} {text}"),
                }
            }
        };
        assert!(
            started.elapsed() < PLACE_PATIENCE,
            "placeOrder {key} not accepted within {PLACE_PATIENCE:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The time `sql` reads for `stream` (its one parameter), once the log holds it, polled for up
/// to `within`.
async fn time_in_log(
    db: &tokio_postgres::Client,
    sql: &str,
    stream: &str,
    within: Duration,
) -> Option<DateTime<Utc>> {
    poll(within, || async {
        db.query_opt(sql, &[&stream])
            .await
            .expect("read the log")
            .map(|row| row.get(0))
    })
    .await
}

/// Calls `probe` every 20 ms until it yields something, for up to `within`.
async fn poll<T, F, Fut>(within: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    while started.elapsed() < within {
        if let Some(found) = probe().await {
            return Some(found);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The event log, judged.

/// What the log says happened to one order.
#[derive(Debug, Default)]
struct OrderFacts {
    placed: usize,
    /// (sku, quantity) of each line.
    lines: Vec<(String, i64)>,
    confirmed: bool,
    /// Shipped (its reserved stock then leaves the warehouse) and delivered.
    shipped: bool,
    delivered: bool,
    /// The reason, once cancelled, and by whom (`customer` or `fulfilment`).
    cancelled: Option<String>,
    cancelled_by: Option<String>,
    /// An `OrderConfirmed` came after the `OrderCancelled`: never right.
    confirmed_after_cancel: bool,
    charges: usize,
    refunds: usize,
    /// Per SKU: reserved, minus released, minus shipped, for this order.
    held: BTreeMap<String, i64>,
}

impl OrderFacts {
    fn is_terminal(&self) -> bool {
        self.confirmed || self.cancelled.is_some()
    }

    /// What the order should hold of `sku` once settled: its line if confirmed and not shipped
    /// yet, else nothing.
    fn should_hold(&self, sku: &str) -> i64 {
        if !self.confirmed || self.shipped || self.cancelled.is_some() {
            return 0;
        }
        self.lines
            .iter()
            .filter(|(s, _)| s == sku)
            .map(|(_, q)| q)
            .sum()
    }
}

/// The whole log, read once.
struct Log {
    orders: BTreeMap<Uuid, OrderFacts>,
    /// The highest sequence value written, to see whether anything still happens.
    last_seq: i64,
}

impl Log {
    async fn read(db: &tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        let rows = db
            .query(
                "select event_type, data, seq from events order by tx_id, seq",
                &[],
            )
            .await?;
        let mut orders: BTreeMap<Uuid, OrderFacts> = BTreeMap::new();
        let mut last_seq = 0;
        for row in rows {
            let event_type: String = row.get(0);
            let data: Value = row.get(1);
            last_seq = last_seq.max(row.get::<_, i64>(2));
            let Some(order_id) = data["order_id"].as_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let order = orders.entry(order_id).or_default();
            let sku = || data["sku"].as_str().unwrap_or_default().to_owned();
            let quantity = data["quantity"].as_i64().unwrap_or_default();
            match event_type.as_str() {
                "OrderPlaced" => {
                    order.placed += 1;
                    order.lines = data["lines"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|line| {
                            let sku = line["sku"].as_str().unwrap_or_default().to_owned();
                            (sku, line["quantity"].as_i64().unwrap_or_default())
                        })
                        .collect();
                }
                "OrderConfirmed" => {
                    order.confirmed_after_cancel |= order.cancelled.is_some();
                    order.confirmed = true;
                }
                "OrderShipped" => order.shipped = true,
                "OrderDelivered" => order.delivered = true,
                "OrderCancelled" => {
                    let reason = data["cancellation_reason"].as_str().unwrap_or_default();
                    order.cancelled = Some(reason.to_owned());
                    order.cancelled_by = data["cancelled_by"].as_str().map(str::to_owned);
                }
                "PaymentCharged" => order.charges += 1,
                "PaymentRefunded" => order.refunds += 1,
                "StockReserved" => *order.held.entry(sku()).or_default() += quantity,
                "StockReservationReleased" | "ReservedStockShipped" => {
                    *order.held.entry(sku()).or_default() -= quantity;
                }
                _ => {}
            }
        }
        Ok(Self { orders, last_seq })
    }

    /// Every order placed, in id order.
    fn placed(&self) -> Vec<Uuid> {
        self.orders
            .iter()
            .filter(|(_, order)| order.placed > 0)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Orders not confirmed or cancelled yet.
    fn open(&self, ids: &[Uuid]) -> Vec<Uuid> {
        ids.iter()
            .filter(|id| !self.orders.get(id).is_some_and(OrderFacts::is_terminal))
            .copied()
            .collect()
    }

    /// Everything wrong with the outcome for orders `ids`, each said in a line; empty when
    /// sound. Some may still be on their way to right (a release follows its cancellation).
    fn problems(&self, ids: &[Uuid]) -> Vec<String> {
        let mut problems = Vec::new();
        let expected: BTreeSet<&Uuid> = ids.iter().collect();
        for id in self.orders.keys().filter(|id| !expected.contains(id)) {
            problems.push(format!(
                "order {id} is in the log but was never placed by the test"
            ));
        }
        let open = self.open(ids);
        if !open.is_empty() {
            problems.push(format!(
                "{} of {} orders neither confirmed nor cancelled, e.g. {:?}",
                open.len(),
                ids.len(),
                &open[..open.len().min(5)]
            ));
        }
        for (id, order) in ids.iter().filter_map(|id| Some((id, self.orders.get(id)?))) {
            if order.placed != 1 {
                problems.push(format!("order {id} placed {} times", order.placed));
            }
            // A customer may cancel a confirmed order until it ships (it is then refunded);
            // the saga never cancels one it confirmed, and nothing confirms a cancelled one.
            if order.confirmed_after_cancel
                || (order.confirmed
                    && order.cancelled.is_some()
                    && order.cancelled_by.as_deref() != Some("customer"))
            {
                problems.push(format!("order {id} confirmed and cancelled: {order:?}"));
            }
            if order.charges > 1 {
                problems.push(format!("order {id} charged {} times", order.charges));
            }
            if order.shipped && !order.confirmed {
                problems.push(format!("order {id} shipped but never confirmed"));
            }
            if order.delivered && !order.shipped {
                problems.push(format!("order {id} delivered but never shipped"));
            }
            if order.confirmed && order.charges == 0 {
                problems.push(format!("order {id} confirmed but never charged"));
            }
            if order.cancelled.is_some() && order.charges > order.refunds {
                problems.push(format!("order {id} cancelled but its charge not refunded"));
            }
            if order.is_terminal() {
                for (sku, held) in &order.held {
                    let should = order.should_hold(sku);
                    if *held != should {
                        problems.push(format!(
                            "order {id} holds {held} of {sku}, not {should}: {order:?}"
                        ));
                    }
                }
            }
        }
        // The same per product, as the product's stock counts it.
        let mut held: BTreeMap<&str, i64> = BTreeMap::new();
        let mut should: BTreeMap<&str, i64> = BTreeMap::new();
        for order in self.orders.values() {
            for (sku, quantity) in &order.held {
                *held.entry(sku).or_default() += quantity;
            }
            for (sku, _) in &order.lines {
                *should.entry(sku).or_default() += order.should_hold(sku);
            }
        }
        for sku in held.keys().chain(should.keys()).collect::<BTreeSet<_>>() {
            let (held, should) = (held.get(sku), should.get(sku));
            let (held, should) = (held.copied().unwrap_or(0), should.copied().unwrap_or(0));
            if held != should {
                problems.push(format!(
                    "{sku}: the log holds {held} reserved, the confirmed orders {should}"
                ));
            }
        }
        problems
    }

    fn assert_sound(&self, ids: &[Uuid]) {
        let problems = self.problems(ids);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

/// Reads the log until the outcome for `ids` is sound, for up to `within`, or until the log
/// has not grown for `quiet` (nothing left that would change it); the last reading. A failure
/// quotes the lost steps and errors that the `watched` processes logged.
async fn settle(
    cluster: &PrivateCluster,
    ids: &[Uuid],
    within: Duration,
    quiet: Duration,
    watched: &[&Orderly],
) -> Log {
    let started = Instant::now();
    let mut db = cluster.connect().await.expect("a connection");
    let (mut last_seq, mut grew_at) = (0, Instant::now());
    loop {
        let log = match Log::read(&db).await {
            Ok(log) => log,
            Err(error) => {
                assert!(started.elapsed() < within, "the log unreadable: {error}");
                tokio::time::sleep(Duration::from_millis(250)).await;
                db = cluster.connect().await.expect("a connection");
                continue;
            }
        };
        let problems = log.problems(ids);
        if problems.is_empty() {
            return log;
        }
        if log.last_seq != last_seq {
            (last_seq, grew_at) = (log.last_seq, Instant::now());
        }
        let waited = started.elapsed();
        assert!(
            waited < within && grew_at.elapsed() < quiet,
            "not settled after {waited:?} (the log quiet for {:?}):\n{}\n{}",
            grew_at.elapsed(),
            problems.join("\n"),
            watched
                .iter()
                .map(|process| process.errors())
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
