-- The log's clock: `tx_id` is the writing transaction's id plus `tx_offset`, and readers read
-- below the oldest running transaction's id plus `tx_offset`. The offset is 0 where the log was
-- created. A log moved to another cluster by a logical copy (pg_dump/pg_restore, logical
-- replication) keeps its stored ids, which may be ahead of the new cluster's: new events would
-- then sort before old ones and every reader would pass them by. `orderly migrate --rebase-log`
-- raises the offset so that they sort after; start-up refuses to run until it has.
create table event_log_clock (
    singleton boolean primary key default true check (singleton),
    tx_offset bigint not null default 0 check (tx_offset >= 0)
);

insert into event_log_clock default values;

-- For inserts that name no tx_id; the store's own append computes the same once per statement.
create function event_log_xact_id() returns bigint
language sql volatile
as $$ select pg_current_xact_id()::text::bigint + tx_offset from event_log_clock $$;

alter table events alter column tx_id set default event_log_xact_id();
