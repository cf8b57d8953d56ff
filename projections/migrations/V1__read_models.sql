-- Projection bookkeeping: where each projection is in the log, what it parked, what it rebuilds.
create table projection_checkpoints (
    projection       text primary key,
    position_commit  bigint not null default 0,
    position_prepare bigint not null default 0,
    -- RUNNING, CATCHING_UP, STOPPED or FAILED as last reported by the active runner.
    state            text not null default 'STOPPED',
    last_error       text,
    updated_at       timestamptz not null default now()
);

-- A shadow copy being rebuilt has a checkpoint of its own, so an interrupted rebuild resumes.
create table projection_rebuilds (
    projection       text primary key,
    position_commit  bigint not null default 0,
    position_prepare bigint not null default 0,
    started_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
);

create table dead_letters (
    dead_letter_id   bigint generated always as identity primary key,
    projection       text not null,
    event_id         uuid not null,
    stream           text not null,
    version          bigint not null,
    position_commit  bigint not null,
    position_prepare bigint not null,
    event_type       text not null,
    error            text not null,
    parked_at        timestamptz not null default now(),
    -- 'retried' or 'skipped' once an operator dealt with it; null while it waits.
    resolution       text,
    resolved_at      timestamptz,
    unique (projection, event_id)
);

create index dead_letters_unresolved_idx on dead_letters (projection) where resolved_at is null;

-- Read models. Index names are the ones PostgreSQL picks itself, so that a shadow copy made with
-- `create table ... (like ... including all)` carries the same names after the swap.
create table orders (
    order_id            uuid primary key,
    customer_id         text not null,
    status              text not null,
    total_minor         bigint not null,
    currency            text not null,
    ship_name           text not null,
    ship_line1          text not null,
    ship_line2          text,
    ship_city           text not null,
    ship_postal_code    text not null,
    ship_country        text not null,
    placed_at           timestamptz not null,
    updated_at          timestamptz not null,
    cancellation_reason text,
    carrier             text,
    tracking_number     text,
    shipped_at          timestamptz,
    delivered_at        timestamptz,
    -- Version of the order stream this row reflects: an event at or below it is already in.
    version             bigint not null
);

create index on orders (customer_id, placed_at, order_id);
create index on orders (status, placed_at, order_id);
create index on orders (placed_at, order_id);

-- Written once, at placement: kept apart from `orders` so that the order's many status updates
-- neither copy the document nor touch the GIN index.
create table order_search (
    order_id         uuid primary key,
    -- Product names, SKUs, customer id and address, for searchOrders.
    search_document  tsvector not null
);

create index on order_search using gin (search_document);

create table order_lines (
    order_id          uuid not null,
    line_no           integer not null,
    sku               text not null,
    name              text not null,
    quantity          integer not null,
    unit_price_minor  bigint not null,
    line_total_minor  bigint not null,
    currency          text not null,
    primary key (order_id, line_no)
);

-- One row per status change; `version` is the order-stream version of the event behind it.
create table order_status_history (
    order_id  uuid not null,
    version   bigint not null,
    status    text not null,
    at        timestamptz not null,
    reason    text,
    primary key (order_id, version)
);

-- Fed by the payment-<order id> stream, so it carries that stream's version.
create table order_payments (
    order_id        uuid primary key,
    status          text not null,
    amount_minor    bigint not null,
    currency        text not null,
    attempts        integer not null,
    failure_reason  text,
    version         bigint not null
);

create table products (
    sku          text primary key,
    name         text not null,
    description  text,
    price_minor  bigint not null,
    currency     text not null,
    on_hand      integer not null,
    reserved     integer not null,
    available    integer not null,
    version      bigint not null,
    check (available = on_hand - reserved and available >= 0 and reserved >= 0)
);

create index on products (name, sku);
create index on products using gin (to_tsvector('simple', name || ' ' || sku));

-- Aggregates over orders, kept in the same transaction as the orders they count.
create table customers (
    customer_id    text primary key,
    order_count    integer not null,
    last_order_at  timestamptz
);

create table customer_lifetime_values (
    customer_id   text not null,
    currency      text not null,
    amount_minor  bigint not null,
    primary key (customer_id, currency)
);

create table daily_sales (
    date           date not null,
    currency       text not null,
    orders         integer not null,
    cancelled      integer not null,
    revenue_minor  bigint not null,
    primary key (date, currency)
);

insert into projection_checkpoints (projection) values ('orders'), ('products');
