//! The outbox's notifications end to end: a failing transport is retried, dead-lettered, put
//! back in line from the CLI and delivered; SMTP delivery through a local SMTP listener; the
//! retention purge, which removes only settled and old rows; and a charge whose answer was
//! lost, found at the provider after the order was cancelled, and refunded.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use async_trait::async_trait;
use orderly_command_api::CommandError;
use orderly_command_api::saga::maintenance::{self, OutboxState};
use orderly_command_api::saga::{
    Charge, ChargeOutcome, Notice, Notifier, PaymentGateway, SagaConfig, SagaRunner, Simulator,
};
use orderly_service::settings::Settings;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Fails every delivery while `failing` is set; records what it delivered.
#[derive(Default)]
struct Flaky {
    failing: AtomicBool,
    calls: AtomicU32,
    delivered: Mutex<Vec<Notice>>,
}

#[async_trait]
impl Notifier for Flaky {
    async fn send(&self, notice: &Notice) -> Result<(), CommandError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(CommandError::Delivery("mail server says no".into()));
        }
        self.delivered.lock().unwrap().push(notice.clone());
        Ok(())
    }
}

fn spawn(runner: SagaRunner) {
    tokio::spawn(async move {
        runner
            .run_until_stopped(std::future::pending())
            .await
            .unwrap();
    });
}

fn runner(settings: &Settings, config: SagaConfig) -> SagaRunner {
    configured_runner(settings, config, Arc::new(Simulator::default()))
}

#[tokio::test]
async fn a_failing_notification_is_retried_dead_lettered_and_delivered_after_a_cli_retry() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let flaky = Arc::new(Flaky::default());
    flaky.failing.store(true, Ordering::SeqCst);
    let config = SagaConfig {
        tick: Duration::from_millis(50),
        outbox_max_attempts: 3,
        ..SagaConfig::default()
    };
    spawn(runner(&settings, config).with_notifier(flaky.clone()));
    let order_id = place_one(&api, "alice", "TEA").await;

    let dead = "select count(*) from outbox where kind = 'notification' and attempts = 3
                and dead_lettered_at is not null and delivered_at is null";
    eventually(&db, dead, 1, Duration::from_secs(30)).await;
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        3,
        "tried outbox_max_attempts times, then no more"
    );
    let pg_config = orderly_service::app::pg_config(&settings).unwrap();
    let client = db.connect().await.unwrap();
    let listed = maintenance::list(&client, false).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let letter = &listed[0];
    assert_eq!(
        (letter.kind.as_str(), letter.state),
        ("notification", OutboxState::DeadLettered)
    );
    assert_eq!(letter.order_id.to_string(), order_id);
    assert!(
        letter
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("mail server says no")),
        "{letter:?}"
    );
    // Still dead after a while: nothing retries it behind the operator's back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);

    flaky.failing.store(false, Ordering::SeqCst);
    orderly_service::command_side::retry_outbox(&pg_config, letter.outbox_id)
        .await
        .unwrap();
    eventually(
        &db,
        "select count(*) from outbox where kind = 'notification' and delivered_at is not null
         and dead_lettered_at is null",
        1,
        Duration::from_secs(10),
    )
    .await;
    let delivered = flaky.delivered.lock().unwrap().clone();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].template, "order-confirmed");
    assert_eq!(delivered[0].customer_id, "alice");
    assert_eq!(delivered[0].order_id.to_string(), order_id);
    assert!(maintenance::list(&client, false).await.unwrap().is_empty());
    // A message that is not dead-lettered cannot be retried or skipped.
    for error in [
        orderly_service::command_side::retry_outbox(&pg_config, letter.outbox_id).await,
        orderly_service::command_side::skip_outbox(&pg_config, uuid::Uuid::now_v7()).await,
    ] {
        let error = error.unwrap_err().to_string();
        assert!(error.contains("not found"), "{error}");
    }
}

/// A minimal SMTP server: accepts every command, and sends each message's DATA to `mails`.
async fn smtp_listener() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (mails, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let mails = mails.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 test ESMTP\r\n").await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.to_ascii_uppercase();
                    let reply: &[u8] = if verb.starts_with("DATA") {
                        write.write_all(b"354 go ahead\r\n").await.unwrap();
                        let mut data = String::new();
                        while let Ok(Some(line)) = lines.next_line().await {
                            if line == "." {
                                break;
                            }
                            data.push_str(&line);
                            data.push('\n');
                        }
                        mails.send(data).unwrap();
                        b"250 queued\r\n"
                    } else if verb.starts_with("QUIT") {
                        write.write_all(b"221 bye\r\n").await.unwrap();
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    write.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, received)
}

async fn next_mail(mails: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(30), mails.recv())
        .await
        .expect("a mail within 30 s")
        .unwrap()
}

