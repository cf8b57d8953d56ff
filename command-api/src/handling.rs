//! Command handling: load the aggregate's stream, fold it, decide, append with the loaded
//! version as the expected version. On a version conflict without a client expectation the
//! whole sequence runs again (a bounded number of times); with one, the caller gets CONFLICT.

use std::any::Any;
use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use lru::LruCache;
use orderly_domain::Aggregate;
use orderly_domain::order::OrderAggregate;
use orderly_domain::payment::PaymentAggregate;
use orderly_domain::product::{Product, ProductAggregate};
use orderly_event_schemas::{
    Event, EventMetadata, OrderEvent, PaymentEvent, ProductEvent, decode_recorded, encode,
};
use orderly_event_store::{
    AppendResult, Direction, EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent,
    StoreError, StreamName,
};
use uuid::Uuid;

use crate::CommandError;
use crate::snapshots::{self, Snapshot, Snapshots, Taken};

/// Decide-and-append attempts before a command gives up as contended. Each failed attempt
/// means another writer made progress, so this bounds work, not correctness.
pub const MAX_ATTEMPTS: u32 = 8;

/// Events read per page while loading a stream.
const PAGE: usize = 500;

/// Who and why, for every event one command appends. Event ids derive from `command_id`, so
/// the same command sent twice (a retry, a redelivered saga step) appends the same ids and the
/// store writes them once.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub command_id: Uuid,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub actor: String,
    pub idempotency_key: Option<String>,
    pub traceparent: Option<String>,
}

impl Envelope {
    /// A command that starts a new correlation: an API request.
    pub fn request(command_id: Uuid, actor: &str) -> Self {
        Self {
            command_id,
            correlation_id: command_id,
            causation_id: command_id,
            actor: actor.to_owned(),
            idempotency_key: None,
            traceparent: None,
        }
    }

    /// The id of the `index`-th event this command appends.
    pub fn event_id(&self, index: usize) -> Uuid {
        Uuid::new_v5(&self.command_id, format!("event/{index}").as_bytes())
    }

    fn metadata(&self, index: usize) -> EventMetadata {
        EventMetadata {
            event_id: self.event_id(index),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            traceparent: self.traceparent.clone(),
            actor: self.actor.clone(),
            command_id: self.command_id,
            idempotency_key: self.idempotency_key.clone(),
            occurred_at: Utc::now(),
        }
    }
}

/// The event type of one aggregate, as a part of the registry's [`Event`].
pub trait ContextEvent: Clone + Sized {
    fn from_event(event: Event) -> Option<Self>;
    fn into_event(self) -> Event;
}

macro_rules! context_event {
    ($type:ty, $variant:ident) => {
        impl ContextEvent for $type {
            fn from_event(event: Event) -> Option<Self> {
                match event {
                    Event::$variant(event) => Some(event),
                    _ => None,
                }
            }

            fn into_event(self) -> Event {
                Event::$variant(self)
            }
        }
    };
}

context_event!(OrderEvent, Order);
context_event!(ProductEvent, Product);
context_event!(PaymentEvent, Payment);

/// An aggregate whose events live in the registry; the three of the domain are.
pub trait Stored: Aggregate<Event: ContextEvent, State: Send + Sync + 'static> + 'static {
    /// The form its state's snapshots are written in ([`Snapshots`]); `None`, the default,
    /// for aggregates whose streams stay short, which are never snapshotted.
    const SNAPSHOT_FORMAT: Option<i32> = None;

    /// The state as a snapshot of [`Stored::SNAPSHOT_FORMAT`]; `None`: nothing to keep.
    fn snapshot(_state: &Self::State) -> Option<String> {
        None
    }

    /// The state a snapshot of [`Stored::SNAPSHOT_FORMAT`] holds; `None` if it does not read.
    fn restore(_snapshot: &str) -> Option<Self::State> {
        None
    }
}
impl Stored for OrderAggregate {}
impl Stored for PaymentAggregate {}

/// A product's stream gains two events per order it serves, for as long as it sells.
impl Stored for ProductAggregate {
    const SNAPSHOT_FORMAT: Option<i32> = Some(orderly_domain::product::SNAPSHOT_FORMAT);

    fn snapshot(state: &Option<Product>) -> Option<String> {
        serde_json::to_string(state.as_ref()?).ok()
    }

    /// A snapshot breaking the product's invariants is not trusted, whatever its form says.
    fn restore(snapshot: &str) -> Option<Option<Product>> {
        serde_json::from_str::<Product>(snapshot)
            .ok()
            .filter(Product::is_consistent)
            .map(Some)
    }
}

/// An aggregate's state as of its stream's last event.
#[derive(Debug, Clone)]
pub struct Loaded<S> {
    pub state: S,
    /// `None` when the stream does not exist.
    pub version: Option<u64>,
    /// Position of the last event read; `Position::START` for no stream.
    pub position: Position,
    /// Id of the stream's first event, which tells whether a placement was ours.
    pub first_event_id: Option<Uuid>,
    /// Id of the event at `version`, which a snapshot of this state names (see
    /// [`Snapshots`]); `None` when not known.
    pub last_event_id: Option<Uuid>,
}

/// Where an event read from the log stands in its stream, for [`Handler::observe`].
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    pub id: Uuid,
    pub version: u64,
    pub position: Position,
}

/// What a handled command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The stream's version after the command.
    pub version: Option<u64>,
    /// A consistency token for reading this write (or the state the decision saw).
    pub position: Position,
    /// Types of the events the decision produced, in order.
    pub events: Vec<String>,
    /// False when nothing new was written: the decision was empty, or the store recognised the
    /// events as a retry of an earlier append.
    pub appended: bool,
}

/// Runs commands against the event store. Cheap to clone.
#[derive(Clone)]
pub struct Handler {
    store: Arc<dyn EventStore>,
    states: Arc<StateCache>,
    /// Decide on the cached state without reading the stream first (see
    /// [`Handler::optimistic`]).
    optimistic: bool,
    /// Where long streams' states are snapshotted, if anywhere (see
    /// [`Handler::with_snapshots`]).
    snapshots: Option<Snapshots>,
}

/// How long a stream that lost a race to another writer is read before each decision of an
/// optimistic handler. Several saga processes reserve stock of the same products; deciding on
/// the cached state there loses most races (a conflict costs a refused append, its
/// explanation, a read and the append again), while one read before deciding loses few. Where
/// nobody else writes (one saga process) nothing conflicts and nothing changes.
const CONTENDED_FOR: Duration = Duration::from_secs(1);

/// Streams whose folded state is kept between commands; past it the least recently used
/// goes.
const CACHED_STREAMS: NonZeroUsize = NonZeroUsize::new(4096).expect("a nonzero capacity");

