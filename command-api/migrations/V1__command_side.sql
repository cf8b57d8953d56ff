-- placeOrder idempotency keys, scoped per customer. The row is inserted before the command
-- runs (insert-first), so a concurrent duplicate finds it. The first result is not stored: it
-- is the order's first event, read back from the log on a retry.
create table idempotency_keys (
    customer_id text not null,
    idempotency_key text not null,
    request_fingerprint uuid not null,
    order_id uuid not null,
    created_at timestamptz not null default now(),
    primary key (customer_id, idempotency_key)
);

-- How far each saga runner has followed the log (Position: commit, prepare).
create table saga_checkpoints (
    saga_name text primary key,
    position_commit bigint not null,
    position_prepare bigint not null,
    updated_at timestamptz not null default now()
);

-- One fulfilment saga per order; due_at is the state's next deadline, for the ticker.
create table saga_states (
    saga_name text not null,
    order_id uuid not null,
    state jsonb not null,
    -- Carried onto the commands a deadline sends, so they join the order's trace.
    correlation_id uuid not null,
    due_at timestamptz,
    settled boolean not null default false,
    updated_at timestamptz not null default now(),
    primary key (saga_name, order_id)
);
create index saga_states_due on saga_states (saga_name, due_at) where due_at is not null;

-- Side effects the saga asked for (payment gateway calls, notifications), delivered by a
-- worker at least once. outbox_id is derived from the saga step, so a redelivered step adds
-- nothing; a row that fails max_attempts times is dead-lettered.
create table outbox (
    outbox_id uuid primary key,
    order_id uuid not null,
    kind text not null,
    payload jsonb not null,
    attempts integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    delivered_at timestamptz,
    dead_lettered_at timestamptz,
    last_error text,
    created_at timestamptz not null default now()
);
create index outbox_pending on outbox (next_attempt_at)
    where delivered_at is null and dead_lettered_at is null;
