//! How the saga's work is divided between processes: lanes, members and leases.
//!
//! An order's events all go to one of [`LANES`] lanes, chosen by the order id, so one order is
//! only ever handled by one lane, strictly in log order, while different lanes run at once.
//! Each running process is a *member* with a lease it renews every heartbeat; the live members,
//! sorted by id, take the lanes round-robin (member `i` of `m` wants lane `l` when
//! `l % m == i`). A lane is owned through a lease of its own in `saga_lanes`:
//!
//! - claiming takes a lane only when it is released or its lease ran out, and bumps its
//!   `generation`;
//! - every write of a lane's states and checkpoint (the batch commit) first updates the lane's
//!   row where the owner *and* generation are still the claimer's, so a process that was paused
//!   past its lease, or cut off from the database while another took over, finds zero rows,
//!   rolls back and stops that lane: it can never write after its lane moved;
//! - the appends a step makes before that commit are guarded on the process's own clock: it
//!   sends nothing once its last renewal may have run out (`LeaseClock`), so by the time
//!   another process can claim its lanes, it has stopped sending (what is left is a pause
//!   between that check and the append it guards);
//! - a member that stops releases its lanes, so another takes them at its next heartbeat; one
//!   that dies leaves them to expire after the lease time.
//!
//! The row lock the commit's update takes also orders a takeover after an in-flight commit:
//! the new owner reads the checkpoint that commit wrote.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use orderly_domain::values::OrderId;
use orderly_event_store::Position;
use tokio_postgres::GenericClient;

use crate::CommandError;

/// How many lanes a saga has. Fixed: a lane's checkpoint only means something for the orders
/// that hash to it, so changing the count would need every checkpoint moved back to the lowest.
/// Sixteen lets up to sixteen processes share the work, each lane many orders at once.
pub const LANES: u32 = 16;

/// The lane of an order: the last four bytes of its id (random in v4, v5 and v7 ids alike).
pub fn lane_of(order_id: OrderId) -> u32 {
    let bytes = order_id.0.as_bytes();
    u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) % LANES
}

/// [`lane_of`] in SQL over a column `order_id`, for queries that pick one lane's rows. The
/// saga-tests check that both agree.
pub const LANE_OF_SQL: &str =
    "(('x' || right(replace(order_id::text, '-', ''), 8))::bit(32)::bigint % 16)";

/// A lane this process holds: the generation it claimed it at, and where it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub lane: u32,
    pub generation: i64,
    pub checkpoint: Position,
}

const ENSURE_LANES: &str = "
insert into saga_lanes (saga_name, lane, position_commit, position_prepare)
select $1, lane, 0, 0 from generate_series(0, $2 - 1) lane
on conflict (saga_name, lane) do nothing";

const HEARTBEAT: &str = "
insert into saga_members (saga_name, member_id, lease_until)
values ($1, $2, now() + make_interval(secs => $3))
on conflict (saga_name, member_id) do update set lease_until = excluded.lease_until";

pub(super) const LIVE_MEMBERS: &str = "
select member_id from saga_members where saga_name = $1 and lease_until > now() order by member_id";

const FORGET_DEAD: &str = "
delete from saga_members where saga_name = $1 and lease_until < now() - interval '1 minute'";

const RENEW: &str = "
update saga_lanes set lease_until = now() + make_interval(secs => $3)
where saga_name = $1 and owner = $2
returning lane, generation";

const CLAIM: &str = "
update saga_lanes
set owner = $3, generation = generation + 1, lease_until = now() + make_interval(secs => $4),
    updated_at = now()
where saga_name = $1 and lane = $2 and (owner is null or owner = $3 or lease_until < now())
returning generation, position_commit, position_prepare";

const RELEASE: &str = "
update saga_lanes set owner = null, lease_until = '-infinity', updated_at = now()
where saga_name = $1 and owner = $2 and lane = any($3)";

const HELD: &str = "
select lane, generation, position_commit, position_prepare from saga_lanes
where saga_name = $1 and owner = $2";

const LEAVE: &str = "delete from saga_members where saga_name = $1 and member_id = $2";

/// Moves a lane's checkpoint where its owner and generation still hold it; zero rows means
/// the lane moved to another process. `$4`/`$5` null keep the checkpoint (a deadline tick).
pub(super) const FENCE: &str = "
update saga_lanes
set position_commit = coalesce($4, position_commit),
    position_prepare = coalesce($5, position_prepare),
    updated_at = now()
where saga_name = $1 and lane = $2 and generation = $3 and owner = $6";

/// One process's membership of a saga.
#[derive(Debug, Clone)]
pub struct Member {
    pub saga: String,
    /// Unique per process run; sorts the members, names the owner of a lane.
    pub id: String,
    /// How long a lease holds without a renewal: a dead process's lanes wait this long.
    pub lease: Duration,
}

