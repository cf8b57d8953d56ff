//! Starting the app on port 0 against a fresh database, and talking GraphQL to it.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use orderly_graphql::{JwtConfig, Role, TokenIssuer};
use orderly_service::app::App;
use orderly_service::settings::Settings;
use orderly_test_support::{BoxError, TestDb};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "command-api-test-secret";

pub async fn migrated_database() -> TestDb {
    capture_logs();
    TestDb::create(
        "orderly-all",
        &orderly_service::app::migration_fingerprint(),
        |url| async move {
            let settings = Settings::with_database(url);
            orderly_service::app::migrate(&settings)
                .await
                .map_err(|e| BoxError::from(e.to_string()))
        },
    )
    .await
    .expect("test database")
}

/// Sends what the service logs to the test's output, which the test runner shows when the test
/// fails: warnings and errors, or what `RUST_LOG` asks for. A stalled background worker then
/// says why in the failure report instead of leaving only a timeout.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Only the first call of a test process installs it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The single number `sql` selects.
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    db.connect()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until `sql` selects `expected`, which work in the background will make true.
pub async fn eventually(db: &TestDb, sql: &str, expected: i64, within: Duration) {
    let started = std::time::Instant::now();
    loop {
        let got = count(db, sql).await;
        if got == expected {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{sql}: {got}, not {expected}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn settings_for(url: &str) -> Settings {
    let mut settings = Settings::with_database(url);
    settings.http.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    settings.auth.jwt_secret = Some(SECRET.into());
    settings.http.rate_limit_per_second = 0;
    settings.store.pool_size = 8;
    settings
}

pub fn token(sub: &str, roles: &[Role]) -> String {
    let config = JwtConfig {
        secret: Some(SECRET.to_owned()),
        ..Default::default()
    };
    TokenIssuer::new(&config)
        .unwrap()
        .issue(sub, roles, Duration::from_secs(600))
        .unwrap()
}

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

/// Serves `settings` in the background until the test ends.
pub async fn start(settings: &Settings) -> Api {
    let app = App::build(settings).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    Api {
        base,
        http: reqwest::Client::new(),
    }
}

/// The start of most scenarios: the app served on a fresh migrated database. Keep `db` bound
/// for as long as the test runs (the database is dropped with it).
pub struct Shop {
    pub db: TestDb,
    pub settings: Settings,
    pub api: Api,
}

impl Shop {
    pub async fn open() -> Self {
        let db = migrated_database().await;
        let settings = settings_for(db.url());
        let api = start(&settings).await;
        Self { db, settings, api }
    }
}

/// As [`start`], with the fulfilment saga runner (the configured gateway) beside it, as
/// `orderly serve` runs them.
pub async fn start_with_saga(settings: &Settings) -> Api {
    let api = start(settings).await;
    let gateway = orderly_service::app::payment_gateway(settings).unwrap();
    let saga = orderly_service::app::saga_runner(settings, gateway).unwrap();
    tokio::spawn(saga.run_until_stopped(std::future::pending()));
    api
}

/// An HTTP answer: status, Retry-After, body.
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Value,
}

impl Answer {
    pub fn data(&self, field: &str) -> &Value {
        assert!(
            self.body.get("errors").is_none(),
            "unexpected errors: {}",
            self.body
        );
        &self.body["data"][field]
    }

    /// The first error's `extensions.code`.
    pub fn code(&self) -> &str {
        self.body["errors"][0]["extensions"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", self.body))
    }

    pub fn error(&self) -> &Value {
        &self.body["errors"][0]
    }
}

impl Api {
    pub async fn raw(&self, token: Option<&str>, body: impl Into<reqwest::Body>) -> Answer {
        let mut request = self
            .http
            .post(format!("{}/graphql", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {status}, not JSON: {text}"));
        Answer {
            status,
            retry_after,
            body,
        }
    }

    /// The SDL the server serves, as a client fetches it.
    pub async fn sdl(&self) -> String {
        self.text("/graphql/schema.graphql").await
    }

    /// What `GET /metrics` answers.
    pub async fn metrics(&self) -> String {
        self.text("/metrics").await
    }

    async fn text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn gql(&self, token: Option<&str>, query: &str, variables: Value) -> Answer {
        let body = json!({ "query": query, "variables": variables });
        self.raw(token, body.to_string()).await
    }
}

pub const REGISTER: &str = "mutation($input: RegisterProductInput!) {
  registerProduct(input: $input) { id version token events replayed } }";
pub const PLACE: &str = "mutation($input: PlaceOrderInput!) {
  placeOrder(input: $input) { id version token events replayed } }";
pub const CANCEL: &str = "mutation($id: UUID!, $reason: String!, $v: Int) {
  cancelOrder(orderId: $id, reason: $reason, expectedVersion: $v) { id version token events replayed } }";
pub const SHIP: &str = "mutation($id: UUID!, $v: Int) {
  shipOrder(orderId: $id, carrier: \"DHL\", trackingNumber: \"TRK1\", expectedVersion: $v) { id version events replayed } }";
pub const DELIVER: &str = "mutation($id: UUID!) {
  markDelivered(orderId: $id) { id version events replayed } }";
pub const RESTOCK: &str = "mutation($sku: String!, $q: Int!, $v: Int) {
  restock(sku: $sku, quantity: $q, expectedVersion: $v) { id version events replayed } }";
pub const CHANGE_PRICE: &str = "mutation($sku: String!, $p: Long!, $v: Int) {
  changePrice(sku: $sku, priceMinor: $p, expectedVersion: $v) { id version events replayed } }";

