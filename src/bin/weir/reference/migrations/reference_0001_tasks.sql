-- reference/0001_tasks: the reference service's tasks (seed 000), minimal for now.
--
-- A task is created `pending` together with its `task.created` event (through the outbox, in
-- the same transaction); processing moves it on. `status` is free text until the reference
-- service settles its state machine.

CREATE TABLE IF NOT EXISTS tasks (
    id             uuid        PRIMARY KEY,
    tenant_id      text        NOT NULL,
    environment_id text        NOT NULL,
    file_url       text        NOT NULL,
    entity_type    text        NOT NULL,
    status         text        NOT NULL DEFAULT 'pending',
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS tasks_tenant ON tasks (tenant_id, environment_id, created_at);
