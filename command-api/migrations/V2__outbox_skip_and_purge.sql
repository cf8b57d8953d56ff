-- An operator's decision to drop a dead-lettered message (`orderly saga outbox skip`); the row
-- stays, for the record, until the retention purge removes it.
alter table outbox add column skipped_at timestamptz;

-- The retention purge deletes delivered and skipped messages, and settled sagas, older than
-- the retention; these keep it from scanning the live rows.
create index outbox_delivered on outbox (delivered_at) where delivered_at is not null;
create index outbox_skipped on outbox (skipped_at) where skipped_at is not null;
create index saga_states_settled on saga_states (saga_name, updated_at) where settled;