pub fn admin() -> String {
    token("admin-1", &[Role::Admin])
}

pub fn warehouse() -> String {
    token("warehouse-1", &[Role::Warehouse])
}

pub fn customer(sub: &str) -> String {
    token(sub, &[Role::Customer])
}

pub async fn register(api: &Api, sku: &str, price: i64, currency: &str, stock: i32) {
    let answer = api
        .gql(
            Some(&admin()),
            REGISTER,
            json!({ "input": { "sku": sku, "name": format!("Product {sku}"),
                "priceMinor": price, "currency": currency, "initialStock": stock } }),
        )
        .await;
    answer.data("registerProduct");
}

pub fn address() -> Value {
    json!({ "name": "Ada", "line1": "1 Main St", "city": "Berlin", "postalCode": "10115", "country": "DE" })
}

pub fn order_input(lines: Value, token: &str) -> Value {
    json!({ "input": { "lines": lines, "paymentToken": token, "shippingAddress": address() } })
}

/// What placeOrder answered: the order's id and the mutation's consistency token.
pub struct Placed {
    pub id: String,
    pub token: String,
}

/// Places an order of `quantity` units of `sku` as customer `sub`, paid with `payment_token`.
pub async fn place(api: &Api, sub: &str, sku: &str, quantity: i64, payment_token: &str) -> Placed {
    let answer = api
        .gql(
            Some(&customer(sub)),
            PLACE,
            order_input(json!([{ "sku": sku, "quantity": quantity }]), payment_token),
        )
        .await;
    let placed = answer.data("placeOrder");
    Placed {
        id: placed["id"].as_str().unwrap().to_owned(),
        token: placed["token"].as_str().unwrap().to_owned(),
    }
}

/// Cancels order `id` as its customer `sub`, "changed my mind".
pub async fn cancel_as(api: &Api, sub: &str, id: &str) {
    api.gql(
        Some(&customer(sub)),
        CANCEL,
        json!({ "id": id, "reason": "changed my mind" }),
    )
    .await
    .data("cancelOrder");
}

/// Places an order of one unit of `sku`, paid with tok_ok, as customer `sub`; its id.
pub async fn place_one(api: &Api, sub: &str, sku: &str) -> String {
    place(api, sub, sku, 1, "tok_ok").await.id
}

