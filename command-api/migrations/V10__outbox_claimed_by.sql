-- The saga member (one process run, see saga_members) that holds each claimed outbox message,
-- set by the claim and cleared when the claim's outcome is recorded. A member whose lease ran
-- out (a crashed or stalled process) gives its claims back at the next heartbeat of a live
-- one, instead of after the claims' own lease (a minute by default). No index: the rows a
-- heartbeat looks at are the few whose next attempt lies ahead (index outbox_pending).
alter table outbox add column claimed_by text;