/// Plain SMTP (no TLS, no authentication) to a listener in this process, wired from the
/// settings the way `orderly serve` wires it.
#[tokio::test]
async fn with_an_smtp_url_confirmations_and_cancellations_are_mailed_to_the_customer() {
    let db = migrated_database().await;
    let (port, mut mails) = smtp_listener().await;
    let mut settings = settings_for(db.url());
    settings.mail.smtp_url = Some(format!("smtp://127.0.0.1:{port}").into());
    settings.mail.from = "Shop <orders@shop.test>".into();
    settings.mail.recipient = "{customer_id}@customers.shop.test".into();
    settings.saga.tick = Duration::from_millis(50);
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let gateway = orderly_service::app::payment_gateway(&settings).unwrap();
    spawn(orderly_service::app::saga_runner(&settings, gateway).unwrap());
    let order_id = place_one(&api, "alice", "TEA").await;

    let confirmed = next_mail(&mut mails).await;
    assert!(
        confirmed.contains("To: alice@customers.shop.test"),
        "{confirmed}"
    );
    assert!(confirmed.contains("From: Shop <orders@shop.test>"));
    assert!(confirmed.contains(&format!("Your order {order_id} is confirmed")));
    // Named by its outbox row, so a redelivery would be the same message.
    let notice: uuid::Uuid = db
        .connect()
        .await
        .unwrap()
        .query_one(
            "select outbox_id from outbox where payload->>'template' = 'order-confirmed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        confirmed.contains(&format!("Message-ID: <{notice}@shop.test>")),
        "{confirmed}"
    );

    let cancelled = api
        .gql(
            Some(&customer("alice")),
            CANCEL,
            json!({ "id": order_id, "reason": "changed my mind" }),
        )
        .await;
    cancelled.data("cancelOrder");
    let mail = next_mail(&mut mails).await;
    assert!(mail.contains("To: alice@customers.shop.test"), "{mail}");
    assert!(mail.contains("was cancelled"), "{mail}");
    assert!(mail.contains("Reason: changed my mind"), "{mail}");
    eventually(
        &db,
        "select count(*) from outbox where kind = 'notification' and delivered_at is not null",
        2,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test]
async fn the_runner_purges_only_settled_and_old_rows() {
    let db = migrated_database().await;
    let settings = settings_for(db.url());
    let client = db.connect().await.unwrap();
    // (name, delivered, dead-lettered, skipped), ages in days; None: not set.
    let outbox = [
        ("delivered-old", Some(8), None, None),
        ("delivered-new", Some(1), None, None),
        ("pending-old", None, None, None),
        ("dead-old", None, Some(30), None),
        ("skipped-old", None, Some(30), Some(8)),
        ("skipped-new", None, Some(30), Some(1)),
    ];
    for (name, delivered, dead, skipped) in outbox {
        let ago = |days: Option<i32>| days.map(|d| format!("now() - interval '{d} days'"));
        let sql = format!(
            "insert into outbox (outbox_id, order_id, kind, payload, created_at, delivered_at,
                                 dead_lettered_at, skipped_at, next_attempt_at)
             values (gen_random_uuid(), gen_random_uuid(), '{name}', '{{}}',
                     now() - interval '40 days', {}, {}, {}, now() + interval '1 day')",
            ago(delivered).unwrap_or("null".into()),
            ago(dead).unwrap_or("null".into()),
            ago(skipped).unwrap_or("null".into()),
        );
        client.execute(&sql, &[]).await.unwrap();
    }
    // (saga, settled, age in days)
    let sagas = [
        ("fulfilment", true, 8),
        ("fulfilment", true, 1),
        ("fulfilment", false, 30),
        ("other", true, 30),
    ];
    for (saga, settled, days) in sagas {
        client
            .execute(
                &format!(
                    "insert into saga_states (saga_name, order_id, state, correlation_id,
                                              settled, updated_at)
                     values ($1, gen_random_uuid(), '{{}}', gen_random_uuid(), $2,
                             now() - interval '{days} days')"
                ),
                &[&saga, &settled],
            )
            .await
            .unwrap();
    }
    let config = SagaConfig {
        retention: Some(Duration::from_secs(7 * 24 * 3600)),
        purge_every: Duration::from_millis(100),
        ..SagaConfig::default()
    };
    spawn(runner(&settings, config));
    eventually(
        &db,
        "select count(*) from outbox",
        4,
        Duration::from_secs(10),
    )
    .await;
    let kept: Vec<String> = client
        .query("select kind from outbox order by kind", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        kept,
        ["dead-old", "delivered-new", "pending-old", "skipped-new"]
    );
    eventually(
        &db,
        "select count(*) from saga_states",
        3,
        Duration::from_secs(10),
    )
    .await;
    let kept: Vec<(String, bool)> = client
        .query(
            "select saga_name, settled from saga_states order by saga_name, settled",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        kept,
        [
            ("fulfilment".to_owned(), false),
            ("fulfilment".to_owned(), true),
            ("other".to_owned(), true)
        ],
        "the recent settled saga, the unsettled one and another saga's stay"
    );
    let recent: i64 = client
        .query_one(
            "select count(*) from saga_states where settled and saga_name = 'fulfilment'
             and updated_at > now() - interval '2 days'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recent, 1);

    // Skipping moves a dead letter out of the default list; the purge then counts from the skip.
    let dead: uuid::Uuid = client
        .query_one("select outbox_id from outbox where kind = 'dead-old'", &[])
        .await
        .unwrap()
        .get(0);
    let pg_config = orderly_service::app::pg_config(&settings).unwrap();
    orderly_service::command_side::skip_outbox(&pg_config, dead)
        .await
        .unwrap();
    assert!(maintenance::list(&client, false).await.unwrap().is_empty());
    let all = maintenance::list(&client, true).await.unwrap();
    let states: Vec<_> = all.iter().map(|e| (e.kind.as_str(), e.state)).collect();
    assert_eq!(
        states,
        [
            ("pending-old", OutboxState::Pending),
            ("dead-old", OutboxState::Skipped),
            ("skipped-new", OutboxState::Skipped)
        ]
    );
}

