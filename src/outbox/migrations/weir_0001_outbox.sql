-- weir/0001_outbox: the transactional outbox.
--
-- A service inserts one row per event in the same transaction as its own writes; `weir
-- outbox-relay` publishes committed rows and marks them. Services in other languages write the
-- same rows (see "The outbox table" in the README): only id, topic, key, event_type and payload
-- are required, every other column has a default.

CREATE TABLE IF NOT EXISTS weir_outbox (
    -- The CloudEvent id: the consumer's deduplication key, and a second write of the same event
    -- fails instead of publishing twice.
    id              uuid        PRIMARY KEY,
    -- Insertion order; the relay publishes the rows of one key in this order.
    seq             bigserial   NOT NULL,
    topic           text        NOT NULL,
    -- Record key (the entity id): it picks the partition, and rows of one key are published one
    -- after the other, never concurrently.
    key             text        NOT NULL,
    -- The CloudEvents type, for people and dashboards; the relay publishes `payload` as it is.
    event_type      text        NOT NULL,
    -- The record value, byte for byte (a structured-mode CloudEvent for Weir's writer).
    payload         bytea       NOT NULL,
    -- Record headers as a JSON object of string values (content-type, traceparent, tracestate).
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    -- A failed row is not retried before this time (exponential backoff).
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT weir_outbox_headers_object CHECK (jsonb_typeof(headers) = 'object')
);

-- The relay's claim: unpublished rows in seq order, and "is there an earlier unpublished row of
-- this key?".
CREATE INDEX IF NOT EXISTS weir_outbox_pending_seq ON weir_outbox (seq)
    WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS weir_outbox_pending_key ON weir_outbox (key, seq)
    WHERE published_at IS NULL;
-- The purge of published rows by age.
CREATE INDEX IF NOT EXISTS weir_outbox_published_at ON weir_outbox (published_at)
    WHERE published_at IS NOT NULL;

-- Wakes relays (LISTEN weir_outbox) when rows commit: PostgreSQL delivers a notification only on
-- commit and folds identical ones within a transaction, so a transaction that writes many rows
-- sends one. A trigger rather than a call in the writer, so rows written by other services wake
-- the relay too. Relays also poll, so a lost notification only delays.
CREATE OR REPLACE FUNCTION weir_outbox_notify() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('weir_outbox', '');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS weir_outbox_notify ON weir_outbox;
CREATE TRIGGER weir_outbox_notify
    AFTER INSERT ON weir_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION weir_outbox_notify();