/// The same for an optimistic handler (the saga): every order in flight has two streams of
/// its own (order, payment), and a burst holds thousands of orders in flight; a state is a few
/// hundred bytes, so this is some megabytes.
const CACHED_STREAMS_OPTIMISTIC: NonZeroUsize =
    NonZeroUsize::new(32_768).expect("a nonzero capacity");

/// Folded states by stream, so a load reads only the events after the cached version instead
/// of the whole stream (a popular product's stream grows with every reservation). A load reads
/// the stream up to its end, and streams are append-only, so what it returns is never stale;
/// only [`Handler::load_many`] may answer from a state a read confirmed a short while ago.
///
/// Full, it drops the stream used least recently: the products every order touches stay,
/// the orders long settled go. (Starting over instead made every product's whole stream be
/// read and folded again each time the cache filled, a pause that grew with the shop's
/// history.)
struct StateCache {
    states: Mutex<LruCache<StreamName, Cached>>,
}

impl StateCache {
    fn new(capacity: NonZeroUsize) -> Self {
        Self {
            states: Mutex::new(LruCache::new(capacity)),
        }
    }
}

#[derive(Default)]
struct Cached {
    /// A `Loaded<S>` for the stream's aggregate; `None` until a read found events.
    loaded: Option<Box<dyn Any + Send + Sync>>,
    /// When the last read that found the stream ending at `loaded` started.
    read_at: Option<Instant>,
    /// When this process last appended to the stream. A read that started before that may
    /// not have seen the append, so it does not vouch for the state.
    appended_at: Option<Instant>,
    /// Until when an optimistic handler reads the stream before deciding, instead of trusting
    /// this state: another process wrote to it lately (see [`CONTENDED_FOR`]).
    contended_until: Option<Instant>,
    /// The version of the stream's latest snapshot this process knows of (restored or
    /// taken), from which the next one is counted.
    snapshot_at: Option<u64>,
}

impl Cached {
    /// Since when the state is known to be the stream's whole story, if it is.
    fn confirmed(&self) -> Option<Instant> {
        self.read_at
            .filter(|read| self.appended_at.is_none_or(|appended| *read > appended))
    }
}

impl StateCache {
    /// The cached state of `stream`, and since when it is known to be the stream's end.
    fn get<S: Clone + 'static>(&self, stream: &StreamName) -> Option<(Loaded<S>, Option<Instant>)> {
        let mut states = self.states.lock().ok()?;
        let cached = states.get(stream)?;
        let loaded = cached.loaded.as_ref()?.downcast_ref::<Loaded<S>>()?.clone();
        Some((loaded, cached.confirmed()))
    }

    /// Keeps `loaded`, which a read that started at `read_at` found at the stream's end,
    /// unless a concurrent read already kept a later state.
    fn put<S: Clone + Send + Sync + 'static>(
        &self,
        stream: &StreamName,
        loaded: &Loaded<S>,
        read_at: Instant,
    ) {
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        let cached = self.slot(&mut states, stream);
        let kept = cached
            .loaded
            .as_ref()
            .and_then(|kept| kept.downcast_ref::<Loaded<S>>())
            .and_then(|kept| kept.version);
        if kept > loaded.version {
            return;
        }
        cached.loaded = Some(Box::new(loaded.clone()));
        cached.read_at = cached.read_at.max(Some(read_at));
    }

    /// A read that started at `read_at` found nothing after the cached state.
    fn confirm(&self, stream: &StreamName, read_at: Instant) {
        if let Ok(mut states) = self.states.lock()
            && let Some(cached) = states.get_mut(stream)
        {
            cached.read_at = cached.read_at.max(Some(read_at));
        }
    }

    /// Another writer's append to `stream` refused this process's: read it before deciding for
    /// a while (see [`CONTENDED_FOR`]).
    fn contended(&self, stream: &StreamName) {
        if let Ok(mut states) = self.states.lock() {
            self.slot(&mut states, stream).contended_until = Some(Instant::now() + CONTENDED_FOR);
        }
    }

    /// The cached state of `stream` to decide on without a read: none while another writer
    /// raced this process for it lately (see [`CONTENDED_FOR`]).
    fn uncontended<S: Clone + 'static>(&self, stream: &StreamName) -> Option<Loaded<S>> {
        let mut states = self.states.lock().ok()?;
        let cached = states.get(stream)?;
        if cached
            .contended_until
            .is_some_and(|until| Instant::now() < until)
        {
            return None;
        }
        cached.loaded.as_ref()?.downcast_ref::<Loaded<S>>().cloned()
    }

    /// This process appended to `stream`: its cached state is behind until a read that
    /// starts after now.
    fn appended(&self, stream: &StreamName) {
        if let Ok(mut states) = self.states.lock() {
            self.slot(&mut states, stream).appended_at = Some(Instant::now());
        }
    }

    /// This process appended to `stream` and `loaded` is the state right after: kept (unless
    /// a later one is), but not as confirmed by a read, since other processes may append too.
    fn appended_with<S: Clone + Send + Sync + 'static>(
        &self,
        stream: &StreamName,
        loaded: &Loaded<S>,
    ) {
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        let cached = self.slot(&mut states, stream);
        cached.appended_at = Some(Instant::now());
        let kept = cached
            .loaded
            .as_ref()
            .and_then(|kept| kept.downcast_ref::<Loaded<S>>())
            .and_then(|kept| kept.version);
        if kept < loaded.version {
            cached.loaded = Some(Box::new(loaded.clone()));
        }
    }

    /// The stream's snapshot at `version` was restored or taken.
    fn snapshotted(&self, stream: &StreamName, version: u64) {
        if let Ok(mut states) = self.states.lock() {
            let cached = self.slot(&mut states, stream);
            cached.snapshot_at = cached.snapshot_at.max(Some(version));
        }
    }

    /// Whether the stream at `version` is due a snapshot; if so, it counts as taken (one
    /// caller takes it).
    fn claim_snapshot(&self, stream: &StreamName, version: u64) -> bool {
        let Ok(mut states) = self.states.lock() else {
            return false;
        };
        let cached = self.slot(&mut states, stream);
        if !snapshots::due(version, cached.snapshot_at) {
            return false;
        }
        cached.snapshot_at = Some(version);
        true
    }

    /// The entry of `stream`, made empty if there is none (a full cache drops its least
    /// recently used entry for it).
    fn slot<'a>(
        &self,
        states: &'a mut LruCache<StreamName, Cached>,
        stream: &StreamName,
    ) -> &'a mut Cached {
        states.get_or_insert_mut_ref(stream, Cached::default)
    }
}