/// An SMTP server that cannot be reached fails the delivery, which is retried and then
/// dead-lettered with the transport's error.
#[tokio::test]
async fn an_unreachable_smtp_server_dead_letters_the_notification_with_its_error() {
    let db = migrated_database().await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut settings = settings_for(db.url());
    settings.mail.smtp_url = Some(format!("smtp://127.0.0.1:{port}").into());
    settings.mail.recipient = "{customer_id}@customers.shop.test".into();
    settings.saga.tick = Duration::from_millis(50);
    settings.saga.outbox_max_attempts = 2;
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let gateway = orderly_service::app::payment_gateway(&settings).unwrap();
    spawn(orderly_service::app::saga_runner(&settings, gateway).unwrap());
    place_one(&api, "alice", "TEA").await;
    eventually(
        &db,
        "select count(*) from outbox where kind = 'notification' and attempts = 2
         and dead_lettered_at is not null and last_error like '%SMTP%'",
        1,
        Duration::from_secs(30),
    )
    .await;
    // The payment went through all the same: only the notice is parked.
    assert_eq!(
        count(
            &db,
            "select count(*) from outbox where kind = 'charge' and delivered_at is not null"
        )
        .await,
        1
    );
}

/// The simulator behind a gate: each charge waits for a permit the test hands out.
struct Gated {
    provider: Simulator,
    calls: AtomicU32,
    gate: tokio::sync::Semaphore,
}

impl Default for Gated {
    fn default() -> Self {
        Self {
            provider: Simulator::default(),
            calls: AtomicU32::new(0),
            gate: tokio::sync::Semaphore::new(0),
        }
    }
}

#[async_trait]
impl PaymentGateway for Gated {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.gate
            .acquire()
            .await
            .expect("the gate stays open")
            .forget();
        self.provider.charge(charge).await
    }

    async fn refund(&self, key: &str, reference: &str) -> Result<(), CommandError> {
        self.provider.refund(key, reference).await
    }

    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        self.provider.lookup(key).await
    }
}

/// A charge went through, and the outbox is locked when its outcome is to be recorded: the
/// worker tries again until the lock is gone instead of leaving the message claimed for its
/// lease (a minute), and it is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcome_that_cannot_be_recorded_at_once_is_recorded_when_it_can() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let client = db.connect().await.unwrap();
    // Every connection opened from now on gives up waiting for a lock after 200 ms.
    client
        .batch_execute(&format!(
            "alter database \"{}\" set lock_timeout = '200ms'",
            db.name()
        ))
        .await
        .unwrap();
    let gateway = charge_held_at_the_provider(&settings, &api).await;

    let locker = db.connect().await.unwrap();
    locker
        .batch_execute("set lock_timeout = 0; begin; lock table outbox in access exclusive mode")
        .await
        .unwrap();
    gateway.gate.add_permits(1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    locker.batch_execute("commit").await.unwrap();

    let delivered = "select count(*) from outbox where kind = 'charge' and delivered_at is not null
                     and attempts = 1";
    eventually(&db, delivered, 1, Duration::from_secs(20)).await;
    assert_eq!(gateway.calls.load(Ordering::SeqCst), 1, "charged once");
}

/// A saga runner whose gateway holds every charge until the test opens its gate, and an
/// order of one TEA by alice whose charge has reached it: the gateway.
async fn charge_held_at_the_provider(settings: &Settings, api: &Api) -> Arc<Gated> {
    let gateway = Arc::new(Gated::default());
    let config = SagaConfig {
        tick: Duration::from_millis(50),
        ..SagaConfig::default()
    };
    spawn(configured_runner(settings, config, gateway.clone()));
    place_one(api, "alice", "TEA").await;
    let started = std::time::Instant::now();
    while gateway.calls.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "no charge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway
}

/// An order charged through a gateway that counts its calls, with the charge's message marked
/// delivered: the database, the gateway and the order's id.
async fn charged_and_delivered() -> (orderly_test_support::TestDb, Arc<Gated>, String) {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let gateway = Arc::new(Gated::default());
    gateway.gate.add_permits(100);
    let config = SagaConfig {
        tick: Duration::from_millis(50),
        ..SagaConfig::default()
    };
    spawn(configured_runner(&settings, config, gateway.clone()));
    let order_id = place_one(&api, "alice", "TEA").await;
    eventually_events_of(&db, "PaymentCharged", &format!("payment-{order_id}"), 1).await;
    eventually(
        &db,
        "select count(*) from outbox where kind = 'charge' and delivered_at is not null",
        1,
        Duration::from_secs(10),
    )
    .await;
    (db, gateway, order_id)
}

