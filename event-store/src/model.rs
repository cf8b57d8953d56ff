//! The values that cross the port: stream names, expected versions, positions, events.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{InvalidInput, StoreError};

/// Largest serialized size of one event (data + metadata as JSON text). KurrentDB's default
/// `MaxAppendSize` is 1 MiB for a whole append; deployments that use it must raise it to match.
pub const MAX_EVENT_BYTES: usize = 2 * 1024 * 1024;
/// Largest serialized size of one append call, all events together.
pub const MAX_APPEND_BYTES: usize = 8 * 1024 * 1024;
/// Most events one append call may carry.
pub const MAX_EVENTS_PER_APPEND: usize = 1000;
/// Longest stream name, in bytes.
pub const MAX_STREAM_NAME_BYTES: usize = 255;
/// Longest event type name, in bytes.
pub const MAX_EVENT_TYPE_BYTES: usize = 128;

/// A validated stream name: 1 to 255 bytes of printable ASCII without whitespace, not starting
/// with `$` (reserved for system streams such as `$all`). The category is the text before the
/// first `-` (`order-<uuid>` belongs to `order`), or the whole name when there is none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct StreamName(String);

impl StreamName {
    pub fn parse(name: impl Into<String>) -> Result<Self, InvalidInput> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= MAX_STREAM_NAME_BYTES
            && !name.starts_with('$')
            && !name.starts_with('-')
            && name.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(Self(name))
        } else {
            Err(InvalidInput::StreamName {
                name: truncate_for_message(&name),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn category(&self) -> &str {
        category_of(&self.0)
    }
}

/// The category of a stream name: the text before the first `-`.
pub fn category_of(stream: &str) -> &str {
    stream
        .split_once('-')
        .map_or(stream, |(category, _)| category)
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for StreamName {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for StreamName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(s).map_err(serde::de::Error::custom)
    }
}

/// What the writer believes about the stream before its append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check: append after whatever is there.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last event must have exactly this version (versions count from 0).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `current` (None: no stream) satisfies this.
    pub fn admits(self, current: Option<u64>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => current.is_none(),
            Self::StreamExists => current.is_some(),
            Self::Exact(v) => current == Some(v),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no stream"),
            Self::StreamExists => f.write_str("stream exists"),
            Self::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// A place in the whole log, totally ordered. Every adapter fills the same two numbers
/// (KurrentDB: commit and prepare positions; PostgreSQL: writing transaction id and sequence),
/// so that tokens look alike whichever store produced them. Callers treat it as opaque and only
/// compare, store and pass it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub commit: u64,
    pub prepare: u64,
}

impl Position {
    /// Before the first event: reading or subscribing from here starts at the beginning.
    pub const START: Position = Position {
        commit: 0,
        prepare: 0,
    };

    pub const fn new(commit: u64, prepare: u64) -> Self {
        Self { commit, prepare }
    }
}

/// Tokens are 32 lowercase hex digits (commit, then prepare, 16 each), so that comparing two
/// tokens as strings agrees with comparing the positions.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.commit, self.prepare)
    }
}

impl FromStr for Position {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidInput::Position {
            token: truncate_for_message(s),
        };
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let commit = u64::from_str_radix(&s[..16], 16).map_err(|_| bad())?;
        let prepare = u64::from_str_radix(&s[16..], 16).map_err(|_| bad())?;
        Ok(Self { commit, prepare })
    }
}

impl Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An event to append. The id is chosen by the client (UUIDv7) so that a retried append of the
/// same ids is recognised and not written twice.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: Uuid,
    pub event_type: String,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
}

impl NewEvent {
    /// A new event with a fresh UUIDv7 id and empty metadata.
    pub fn new(event_type: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            data,
            metadata: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn with_metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An event as stored. Its two JSON columns are parsed trees by default; readers that decode
/// the JSON themselves read them as the stored text instead ([`RawRecordedEvent`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent<J = serde_json::Value> {
    pub id: Uuid,
    pub stream: StreamName,
    /// Version within its stream, from 0.
    pub version: u64,
    pub position: Position,
    pub event_type: String,
    pub data: J,
    pub metadata: J,
    pub recorded_at: DateTime<Utc>,
}

/// A recorded event with its JSON left as the stored text, for readers that decode it
/// themselves (a rebuild): they skip building trees and can pass over what they do not read.
pub type RawRecordedEvent = RecordedEvent<Box<serde_json::value::RawValue>>;

impl<J> RecordedEvent<J> {
    /// The same event with `data` and `metadata` converted by `convert`.
    pub fn try_map_json<K, E>(
        self,
        mut convert: impl FnMut(J) -> Result<K, E>,
    ) -> Result<RecordedEvent<K>, E> {
        Ok(RecordedEvent {
            data: convert(self.data)?,
            metadata: convert(self.metadata)?,
            id: self.id,
            stream: self.stream,
            version: self.version,
            position: self.position,
            event_type: self.event_type,
            recorded_at: self.recorded_at,
        })
    }
}

impl TryFrom<RecordedEvent> for RawRecordedEvent {
    type Error = StoreError;