impl Handler {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            states: Arc::new(StateCache::new(CACHED_STREAMS)),
            optimistic: false,
            snapshots: None,
        }
    }

    /// Snapshots the states of long streams (products) into `snapshots`, and starts a cold
    /// load from the latest one there that matches the log, instead of the stream's first
    /// event.
    pub fn with_snapshots(self, snapshots: Snapshots) -> Self {
        Self {
            snapshots: Some(snapshots),
            ..self
        }
    }

    /// A handler that decides a command's first attempt on the state it holds for the stream
    /// (left by its own last append or read) without reading the stream first, and appends at
    /// that state's version: if anyone else appended meanwhile, the store refuses with a
    /// conflict and the command is decided again on a fresh read; a decision with nothing to
    /// append (a refusal, a no-op) is always taken again on a read, as no append checks it. So
    /// no decision ever rests on a stale state. It saves a read per command where this process
    /// is (nearly) the only writer of its streams: the saga, whose lanes own their orders'
    /// streams.
    pub fn optimistic(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            states: Arc::new(StateCache::new(CACHED_STREAMS_OPTIMISTIC)),
            optimistic: true,
            snapshots: None,
        }
    }

    /// The state to decide attempt `attempt` on: for the first, the cached one when optimistic
    /// and there is one, unless another writer raced this process for the stream lately; else,
    /// and for every later attempt (which follows a lost race), a read.
    ///
    /// Answers whether a read confirmed it. An optimistic handler's cached state is not read
    /// again, and may be behind the stream (another process appended: a reservation made by
    /// the process that held the order's lane before, a restock): an append decided on it is
    /// checked by its expected version, but a refusal, or a decision to write nothing, is
    /// checked by nothing, so callers take those again on a read of the stream.
    async fn attempt_state<A: Stored>(
        &self,
        stream: &StreamName,
        attempt: u32,
    ) -> Result<(Loaded<A::State>, bool), CommandError> {
        if attempt == 0
            && self.optimistic
            && let Some(loaded) = self.states.uncontended::<A::State>(stream)
        {
            return Ok((loaded, false));
        }
        Ok((self.load::<A>(stream).await?, true))
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The stream's state as of its last event: the cached state (if any) folded with the
    /// events after it.
    pub async fn load<A: Stored>(
        &self,
        stream: &StreamName,
    ) -> Result<Loaded<A::State>, CommandError> {
        let read_at = Instant::now();
        let mut loaded = self.cached::<A>(stream).0;
        let cached_version = loaded.version;
        // With nothing cached, the stream is read from its snapshot's event on, if it has one.
        let mut snapshot = match loaded.version {
            None => self.snapshot::<A>(stream).await,
            Some(_) => None,
        };
        loop {
            let from = match &snapshot {
                Some(snapshot) => snapshot.version,
                None => loaded.version.map_or(0, |v| v + 1),
            };
            let mut page = self
                .store
                .read_stream(stream, Direction::Forwards, Some(from), PAGE)
                .await?;
            let more = page.len() >= PAGE;
            if let Some(snapshot) = snapshot.take() {
                match restore::<A>(snapshot_of_this_log(&snapshot, &page), &snapshot).await {
                    Some(restored) => {
                        loaded = restored;
                        page.remove(0);
                        self.states.snapshotted(stream, snapshot.version);
                    }
                    None => {
                        self.discard_snapshot(stream, &snapshot).await;
                        continue;
                    }
                }
            }
            fold::<A>(&mut loaded, page)?;
            if !more {
                if loaded.version == cached_version {
                    self.states.confirm(stream, read_at);
                } else {
                    self.states.put(stream, &loaded, read_at);
                    self.consider_snapshot::<A>(stream, &loaded);
                }
                return Ok(loaded);
            }
        }
    }

    /// The stored snapshot of `stream` in the form this program writes, when its aggregate
    /// is snapshotted here. A snapshot that cannot be read is as good as none (the stream
    /// is folded whole): it only saves time.
    async fn snapshot<A: Stored>(&self, stream: &StreamName) -> Option<Snapshot> {
        let snapshots = self.snapshots.as_ref()?;
        let format = A::SNAPSHOT_FORMAT?;
        match snapshots.load(stream).await {
            Ok(Some(snapshot)) if snapshot.format == format => Some(snapshot),
            Ok(Some(_)) => {
                // Another form (written by another release): replaced by the next snapshot.
                snapshots::count("ignored");
                None
            }
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%stream, %error, "snapshot not read; the stream is read whole");
                None
            }
        }
    }

    /// Which of the streams `requests` would read from their start (this handler holds no
    /// state of them) have a snapshot, in one query; none when the aggregate is not
    /// snapshotted here or the query fails (they are then read whole, which only costs time).
    async fn snapshotted<A: Stored>(
        &self,
        requests: &[(usize, (StreamName, u64))],
        states: &[Loaded<A::State>],
    ) -> HashSet<String> {
        let (Some(snapshots), Some(_)) = (&self.snapshots, A::SNAPSHOT_FORMAT) else {
            return HashSet::new();
        };
        let cold: Vec<&str> = requests
            .iter()
            .filter(|(index, _)| states[*index].version.is_none())
            .map(|(_, (stream, _))| stream.as_str())
            .collect();
        if cold.is_empty() {
            return HashSet::new();
        }
        snapshots.which(&cold).await.unwrap_or_else(|error| {
            tracing::warn!(%error, "snapshots not looked up; cold streams are read whole");
            HashSet::new()
        })
    }

    /// `snapshot` does not match the log (its event is not at its version there): it is
    /// ignored, and deleted so that the next cold load does not read it again.
    async fn discard_snapshot(&self, stream: &StreamName, snapshot: &Snapshot) {
        snapshots::count("ignored");
        tracing::warn!(
            %stream, version = snapshot.version,
            "snapshot does not match the log; ignored, and the stream read whole"
        );
        if let Some(snapshots) = &self.snapshots {
            snapshots.discard(stream, snapshot).await;
        }
    }

    /// Takes a snapshot of `loaded`, the state of `stream` a read or an append at its
    /// expected version vouched for, when the stream is due one.
    fn consider_snapshot<A: Stored>(&self, stream: &StreamName, loaded: &Loaded<A::State>) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        let (Some(_), Some(version), Some(event_id), Some(first_event_id)) = (
            A::SNAPSHOT_FORMAT,
            loaded.version,
            loaded.last_event_id,
            loaded.first_event_id,
        ) else {
            return;
        };
        if self.states.claim_snapshot(stream, version) {
            let taken = Taken {
                stream: stream.clone(),
                version,
                event_id,
                first_event_id,
            };
            snapshots.save_in_background::<A>(taken, loaded.state.clone());
        }
    }

    /// [`Handler::load`] for several streams (each at most once), reading the new events of
    /// all of them in one store call; a stream with more than a page of new events (a cold
    /// cache on a busy product) goes on by itself. A stream whose cached state a read
    /// confirmed less than `max_age` ago, and that this process has not appended to since,
    /// is not read: its state may then miss what other processes appended in that time. With
    /// `max_age` zero every stream is read. A stream this handler holds no state of and that
    /// has a snapshot is loaded by itself from the snapshot on, not read from its start.
    pub async fn load_many<A: Stored>(
        &self,
        streams: &[StreamName],
        max_age: Duration,
    ) -> Result<Vec<Loaded<A::State>>, CommandError> {
        let read_at = Instant::now();
        let mut states = Vec::with_capacity(streams.len());
        let mut requests = Vec::with_capacity(streams.len());
        for (index, stream) in streams.iter().enumerate() {
            let (loaded, confirmed) = self.cached::<A>(stream);
            let fresh = !max_age.is_zero()
                && confirmed.is_some_and(|at| read_at.saturating_duration_since(at) < max_age);
            if !fresh {
                let from = loaded.version.map_or(0, |v| v + 1);
                requests.push((index, (stream.clone(), from)));
            }
            states.push(loaded);
        }
        let snapshotted = self.snapshotted::<A>(&requests, &states).await;
        if !snapshotted.is_empty() {
            let mut rest = Vec::with_capacity(requests.len());
            for (index, (stream, from)) in requests {
                if snapshotted.contains(stream.as_str()) {
                    states[index] = self.load::<A>(&stream).await?;
                } else {
                    rest.push((index, (stream, from)));
                }
            }
            requests = rest;
        }
        if requests.is_empty() {
            return Ok(states);
        }
        let (indexes, requests): (Vec<usize>, Vec<(StreamName, u64)>) =
            requests.into_iter().unzip();
        let pages = self.store.read_streams(&requests, PAGE).await?;
        for ((index, (stream, _)), page) in indexes.into_iter().zip(&requests).zip(pages) {
            let loaded = &mut states[index];
            let read = !page.is_empty();
            let more = fold::<A>(loaded, page)?;
            if more {
                *loaded = self.load::<A>(stream).await?;
            } else if read {
                self.states.put(stream, loaded, read_at);
                self.consider_snapshot::<A>(stream, loaded);
            } else {
                self.states.confirm(stream, read_at);
            }
        }
        Ok(states)
    }

    /// The cached state of `stream` (the empty state when there is none) and when a read
    /// last confirmed it.
    fn cached<A: Stored>(&self, stream: &StreamName) -> (Loaded<A::State>, Option<Instant>) {
        self.states.get(stream).unwrap_or_else(|| {
            let empty = Loaded {
                state: A::State::default(),
                version: None,
                position: Position::START,
                first_event_id: None,
                last_event_id: None,
            };
            (empty, None)
        })
    }

    /// Load, decide with `decide`, append; retried on conflicts unless `expected` (the
    /// client's `expectedVersion`) was given. `decide` may refuse with any [`CommandError`]
    /// (ownership checks need the state too); a not-found refusal wins over a version
    /// mismatch.
    pub async fn execute<A, F>(
        &self,
        stream: &StreamName,
        expected: Option<u64>,
        envelope: &Envelope,
        decide: F,
    ) -> Result<Outcome, CommandError>
    where
        A: Stored,
        F: Fn(&Loaded<A::State>) -> Result<Vec<A::Event>, CommandError>,
    {
        self.run::<A, F>(stream, expected, envelope, decide, false)
            .await
    }

    /// As [`Handler::execute`] for a stream the caller has just named with a fresh id (a new
    /// order): the first attempt decides on the empty state without reading, saving a round
    /// trip; if the stream exists after all, the append conflicts and the normal path runs.
    pub async fn execute_new<A, F>(
        &self,
        stream: &StreamName,
        envelope: &Envelope,
        decide: F,
    ) -> Result<Outcome, CommandError>
    where
        A: Stored,
        F: Fn(&Loaded<A::State>) -> Result<Vec<A::Event>, CommandError>,
    {
        self.run::<A, F>(stream, None, envelope, decide, true).await
    }

    /// Loads (or, for a stream known to be new, assumes) the state, decides, and appends at
    /// the version decided on; a lost race decides again on a fresh load, up to
    /// [`MAX_ATTEMPTS`] times, unless the caller named the version it expected.
    async fn run<A, F>(
        &self,
        stream: &StreamName,
        expected: Option<u64>,
        envelope: &Envelope,
        decide: F,
        assume_new: bool,
    ) -> Result<Outcome, CommandError>
    where
        A: Stored,
        F: Fn(&Loaded<A::State>) -> Result<Vec<A::Event>, CommandError>,
    {
        // Fields of the `command` span this runs in (see `metering`), for the logs.
        let span = tracing::Span::current();
        span.record(
            "correlation_id",
            tracing::field::display(envelope.correlation_id),
        );
        span.record(
            "causation_id",
            tracing::field::display(envelope.causation_id),
        );
        // Ids refused as stored once more after a fresh read are another event's: a
        // collision (a bug), not a retry, and no further try changes it.
        let mut duplicate = false;
        for attempt in 0..MAX_ATTEMPTS {
            let (loaded, read) = if assume_new && attempt == 0 {
                let assumed = Loaded {
                    state: A::State::default(),
                    version: None,
                    position: Position::START,
                    first_event_id: None,
                    last_event_id: None,
                };
                (assumed, false)
            } else {
                self.attempt_state::<A>(stream, attempt).await?
            };
            let decided = at_expected(expected, &loaded, decide(&loaded));
            // Nothing to append checks an unread state: decide again on the stream itself.
            if !read && !decided.as_ref().is_ok_and(|events| !events.is_empty()) {
                continue;
            }
            let decided = decided?;
            if decided.is_empty() {
                return Ok(Outcome {
                    version: loaded.version,
                    position: loaded.position,
                    events: Vec::new(),
                    appended: false,
                });
            }
            // The state after this append, to decide the stream's next command on.
            let after = self
                .optimistic
                .then(|| decided.iter().fold(loaded.state.clone(), A::evolve));
            let (names, batch) = new_events(decided, envelope)?;
            match self
                .append_decided::<A>(stream, &loaded, after, names, batch)
                .await
            {
                Ok(outcome) => return Ok(outcome),
                Err(StoreError::Conflict { actual, .. }) => {
                    self.lost_race(stream);
                    if let Some(expected) = expected {
                        return Err(CommandError::Conflict { expected, actual });
                    }
                }
                // These ids were stored by an earlier run of this very command, which then
                // lost a race to a later writer: reload, and the decider sees it is done.
                Err(StoreError::DuplicateEventId { .. }) if !duplicate => duplicate = true,
                Err(error) => return Err(error.into()),
            }
        }
        Err(CommandError::Contended(MAX_ATTEMPTS))
    }

    /// Appends `batch`, decided on `loaded`, at its version, and remembers `after`, the state
    /// it leads to, for the stream's next command (optimistic handlers).
    async fn append_decided<A: Stored>(
        &self,
        stream: &StreamName,
        loaded: &Loaded<A::State>,
        after: Option<A::State>,
        names: Vec<String>,
        batch: Vec<NewEvent>,
    ) -> Result<Outcome, StoreError> {
        let at = loaded
            .version
            .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        let ids = (batch.first().map(|e| e.id), batch.last().map(|e| e.id));
        let result = self.store.append(stream, at, batch).await?;
        match after {
            Some(after) => self.remember::<A>(stream, loaded, after, &result, ids),
            None => self.states.appended(stream),
        }
        Ok(Outcome {
            version: Some(result.next_expected_version),
            position: result.position,
            events: names,
            appended: !result.deduplicated,
        })
    }
}