/// Waits until the charge message is marked delivered at claim `attempts`, then checks that
/// the provider was called once and the payment holds one charge.
async fn delivered_without_a_second_call(
    db: &orderly_test_support::TestDb,
    gateway: &Gated,
    order_id: &str,
    attempts: i32,
) {
    eventually(
        db,
        &format!(
            "select count(*) from outbox where kind = 'charge' and delivered_at is not null
             and attempts = {attempts}"
        ),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(gateway.calls.load(Ordering::SeqCst), 1, "called once");
    assert_eq!(
        events_of(db, "PaymentCharged", &format!("payment-{order_id}")).await,
        1
    );
}

/// A charge message delivered again after its outcome was recorded (the worker that recorded
/// it died, or its lease ran out, before marking it delivered) does not call the provider
/// again: once the payment moved on, a second call that timed out after taking the money would
/// record nothing, and nothing would look for that money again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_whose_outcome_is_recorded_is_not_sent_to_the_provider_again() {
    let (db, gateway, order_id) = charged_and_delivered().await;

    // As if the worker had died between recording the charge and marking the message.
    db.connect()
        .await
        .unwrap()
        .execute(
            "update outbox set delivered_at = null, next_attempt_at = now() where kind = 'charge'",
            &[],
        )
        .await
        .unwrap();
    delivered_without_a_second_call(&db, &gateway, &order_id, 2).await;
}

/// The same after an operator's retry: a charge message dead-lettered although its outcome was
/// recorded (its last attempts could not mark it delivered), put back in line from the CLI
/// with a fresh set of attempts, is still checked against the payment before the provider is
/// called. A retry days later could otherwise charge again once the provider has forgotten
/// the idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_retried_by_an_operator_after_its_outcome_was_recorded_is_not_sent_again() {
    let (db, gateway, order_id) = charged_and_delivered().await;
    let client = db.connect().await.unwrap();
    let outbox_id: uuid::Uuid = client
        .query_one(
            "update outbox set delivered_at = null, dead_lettered_at = now(),
                 last_error = 'outcome not recorded: the database is read-only'
             where kind = 'charge' returning outbox_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    maintenance::retry(&client, outbox_id).await.unwrap();
    delivered_without_a_second_call(&db, &gateway, &order_id, 1).await;
}

/// A process that stops gives back what its outbox worker claimed and could not record, for
/// the others to deliver at once. Its membership ends with the stop, so the heartbeat's check
/// for the claims of members whose lease ran out never finds these: they used to wait out the
/// claim's lease (a minute by default, an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_process_gives_back_its_outbox_claims_at_once() {
    let db = migrated_database().await;
    let settings = settings_for(db.url());
    let config = SagaConfig {
        tick: Duration::from_millis(50),
        heartbeat: Duration::from_millis(200),
        outbox_lease: Duration::from_secs(3600),
        ..SagaConfig::default()
    };
    let first = runner(&settings, config.clone());
    let member = first.member_id().to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(first.run_until_stopped(async {
        let _ = stopped.await;
    }));
    eventually(
        &db,
        "select count(*) from saga_members",
        1,
        Duration::from_secs(10),
    )
    .await;
    // A notice the stopping process claimed and could not record as delivered (its database
    // went away a moment, say).
    let notice = json!({
        "kind": "notification",
        "order_id": uuid::Uuid::now_v7(),
        "template": "order-confirmed",
        "customer_id": "alice",
        "detail": null,
        "correlation_id": uuid::Uuid::now_v7(),
    });
    db.connect()
        .await
        .unwrap()
        .execute(
            "insert into outbox (outbox_id, order_id, kind, payload, attempts, next_attempt_at,
                 claimed_by)
             values (gen_random_uuid(), ($1::jsonb ->> 'order_id')::uuid, 'notification', $1, 1,
                 now() + interval '1 hour', $2)",
            &[&notice, &member],
        )
        .await
        .unwrap();

    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(
        count(
            &db,
            "select count(*) from outbox where claimed_by is null and next_attempt_at <= now()"
        )
        .await,
        1,
        "given back, due at once"
    );
    let flaky = Arc::new(Flaky::default());
    spawn(runner(&settings, config).with_notifier(flaky.clone()));
    eventually(
        &db,
        "select count(*) from outbox where delivered_at is not null and attempts = 2",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(flaky.delivered.lock().unwrap().len(), 1);
}

