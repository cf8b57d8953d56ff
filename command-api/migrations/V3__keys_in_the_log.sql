-- placeOrder keys live in the log now: the order id follows from (customer, key) and the event
-- ids from (customer, key, request), so the event store's own checks answer retries and refuse
-- a key reused for another request. The claim table is no longer read or written.
drop table idempotency_keys;
