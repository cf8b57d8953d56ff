-- Sagas of orders that ended (cancelled or shipped) but have not settled, stored before the
-- saga read again what such a saga waits for (its settle check), have no deadline, and no
-- tick would ever come back to them. Due now: the first tick schedules their check.
update saga_states set due_at = now()
where not settled
  and due_at is null
  and (state->'order'->>'cancelled' = 'true' or state->'order'->>'shipped' = 'true');
