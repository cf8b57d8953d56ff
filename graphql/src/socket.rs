//! Subscriptions (and queries and mutations) over a WebSocket speaking graphql-transport-ws,
//! behind the same gate as `POST /graphql`:
//!
//! - every message is held to the HTTP body limit; a larger one is refused before it is read
//!   whole, let alone parsed (close 1009);
//! - a socket that does not send `connection_init` within [`GraphqlLimits::init_timeout`] is
//!   closed (4408); a second `connection_init` closes it (4429); a refused token closes it
//!   (4403), and so does the token's expiry while the socket is open;
//! - every `subscribe` takes its cost from the caller's rate-limit budget (the token's subject,
//!   else the client's address, as over HTTP) and is refused with RATE_LIMITED when it is short;
//! - a query or mutation runs at most [`GraphqlLimits::timeout`], and a subscription gets as
//!   long to be set up (until its resolver calls [`subscription_ready`] or it answers); past
//!   that it ends with UNAVAILABLE and gives its place back;
//! - a subscription selects exactly one root field, as the GraphQL specification says: its
//!   one resolver then says when the whole subscription is set up;
//! - subscriptions are capped per socket and per caller in this process;
//! - protocol violations close with the protocol's codes: 4400 for a message that is not one of
//!   the protocol's, 4401 for `subscribe` before `connection_ack`, 4409 for an id in use.
//!
//! Operations run as tasks of their own and hand their messages to the socket through one
//! bounded channel, so a client that does not read slows its operations down (and the read
//! API's per-subscription buffer then cuts a subscription off) instead of growing memory.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_graphql::parser::types::OperationType;
use async_graphql::{Executor, Response as GqlResponse};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::auth::{Actor, Authenticator};
use crate::cost::{Budget, visit_root_fields};
use crate::error_codes::{ErrorCode, rate_limited};
use crate::http::{Caller, Coded, GraphqlLimits, failure, operation, rate_limited_response};
use crate::rate_limit::RateLimiter;

/// The one subprotocol served.
const PROTOCOL: &str = "graphql-transport-ws";

/// Close codes: RFC 6455's for an oversize message, graphql-transport-ws's for the rest.
mod close {
    pub const TOO_BIG: u16 = 1009;
    pub const BAD_MESSAGE: u16 = 4400;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const FORBIDDEN: u16 = 4403;
    pub const INIT_TIMEOUT: u16 = 4408;
    pub const DUPLICATE_ID: u16 = 4409;
    pub const TOO_MANY_INITS: u16 = 4429;
}

/// What every socket of one `/graphql` shares.
pub(crate) struct Sockets<E> {
    pub executor: Coded<E>,
    pub auth: Arc<Authenticator>,
    pub limiter: Arc<RateLimiter>,
    pub limits: GraphqlLimits,
    /// Open subscriptions per caller key, over all sockets of this process.
    pub open: Mutex<HashMap<String, usize>>,
}

/// Answers an upgrade request: refuses it unless it offers graphql-transport-ws, charges the
/// connection to the client's address, and serves the socket.
pub(crate) async fn upgrade<E: Executor>(sockets: Arc<Sockets<E>>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let offered = parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim().eq_ignore_ascii_case(PROTOCOL));
    if !offered {
        return failure(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadUserInput,
            "subscriptions need the graphql-transport-ws WebSocket subprotocol",
        );
    }
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let peer: Option<IpAddr> = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let by_address = peer.map_or_else(|| "anonymous".to_owned(), |ip| format!("ip:{ip}"));
    if let Err(wait) = sockets.limiter.check(&by_address) {
        return rate_limited_response(wait);
    }
    let header_token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let limit = sockets.limits.body_limit;
    upgrade
        .protocols([PROTOCOL])
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let (sink, stream) = socket.split();
            let connection = Connection {
                sockets,
                sink,
                by_address,
                header_token,
                session: None,
                initialising: false,
                operations: Operations::default(),
                serial: 0,
            };
            connection.serve(stream)
        })
}

/// A message from the client.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    ConnectionInit {
        #[serde(default)]
        payload: Option<Value>,
    },
    Ping {},
    Pong {},
    Subscribe {
        id: String,
        payload: Box<async_graphql::Request>,
    },
    Complete {
        id: String,
    },
}

/// What an operation's task hands to the socket.
enum Outgoing {
    Text(String),
    /// The last message of the operation with this id and serial: its id is free again once
    /// this is sent, and not before (a client may reuse an id once it saw `complete`).
    Last {
        id: String,
        serial: u64,
        text: String,
    },
}

