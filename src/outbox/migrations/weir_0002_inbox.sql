-- weir/0002_inbox: events a consumer has already applied, for idempotent handlers.
--
-- The inbox wrapper inserts (consumer_group, event_id) in the same transaction as the handler's
-- own writes; a redelivered event finds its row and is skipped.

CREATE TABLE IF NOT EXISTS weir_inbox (
    -- Whose inbox: one name per handler that must apply an event once.
    consumer_group text        NOT NULL,
    -- The CloudEvent id.
    event_id       uuid        NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);

-- Purging entries older than the redelivery horizon.
CREATE INDEX IF NOT EXISTS weir_inbox_processed_at ON weir_inbox (processed_at);