// graphql-transport-ws over a WebSocket, for subscriptions.

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket speaking graphql-transport-ws, without `connection_init`.
pub async fn open(api: &Api) -> Socket {
    let url = format!("{}/graphql", api.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
}

/// Opens a graphql-transport-ws connection, authenticated with `token` when given.
pub async fn connect(api: &Api, token: Option<&str>) -> Socket {
    let mut socket = open(api).await;
    init(&mut socket, token).await;
    assert_eq!(next(&mut socket).await["type"], "connection_ack");
    socket
}

/// Sends `connection_init`, with `token` in its payload when given.
pub async fn init(socket: &mut Socket, token: Option<&str>) {
    let payload = token.map_or(
        json!({}),
        |t| json!({ "Authorization": format!("Bearer {t}") }),
    );
    send(
        socket,
        json!({ "type": "connection_init", "payload": payload }),
    )
    .await;
}

pub async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

pub async fn subscribe(socket: &mut Socket, id: &str, query: &str, variables: Value) {
    send(
        socket,
        json!({ "id": id, "type": "subscribe", "payload": { "query": query, "variables": variables } }),
    )
    .await;
}

/// The next protocol message within 15 s; pings are answered and `complete` (which follows a
/// refused subscription) skipped on the way.
pub async fn next(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(15), socket.next())
            .await
            .expect("a message within 15 s")
            .expect("the socket stays open")
            .unwrap();
        match message {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] == "ping" {
                    send(socket, json!({ "type": "pong" })).await;
                    continue;
                }
                if value["type"] == "complete" {
                    continue;
                }
                return value;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The contract code of a refused subscription: resolver errors arrive as a `next` carrying
/// `errors`, request errors (validation) as an `error` message.
pub fn refusal(message: &Value) -> &str {
    let errors = match message["type"].as_str() {
        Some("next") => &message["payload"]["errors"],
        Some("error") => &message["payload"],
        _ => panic!("not a refusal: {message}"),
    };
    errors[0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code in {message}"))
}

/// The close frame the server ends `socket` with, within 15 s: its code and reason. Messages
/// before it are skipped.
pub async fn closed(socket: &mut Socket) -> (u16, String) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(15), socket.next())
            .await
            .expect("a close within 15 s")
            .expect("a close frame before the end")
            .expect("a close frame, not a failure");
        if let Message::Close(frame) = message {
            let frame = frame.expect("a close frame with a code");
            return (u16::from(frame.code), frame.reason.to_string());
        }
    }
}

/// The folder whose `node_modules` holds `tests/node/package.json`'s packages, which
/// `deploy/local/test.sh` installs: `ORDERLY_NODE_DIR`, else `~/.cache/orderly/node`.
pub fn node_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("ORDERLY_NODE_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("orderly").join("node")
}

