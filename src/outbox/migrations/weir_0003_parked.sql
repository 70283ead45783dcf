-- weir/0003_parked: records parked for durable retries.
--
-- A consumer parks a record here when its handler still fails `Retryable` after the in-place
-- attempts, and parks every later record of the same key (for that handler and group) behind it,
-- so that per key, records are handled in offset order. The parked-record worker takes each key's
-- head row (lowest offset), calls the handler again, and deletes the row when it succeeds or once
-- the record is dead-lettered.

CREATE TABLE IF NOT EXISTS weir_parked (
    seq              bigserial   PRIMARY KEY,
    group_id         text        NOT NULL,
    -- Parking is per handler: with fan-out, the handlers that succeeded are not run again.
    handler          text        NOT NULL,
    topic            text        NOT NULL,
    partition        integer     NOT NULL,
    "offset"         bigint      NOT NULL,
    -- The record, byte for byte: key and value as received, headers as parallel arrays.
    key              bytea,
    value            bytea,
    header_names     text[]      NOT NULL DEFAULT '{}',
    header_values    bytea[]     NOT NULL DEFAULT '{}',
    timestamp_ms     bigint,
    -- Handler calls so far (in place, then durable): the next call is attempt attempts + 1.
    attempts         integer     NOT NULL,
    durable_attempts integer     NOT NULL DEFAULT 0,
    last_error       text,
    parked_at        timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- A record redelivered after a rebalance is parked once.
    CONSTRAINT weir_parked_record UNIQUE (group_id, handler, topic, partition, "offset")
);

-- "Does this key have parked records?" and "which row is the key's head?".
CREATE INDEX IF NOT EXISTS weir_parked_key
    ON weir_parked (group_id, handler, topic, partition, key, "offset");
-- The worker's scan for due heads.
CREATE INDEX IF NOT EXISTS weir_parked_due ON weir_parked (group_id, next_attempt_at);