impl Handler {
    /// Decides several commands against one stream and appends all their events at once:
    /// each command is decided against the state the ones before it left, so the stream's
    /// invariants hold across the batch exactly as if they had been sent one by one. Answers
    /// one outcome per command (a rejection refuses only its own command). On a version
    /// conflict the whole batch is decided again; commands already stored by an earlier try
    /// decide nothing the second time (saga commands are idempotent at their aggregate) and
    /// their event ids are the same anyway.
    ///
    /// This is how a hot stream (a product that many orders reserve at once) takes one
    /// append per round instead of one optimistic-concurrency race per command.
    pub async fn execute_batch<A: Stored>(
        &self,
        stream: &StreamName,
        commands: &[(Envelope, A::Command)],
    ) -> Result<Vec<Result<(), orderly_domain::Rejection>>, CommandError> {
        let mut duplicate = false;
        for attempt in 0..MAX_ATTEMPTS {
            let (loaded, read) = self.attempt_state::<A>(stream, attempt).await?;
            let mut state = loaded.state.clone();
            let mut outcomes = Vec::with_capacity(commands.len());
            let mut batch = Vec::new();
            for (envelope, command) in commands {
                match A::decide(&state, command) {
                    Ok(events) => {
                        for (index, event) in events.into_iter().enumerate() {
                            state = A::evolve(state, &event);
                            batch.push(new_event(event, envelope, index)?);
                        }
                        outcomes.push(Ok(()));
                    }
                    Err(rejection) => outcomes.push(Err(rejection)),
                }
            }
            // Refusals and no-ops alone check nothing (see `attempt_state`): decided on an
            // unread state, they are decided again on the stream. With an append, its
            // expected version checks the state every outcome of the round was decided on.
            if batch.is_empty() {
                if !read {
                    continue;
                }
                return Ok(outcomes);
            }
            // The batch's outcomes are per command; the event names are not needed.
            match self
                .append_decided::<A>(stream, &loaded, Some(state), Vec::new(), batch)
                .await
            {
                Ok(_) => return Ok(outcomes),
                Err(StoreError::Conflict { .. }) => self.lost_race(stream),
                // As in `run`: once is a retry, twice a collision.
                Err(StoreError::DuplicateEventId { .. }) if !duplicate => duplicate = true,
                Err(error) => return Err(error.into()),
            }
        }
        Err(CommandError::Contended(MAX_ATTEMPTS))
    }
}