/// Runs `script` (in `tests/node`) under Node.js with `args`, and returns what it printed;
/// panics, saying how to get them, when Node.js or the packages are missing.
pub fn run_node(script: &str, args: &[&str]) -> String {
    let dir = node_dir();
    assert!(
        dir.join("node_modules").is_dir(),
        "no node_modules in {}: run deploy/local/test.sh, which installs tests/node/package.json there",
        dir.display()
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/node")
        .join(script);
    let output = std::process::Command::new("node")
        .arg(&path)
        .args(args)
        .env("ORDERLY_NODE_DIR", &dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node (Node.js 18 or later is needed): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "node {script} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Parks `event`, a product's registration (as the admin `events` query answers it), for the
/// products projection with `error`, as a runner does when its handler fails: the product's
/// row is taken out first (once the runner has written it), so that the read model does not
/// hold the event and a retry has it to apply. Answers the dead letter's id.
pub async fn park_registration(db: &TestDb, event: &Value, error: &str) -> i64 {
    let (commit, prepare) = position_columns(event);
    let event_id = uuid::Uuid::parse_str(event["id"].as_str().unwrap()).unwrap();
    let stream = event["stream"].as_str().unwrap();
    let sku = stream.strip_prefix("product-").expect("a product's event");
    let row = format!("select count(*) from products where sku = '{sku}'");
    eventually(db, &row, 1, Duration::from_secs(10)).await;
    let client = db.connect().await.unwrap();
    client
        .execute("delete from products where sku = $1", &[&sku])
        .await
        .unwrap();
    client
        .query_one(
            "insert into dead_letters (projection, event_id, stream, version, position_commit,
                 position_prepare, event_type, error)
             values ('products', $1, $2, $3, $4, $5, $6, $7) returning dead_letter_id",
            &[
                &event_id,
                &stream,
                &event["version"].as_i64().unwrap(),
                &commit,
                &prepare,
                &event["type"].as_str().unwrap(),
                &error,
            ],
        )
        .await
        .unwrap()
        .get(0)
}

/// The `position_commit` and `position_prepare` columns of an event's position (its 32 hex
/// digits as the API answers them).
fn position_columns(event: &Value) -> (i64, i64) {
    let position = event["position"].as_str().unwrap();
    let half = |range: std::ops::Range<usize>| i64::from_str_radix(&position[range], 16).unwrap();
    (half(0..16), half(16..32))
}

/// Parks `event` (as the admin `events` query answers it) for the fulfilment saga with
/// `error`, as a lane does when a step fails for good; answers its event id.
pub async fn park_saga_event(db: &TestDb, event: &Value, error: &str) -> String {
    let (commit, prepare) = position_columns(event);
    let event_id = uuid::Uuid::parse_str(event["id"].as_str().unwrap()).unwrap();
    let order_id = event["stream"]
        .as_str()
        .and_then(|stream| stream.strip_prefix("order-"))
        .map(|id| uuid::Uuid::parse_str(id).unwrap());
    db.connect()
        .await
        .unwrap()
        .execute(
            "insert into saga_parked (saga_name, event_id, order_id, position_commit,
                 position_prepare, stream, version, event_type, error)
             values ('fulfilment', $1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &event_id,
                &order_id,
                &commit,
                &prepare,
                &event["stream"].as_str().unwrap(),
                &event["version"].as_i64().unwrap(),
                &event["type"].as_str().unwrap(),
                &error,
            ],
        )
        .await
        .unwrap();
    event_id.to_string()
}

/// Adds an outbox message of `kind` that failed its attempts with `error` and waits for an
/// operator; answers its id.
pub async fn dead_letter_outbox(db: &TestDb, kind: &str, error: &str) -> String {
    let outbox_id = uuid::Uuid::new_v4();
    db.connect()
        .await
        .unwrap()
        .execute(
            "insert into outbox (outbox_id, order_id, kind, payload, attempts, last_error,
                 dead_lettered_at)
             values ($1, gen_random_uuid(), $2, '{}', 5, $3, now())",
            &[&outbox_id, &kind, &error],
        )
        .await
        .unwrap();
    outbox_id.to_string()
}

/// Runs the `orderly` binary with `args` and the tests' signing key, and returns what it
/// printed; panics with its error output when it fails.
pub fn orderly_cli(args: &[&str]) -> String {
    orderly_cli_with(&[], args)
}