/// Money the provider took for a payment that cannot hold it (one it declined, here) is
/// dead-lettered at once with the payment's refusal, for an operator to reconcile. The
/// delivery used to be tried again, and the next attempt found the payment settled and marked
/// the message done: the money was only ever in a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_its_payment_cannot_record_is_dead_lettered_at_once() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let config = SagaConfig {
        tick: Duration::from_millis(50),
        ..SagaConfig::default()
    };
    spawn(runner(&settings, config));
    let order_id = place(&api, "alice", "TEA", 1, "tok_declined").await.id;
    let payment = format!("payment-{order_id}");
    eventually_events_of(&db, "PaymentDeclined", &payment, 1).await;

    // The same attempt, as the provider took it after all (under a token it charges).
    let charge = json!({
        "kind": "charge",
        "order_id": order_id,
        "attempt": 1,
        "amount_minor": 650,
        "currency": "EUR",
        "payment_token": "tok_ok",
        "correlation_id": uuid::Uuid::now_v7(),
    });
    db.connect()
        .await
        .unwrap()
        .execute(
            "insert into outbox (outbox_id, order_id, kind, payload)
             values (gen_random_uuid(), $1::text::uuid, 'charge', $2)",
            &[&order_id, &charge],
        )
        .await
        .unwrap();
    eventually(
        &db,
        "select count(*) from outbox where kind = 'charge' and dead_lettered_at is not null
         and attempts = 1 and last_error like '%cannot record a charge%'",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(events_of(&db, "PaymentCharged", &payment).await, 0);
}

/// A mail and a charge claimed together: the mail is recorded as delivered once it is sent,
/// while the provider still has not answered the charge. It used to wait for the slowest
/// call of its batch, and a crash meanwhile sent the mail a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mail_is_recorded_as_sent_without_waiting_for_a_charge_beside_it() {
    let db = migrated_database().await;
    let settings = settings_for(db.url());
    let gateway = Arc::new(Gated::default());
    let mailer = Arc::new(Flaky::default());
    let config = SagaConfig {
        tick: Duration::from_millis(50),
        ..SagaConfig::default()
    };
    spawn(configured_runner(&settings, config, gateway.clone()).with_notifier(mailer.clone()));
    // One statement, so one claim takes both.
    db.connect()
        .await
        .unwrap()
        .execute(
            "insert into outbox (outbox_id, order_id, kind, payload)
             select gen_random_uuid(), o, kind, payload
             from (select gen_random_uuid() as o) n,
                  lateral (values
                      ('notification', jsonb_build_object(
                          'kind', 'notification', 'order_id', o, 'template', 'order-confirmed',
                          'customer_id', 'alice', 'detail', null, 'correlation_id', o)),
                      ('charge', jsonb_build_object(
                          'kind', 'charge', 'order_id', o, 'attempt', 1, 'amount_minor', 650,
                          'currency', 'EUR', 'payment_token', 'tok_ok', 'correlation_id', o))
                  ) as m(kind, payload)",
            &[],
        )
        .await
        .unwrap();

    eventually(
        &db,
        "select count(*) from outbox where kind = 'notification' and delivered_at is not null",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        gateway.calls.load(Ordering::SeqCst),
        1,
        "the charge is under way"
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from outbox where kind = 'charge' and delivered_at is null
             and attempts = 1"
        )
        .await,
        1,
        "claimed with the mail"
    );
    assert_eq!(mailer.delivered.lock().unwrap().len(), 1);
    gateway.gate.add_permits(1);
}

/// An order cancelled while its charge waits in the outbox (the provider is slow, and the
/// worker's batch waits on it) has that charge withdrawn: the provider is never called for
/// it, the attempt is recorded as failed, and the saga settles. It used to be sent after the
/// cancel, and the money taken was given back by a refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_still_queued_when_its_order_is_cancelled_is_never_sent() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    // The first order's charge holds the outbox worker at the provider.
    let gateway = charge_held_at_the_provider(&settings, &api).await;
    let queued = place_one(&api, "bob", "TEA").await;
    let of_order = |kind: &str| {
        format!("select count(*) from outbox where kind = '{kind}' and order_id = '{queued}'")
    };
    eventually(&db, &of_order("charge"), 1, Duration::from_secs(30)).await;
    cancel_as(&api, "bob", &queued).await;
    // The cancellation's notice is stored by the step that handles the cancel.
    eventually(&db, &of_order("notification"), 1, Duration::from_secs(30)).await;

    gateway.gate.add_permits(10);
    let payment = format!("payment-{queued}");
    let failed = format!(
        "select count(*) from events where event_type = 'PaymentFailed' and stream = '{payment}'
         and data ->> 'reason' like 'charge withdrawn%'"
    );
    eventually(&db, &failed, 1, Duration::from_secs(30)).await;
    let settled =
        format!("select count(*) from saga_states where order_id = '{queued}' and settled");
    eventually(&db, &settled, 1, Duration::from_secs(30)).await;
    assert_eq!(
        gateway.calls.load(Ordering::SeqCst),
        1,
        "only the first order's"
    );
    assert_eq!(events_of(&db, "PaymentCharged", &payment).await, 0);
    assert_eq!(events_of(&db, "PaymentRefunded", &payment).await, 0);
}

