//! Idle subscribers: the database transactions per second a read API process causes while it
//! holds 1 and then N `events(stream:)` subscriptions over graphql-transport-ws that receive
//! nothing, next to N subscriptions made straight on the PostgreSQL store (one reader each, as
//! every served subscription had before they shared one).
//!
//! Method: `orderly read-api` (`Part::Reads`) served in-process on a fresh database; each
//! socket belongs to its own admin and holds `per_socket` subscriptions to streams that never
//! get an event. Per scenario: set up, wait `warm_up` seconds, then read `xact_commit` of the
//! database from `pg_stat_database` before and after `seconds` seconds. Backends report their
//! counts about once a second while busy, so windows of tens of seconds make that blur small.
//! The bare process (no subscriber) is measured first: health sampling and the projection
//! follower's own reads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use futures::{SinkExt, StreamExt};
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions};
use orderly_event_store::{EventFilter, EventStore, Position, StreamName, Subscription};
use orderly_graphql::Role;
use orderly_service::app::{App, Part};
use orderly_service::settings::Settings;
use orderly_test_support::TestDb;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::place_order::{SECRET, issuer};
use crate::report;

#[derive(clap::Args)]
pub struct Args {
    /// Subscribers of the large scenarios.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Subscriptions per WebSocket (at most the server's per-socket cap, 20 by default).
    #[arg(long, default_value_t = 20)]
    per_socket: usize,
    /// Seconds measured per scenario.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seconds between setting a scenario up and measuring it.
    #[arg(long, default_value_t = 5)]
    warm_up: u64,
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn run(args: Args) -> anyhow::Result<()> {
    let db = report::service_database("bench-subscribers").await?;
    println!("# idle subscribers benchmark\n");
    println!("- machine: {}", report::machine());
    println!("- server: {}", report::server_version(&db).await?);
    println!(
        "- {} s measured per scenario after {} s warm-up; {} subscriptions per WebSocket\n",
        args.seconds, args.warm_up, args.per_socket
    );
    let mut settings = Settings::with_database(db.url());
    settings.http.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    settings.auth.jwt_secret = Some(SECRET.into());
    settings.http.rate_limit_per_second = 0;
    let app = App::build_part(&settings, Part::Reads).await?;
    let url = format!("ws://{}/graphql", app.local_addr());
    let stop = CancellationToken::new();
    let served = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    let stats = db.connect().await.map_err(|e| anyhow!("{e}"))?;

    println!("| scenario | subscribers | transactions/s |");
    println!("|---|---:|---:|");
    let rate = measure(&args, &stats).await?;
    println!("| read API, no subscriber | 0 | {rate:.1} |");
    for count in [1, args.subscribers] {
        let sockets = served_subscribers(&url, count, args.per_socket).await?;
        let rate = measure(&args, &stats).await?;
        println!("| read API, `events(stream:)` over WebSockets | {count} | {rate:.1} |");
        drop(sockets);
    }
    let raw = raw_subscribers(&db, args.subscribers).await?;
    let rate = measure(&args, &stats).await?;
    println!(
        "| read API idle + `EventStore::subscribe` on the store, one reader each | {} | {rate:.1} |",
        args.subscribers
    );
    drop(raw);
    stop.cancel();
    served.await??;
    Ok(())
}

/// Transactions per second committed in the database over `args.seconds`, after the warm-up.
async fn measure(args: &Args, stats: &tokio_postgres::Client) -> anyhow::Result<f64> {
    tokio::time::sleep(Duration::from_secs(args.warm_up)).await;
    let commits = || async {
        let row = stats
            .query_one(
                "select xact_commit from pg_stat_database where datname = current_database()",
                &[],
            )
            .await?;
        anyhow::Ok(row.get::<_, i64>(0))
    };
    let before = commits().await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let after = commits().await?;
    Ok((after - before) as f64 / started.elapsed().as_secs_f64())
}

/// `count` idle subscriptions over WebSockets, `per_socket` on each, every socket its own
/// admin; each acknowledged before this returns.
async fn served_subscribers(
    url: &str,
    count: usize,
    per_socket: usize,
) -> anyhow::Result<Vec<Socket>> {
    let issuer = issuer()?;
    let mut sockets = Vec::new();
    let mut left = count;
    while left > 0 {
        let here = left.min(per_socket.max(1));
        let token = issuer.issue(
            &format!("bench-admin-{}", sockets.len()),
            &[Role::Admin],
            Duration::from_secs(3600),
        )?;
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
        send(
            &mut socket,
            json!({ "type": "connection_init", "payload": { "Authorization": format!("Bearer {token}") } }),
        )
        .await?;
        expect(&mut socket, "connection_ack").await?;
        for i in 0..here {
            let stream = format!("order-{}", Uuid::new_v4());
            send(
                &mut socket,
                json!({ "id": i.to_string(), "type": "subscribe", "payload": {
                    "query": "subscription($s: String) { events(stream: $s) { type } }",
                    "variables": { "s": stream } } }),
            )
            .await?;
        }
        // A query after them comes back once they are set up (or refused, which it reports).
        send(
            &mut socket,
            json!({ "id": "probe", "type": "subscribe", "payload": { "query": "{ __typename }" } }),
        )
        .await?;
        expect(&mut socket, "next").await?;
        sockets.push(socket);
        left -= here;
    }
    Ok(sockets)
}

async fn send(socket: &mut Socket, message: Value) -> anyhow::Result<()> {
    socket
        .send(Message::Text(message.to_string().into()))
        .await?;
    Ok(())
}

/// Waits for a message of type `kind`; any `error` or early close is a failed setup.
async fn expect(socket: &mut Socket, kind: &str) -> anyhow::Result<()> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .context("no answer within 30 s")?
            .context("the socket closed")??;
        let Message::Text(text) = message else {
            continue;
        };
        let value: Value = serde_json::from_str(&text)?;
        match value["type"].as_str() {
            Some(t) if t == kind => return Ok(()),
            Some("error") => anyhow::bail!("subscription refused: {value}"),
            _ => {}
        }
    }
}

/// `count` subscriptions made on a PostgreSQL store of their own, as each served one was made
/// before the shared reader.
async fn raw_subscribers(
    db: &TestDb,
    count: usize,
) -> anyhow::Result<(Arc<PgEventStore>, Vec<Subscription>)> {
    let store = Arc::new(PgEventStore::new(
        db.config().clone(),
        PgStoreOptions::default(),
    )?);
    let head = store.head().await.unwrap_or(Position::START);
    let mut subscriptions = Vec::with_capacity(count);
    for _ in 0..count {
        let stream = StreamName::parse(format!("order-{}", Uuid::new_v4()))?;
        subscriptions.push(store.subscribe(head, EventFilter::Stream(stream)).await?);
    }
    Ok((store, subscriptions))
}