impl Member {
    /// Creates the saga's lanes if this is its first run.
    pub async fn ensure_lanes(&self, client: &impl GenericClient) -> Result<(), CommandError> {
        let lanes = i32::try_from(LANES).unwrap_or(i32::MAX);
        client.execute(ENSURE_LANES, &[&self.saga, &lanes]).await?;
        Ok(())
    }

    /// Renews this member's lease and answers the live members, sorted.
    pub async fn heartbeat(
        &self,
        client: &impl GenericClient,
    ) -> Result<Vec<String>, CommandError> {
        let secs = self.lease.as_secs_f64();
        client
            .execute(HEARTBEAT, &[&self.saga, &self.id, &secs])
            .await?;
        client.execute(FORGET_DEAD, &[&self.saga]).await?;
        let rows = client.query(LIVE_MEMBERS, &[&self.saga]).await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// The lanes this member should hold among `members`.
    pub fn share(&self, members: &[String]) -> BTreeSet<u32> {
        let Some(index) = members.iter().position(|member| *member == self.id) else {
            return BTreeSet::new();
        };
        let count = u32::try_from(members.len()).unwrap_or(u32::MAX);
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        (0..LANES).filter(|lane| lane % count == index).collect()
    }

    /// Extends the lease of every lane this member holds; answers those it still holds, each
    /// with its generation (a lane missing, or at another generation, was taken over).
    pub async fn renew(
        &self,
        client: &impl GenericClient,
    ) -> Result<Vec<(u32, i64)>, CommandError> {
        let secs = self.lease.as_secs_f64();
        let rows = client.query(RENEW, &[&self.saga, &self.id, &secs]).await?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, i32>(0).unsigned_abs(), row.get(1)))
            .collect())
    }

    /// Takes `lane` if it is free or its lease ran out.
    pub async fn claim(
        &self,
        client: &impl GenericClient,
        lane: u32,
    ) -> Result<Option<Lease>, CommandError> {
        let secs = self.lease.as_secs_f64();
        let index = i32::try_from(lane).unwrap_or(i32::MAX);
        let row = client
            .query_opt(CLAIM, &[&self.saga, &index, &self.id, &secs])
            .await?;
        Ok(row.map(|row| Lease {
            lane,
            generation: row.get(0),
            checkpoint: position(row.get(1), row.get(2)),
        }))
    }

    /// The lanes this member holds as the database has them now, each with its generation
    /// and the checkpoint its last commit stored: a consumer that stopped went on past where
    /// its lanes stood when they were claimed, and the next must start from there.
    pub async fn held(&self, client: &impl GenericClient) -> Result<Vec<Lease>, CommandError> {
        let rows = client.query(HELD, &[&self.saga, &self.id]).await?;
        Ok(rows
            .iter()
            .map(|row| Lease {
                lane: row.get::<_, i32>(0).unsigned_abs(),
                generation: row.get(1),
                checkpoint: position(row.get(2), row.get(3)),
            })
            .collect())
    }

    /// Gives `lanes` back, for another member to take at once.
    pub async fn release(
        &self,
        client: &impl GenericClient,
        lanes: &[u32],
    ) -> Result<(), CommandError> {
        let lanes: Vec<i32> = lanes
            .iter()
            .map(|lane| i32::try_from(*lane).unwrap_or(i32::MAX))
            .collect();
        client
            .execute(RELEASE, &[&self.saga, &self.id, &lanes])
            .await?;
        Ok(())
    }

    /// Releases every lane and leaves the membership, at a clean stop.
    pub async fn leave(&self, client: &impl GenericClient) -> Result<(), CommandError> {
        let all: Vec<u32> = (0..LANES).collect();
        self.release(client, &all).await?;
        client.execute(LEAVE, &[&self.saga, &self.id]).await?;
        Ok(())
    }
}

/// Until when this process may act for the lanes it holds, by its own clock: when it last
/// asked the database to renew its leases, plus their length. The database runs the renewal,
/// and so starts the lease, no earlier than it was asked, so a process that cannot renew
/// (paused, cut off, stuck behind a lock) stops sending commands before any other process may
/// take its lanes over. Commits are fenced in the database as well ([`FENCE`]); this guards
/// the appends a step makes before its commit.
///
/// A renewal extends the clock only if it still holds every lane the running consumer acts
/// for, at the generation it started with: one of them taken over (this process paused past
/// its lease, say), the consumer is stopped, and the batches it has in hand must not go on
/// sending on the renewal of the lanes it kept.
#[derive(Debug, Default)]
pub(super) struct LeaseClock {
    until: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Lane -> generation of the running consumer's leases; empty while none runs.
    serving: std::sync::Mutex<HashMap<u32, i64>>,
}

impl LeaseClock {
    /// A consumer starts acting for `leases` (none: it stopped).
    pub(super) fn serving(&self, leases: &[Lease]) {
        // Plain values: a panic while one was held left it whole.
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = leases
            .iter()
            .map(|lease| (lease.lane, lease.generation))
            .collect();
    }