impl Handler {
    /// Folds an event read from the log into the cached state of its stream, when it is the
    /// very next event after the state held (a reader of the log meets every event of a
    /// stream in order; its own appends come back already counted and are ignored). Keeps an
    /// optimistic handler's states current without reading the streams, including what
    /// other processes appended; an event that does not follow on is ignored, and the next
    /// command reads the stream as usual.
    pub fn observe<A: Stored>(&self, stream: &StreamName, read: Observed, event: &A::Event) {
        let (held, _) = self.cached::<A>(stream);
        if held.version.map_or(0, |version| version + 1) != read.version {
            return;
        }
        let observed = Loaded {
            state: A::evolve(held.state, event),
            version: Some(read.version),
            position: read.position,
            first_event_id: held.first_event_id.or(Some(read.id)),
            last_event_id: Some(read.id),
        };
        self.states.appended_with(stream, &observed);
        self.consider_snapshot::<A>(stream, &observed);
    }

    /// Keeps `state`, the stream's state right after `result` appended to `before`, for the
    /// next optimistic decision on the stream.
    /// `ids` are the first and last of the appended events'.
    fn remember<A: Stored>(
        &self,
        stream: &StreamName,
        before: &Loaded<A::State>,
        state: A::State,
        result: &AppendResult,
        (first_id, last_id): (Option<Uuid>, Option<Uuid>),
    ) {
        if !self.optimistic {
            self.states.appended(stream);
            return;
        }
        let after = Loaded {
            state,
            version: Some(result.next_expected_version),
            position: result.position,
            first_event_id: before.first_event_id.or(first_id),
            last_event_id: last_id,
        };
        self.states.appended_with(stream, &after);
        // A retry the store recognised wrote nothing: the stream may have moved on since, so
        // this state is not known to be the one at that version.
        if !result.deduplicated {
            self.consider_snapshot::<A>(stream, &after);
        }
    }
}

impl Handler {
    /// A decision on `stream` lost a race to another writer: counted, and the stream is read
    /// before the next decisions for a while.
    fn lost_race(&self, stream: &StreamName) {
        count_conflict(stream);
        self.states.contended(stream);
    }
}

/// `orderly_append_conflicts_total`: a decision lost a race to another writer of `stream`.
fn count_conflict(stream: &StreamName) {
    metrics::counter!(
        "orderly_append_conflicts_total",
        "category" => stream.category().to_owned()
    )
    .increment(1);
}

/// The decision, when the caller expected the version it was made on (or expected none). An
/// aggregate the caller cannot see (missing, or not theirs) is NOT_FOUND whatever version they
/// expected: a CONFLICT would name a version to reload for something that is not there, and
/// would let ids be probed.
fn at_expected<S, E>(
    expected: Option<u64>,
    loaded: &Loaded<S>,
    decided: Result<Vec<E>, CommandError>,
) -> Result<Vec<E>, CommandError> {
    match expected {
        Some(expected) if loaded.version != Some(expected) => Err(match decided {
            Err(error) if error.is_not_found() => error,
            _ => CommandError::Conflict {
                expected,
                actual: loaded.version,
            },
        }),
        _ => decided,
    }
}

/// The events of one decision, ready to append, with their type names.
fn new_events<E: ContextEvent>(
    decided: Vec<E>,
    envelope: &Envelope,
) -> Result<(Vec<String>, Vec<NewEvent>), CommandError> {
    let mut names = Vec::with_capacity(decided.len());
    let mut batch = Vec::with_capacity(decided.len());
    for (index, event) in decided.into_iter().enumerate() {
        let event = new_event(event, envelope, index)?;
        names.push(event.event_type.clone());
        batch.push(event);
    }
    Ok((names, batch))
}

/// The `index`-th event of the command in `envelope`, ready to append.
fn new_event<E: ContextEvent>(
    event: E,
    envelope: &Envelope,
    index: usize,
) -> Result<NewEvent, CommandError> {
    let encoded = encode(&event.into_event(), &envelope.metadata(index))
        .map_err(|e| CommandError::Internal(e.to_string()))?;
    Ok(NewEvent {
        id: encoded.event_id,
        event_type: encoded.event_type.to_owned(),
        data: encoded.data,
        metadata: encoded.metadata,
    })
}

