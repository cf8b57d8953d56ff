-- The event log: one row per event, never updated or deleted.
create table events (
    event_id    uuid primary key,
    stream      text not null,
    -- Derived so that category subscriptions can use an index.
    category    text not null generated always as (split_part(stream, '-', 1)) stored,
    version     bigint not null check (version >= 0),
    -- The writing transaction's 64-bit id. Log order is (tx_id, seq); readers only read rows
    -- whose tx_id is below the oldest transaction still in flight, so a row that commits late
    -- can never land behind a position a reader has already passed.
    tx_id       bigint not null default (pg_current_xact_id()::text::bigint),
    seq         bigint not null generated always as identity,
    event_type  text not null,
    data        jsonb not null,
    metadata    jsonb not null,
    recorded_at timestamptz not null default now(),
    constraint events_stream_version_key unique (stream, version)
);

create index events_position_idx on events (tx_id, seq);
create index events_category_position_idx on events (category, tx_id, seq);
