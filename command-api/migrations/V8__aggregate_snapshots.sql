-- Snapshots of the states of long streams (a product's grows with every order it serves), so
-- that a command handler starting cold reads the events after the snapshot instead of the
-- whole stream. A cache, never the truth: the log is. A row that does not match the log (its
-- event is not at its version) or whose format the program does not read is ignored, and the
-- next snapshot of the stream replaces it.
create table aggregate_snapshots (
    stream text primary key,
    -- The state is folded from the stream's events up to this version, the last of which has
    -- this id.
    version bigint not null,
    event_id uuid not null,
    -- Id of the stream's first event (what tells a handler whether a placement was its own).
    first_event_id uuid not null,
    -- The state's serialized form (e.g. orderly_domain::product::SNAPSHOT_FORMAT).
    format integer not null,
    state jsonb not null,
    taken_at timestamptz not null default now()
);