    /// A renewal sent at `asked_at` answered the lanes it still holds, with their generations.
    pub(super) fn renewed(
        &self,
        asked_at: tokio::time::Instant,
        lease: Duration,
        held: &HashMap<u32, i64>,
    ) {
        let serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        if serving
            .iter()
            .all(|(lane, generation)| held.get(lane) == Some(generation))
        {
            *self.until.lock().unwrap_or_else(|p| p.into_inner()) = Some(asked_at + lease);
        }
    }

    /// `Ok` while the last renewal still holds; else a failure that passes with the next one.
    pub(super) fn check(&self) -> Result<(), CommandError> {
        if self.holds_at(tokio::time::Instant::now()) {
            return Ok(());
        }
        Err(CommandError::Unavailable(
            "this process's saga leases were not renewed in time; its lanes wait for the next \
             renewal"
                .into(),
        ))
    }

    fn holds_at(&self, now: tokio::time::Instant) -> bool {
        let until = *self.until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|until| now < until)
    }
}

/// A checkpoint as stored (two non-negative bigints).
pub(super) fn position(commit: i64, prepare: i64) -> Position {
    Position::new(commit.unsigned_abs(), prepare.unsigned_abs())
}

/// A position as stored.
pub(super) fn position_columns(position: Position) -> Result<(i64, i64), CommandError> {
    let column = |n: u64| {
        i64::try_from(n)
            .map_err(|_| CommandError::Internal(format!("position {position} out of range")))
    };
    Ok((column(position.commit)?, column(position.prepare)?))
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn member(id: &str) -> Member {
        Member {
            saga: "fulfilment".into(),
            id: id.into(),
            lease: Duration::from_secs(5),
        }
    }

    #[test]
    fn live_members_share_every_lane_exactly_once() {
        let members: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let shares: Vec<BTreeSet<u32>> =
            members.iter().map(|m| member(m).share(&members)).collect();
        let mut all: Vec<u32> = shares.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..LANES).collect::<Vec<_>>());
        assert!(shares.iter().all(|share| share.len() >= 5));
    }

    #[test]
    fn a_process_acts_for_its_lanes_only_while_its_last_renewal_holds() {
        let clock = LeaseClock::default();
        assert!(clock.check().is_err(), "never renewed");
        let asked = tokio::time::Instant::now();
        let lease = Duration::from_secs(5);
        let none = HashMap::new();
        clock.renewed(asked, lease, &none);
        assert!(clock.check().is_ok());
        // Counted from the request, however late its answer came.
        assert!(clock.holds_at(asked + Duration::from_millis(4_999)));
        assert!(!clock.holds_at(asked + lease));
        clock.renewed(asked + Duration::from_secs(1), lease, &none);
        assert!(clock.holds_at(asked + lease));
        let stale = LeaseClock::default();
        stale.renewed(asked, Duration::ZERO, &none);
        let refused = stale.check().unwrap_err();
        assert!(refused.is_transient(), "{refused}");
    }

    #[test]
    fn a_renewal_that_lost_a_lane_the_consumer_acts_for_does_not_extend_the_clock() {
        let clock = LeaseClock::default();
        let lease = |lane, generation| Lease {
            lane,
            generation,
            checkpoint: Position::START,
        };
        clock.serving(&[lease(0, 1), lease(1, 1)]);
        let asked = tokio::time::Instant::now();
        let span = Duration::from_secs(5);
        clock.renewed(asked, span, &HashMap::from([(0, 1), (1, 1), (2, 1)]));
        assert!(clock.holds_at(asked + Duration::from_secs(4)));
        // Lane 1 was taken over (a new generation, another owner): no extension.
        let later = asked + Duration::from_secs(3);
        clock.renewed(later, span, &HashMap::from([(0, 1)]));
        assert!(!clock.holds_at(asked + span));
        clock.renewed(later, span, &HashMap::from([(0, 1), (1, 2)]));
        assert!(!clock.holds_at(asked + span));
        // The consumer stopped; a new one acts for what is left.
        clock.serving(&[lease(0, 1)]);
        clock.renewed(later, span, &HashMap::from([(0, 1)]));
        assert!(clock.holds_at(asked + span));
    }

    #[test]
    fn a_member_that_is_not_live_wants_no_lane() {
        assert!(member("z").share(&["a".to_owned()]).is_empty());
    }

    #[test]
    fn the_sql_lane_expression_names_the_same_lane_count() {
        assert!(LANE_OF_SQL.ends_with(&format!("% {LANES})")));
    }

    #[test]
    fn orders_spread_over_every_lane() {
        let lanes: BTreeSet<u32> = (0..1000)
            .map(|_| lane_of(OrderId(Uuid::new_v4())))
            .collect();
        assert_eq!(lanes.len(), LANES as usize);
    }
}