/// [`orderly_cli`] with more environment: `ORDERLY_DATABASE_URL` for a test's database, say.
pub fn orderly_cli_with(envs: &[(&str, &str)], args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orderly"))
        .args(args)
        .env("ORDERLY_JWT_SECRET", SECRET)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// How many events of `event_type` stream `stream` holds.
pub async fn events_of(db: &TestDb, event_type: &str, stream: &str) -> i64 {
    db.connect()
        .await
        .unwrap()
        .query_one(
            "select count(*) from events where event_type = $1 and stream = $2",
            &[&event_type, &stream],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits up to 30 s until stream `stream` holds `expected` events of `event_type`.
pub async fn eventually_events_of(db: &TestDb, event_type: &str, stream: &str, expected: i64) {
    let sql = format!(
        "select count(*) from events where event_type = '{event_type}' and stream = '{stream}'"
    );
    eventually(db, &sql, expected, Duration::from_secs(30)).await;
}

/// Runs `orderly saga outbox skip OUTBOX_ID FLAG` on `db` (`--refunded-elsewhere` or
/// `--not-charged`), then checks that the payment of `order_id` holds one `event_type`
/// recorded by the CLI's operator and that the order's saga settles; what the CLI printed.
pub async fn skip_as_settled_elsewhere(
    db: &TestDb,
    outbox_id: &str,
    flag: &str,
    event_type: &str,
    order_id: &str,
) -> String {
    let done = orderly_cli_with(
        &[("ORDERLY_DATABASE_URL", db.url())],
        &["saga", "outbox", "skip", outbox_id, flag],
    );
    let recorded = format!(
        "select count(*) from events where event_type = '{event_type}'
         and stream = 'payment-{order_id}' and metadata ->> 'actor' = 'operator:cli'"
    );
    assert_eq!(count(db, &recorded).await, 1, "{event_type} recorded once");
    let settled =
        format!("select count(*) from saga_states where order_id = '{order_id}' and settled");
    eventually(db, &settled, 1, Duration::from_secs(20)).await;
    done
}

/// Makes the database refuse, for good, the writes `action` (`insert on events`, `update on
/// outbox`) of the rows `when` picks: a trigger named `name` stands in for a bug (what it
/// raises is no failure that passes), until [`accept_again`].
pub async fn refuse_for_good(
    client: &tokio_postgres::Client,
    name: &str,
    action: &str,
    when: &str,
) {
    refuse_with(client, name, action, when, "P0001").await;
}

/// [`refuse_for_good`] with SQLSTATE `code` (class 22: the database blames the values).
pub async fn refuse_with(
    client: &tokio_postgres::Client,
    name: &str,
    action: &str,
    when: &str,
    code: &str,
) {
    client
        .batch_execute(&format!(
            "create function {name}() returns trigger language plpgsql
             as $$ begin raise exception 'refused on purpose' using errcode = '{code}'; end $$;
             create trigger {name} before {action} for each row
             when ({when}) execute function {name}();"
        ))
        .await
        .unwrap();
}

/// Drops the trigger `name` of [`refuse_for_good`] from `table`.
pub async fn accept_again(client: &tokio_postgres::Client, name: &str, table: &str) {
    client
        .batch_execute(&format!("drop trigger {name} on {table}"))
        .await
        .unwrap();
}

/// A saga runner on the test's database, not yet started.
pub fn configured_runner(
    settings: &Settings,
    config: orderly_command_api::saga::SagaConfig,
    gateway: std::sync::Arc<dyn orderly_command_api::saga::PaymentGateway>,
) -> orderly_command_api::saga::SagaRunner {
    let store = orderly_service::app::event_store(settings).unwrap();
    runner_over(settings, config, store, gateway)
}

/// [`configured_runner`] on `store`, e.g. one that injects faults.
pub fn runner_over(
    settings: &Settings,
    config: orderly_command_api::saga::SagaConfig,
    store: std::sync::Arc<dyn orderly_event_store::EventStore>,
    gateway: std::sync::Arc<dyn orderly_command_api::saga::PaymentGateway>,
) -> orderly_command_api::saga::SagaRunner {
    let pg_config = orderly_service::app::pg_config(settings).unwrap();
    let pool = orderly_graphql::pg_pool(&pg_config, 8).unwrap();
    orderly_command_api::saga::SagaRunner::new(config, store, pool, gateway)
}
