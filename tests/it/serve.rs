//! The service starts, reports its health and stops cleanly: in-process on port 0, and as the
//! real binary receiving SIGTERM.

use crate::common::migrated_database;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use std::sync::Arc;

use serde_json::json;

use orderly_event_store::memory::MemoryEventStore;
use orderly_service::app::{App, Part};
use orderly_service::health::Health;
use orderly_service::settings::Settings;
use orderly_test_support::TestDb;

fn settings_for(url: &str) -> Settings {
    let mut settings = Settings::with_database(url);
    settings.http.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    settings
}

#[tokio::test]
async fn a_started_app_is_healthy_and_ready_then_stops_on_request() {
    let db = migrated_database().await;
    let app = App::build(&settings_for(db.url())).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["status"],
        "ready"
    );

    stop.send(()).unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(
        matches!(finished, Ok(Ok(Ok(())))),
        "the server did not stop cleanly: {finished:?}"
    );
}

#[tokio::test]
async fn readiness_says_why_when_the_store_is_unreachable() {
    let app = App::build(&settings_for("postgres://postgres@127.0.0.1:1/nowhere"))
        .await
        .unwrap();
    let base = format!("http://{}", app.local_addr());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert!(
        body["reason"].as_str().unwrap().contains("event store"),
        "{body}"
    );
    assert!(
        !body.to_string().contains("127.0.0.1:1"),
        "no connection detail leaks: {body}"
    );
}

#[tokio::test]
async fn readiness_says_why_when_the_read_database_is_unreachable() {
    // The log answers (in memory here), the read models' database does not.
    let nowhere = "postgres://postgres@127.0.0.1:1/nowhere".parse().unwrap();
    let health = Health {
        store: Arc::new(MemoryEventStore::new()),
        read_db: orderly_graphql::pg_pool(&nowhere, 2).unwrap(),
        log_in_read_db: false,
        projections_gate_readiness: true,
    };
    let readiness = health.check().await;
    assert!(!readiness.is_ready());
    let body = readiness.body();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["event_store"], "ok");
    assert_eq!(body["checks"]["read_database"], "read database unreachable");
    assert_eq!(
        body["checks"]["projections"],
        "projection states unknown (read database unreachable)"
    );
}

#[tokio::test]
async fn a_failed_projection_makes_the_process_unready_and_says_which() {
    let db = migrated_database().await;
    let app = App::build(&settings_for(db.url())).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    // No runner here, so nothing but this test writes the projection's state.
    tokio::spawn(
        app.without_projections()
            .run_until_stopped(std::future::pending()),
    );
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);

    fail_orders_projection(&db).await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["event_store"], "ok");
    assert_eq!(body["checks"]["read_database"], "ok");
    assert_eq!(
        body["checks"]["projections"],
        "projection orders failed: handler error at event 42"
    );
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("projection orders failed"),
        "{body}"
    );
    // The gauges are process-wide, and the other tests' servers in this binary publish their
    // own verdicts every few seconds: probe again until this one's is the last published.
    let mut metrics = String::new();
    for _ in 0..10 {
        reqwest::get(format!("{base}/readyz")).await.unwrap();
        metrics = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains(r#"orderly_readiness_check{check="projections"} 0"#) {
            return;
        }
    }
    panic!("the failed projection never showed in the readiness gauge:\n{metrics}");
}

/// A command or read API serves as well with a read model stopped (reads say how stale they
/// are): one bad event in a read model must not take every API replica out of its load
/// balancer. Its `/readyz` still shows the check.
#[tokio::test]
async fn a_failed_projection_leaves_the_api_processes_ready_and_shows_it() {
    let db = migrated_database().await;
    fail_orders_projection(&db).await;
    for part in [Part::Commands, Part::Reads] {
        let app = App::build_part(&settings_for(db.url()), part)
            .await
            .unwrap();
        let base = format!("http://{}", app.local_addr());
        tokio::spawn(app.run_until_stopped(std::future::pending()));
        let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
        assert_eq!(ready.status(), 200);
        let body: serde_json::Value = ready.json().await.unwrap();
        assert_eq!(body["status"], "ready", "{body}");
        assert_eq!(
            body["checks"]["projections"],
            "projection orders failed: handler error at event 42"
        );
    }
}