/// Folds one page of a stream's events into `loaded`; whether the page was full (more may
/// follow).
fn fold<A: Stored>(
    loaded: &mut Loaded<A::State>,
    page: Vec<RecordedEvent>,
) -> Result<bool, CommandError> {
    let full = page.len() >= PAGE;
    for recorded in page {
        loaded.first_event_id.get_or_insert(recorded.id);
        loaded.last_event_id = Some(recorded.id);
        loaded.version = Some(recorded.version);
        loaded.position = recorded.position;
        let event = decode::<A::Event>(recorded)?;
        let state = std::mem::take(&mut loaded.state);
        loaded.state = A::evolve(state, &event);
    }
    Ok(full)
}

/// The first event of `page` (read from the snapshot's version on) when it is the event
/// `snapshot` names; `None` if the snapshot does not match the log.
fn snapshot_of_this_log<'a>(
    snapshot: &Snapshot,
    page: &'a [RecordedEvent],
) -> Option<&'a RecordedEvent> {
    page.first()
        .filter(|at| at.version == snapshot.version && at.id == snapshot.event_id)
}

/// The state `snapshot` holds, as of `at` (see [`snapshot_of_this_log`]), when its state
/// reads; `None` otherwise. Parsed on the blocking pool: an old product's snapshot is some
/// megabytes, a tenth of a second or more of CPU that must not hold a thread serving requests.
async fn restore<A: Stored>(
    at: Option<&RecordedEvent>,
    snapshot: &Snapshot,
) -> Option<Loaded<A::State>> {
    let at = at?;
    let form = Arc::clone(&snapshot.state);
    let state = tokio::task::spawn_blocking(move || A::restore(&form))
        .await
        .ok()??;
    Some(Loaded {
        state,
        version: Some(at.version),
        position: at.position,
        first_event_id: Some(snapshot.first_event_id),
        last_event_id: Some(at.id),
    })
}

/// One stored event as its aggregate's event type; anything else in the stream is corrupt data.
pub fn decode<E: ContextEvent>(recorded: RecordedEvent) -> Result<E, CommandError> {
    let stream = recorded.stream.to_string();
    let decoded = decode_recorded(&recorded.event_type, recorded.data, recorded.metadata)
        .map_err(|e| CommandError::Internal(format!("{stream}: {e}")))?;
    E::from_event(decoded.event)
        .ok_or_else(|| CommandError::Internal(format!("{stream} holds an event of another kind")))
}

