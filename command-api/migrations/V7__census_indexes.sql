-- The saga runner's census (every 15 s, in every saga process) reads the open saga states and
-- the outbox messages not delivered. Without these it scanned every stored row, a week of
-- settled sagas and delivered messages at the default retention; with them it reads only
-- what is still open.
create index saga_states_open on saga_states (saga_name, phase) where not settled;
create index outbox_undelivered on outbox (created_at) where delivered_at is null;
