//! What an append means when some of its event ids are already stored. Shared by the adapters so
//! that every store answers a retried append the same way.

use std::collections::HashMap;

use uuid::Uuid;

use crate::error::StoreError;
use crate::model::{AppendResult, ExpectedVersion, Position, StreamName};

/// Where an already stored event id lives.
pub(crate) struct StoredId {
    pub id: Uuid,
    pub stream: String,
    pub version: u64,
    pub position: Position,
}

/// `Ok(None)`: none of the ids is stored, so the append is new. `Ok(Some(..))`: every id is
/// stored as one run in this stream, in this order, where `expected` would have put it: the
/// append is a retry of one that succeeded, and this is its result. Anything else is an error:
/// `Conflict` when the run is there but `expected` disagrees with where it sits (the caller's
/// view of the stream is stale), `DuplicateEventId` when the ids were used by something else.
pub(crate) fn resolve_prior_write(
    stream: &StreamName,
    expected: ExpectedVersion,
    ids: &[Uuid],
    found: Vec<StoredId>,
    current: Option<u64>,
) -> Result<Option<AppendResult>, StoreError> {
    if found.is_empty() {
        return Ok(None);
    }
    let by_id: HashMap<Uuid, &StoredId> = found.iter().map(|s| (s.id, s)).collect();
    let run: Option<Vec<&StoredId>> = ids.iter().map(|id| by_id.get(id).copied()).collect();
    let clean_run = run.filter(|run| {
        run.iter()
            .enumerate()
            .all(|(i, s)| s.stream == stream.as_str() && s.version == run[0].version + i as u64)
    });
    match clean_run {
        Some(run) => {
            let (first, last) = (run[0], run[run.len() - 1]);
            if !expected.admits(first.version.checked_sub(1)) {
                return Err(StoreError::Conflict {
                    stream: stream.clone(),
                    expected,
                    actual: current,
                });
            }
            Ok(Some(AppendResult {
                next_expected_version: last.version,
                first_position: first.position,
                position: last.position,
                deduplicated: true,
            }))
        }
        None => {
            let taken = &found[0];
            Err(StoreError::DuplicateEventId {
                id: taken.id,
                stream: taken.stream.clone(),
                version: taken.version,
            })
        }
    }
}