/// The caller, once `connection_init` was accepted.
struct Session {
    actor: Option<Actor>,
    /// The rate-limit and subscription-cap key: `sub:<subject>`, else the client's address.
    key: String,
    /// When the token stops being accepted; `None` for an anonymous socket.
    expires_at: Option<Instant>,
}

/// The operations running on one socket, aborted when the socket ends.
#[derive(Default)]
struct Operations {
    running: HashMap<String, Running>,
}

struct Running {
    serial: u64,
    subscription: bool,
    task: AbortHandle,
}

impl Drop for Operations {
    fn drop(&mut self) {
        for running in self.running.values() {
            running.task.abort();
        }
    }
}

struct Connection<E> {
    sockets: Arc<Sockets<E>>,
    sink: SplitSink<WebSocket, Message>,
    by_address: String,
    header_token: Option<String>,
    session: Option<Session>,
    /// `connection_init` was received (acknowledged or refused): a second one is an error.
    initialising: bool,
    operations: Operations,
    /// Tells an operation's `Done` from that of an earlier one with the same id.
    serial: u64,
}

/// Why the server ends a connection: a close code and a reason for the client.
struct Closing(u16, String);

impl<E: Executor> Connection<E> {
    async fn serve(mut self, mut stream: SplitStream<WebSocket>) {
        let (tx, mut rx) = mpsc::channel::<Outgoing>(64);
        let init_deadline = Instant::now() + self.sockets.limits.init_timeout;
        let closing = loop {
            let deadline = match &self.session {
                None => Some((init_deadline, close::INIT_TIMEOUT)),
                Some(session) => session.expires_at.map(|at| (at, close::FORBIDDEN)),
            };
            let timer = async {
                match deadline {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = stream.next() => match self.receive(message, &tx).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(closing) => break closing,
                },
                Some(outgoing) = rx.recv() => {
                    let text = match outgoing {
                        Outgoing::Text(text) => text,
                        Outgoing::Last { id, serial, text } => {
                            if self.operations.running.get(&id).is_some_and(|r| r.serial == serial) {
                                self.operations.running.remove(&id);
                            }
                            text
                        }
                    };
                    if self.sink.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                () = timer => break match deadline {
                    Some((_, close::INIT_TIMEOUT)) => {
                        Closing(close::INIT_TIMEOUT, "Connection initialisation timeout".into())
                    }
                    _ => Closing(close::FORBIDDEN, "Forbidden: the token has expired".into()),
                },
            }
        };
        // Operations stop first, so that nothing follows the close frame.
        self.operations = Operations::default();
        let Closing(code, reason) = closing;
        tracing::debug!(code, %reason, "closing a subscription socket");
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        if self.sink.send(Message::Close(Some(frame))).await.is_ok() {
            // Give the client a moment to answer the close, so the frame is read before the
            // connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(Ok(message)) = stream.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }

    /// Handles one frame; `Ok(false)` when the client went away.
    async fn receive(
        &mut self,
        message: Option<Result<Message, axum::Error>>,
        tx: &mpsc::Sender<Outgoing>,
    ) -> Result<bool, Closing> {
        let text = match message {
            None | Some(Ok(Message::Close(_))) => return Ok(false),
            Some(Ok(Message::Text(text))) => text,
            // WebSocket-level pings are answered by the transport itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(true),
            Some(Ok(Message::Binary(_))) => {
                return Err(Closing(
                    close::BAD_MESSAGE,
                    "graphql-transport-ws messages are text".into(),
                ));
            }
            Some(Err(error)) => return Err(read_failure(error, self.sockets.limits.body_limit)),
        };
        let message: ClientMessage = serde_json::from_str(text.as_str()).map_err(|error| {
            Closing(
                close::BAD_MESSAGE,
                truncate(format!("Invalid message received: {error}")),
            )
        })?;
        match message {
            ClientMessage::ConnectionInit { payload } => self.init(payload).await?,
            ClientMessage::Ping {} => {
                let pong = json!({ "type": "pong" }).to_string();
                if self.sink.send(Message::Text(pong.into())).await.is_err() {
                    return Ok(false);
                }
            }
            ClientMessage::Pong {} => {}
            ClientMessage::Subscribe { id, payload } => self.subscribe(id, *payload, tx).await?,
            ClientMessage::Complete { id } => {
                if let Some(running) = self.operations.running.remove(&id) {
                    running.task.abort();
                }
            }
        }
        Ok(true)
    }

    async fn init(&mut self, payload: Option<Value>) -> Result<(), Closing> {
        if std::mem::replace(&mut self.initialising, true) {
            return Err(Closing(
                close::TOO_MANY_INITS,
                "Too many initialisation requests".into(),
            ));
        }
        // The token comes in the payload (browsers cannot set headers on a WebSocket), else in
        // the upgrade request's Authorization header.
        let from_payload = ["Authorization", "authorization"]
            .iter()
            .find_map(|key| payload.as_ref()?.get(*key)?.as_str())
            .map(str::to_owned);
        let authorization = from_payload.or_else(|| self.header_token.take());
        let session = self
            .sockets
            .auth
            .session(authorization.as_deref())
            .map_err(|why| Closing(close::FORBIDDEN, truncate(format!("Forbidden: {why}"))))?;
        let now = SystemTime::now();
        self.session = Some(match session {
            None => Session {
                actor: None,
                key: self.by_address.clone(),
                expires_at: None,
            },
            Some(session) => Session {
                key: format!("sub:{}", session.actor.sub),
                actor: Some(session.actor),
                // An expiry past what the monotonic clock can count is as good as none.
                expires_at: Instant::now().checked_add(
                    session
                        .expires_at
                        .duration_since(now)
                        .unwrap_or(Duration::ZERO),
                ),
            },
        });
        let ack = json!({ "type": "connection_ack" }).to_string();
        self.sink
            .send(Message::Text(ack.into()))
            .await
            .map_err(|_| Closing(close::BAD_MESSAGE, "connection lost".into()))
    }

    async fn subscribe(
        &mut self,
        id: String,
        request: async_graphql::Request,
        tx: &mpsc::Sender<Outgoing>,
    ) -> Result<(), Closing> {
        let Some(session) = &self.session else {
            return Err(Closing(close::UNAUTHORIZED, "Unauthorized".into()));
        };
        if self.operations.running.contains_key(&id) {
            return Err(Closing(
                close::DUPLICATE_ID,
                truncate(format!("Subscriber for {id} already exists")),
            ));
        }
        let sockets = &self.sockets;
        let refuse = |error: async_graphql::Error| {
            let payload = json!([error.into_server_error(Default::default())]);
            json!({ "id": id, "type": "error", "payload": payload }).to_string()
        };
        // The door: one token before the request is even looked at, as over HTTP.
        if let Err(wait) = sockets.limiter.check(&session.key) {
            let _ = tx.send(Outgoing::Text(refuse(rate_limited(wait)))).await;
            return Ok(());
        }
        let mut request = request;
        let name = request.operation_name.clone();
        // Parsed here once; execution reuses the parsed document.
        let kind = request.parsed_query().ok().and_then(|document| {
            let operation = operation(document, name.as_deref())?;
            let mut fields = 0;
            visit_root_fields(document, &operation.node.selection_set.node, &mut |_| {
                fields += 1;
            });
            Some((operation.node.ty, fields))
        });
        let subscription = matches!(kind, Some((OperationType::Subscription, _)));
        if let Some((OperationType::Subscription, fields)) = kind
            && fields != 1
        {
            let error = ErrorCode::BadUserInput.error(format!(
                "a subscription selects exactly one root field; this one selects {fields}"
            ));
            let _ = tx.send(Outgoing::Text(refuse(error))).await;
            return Ok(());
        }
        let slot = if subscription {
            match self.take_slot(session.key.clone()) {
                Ok(slot) => Some(slot),
                Err(error) => {
                    let _ = tx.send(Outgoing::Text(refuse(error))).await;
                    return Ok(());
                }
            }
        } else {
            None
        };
        let caller = Caller {
            actor: session.actor.clone(),
            request_id: uuid::Uuid::new_v4().to_string(),
            traceparent: None,
        };
        let budget = Budget::new(sockets.limiter.clone(), session.key.clone(), 1);
        let mut request = request.data(caller).data(budget);
        if let Some(slot) = &slot {
            request = request.data(slot.setup.clone());
        }
        self.serial += 1;
        let serial = self.serial;
        let task = tokio::spawn(run_operation(
            sockets.executor.clone(),
            request,
            sockets.limits.timeout,
            id.clone(),
            serial,
            tx.clone(),
            slot,
        ));
        self.operations.running.insert(
            id,
            Running {
                serial,
                subscription,
                task: task.abort_handle(),
            },
        );
        Ok(())
    }

    /// A place for one more subscription of `key`, within the per-socket and per-caller caps.
    fn take_slot(&self, key: String) -> Result<Slot<E>, async_graphql::Error> {
        let limits = &self.sockets.limits;
        let here = self
            .operations
            .running
            .values()
            .filter(|running| running.subscription)
            .count();
        if here >= limits.subscriptions_per_socket {
            return Err(too_many(format!(
                "at most {} subscriptions per connection",
                limits.subscriptions_per_socket
            )));
        }
        let mut open = self
            .sockets
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(key.clone()).or_default();
        if *count >= limits.subscriptions_per_subject {
            return Err(too_many(format!(
                "at most {} subscriptions per caller",
                limits.subscriptions_per_subject
            )));
        }
        *count += 1;
        Ok(Slot {
            sockets: self.sockets.clone(),
            key,
            setup: Setup::default(),
        })
    }
}

/// RATE_LIMITED for a subscription over a cap: it may pass once another one ends.
fn too_many(message: String) -> async_graphql::Error {
    use async_graphql::ErrorExtensions;
    ErrorCode::RateLimited
        .error(message)
        .extend_with(|_, e| e.set("reason", "TOO_MANY_SUBSCRIPTIONS"))
}

/// One open subscription counted against its caller; dropping it gives the place back.
struct Slot<E> {
    sockets: Arc<Sockets<E>>,
    key: String,
    /// Told by the resolver once the subscription is set up.
    setup: Setup,
}

impl<E> Drop for Slot<E> {
    fn drop(&mut self) {
        let mut open = self
            .sockets
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Put into a subscription's request data by the socket, so that its resolver can say when
/// it is set up: see [`subscription_ready`].
#[derive(Clone, Default)]
struct Setup(Arc<Notify>);

/// Says that the subscription being resolved in `ctx` is set up: its resolver has done the
/// reads it needs before it streams (access checks, a baseline, the log's head). Every
/// subscription resolver calls it right before it returns its stream; until then (or until
/// the subscription answers) the operation timeout applies, so a setup that hangs on the
/// database ends with UNAVAILABLE instead of holding its place for good. A resolver that
/// never calls it and has nothing to send within the timeout is ended the same way.
pub fn subscription_ready(ctx: &async_graphql::Context<'_>) {
    if let Some(setup) = ctx.data_opt::<Setup>() {
        // Keeps the permit when nobody waits yet, so the order of the two does not matter.
        setup.0.notify_one();
    }
}

/// Runs one operation and sends its messages: `next` per response, then `complete`; or one
/// `error` when it does not get going within the timeout. A query or mutation gets going
/// with its one response, a subscription once [`subscription_ready`] was called or its first
/// response came; after that a subscription streams without a time limit.
async fn run_operation<E: Executor>(
    executor: Coded<E>,
    request: async_graphql::Request,
    timeout: Duration,
    id: String,
    serial: u64,
    tx: mpsc::Sender<Outgoing>,
    slot: Option<Slot<E>>,
) {
    let mut responses = executor.execute_stream(request, None);
    let next = |response: GqlResponse| {
        json!({ "id": id, "type": "next", "payload": response }).to_string()
    };
    // The first response (`None` for none at all), or nothing when the subscription said it
    // is set up before it had one.
    let started = tokio::time::timeout(timeout, async {
        match &slot {
            None => Some(responses.next().await),
            Some(slot) => tokio::select! {
                response = responses.next() => Some(response),
                () = slot.setup.0.notified() => None,
            },
        }
    })
    .await;
    let last = match started {
        Err(_) => {
            tracing::warn!(operation_id = %id, "operation over a socket timed out");
            let error = ErrorCode::Unavailable
                .error("the request took too long; retry (with the same idempotency key)")
                .into_server_error(Default::default());
            json!({ "id": id, "type": "error", "payload": [error] })
        }
        Ok(Some(None)) => json!({ "id": id, "type": "complete" }),
        Ok(first) => {
            if let Some(Some(response)) = first
                && tx.send(Outgoing::Text(next(response))).await.is_err()
            {
                return;
            }
            while let Some(response) = responses.next().await {
                if tx.send(Outgoing::Text(next(response))).await.is_err() {
                    return;
                }
            }
            json!({ "id": id, "type": "complete" })
        }
    };
    // The operation stops before its place is given back.
    drop(responses);
    drop(slot);
    let text = last.to_string();
    let _ = tx.send(Outgoing::Last { id, serial, text }).await;
}

/// How a failed read ends the connection: an oversize message with 1009, anything else that
/// is not a WebSocket message with 4400.
fn read_failure(error: axum::Error, body_limit: usize) -> Closing {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match error.into_inner().downcast::<WsError>().map(|e| *e) {
        Ok(WsError::Capacity(_)) => Closing(
            close::TOO_BIG,
            format!("messages are limited to {body_limit} bytes"),
        ),
        _ => Closing(close::BAD_MESSAGE, "Invalid message received".into()),
    }
}

/// A close reason fits in 123 bytes.
fn truncate(mut reason: String) -> String {
    if reason.len() > 123 {
        let mut end = 123;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}
