//! The operator console (`/console`) and GraphiQL in a real browser: Debian's Chromium driven
//! by `playwright-core` (`tests/node/console-browser.mjs`), with every request outside
//! 127.0.0.1 refused. Screenshots go to `ORDERLY_SCREENSHOTS` (the README's are in
//! `docs/console/`), else to a temporary folder.

use std::time::Duration;

use crate::common::{
    Api, admin, dead_letter_outbox, park_registration, park_saga_event, place_one, register,
    settings_for, start_with_saga,
};
use orderly_service::app::{App, Part};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_follows_an_order_retries_a_dead_letter_rebuilds_and_watches_the_tail() {
    let db = crate::common::migrated_database().await;
    // With the saga's runner, as `orderly serve` runs: the saga page shows its lanes.
    let api = start_with_saga(&settings_for(db.url())).await;
    // A read API alone beside it, whose saga page says the saga is not served there.
    let reads = App::build_part(&settings_for(db.url()), Part::Reads)
        .await
        .unwrap();
    let reads_base = format!("http://{}", reads.local_addr());
    tokio::spawn(reads.run_until_stopped(std::future::pending()));
    register(&api, "CON-1", 1250, "EUR", 100).await;
    let order = place_one(&api, "alice", "CON-1").await;
    let admin = admin();
    // The order's row is there before the browser looks for it.
    let events = api
        .gql(
            Some(&admin),
            "query($id: UUID!) { orderEvents(orderId: $id) { id stream type version position } }",
            json!({ "id": order }),
        )
        .await;
    let placed = events.data("orderEvents")[0].clone();
    let row = api
        .gql(
            Some(&admin),
            "query($id: UUID!, $t: ConsistencyToken!) {
               order(id: $id, consistency: {atLeast: $t, mode: STRICT}) { id } }",
            json!({ "id": order, "t": placed["position"] }),
        )
        .await;
    assert_eq!(row.data("order")["id"], order.as_str());
    // A product of its own, whose registration the products projection failed on.
    register(&api, "CON-2", 990, "EUR", 5).await;
    let registration = first_event(&api, &admin, "stream: \"product-CON-2\"").await;
    let dead_letter = park_registration(&db, &registration, "handler failed: simulated").await;
    // The saga's runner never parks these itself: a step failing for good is simulated.
    let registered = first_event(&api, &admin, "category: \"product\"").await;
    let skipped = park_saga_event(&db, &registered, "step failed: simulated").await;
    let retried = park_saga_event(&db, &placed, "step failed: simulated").await;
    dead_letter_outbox(&db, "notification", "smtp: 554 rejected (simulated)").await;

    let link = crate::common::orderly_cli(&["console-link", "--ttl", "10m", "--base", &api.base]);
    assert!(
        link.starts_with(&format!("{}/console#token=", api.base)),
        "{link}"
    );
    let screenshots = std::env::var("ORDERLY_SCREENSHOTS").unwrap_or_else(|_| {
        std::env::temp_dir()
            .join(format!("orderly-console-{}", std::process::id()))
            .display()
            .to_string()
    });
    let input = json!({
        "base": api.base, "link": link, "order": order, "deadLetter": dead_letter,
        "adminToken": admin, "screenshots": screenshots, "readsBase": reads_base,
        "parkedRetry": retried, "parkedSkip": skipped,
    })
    .to_string();
    let printed = tokio::task::spawn_blocking(move || {
        crate::common::run_node("console-browser.mjs", &[&input])
    })
    .await
    .unwrap();
    let seen: Value = serde_json::from_str(printed.trim()).expect("the browser's JSON");
    assert_eq!(seen["foreign"], json!([]), "requests left 127.0.0.1");
    assert_eq!(seen["pageErrors"], json!([]), "script errors in the pages");
    assert_eq!(
        seen["steps"],
        json!([
            "signed in",
            "log",
            "order",
            "dead letter retried",
            "rebuild",
            "saga",
            "saga parked event retried and skipped",
            "saga not served by a read API alone",
            "tail",
            "graphiql query",
            "graphiql subscription"
        ])
    );
    let freshness = seen["freshness"].as_str().unwrap_or_default();
    assert!(freshness.contains("not stale"), "{freshness}");
    let dialogs: Vec<&str> = seen["dialogs"]
        .as_array()
        .map(|d| d.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(dialogs.len(), 4, "{dialogs:?}");
    assert!(
        dialogs[0].contains("Retry dead letter"),
        "the retry was not confirmed first: {dialogs:?}"
    );
    assert!(
        dialogs[1].contains("Rebuild projection orders"),
        "the rebuild was not confirmed first: {dialogs:?}"
    );
    assert!(
        dialogs[2].contains(&format!("Retry parked event {retried}")),
        "the saga retry was not confirmed first: {dialogs:?}"
    );
    assert!(
        dialogs[3].contains(&format!("Skip parked event {skipped}")),
        "the saga skip was not confirmed first: {dialogs:?}"
    );
    assert_eq!(seen["sagaLanes"], 16);
    let rebuilt = seen["rebuild"].as_str().unwrap_or_default();
    assert!(rebuilt.contains("rebuilt:"), "{rebuilt}");
    // The rebuild went through the API and swapped in: the server ran it to the end, and
    // nothing of it is left in progress.
    let rebuild = api
        .gql(
            Some(&admin),
            r#"{ projectionRebuild(name: "orders") { state finishedAt error } }"#,
            json!({}),
        )
        .await;
    let rebuild = rebuild.data("projectionRebuild");
    assert_eq!(rebuild["state"], "DONE", "{rebuild}");
    assert!(rebuild["finishedAt"].is_string(), "{rebuild}");
    assert_eq!(
        crate::common::count(&db, "select count(*) from projection_rebuilds").await,
        0
    );
    // The retry went through the API: the letter is resolved in the database.
    assert_eq!(
        crate::common::count(
            &db,
            &format!("select count(*) from dead_letters where dead_letter_id = {dead_letter} and resolution = 'retried'")
        )
        .await,
        1
    );
    // Both went through the API: one is marked for a retry (or already fed again and
    // unparked by the runner), the other skipped.
    assert_eq!(
        crate::common::count(
            &db,
            &format!("select count(*) from saga_parked where event_id = '{skipped}' and skipped_at is not null")
        )
        .await,
        1
    );
    assert_eq!(
        crate::common::count(
            &db,
            &format!("select count(*) from saga_parked where event_id = '{retried}' and retry_requested_at is null")
        )
        .await,
        0
    );
}

/// The first event of the log that `filter` selects, as the admin `events` query answers it.
/// The log shows an append once no older transaction in the cluster is open, and other tests
/// share the cluster: hence the wait.
async fn first_event(api: &Api, admin: &str, filter: &str) -> Value {
    let query = format!(
        "{{ events({filter}, first: 1) {{ events {{ id stream type version position }} }} }}"
    );
    let started = std::time::Instant::now();
    loop {
        let answer = api.gql(Some(admin), &query, json!({})).await;
        let first = &answer.data("events")["events"][0];
        if !first.is_null() {
            return first.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no event for {filter}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
