-- The phase each stored saga state is in (`Phase::as_str` in the domain), written with the
-- state, so the census of open instances behind `orderly_saga_instances` counts in the
-- database instead of reading and decoding every open state every 15 s. Null for states
-- stored before this column: the census derives those from the state, as it did for all.
alter table saga_states add column phase text;