/// Fails every notice to one customer, with an error that passes; delivers the others.
struct FailsFor(&'static str);

#[async_trait]
impl Notifier for FailsFor {
    async fn send(&self, notice: &Notice) -> Result<(), CommandError> {
        if notice.customer_id == self.0 {
            return Err(CommandError::Delivery("mailbox full".into()));
        }
        Ok(())
    }
}

/// Two notices claimed together, one delivered and one failed, whose failure cannot be
/// recorded (a trigger refuses it, for good): the delivered one is marked all the same. It
/// used to stay claimed until its lease ran out, then be delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_that_cannot_be_recorded_does_not_hold_back_the_deliveries_beside_it() {
    let db = migrated_database().await;
    let settings = settings_for(db.url());
    let client = db.connect().await.unwrap();
    refuse_for_good(
        &client,
        "no_errors",
        "update on outbox",
        "new.last_error is not null",
    )
    .await;
    let config = SagaConfig {
        tick: Duration::from_millis(50),
        ..SagaConfig::default()
    };
    spawn(runner(&settings, config).with_notifier(Arc::new(FailsFor("bob"))));
    // One statement, so one claim takes both.
    client
        .execute(
            "insert into outbox (outbox_id, order_id, kind, payload)
             select gen_random_uuid(), o, 'notification',
                    jsonb_build_object('kind', 'notification', 'order_id', o,
                                       'template', 'order-confirmed', 'customer_id', c,
                                       'detail', null, 'correlation_id', o)
             from (select gen_random_uuid() as o, c from unnest(array['alice', 'bob']) c) n",
            &[],
        )
        .await
        .unwrap();
    eventually(
        &db,
        "select count(*) from outbox where payload->>'customer_id' = 'alice'
         and delivered_at is not null",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        count(
            &db,
            "select count(*) from outbox where delivered_at is null and attempts = 1"
        )
        .await,
        1,
        "bob's notice waits for its lease, claimed once"
    );
}

/// Takes the money like the simulator but loses every answer, as a charge call that times out
/// after the provider charged. Lookups tell the truth unless `lookups_down`.
#[derive(Default)]
struct LostAnswers {
    provider: Simulator,
    lookups_down: AtomicBool,
}

#[async_trait]
impl PaymentGateway for LostAnswers {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        self.provider.charge(charge).await?;
        Err(CommandError::Gateway("gateway call timed out".into()))
    }

    async fn refund(&self, key: &str, reference: &str) -> Result<(), CommandError> {
        self.provider.refund(key, reference).await
    }

    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        if self.lookups_down.load(Ordering::SeqCst) {
            return Err(CommandError::Gateway("provider unreachable".into()));
        }
        self.provider.lookup(key).await
    }
}

/// What a failure needs to be understood: every outbox row and the order's events in log order.
async fn outbox_and_events(db: &orderly_test_support::TestDb, order_id: &str) -> String {
    let client = db.connect().await.unwrap();
    let outbox = client
        .query(
            "select kind || ' attempts=' || attempts || ' delivered=' || (delivered_at is not null)
                    || ' dead=' || (dead_lettered_at is not null)
                    || ' due_in=' || (next_attempt_at - now())::text
                    || ' error=' || coalesce(last_error, '-')
             from outbox order by created_at",
            &[],
        )
        .await
        .unwrap();
    let events = client
        .query(
            "select stream || ' ' || event_type || ' at ' || recorded_at::text from events
             where data->>'order_id' = $1 order by tx_id, seq",
            &[&order_id],
        )
        .await
        .unwrap();
    outbox
        .iter()
        .chain(&events)
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Settings whose payment deadline passes in two seconds, with a retry or two before it, and
/// whose provider settles a charge at once (the simulator does).
fn short_deadline(url: &str) -> Settings {
    let mut settings = settings_for(url);
    settings.payment.deadline = Duration::from_secs(2);
    settings.payment.retry_after = Duration::from_secs(1);
    settings.payment.settle = Duration::ZERO;
    settings.saga.tick = Duration::from_millis(50);
    settings
}

/// Loses every charge's answer, as a call that times out, and takes the money
/// [`LANDS_AFTER`] later: a provider still finishing a charge when its caller gave up. Until
/// then a lookup finds nothing.
#[derive(Default)]
struct LandsLate {
    provider: Arc<Simulator>,
    lookups: AtomicU32,
}

const LANDS_AFTER: Duration = Duration::from_secs(2);

#[async_trait]
impl PaymentGateway for LandsLate {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        let (provider, charge) = (self.provider.clone(), charge.clone());
        tokio::spawn(async move {
            tokio::time::sleep(LANDS_AFTER).await;
            provider.charge(&charge).await
        });
        Err(CommandError::Gateway("gateway call timed out".into()))
    }

    async fn refund(&self, key: &str, reference: &str) -> Result<(), CommandError> {
        self.provider.refund(key, reference).await
    }

    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.provider.lookup(key).await
    }
}