/// A stream name the domain built; they are always valid.
pub fn stream_name(name: String) -> Result<StreamName, CommandError> {
    StreamName::parse(name).map_err(|e| CommandError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use orderly_domain::product::{Product, ProductAggregate, ProductCommand};
    use orderly_domain::values::{Currency, Money, ProductName, Quantity, Sku};
    use orderly_event_store::memory::MemoryEventStore;

    use super::*;

    fn restock(quantity: u32) -> ProductCommand {
        ProductCommand::Restock {
            quantity: Quantity::new(quantity).unwrap(),
            restocked_at: Utc::now(),
        }
    }

    fn register(sku: &str, initial_stock: u32) -> ProductCommand {
        ProductCommand::Register {
            sku: Sku::parse(sku).unwrap(),
            name: ProductName::parse(sku).unwrap(),
            description: None,
            price: Money::new(100, Currency::parse("EUR").unwrap()).unwrap(),
            initial_stock,
            registered_at: Utc::now(),
        }
    }

    /// `command` as a decision over a product's loaded state.
    fn decide(
        command: ProductCommand,
    ) -> impl Fn(&Loaded<Option<Product>>) -> Result<Vec<ProductEvent>, CommandError> {
        move |loaded| Ok(orderly_domain::product::decide(&loaded.state, &command)?)
    }

    fn envelope() -> Envelope {
        Envelope::request(Uuid::now_v7(), "test")
    }

    #[tokio::test]
    async fn a_cached_state_still_sees_what_other_writers_appended() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
        let (ours, theirs) = (Handler::new(store.clone()), Handler::new(store));
        let stream = StreamName::parse("product-TEA").unwrap();
        ours.execute::<ProductAggregate, _>(&stream, None, &envelope(), decide(register("TEA", 1)))
            .await
            .unwrap();
        assert_eq!(
            ours.load::<ProductAggregate>(&stream)
                .await
                .unwrap()
                .version,
            Some(0)
        );
        theirs
            .execute::<ProductAggregate, _>(&stream, None, &envelope(), decide(restock(4)))
            .await
            .unwrap();
        let loaded = ours.load::<ProductAggregate>(&stream).await.unwrap();
        assert_eq!(loaded.version, Some(1));
        assert_eq!(loaded.state.unwrap().on_hand(), 5);
        // A stale expectation from the cached view is a conflict, not a lost update.
        let stale = ours
            .execute::<ProductAggregate, _>(&stream, Some(0), &envelope(), decide(restock(1)))
            .await;
        assert!(matches!(
            stale,
            Err(CommandError::Conflict {
                expected: 0,
                actual: Some(1)
            })
        ));
    }

    fn order(n: u128) -> orderly_domain::values::OrderId {
        orderly_domain::values::OrderId(Uuid::from_u128(n))
    }

    fn reserve(n: u128, quantity: u32) -> ProductCommand {
        ProductCommand::ReserveStock {
            order_id: order(n),
            quantity: Quantity::new(quantity).unwrap(),
            reserved_at: Utc::now(),
            placed_at: None,
        }
    }

    /// What the product of `stream` has on hand and reserved, as read by `handler`.
    async fn on_hand_and_reserved(handler: &Handler, stream: &StreamName) -> (u32, u32) {
        let loaded = handler.load::<ProductAggregate>(stream).await.unwrap();
        let product = loaded.state.unwrap();
        (product.on_hand(), product.reserved())
    }

    /// An optimistic handler (ours, a saga's) and a plain one (theirs: another process) on one
    /// store, and product TEA registered through ours with `stock` on hand.
    async fn ours_and_theirs(stock: u32) -> (Handler, Handler, StreamName) {
        let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
        let (ours, theirs) = (Handler::optimistic(store.clone()), Handler::new(store));
        let stream = StreamName::parse("product-TEA").unwrap();
        ours.execute::<ProductAggregate, _>(
            &stream,
            None,
            &envelope(),
            decide(register("TEA", stock)),
        )
        .await
        .unwrap();
        (ours, theirs, stream)
    }

    #[tokio::test]
    async fn an_optimistic_handler_never_decides_on_a_state_another_writer_moved_past() {
        let (ours, theirs, stream) = ours_and_theirs(1).await;
        // Ours holds 1 on hand from its own append; theirs brings it to 5.
        theirs
            .execute::<ProductAggregate, _>(&stream, None, &envelope(), decide(restock(4)))
            .await
            .unwrap();
        // Decided on the held state, 3 would be refused; the append conflicts instead, and
        // the decision is taken again on what the stream says.
        ours.execute::<ProductAggregate, _>(&stream, None, &envelope(), decide(reserve(1, 3)))
            .await
            .unwrap();
        let outcomes = ours
            .execute_batch::<ProductAggregate>(
                &stream,
                &[(envelope(), reserve(2, 2)), (envelope(), reserve(3, 1))],
            )
            .await
            .unwrap();
        assert_eq!(outcomes, vec![Ok(()), Ok(())]);
        assert_eq!(on_hand_and_reserved(&theirs, &stream).await, (5, 5));
        // The second reservation of the batch saw the first: nothing is left for a fourth.
        let refused = ours
            .execute::<ProductAggregate, _>(&stream, None, &envelope(), decide(reserve(4, 1)))
            .await
            .unwrap();
        assert_eq!(refused.events, vec!["StockReservationRejected".to_owned()]);
    }

    fn ship(n: u128) -> ProductCommand {
        ProductCommand::ShipReservedStock {
            order_id: order(n),
            shipped_at: Utc::now(),
        }
    }

    fn release(n: u128) -> ProductCommand {
        ProductCommand::ReleaseReservation {
            order_id: order(n),
            released_at: Utc::now(),
        }
    }

    /// A refusal or a decision to write nothing has no append whose expected version would
    /// catch a cached state another writer moved past: an optimistic handler takes it again on
    /// a read of the stream. Here the other writer is the process that held the order's lane
    /// before and reserved its stock; decided on the cache, the shipment was refused ("nothing
    /// reserved") and the release did nothing, and the stock stayed held for good.
    #[tokio::test]
    async fn an_optimistic_handler_refuses_or_skips_nothing_on_a_state_it_did_not_read() {
        let (ours, theirs, stream) = ours_and_theirs(5).await;
        for order in [1, 2] {
            theirs
                .execute::<ProductAggregate, _>(
                    &stream,
                    None,
                    &envelope(),
                    decide(reserve(order, 1)),
                )
                .await
                .unwrap();
        }
        let shipped = ours
            .execute::<ProductAggregate, _>(&stream, None, &envelope(), decide(ship(1)))
            .await
            .unwrap();
        assert_eq!(shipped.events, vec!["ReservedStockShipped".to_owned()]);
        theirs
            .execute::<ProductAggregate, _>(&stream, None, &envelope(), decide(reserve(3, 1)))
            .await
            .unwrap();
        let outcomes = ours
            .execute_batch::<ProductAggregate>(
                &stream,
                &[(envelope(), release(2)), (envelope(), release(3))],
            )
            .await
            .unwrap();
        assert_eq!(outcomes, vec![Ok(()), Ok(())]);
        assert_eq!(on_hand_and_reserved(&theirs, &stream).await, (4, 0));
    }

    /// Counts `orderly_append_conflicts_total`, the metric every lost race increments.
    #[derive(Default)]
    struct Conflicts(Arc<std::sync::atomic::AtomicU64>);

    impl metrics::Recorder for Conflicts {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            if key.name() == "orderly_append_conflicts_total" {
                metrics::Counter::from_arc(self.0.clone())
            } else {
                metrics::Counter::noop()
            }
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    /// Runs `work` on this thread, counting the conflicts it meets.
    fn conflicts_in(work: impl Future<Output = ()>) -> u64 {
        let conflicts = Conflicts::default();
        metrics::with_local_recorder(&conflicts, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(work);
        });
        conflicts.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn after_losing_a_race_an_optimistic_handler_reads_the_stream_before_deciding() {
        let conflicts = conflicts_in(async {
            let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
            let (ours, theirs) = (Handler::optimistic(store.clone()), Handler::new(store));
            let stream = StreamName::parse("product-TEA").unwrap();
            let run = |handler: &Handler, command| {
                let (handler, stream) = (handler.clone(), stream.clone());
                async move {
                    handler
                        .execute::<ProductAggregate, _>(&stream, None, &envelope(), decide(command))
                        .await
                        .unwrap();
                }
            };
            run(&ours, register("TEA", 10)).await;
            // Another process writes; ours, deciding on what it holds, loses the race once.
            run(&theirs, restock(1)).await;
            run(&ours, reserve(1, 1)).await;
            // It writes again: ours now reads the stream first and does not lose again.
            run(&theirs, restock(1)).await;
            run(&ours, reserve(2, 1)).await;
            run(&theirs, restock(1)).await;
            let outcomes = ours
                .execute_batch::<ProductAggregate>(&stream, &[(envelope(), reserve(3, 1))])
                .await
                .unwrap();
            assert_eq!(outcomes, vec![Ok(())]);
        });
        assert_eq!(conflicts, 1, "races lost");
    }

    #[tokio::test]
    async fn several_streams_load_at_once_past_a_page_and_as_fresh_as_one_by_one() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
        let (ours, theirs) = (Handler::new(store.clone()), Handler::new(store));
        let (big, small, missing) = (
            StreamName::parse("product-BIG").unwrap(),
            StreamName::parse("product-SMALL").unwrap(),
            StreamName::parse("product-NONE").unwrap(),
        );
        for (stream, sku) in [(&big, "BIG"), (&small, "SMALL")] {
            theirs
                .execute::<ProductAggregate, _>(stream, None, &envelope(), decide(register(sku, 0)))
                .await
                .unwrap();
        }
        // More events than one page holds, so the batched read has to go on for this one.
        for _ in 0..PAGE + 20 {
            theirs
                .execute::<ProductAggregate, _>(&big, None, &envelope(), decide(restock(1)))
                .await
                .unwrap();
        }
        let streams = [big.clone(), missing.clone(), small.clone()];
        let loaded = ours
            .load_many::<ProductAggregate>(&streams, Duration::ZERO)
            .await
            .unwrap();
        let on_hand: Vec<Option<u32>> = loaded
            .iter()
            .map(|l| l.state.as_ref().map(|p| p.on_hand()))
            .collect();
        assert_eq!(on_hand, [Some(PAGE as u32 + 20), None, Some(0)]);
        assert_eq!(loaded[0].version, Some(PAGE as u64 + 20));
        assert_eq!(loaded[1].version, None);
        // Another writer's event is seen on the next load, though our states are cached.
        theirs
            .execute::<ProductAggregate, _>(&small, None, &envelope(), decide(restock(3)))
            .await
            .unwrap();
        let again = ours
            .load_many::<ProductAggregate>(&streams, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(again[2].state.as_ref().unwrap().on_hand(), 3);
        for (stream, many) in streams.iter().zip(&again) {
            let one = ours.load::<ProductAggregate>(stream).await.unwrap();
            assert_eq!((&one.state, one.version), (&many.state, many.version));
        }
    }

    #[tokio::test]
    async fn a_state_read_within_the_max_age_is_kept_until_it_is_older_or_changed_here() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
        let (ours, theirs) = (Handler::new(store.clone()), Handler::new(store));
        let (tea, new) = (
            StreamName::parse("product-TEA").unwrap(),
            StreamName::parse("product-NEW").unwrap(),
        );
        theirs
            .execute::<ProductAggregate, _>(&tea, None, &envelope(), decide(register("TEA", 1)))
            .await
            .unwrap();
        let on_hand = |loaded: &[Loaded<Option<Product>>]| -> Vec<Option<u32>> {
            loaded
                .iter()
                .map(|l| l.state.as_ref().map(|p| p.on_hand()))
                .collect()
        };
        let streams = [tea.clone(), new.clone()];
        let long = Duration::from_secs(3600);
        let first = ours
            .load_many::<ProductAggregate>(&streams, long)
            .await
            .unwrap();
        assert_eq!(on_hand(&first), [Some(1), None]);

        // Another process restocks and registers: within the max age, the product read a
        // moment ago is not read again, while the unknown one always is.
        theirs
            .execute::<ProductAggregate, _>(&tea, None, &envelope(), decide(restock(4)))
            .await
            .unwrap();
        theirs
            .execute::<ProductAggregate, _>(&new, None, &envelope(), decide(register("NEW", 2)))
            .await
            .unwrap();
        let cached = ours
            .load_many::<ProductAggregate>(&streams, long)
            .await
            .unwrap();
        assert_eq!(on_hand(&cached), [Some(1), Some(2)]);
        // Past the max age (or with none), the stream is read again.
        let short = Duration::from_millis(20);
        tokio::time::sleep(short * 2).await;
        let aged = ours
            .load_many::<ProductAggregate>(&streams, short)
            .await
            .unwrap();
        assert_eq!(on_hand(&aged), [Some(5), Some(2)]);
        theirs
            .execute::<ProductAggregate, _>(&tea, None, &envelope(), decide(restock(1)))
            .await
            .unwrap();
        let zero = ours
            .load_many::<ProductAggregate>(&streams, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(on_hand(&zero), [Some(6), Some(2)]);

        // A change made through this handler counts at once, whatever the max age.
        ours.execute::<ProductAggregate, _>(&tea, None, &envelope(), decide(restock(10)))
            .await
            .unwrap();
        let own = ours
            .load_many::<ProductAggregate>(&streams, long)
            .await
            .unwrap();
        assert_eq!(on_hand(&own), [Some(16), Some(2)]);
    }

    #[test]
    fn a_full_cache_keeps_the_streams_used_lately_and_drops_the_one_used_least() {
        let cache = StateCache::new(NonZeroUsize::new(2).unwrap());
        let stream = |name: &str| StreamName::parse(name).unwrap();
        let loaded = Loaded {
            state: (),
            version: Some(0),
            position: Position::START,
            first_event_id: None,
            last_event_id: None,
        };
        let (product, first, second) =
            (stream("product-TEA"), stream("order-1"), stream("order-2"));
        cache.put(&product, &loaded, Instant::now());
        cache.put(&first, &loaded, Instant::now());
        // Every order touches the product: it is used again before the next order comes.
        assert!(cache.get::<()>(&product).is_some());
        cache.put(&second, &loaded, Instant::now());
        assert!(
            cache.get::<()>(&product).is_some(),
            "the product was dropped"
        );
        assert!(cache.get::<()>(&second).is_some());
        assert!(
            cache.get::<()>(&first).is_none(),
            "the oldest order was kept"
        );
    }

    #[test]
    fn a_read_that_started_before_an_append_here_does_not_vouch_for_the_state() {
        let cache = StateCache::new(CACHED_STREAMS);
        let stream = StreamName::parse("product-TEA").unwrap();
        let loaded = |version| Loaded {
            state: (),
            version: Some(version),
            position: Position::START,
            first_event_id: None,
            last_event_id: None,
        };
        let before = Instant::now();
        cache.put(&stream, &loaded(0), before);
        assert_eq!(cache.get::<()>(&stream).unwrap().1, Some(before));
        // This process appends; a read that had started before answers late, without it.
        cache.appended(&stream);
        cache.confirm(&stream, before);
        cache.put(&stream, &loaded(0), before);
        assert_eq!(cache.get::<()>(&stream).unwrap().1, None);
        // A read that starts after the append vouches again, and an older state read late
        // does not replace a newer one.
        std::thread::sleep(Duration::from_millis(1));
        let after = Instant::now();
        cache.put(&stream, &loaded(1), after);
        cache.put(&stream, &loaded(0), before);
        let (kept, confirmed) = cache.get::<()>(&stream).unwrap();
        assert_eq!((kept.version, confirmed), (Some(1), Some(after)));
    }

    #[tokio::test]
    async fn the_same_command_sent_twice_is_written_once() {
        let handler = Handler::new(Arc::new(MemoryEventStore::new()));
        let stream = StreamName::parse("product-MUG").unwrap();
        let envelope = Envelope::request(Uuid::now_v7(), "test");
        let register = register("MUG", 0);
        let decide = |loaded: &Loaded<_>| {
            if loaded.first_event_id == Some(envelope.event_id(0)) {
                return Ok(Vec::new());
            }
            Ok(orderly_domain::product::decide(&loaded.state, &register)?)
        };
        let first = handler
            .execute::<ProductAggregate, _>(&stream, None, &envelope, decide)
            .await
            .unwrap();
        let second = handler
            .execute::<ProductAggregate, _>(&stream, None, &envelope, decide)
            .await
            .unwrap();
        assert!(first.appended && !second.appended);
        assert_eq!(second.version, Some(0));
    }

    #[tokio::test]
    async fn a_command_whose_event_ids_another_event_holds_fails_for_good_at_once() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
        let handler = Handler::new(store.clone());
        let envelope = envelope();
        let first = StreamName::parse("product-MUG").unwrap();
        handler
            .execute::<ProductAggregate, _>(&first, None, &envelope, decide(register("MUG", 1)))
            .await
            .unwrap();
        // The same envelope for another stream's command: its event takes the same id.
        let second = StreamName::parse("product-TEA").unwrap();
        let register_tea = register("TEA", 1);
        let collided = handler
            .execute::<ProductAggregate, _>(&second, None, &envelope, decide(register_tea.clone()))
            .await;
        assert!(
            matches!(&collided, Err(CommandError::Internal(why)) if why.contains("already stored")),
            "{collided:?}"
        );
        let batch = handler
            .execute_batch::<ProductAggregate>(&second, &[(envelope.clone(), register_tea)])
            .await;
        assert!(
            matches!(&batch, Err(CommandError::Internal(why)) if why.contains("already stored")),
            "{batch:?}"
        );
        assert_eq!(store.stream_version(&second).await.unwrap(), None);
    }
}