/// Marks the `orders` projection FAILED, as its runner does when it gives up.
async fn fail_orders_projection(db: &TestDb) {
    db.connect()
        .await
        .unwrap()
        .execute(
            "insert into projection_checkpoints (projection, state, last_error)
             values ('orders', 'FAILED', 'handler error at event 42')
             on conflict (projection) do update set state = 'FAILED', last_error = excluded.last_error",
            &[],
        )
        .await
        .unwrap();
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn the_binary_migrates_an_empty_database_serves_and_exits_cleanly_on_sigterm() {
    let db = TestDb::create("empty", "nothing", |_| async { Ok(()) })
        .await
        .unwrap();
    let migrate = Command::new(env!("CARGO_BIN_EXE_orderly"))
        .arg("migrate")
        .env("ORDERLY_DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    let role = Role::start(db.url(), &["serve"]);
    let up = role.ready().await;
    let answered = reqwest::Client::new()
        .post(format!("http://{}/graphql", role.addr))
        .header("content-type", "application/json")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(r#"{"query": "{ __typename }"}"#)
        .send()
        .await
        .map(|r| r.status());
    let tables = db
        .connect()
        .await
        .unwrap()
        .query_one("select count(*) from events", &[])
        .await;
    let (status, log) = role.stop().await;
    assert!(up, "serve never became ready: {log}");
    assert!(tables.is_ok(), "serve did not migrate: {tables:?}");
    assert!(status.success(), "serve exited with {status}: {log}");
    assert!(
        log.lines().any(|l| l.contains("\"stopped\"")),
        "no JSON log line for the stop: {log}"
    );
    assert_eq!(answered.ok(), Some(reqwest::StatusCode::OK));
    // The access log line: JSON, with the request's id and the caller's trace id.
    let line = log
        .lines()
        .find(|l| l.contains("graphql request"))
        .unwrap_or_else(|| panic!("no access log line: {log}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["level"], "INFO");
    assert!(line["timestamp"].is_string(), "{line}");
    let request = &line["spans"][0];
    assert_eq!(request["name"], "graphql.request", "{line}");
    assert_eq!(
        request["trace_id"], "0af7651916cd43dd8448eb211c80319c",
        "{line}"
    );
    assert_eq!(
        request["request_id"].as_str().map(str::len),
        Some(36),
        "{line}"
    );
}

#[tokio::test]
async fn the_worker_roles_serve_probes_and_metrics_and_stop_on_sigterm() {
    let db = migrated_database().await;
    for (args, series) in [
        (&["saga", "run"][..], "orderly_payment_breaker_state 0"),
        (
            &["projections", "run"][..],
            "orderly_projection_state{projection=\"orders\",state=\"running\"} 1",
        ),
    ] {
        let role = Role::start(db.url(), args);
        let up = role.ready().await;
        let mut scraped = String::new();
        for _ in 0..50 {
            scraped = reqwest::get(format!("http://{}/metrics", role.addr))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if scraped.contains(series) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let graphql = reqwest::Client::new()
            .post(format!("http://{}/graphql", role.addr))
            .body("{}")
            .send()
            .await
            .unwrap()
            .status();
        let (status, log) = role.stop().await;
        assert!(up, "{args:?} never became ready: {log}");
        assert!(
            scraped.contains(series),
            "{args:?}: no {series} in {scraped}"
        );
        assert_eq!(graphql, 404, "{args:?} serves no GraphQL");
        assert!(status.success(), "{args:?} exited with {status}: {log}");
    }
}

/// One role of the binary, running as its own process on a free port.
struct Role {
    child: std::process::Child,
    addr: String,
}

impl Role {
    fn start(database_url: &str, args: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_orderly"))
            .args(args)
            .env("ORDERLY_DATABASE_URL", database_url)
            .env("ORDERLY_HTTP_ADDR", &addr)
            .env("ORDERLY_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self { child, addr }
    }

    /// Whether `/readyz` answered 200 once it answered at all (within 30 s).
    async fn ready(&self) -> bool {
        for _ in 0..300 {
            if let Ok(r) = reqwest::get(format!("http://{}/readyz", self.addr)).await {
                return r.status() == 200;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// SIGTERM, then its exit status and log, within 10 s.
    async fn stop(mut self) -> (std::process::ExitStatus, String) {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let mut status = None;
        for _ in 0..100 {
            if let Some(s) = self.child.try_wait().unwrap() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(status) = status else {
            let _ = self.child.kill();
            panic!("the process did not exit within 10 s of SIGTERM");
        };
        let output = self.child.wait_with_output().unwrap();
        (status, String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The HTTP side stops first: a request in flight when the stop is asked is answered before
/// what writes upstream of the read models (the saga, in `orderly serve`) is told to stop, so
/// a placement still being handled is not left to a saga that already stopped.
#[tokio::test]
async fn a_stopping_app_answers_its_requests_before_it_stops_the_saga() {
    use crate::common::{Api, customer, settings_for as with_auth};
    use std::sync::Mutex;
    use std::time::Instant;

    let db = migrated_database().await;
    let app = App::build(&with_auth(db.url())).await.unwrap();
    let api = Api {
        base: format!("http://{}", app.local_addr()),
        http: reqwest::Client::new(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let upstream_stopped_at = Arc::new(Mutex::new(None));
    // In the saga runner's place, a worker that notes when it is told to stop.
    let at = upstream_stopped_at.clone();
    let server = tokio::spawn(orderly_service::run::serve_beside(
        app,
        async {
            let _ = stopped.await;
        },
        move |told_to_stop| async move {
            told_to_stop.await;
            *at.lock().unwrap() = Some(Instant::now());
            Ok(())
        },
    ));
    // A read that waits for a position the log will not reach: in flight for its timeout.
    let waiting = tokio::spawn(async move {
        let query = "query($c: ConsistencyInput) { orders(consistency: $c) { nodes { id } } }";
        let far = json!({ "atLeast": "7fffffffffffffff0000000000000000", "timeoutMs": 1500, "mode": "STRICT" });
        api.gql(Some(&customer("alice")), query, json!({ "c": far }))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    let stop_asked_at = Instant::now();
    let answer = waiting.await.unwrap();
    assert_eq!(answer.code(), "STALE_READ", "{}", answer.body);
    let finished = tokio::time::timeout(Duration::from_secs(20), server).await;
    assert!(matches!(finished, Ok(Ok(Ok(())))), "{finished:?}");
    let upstream_stopped_at = upstream_stopped_at.lock().unwrap().take();
    // The read had more than a second left to wait when the stop was asked.
    let waited = upstream_stopped_at.map(|at| at - stop_asked_at);
    assert!(
        waited.is_some_and(|waited| waited >= Duration::from_secs(1)),
        "the saga told to stop {waited:?} after the stop was asked, before the read was answered"
    );
}