/// A charge whose call timed out lands at the provider after the deadline cancelled the order:
/// the provider is asked only once the settle time has passed since the call, finds the
/// charge, and the saga refunds it. The provider used to be asked at the cancel, answered that
/// it held no charge, and the money taken a moment later was never looked for again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_that_lands_after_the_cancel_is_found_once_the_provider_settled_it() {
    let db = migrated_database().await;
    let mut settings = short_deadline(db.url());
    settings.payment.deadline = Duration::from_millis(500);
    settings.payment.retry_after = Duration::from_secs(60);
    settings.payment.settle = LANDS_AFTER * 2;
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let gateway = Arc::new(LandsLate::default());
    spawn(orderly_service::app::saga_runner(&settings, gateway.clone()).unwrap());
    let order_id = place_one(&api, "alice", "TEA").await;
    let payment = format!("payment-{order_id}");

    let refunded = format!(
        "select count(*) from events where event_type = 'PaymentRefunded' and stream = '{payment}'"
    );
    let within = Duration::from_secs(30);
    let started = std::time::Instant::now();
    while count(&db, &refunded).await == 0 {
        assert!(
            started.elapsed() < within,
            "never refunded; {} charge(s) taken, {} lookup(s):\n{}",
            gateway.provider.charges(),
            gateway.lookups.load(Ordering::SeqCst),
            outbox_and_events(&db, &order_id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gateway.provider.charges(), 1);
    assert_eq!(gateway.provider.refunds(), 1);
    let reason: String = db
        .connect()
        .await
        .unwrap()
        .query_one(
            "select data->>'cancellation_reason' from events
             where event_type = 'OrderCancelled' and stream = $1",
            &[&format!("order-{order_id}")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("deadline"), "{reason}");
}

/// How many events of a type a stream holds.
#[tokio::test]
async fn a_charge_whose_answer_was_lost_is_found_after_the_deadline_cancel_and_refunded() {
    let db = migrated_database().await;
    let settings = short_deadline(db.url());
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let gateway = Arc::new(LostAnswers::default());
    spawn(orderly_service::app::saga_runner(&settings, gateway.clone()).unwrap());
    let order_id = place_one(&api, "alice", "TEA").await;
    let payment = format!("payment-{order_id}");

    eventually_events_of(&db, "PaymentRefunded", &payment, 1).await;
    assert_eq!(
        gateway.provider.charges(),
        1,
        "one charge for every attempt"
    );
    assert_eq!(gateway.provider.refunds(), 1);
    assert!(events_of(&db, "PaymentFailed", &payment).await >= 1);
    assert_eq!(events_of(&db, "PaymentCharged", &payment).await, 1);
    let order = format!("order-{order_id}");
    assert_eq!(
        events_of(&db, "OrderPaid", &order).await,
        0,
        "found after the cancel: refunded, never taken as payment"
    );
    let reason: String = db
        .connect()
        .await
        .unwrap()
        .query_one(
            "select data->>'cancellation_reason' from events
             where event_type = 'OrderCancelled' and stream = $1",
            &[&order],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("deadline"), "{reason}");
    assert_eq!(
        count(
            &db,
            "select count(*) from outbox where kind = 'resolve' and dead_lettered_at is not null"
        )
        .await,
        0
    );
}

/// Starts the saga runner of `settings` over `gateway`, places an order of one TEA by alice and
/// waits until its charge's message is dead-lettered: the order's id.
async fn charge_dead_lettered(
    db: &orderly_test_support::TestDb,
    settings: &Settings,
    api: &Api,
    gateway: Arc<dyn PaymentGateway>,
) -> String {
    spawn(orderly_service::app::saga_runner(settings, gateway).unwrap());
    let order_id = place_one(api, "alice", "TEA").await;
    eventually(
        db,
        "select count(*) from outbox where kind = 'charge' and dead_lettered_at is not null",
        1,
        Duration::from_secs(20),
    )
    .await;
    order_id
}

/// The provider took the money, but the charge could not be recorded (a trigger refuses it
/// for good) and its message was dead-lettered: the payment has no outcome. When the deadline
/// cancels the order, the resolution asks the provider, records the charge and the saga
/// refunds it. It used to look only at attempts recorded as failed, and the money stayed taken.
#[tokio::test]
async fn a_charge_taken_but_never_recorded_is_found_and_refunded_when_the_order_is_cancelled() {
    let db = migrated_database().await;
    let mut settings = short_deadline(db.url());
    settings.payment.deadline = Duration::from_secs(5);
    settings.saga.outbox_max_attempts = 2;
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let client = db.connect().await.unwrap();
    refuse_for_good(
        &client,
        "no_charges",
        "insert on events",
        "new.event_type = 'PaymentCharged'",
    )
    .await;
    let simulator = Arc::new(Simulator::default());
    let order_id = charge_dead_lettered(&db, &settings, &api, simulator.clone()).await;
    accept_again(&client, "no_charges", "events").await;

    let payment = format!("payment-{order_id}");
    eventually_events_of(&db, "PaymentRefunded", &payment, 1).await;
    assert_eq!(simulator.charges(), 1);
    assert_eq!(simulator.refunds(), 1);
    assert_eq!(
        events_of(&db, "OrderPaid", &format!("order-{order_id}")).await,
        0
    );
}

/// Fails every charge for good before it reaches the provider (a request that cannot be
/// built, say); refunds like the simulator, and looks charges up like it unless
/// `lookups_refused`, when the provider refuses every lookup.
#[derive(Default)]
struct ChargesBroken {
    provider: Simulator,
    lookups_refused: bool,
}

#[async_trait]
impl PaymentGateway for ChargesBroken {
    async fn charge(&self, _charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        Err(CommandError::Internal(
            "charge request could not be built".into(),
        ))
    }

    async fn refund(&self, key: &str, reference: &str) -> Result<(), CommandError> {
        self.provider.refund(key, reference).await
    }

    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        if self.lookups_refused {
            return Err(CommandError::Internal(
                "the payment provider refused the lookup: 403 Forbidden".into(),
            ));
        }
        self.provider.lookup(key).await
    }
}

/// A charge whose delivery was dead-lettered before any call has no outcome in the log. When
/// the deadline cancels the order, the resolution finds no charge at the provider and records
/// the attempt failed, and the saga settles. It used to record nothing, and the instance,
/// waiting for an answer to its charge, stayed open for good (counted as in flight, and
/// compensating, for ever).
#[tokio::test]
async fn a_charge_dead_lettered_before_its_call_lets_its_cancelled_saga_settle() {
    let db = migrated_database().await;
    let settings = short_deadline(db.url());
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let gateway = Arc::new(ChargesBroken::default());
    let order_id = charge_dead_lettered(&db, &settings, &api, gateway).await;
    let settled =
        format!("select count(*) from saga_states where order_id = '{order_id}' and settled");
    eventually(&db, &settled, 1, Duration::from_secs(30)).await;
    let payment = format!("payment-{order_id}");
    let not_found = format!(
        "select count(*) from events where event_type = 'PaymentFailed' and stream = '{payment}'
         and data ->> 'reason' = 'no charge found at the payment provider'"
    );
    assert_eq!(count(&db, &not_found).await, 1);
    assert_eq!(
        events_of(&db, "OrderCancelled", &format!("order-{order_id}")).await,
        1
    );
    assert_eq!(events_of(&db, "PaymentRefunded", &payment).await, 0);
}

/// A resolution dead-lettered (the provider refuses its lookup) while its order's last charge
/// attempt has no outcome is not skipped like a mail: skipped, nobody would learn whether that
/// charge took money, and the cancelled saga would wait for an answer for good. An operator
/// who found no such charge at the provider says so: the attempt is recorded failed, and the
/// saga settles.
#[tokio::test]
async fn a_resolution_is_skipped_only_once_recorded_as_not_charged() {
    let db = migrated_database().await;
    let settings = short_deadline(db.url());
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let gateway = Arc::new(ChargesBroken {
        lookups_refused: true,
        ..ChargesBroken::default()
    });
    let order_id = charge_dead_lettered(&db, &settings, &api, gateway).await;
    let dead_resolution = "select count(*) from outbox where kind = 'resolve'
                           and dead_lettered_at is not null";
    eventually(&db, dead_resolution, 1, Duration::from_secs(30)).await;
    let client = db.connect().await.unwrap();
    let outbox_id: uuid::Uuid = client
        .query_one(
            "select outbox_id from outbox where kind = 'resolve' and dead_lettered_at is not null",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let refused = maintenance::skip(&client, outbox_id).await;
    assert!(
        matches!(&refused, Err(CommandError::InvalidInput { message, .. })
            if message.contains("--not-charged")),
        "{refused:?}"
    );

    let id = outbox_id.to_string();
    let done =
        skip_as_settled_elsewhere(&db, &id, "--not-charged", "PaymentFailed", &order_id).await;
    assert!(
        done.contains("no charge at the provider recorded"),
        "{done}"
    );
    // The operator's finding asks for no further lookup, which the provider would refuse too.
    assert_eq!(
        count(&db, "select count(*) from outbox where kind = 'resolve'").await,
        1
    );
}

/// Until the provider answers the lookup, nothing assumes the charge failed: the resolution
/// is retried, dead-lettered for an operator, and resolved once put back in line.
#[tokio::test]
async fn a_resolution_the_provider_cannot_answer_is_dead_lettered_then_retried_from_the_cli() {
    let db = migrated_database().await;
    let mut settings = short_deadline(db.url());
    settings.saga.outbox_max_attempts = 2;
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let gateway = Arc::new(LostAnswers::default());
    gateway.lookups_down.store(true, Ordering::SeqCst);
    spawn(orderly_service::app::saga_runner(&settings, gateway.clone()).unwrap());
    let order_id = place_one(&api, "alice", "TEA").await;

    let dead = "select count(*) from outbox where kind = 'resolve' and attempts = 2
                and dead_lettered_at is not null and last_error like '%provider unreachable%'";
    let started = std::time::Instant::now();
    // A generous bound: the attempts wait on the outbox tick, which a busy machine slows.
    while count(&db, dead).await == 0 {
        if started.elapsed() > Duration::from_secs(60) {
            panic!(
                "the resolution was never dead-lettered; the outbox and the order's events:\n{}",
                outbox_and_events(&db, &order_id).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let payment = format!("payment-{order_id}");
    assert_eq!(events_of(&db, "PaymentCharged", &payment).await, 0);
    assert_eq!(gateway.provider.refunds(), 0);

    gateway.lookups_down.store(false, Ordering::SeqCst);
    let pg_config = orderly_service::app::pg_config(&settings).unwrap();
    let client = db.connect().await.unwrap();
    for letter in maintenance::list(&client, false).await.unwrap() {
        assert_eq!(letter.kind, "resolve", "{letter:?}");
        orderly_service::command_side::retry_outbox(&pg_config, letter.outbox_id)
            .await
            .unwrap();
    }
    eventually_events_of(&db, "PaymentRefunded", &payment, 1).await;
    assert_eq!(gateway.provider.refunds(), 1);
}
