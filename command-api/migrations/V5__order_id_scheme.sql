-- Whether the log may hold orders named the public way (a UUIDv5 of customer and idempotency
-- key): placed before order ids were keyed with a secret, or by a process without one. A
-- keyed placement must then look for such an order first, so that a retry of it is answered
-- from it; that look is one more read per placement, which a log begun with keyed ids never
-- needs. One row, written by the first placement that asks (see `OrderIdScheme`).
create table order_id_scheme (
    one_row             boolean primary key default true check (one_row),
    public_ids_possible boolean not null,
    recorded_at         timestamptz not null default now()
);