    fn try_from(event: RecordedEvent) -> Result<Self, StoreError> {
        event.try_map_json(|value| {
            serde_json::value::to_raw_value(&value).map_err(|e| StoreError::Internal(Box::new(e)))
        })
    }
}

/// What a successful append wrote (or, for a recognised retry, what the first attempt wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// Version of the last event of the append: pass as `Exact` for the next append.
    pub next_expected_version: u64,
    /// Position of the first event of the append.
    pub first_position: Position,
    /// Position of the last event: a consistency token for reading one's own write.
    pub position: Position,
    /// True when every event id was already stored by an earlier identical append, so nothing
    /// was written this time.
    pub deduplicated: bool,
}

/// One append of [`EventStore::append_many`](crate::EventStore::append_many): the arguments
/// [`EventStore::append`](crate::EventStore::append) takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    pub stream: StreamName,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forwards,
    Backwards,
}

/// Which events of the whole log a reader or subscriber wants.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EventFilter {
    #[default]
    All,
    /// Streams whose category (text before the first `-`) is this.
    Category(String),
    Stream(StreamName),
}

impl EventFilter {
    pub fn matches(&self, stream: &StreamName) -> bool {
        match self {
            Self::All => true,
            Self::Category(c) => stream.category() == c,
            Self::Stream(s) => s == stream,
        }
    }
}

/// Checks what every adapter must refuse before writing anything: an empty append, too many or
/// too large events, malformed type names. Returns the serialized size of the append.
pub fn validate_append(events: &[NewEvent]) -> Result<usize, StoreError> {
    if events.is_empty() {
        return Err(InvalidInput::EmptyAppend.into());
    }
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(InvalidInput::TooManyEvents {
            count: events.len(),
            limit: MAX_EVENTS_PER_APPEND,
        }
        .into());
    }
    let mut total = 0;
    for (index, event) in events.iter().enumerate() {
        let t = &event.event_type;
        let type_ok = !t.is_empty()
            && t.len() <= MAX_EVENT_TYPE_BYTES
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'));
        if !type_ok {
            return Err(InvalidInput::EventType {
                name: truncate_for_message(t),
            }
            .into());
        }
        let size = json_size(&event.data) + json_size(&event.metadata);
        if size > MAX_EVENT_BYTES {
            return Err(InvalidInput::EventTooLarge {
                index,
                size,
                limit: MAX_EVENT_BYTES,
            }
            .into());
        }
        total += size;
    }
    if total > MAX_APPEND_BYTES {
        return Err(InvalidInput::AppendTooLarge {
            size: total,
            limit: MAX_APPEND_BYTES,
        }
        .into());
    }
    let mut ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(InvalidInput::RepeatedEventId { id: w[0] }.into());
    }
    Ok(total)
}

/// Serialized length without allocating the text.
fn json_size(value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a Value into an in-memory sink cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Error messages quote bad input, but never more than a screenful of it.
fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_sort_like_positions() {
        let a = Position::new(7, 300);
        let b = Position::new(8, 2);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        assert_eq!(a.to_string().parse::<Position>().unwrap(), a);
        assert_eq!(Position::START.to_string(), "0".repeat(32));
    }

    #[test]
    fn broken_tokens_are_rejected() {
        for bad in ["", "abc", &"g".repeat(32), &"A".repeat(32), &"0".repeat(33)] {
            assert!(
                matches!(bad.parse::<Position>(), Err(InvalidInput::Position { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn stream_names_are_validated_and_categorised() {
        assert_eq!(StreamName::parse("order-123").unwrap().category(), "order");
        assert_eq!(
            StreamName::parse("product-ABC-1").unwrap().category(),
            "product"
        );
        assert_eq!(
            StreamName::parse("standalone").unwrap().category(),
            "standalone"
        );
        for bad in [
            "",
            "$all",
            "-x",
            "has space",
            "tab\there",
            "é-1",
            &"x".repeat(256),
        ] {
            assert!(StreamName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expected_versions_admit_what_they_say() {
        assert!(ExpectedVersion::Any.admits(None));
        assert!(ExpectedVersion::NoStream.admits(None));
        assert!(!ExpectedVersion::NoStream.admits(Some(0)));
        assert!(ExpectedVersion::StreamExists.admits(Some(0)));
        assert!(!ExpectedVersion::StreamExists.admits(None));
        assert!(ExpectedVersion::Exact(3).admits(Some(3)));
        assert!(!ExpectedVersion::Exact(3).admits(Some(4)));
    }

    #[test]
    fn appends_are_validated_before_anything_is_written() {
        assert!(matches!(
            validate_append(&[]),
            Err(StoreError::InvalidInput(InvalidInput::EmptyAppend))
        ));
        let bad_type = NewEvent::new("has space", serde_json::json!({}));
        assert!(matches!(
            validate_append(&[bad_type]),
            Err(StoreError::InvalidInput(InvalidInput::EventType { .. }))
        ));
        let big = NewEvent::new("Big", serde_json::json!("x".repeat(MAX_EVENT_BYTES)));
        assert!(matches!(
            validate_append(&[big]),
            Err(StoreError::InvalidInput(InvalidInput::EventTooLarge {
                index: 0,
                ..
            }))
        ));
        let e = NewEvent::new("Twice", serde_json::json!({}));
        assert!(matches!(
            validate_append(&[e.clone(), e]),
            Err(StoreError::InvalidInput(
                InvalidInput::RepeatedEventId { .. }
            ))
        ));
    }
}
