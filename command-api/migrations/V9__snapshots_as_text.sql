-- Snapshots are kept as the JSON text the program wrote and reads back, not as jsonb: a cold
-- load of a product with a week of busy sales read 8 MB of jsonb that PostgreSQL first had to
-- render as text (about 50 ms), a save had it parse the same text into jsonb, and jsonb caps
-- a value at 255 MB where text takes 1 GB. An operator can still query one with `state::jsonb`.
--
-- The rows are dropped rather than converted: snapshots are a cache, every row stored before
-- this release is of a form it ignores (orderly_domain::product::SNAPSHOT_FORMAT 3 came with
-- it), and the next load of each long product takes a new one.
truncate aggregate_snapshots;
alter table aggregate_snapshots alter column state type text using state::text;
