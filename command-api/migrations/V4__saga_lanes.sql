-- The saga follows the log as a partitioned consumer: an order's events go to one of a fixed
-- number of lanes (by the order id), each lane is handled strictly in order by one process at
-- a time, and lanes run in parallel. A lane is owned through a lease; `generation` grows with
-- every change of owner, and every write of the lane's states and checkpoint checks it, so a
-- process that was paused past its lease cannot write after its lane moved.
create table saga_lanes (
    saga_name text not null,
    lane integer not null check (lane >= 0),
    -- The member that holds the lease; null when released.
    owner text,
    generation bigint not null default 0,
    lease_until timestamptz not null default '-infinity',
    -- Every event of this lane at or below this log position is handled.
    position_commit bigint not null,
    position_prepare bigint not null,
    updated_at timestamptz not null default now(),
    primary key (saga_name, lane)
);

-- The processes running a saga; the live ones share its lanes between them.
create table saga_members (
    saga_name text not null,
    member_id text not null,
    lease_until timestamptz not null,
    started_at timestamptz not null default now(),
    primary key (saga_name, member_id)
);

-- Events a saga step could not handle for good (corrupt data, a bug), set aside so the lane
-- goes on with other orders. The saga state tolerates late and repeated facts, so an operator
-- may feed a parked event again later (`orderly saga parked retry`) or drop it (`skip`).
create table saga_parked (
    saga_name text not null,
    event_id uuid not null,
    -- Null for an event the saga could not even route (it did not decode).
    order_id uuid,
    position_commit bigint not null,
    position_prepare bigint not null,
    -- Where to read the event again on a retry.
    stream text not null,
    version bigint not null,
    event_type text not null,
    error text not null,
    attempts integer not null default 1,
    parked_at timestamptz not null default now(),
    retry_requested_at timestamptz,
    skipped_at timestamptz,
    primary key (saga_name, event_id)
);
create index saga_parked_open on saga_parked (saga_name) where skipped_at is null;

-- Lanes start where the single runner's checkpoint was, so an upgrade neither replays the
-- log nor skips anything. 16 lanes: `LANES` in command-api/src/saga/lanes.rs.
insert into saga_lanes (saga_name, lane, position_commit, position_prepare)
select c.saga_name, l, c.position_commit, c.position_prepare
from saga_checkpoints c cross join generate_series(0, 15) l;
drop table saga_checkpoints;
