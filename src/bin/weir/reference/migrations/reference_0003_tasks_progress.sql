-- reference/0003_tasks_progress: task processing (seed 000) and progress (seed 003).
--
-- `tasks` gains the outcome of its current (or last) processing run. Counts and progress are
-- absolute values of that run, always written with UPDATE ... SET, never incremented: a
-- redelivered or re-requested task recounts the file from the start and ends with the same
-- numbers as a single run.
--
-- `task_runs` has one row per processing event (its CloudEvent id): a redelivery of the same
-- event (after a crash, a rebalance or a retry) is the same run, with `attempts` counting the
-- starts; a new trigger is a new run. It is how "each trigger causes exactly one processing" is
-- checked, and an audit of who asked for what.
--
-- `task_schedule_ticks` has one row per fired tick of the schedule: the replica that inserts it
-- is the only one that requests processing for that tick.
--
-- `task_webhook_deliveries` remembers the signatures of accepted webhook calls for the replay
-- window, so a captured request sent again inside the window is refused too.

ALTER TABLE tasks
    ADD COLUMN IF NOT EXISTS processed_records bigint      NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS good_records      bigint      NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS bad_records       bigint      NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS bytes_read        bigint      NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS bytes_total       bigint,
    ADD COLUMN IF NOT EXISTS error             text,
    ADD COLUMN IF NOT EXISTS current_run       bigint,
    ADD COLUMN IF NOT EXISTS last_requested_at timestamptz,
    ADD COLUMN IF NOT EXISTS started_at        timestamptz,
    ADD COLUMN IF NOT EXISTS finished_at       timestamptz,
    ADD COLUMN IF NOT EXISTS updated_at        timestamptz NOT NULL DEFAULT now();

-- The schedule's sweep: pending tasks by age.
CREATE INDEX IF NOT EXISTS tasks_pending ON tasks (created_at) WHERE status = 'pending';

CREATE TABLE IF NOT EXISTS task_runs (
    id           bigserial   PRIMARY KEY,
    task_id      uuid        NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    event_id     uuid        NOT NULL UNIQUE,
    event_type   text        NOT NULL,
    triggered_by text        NOT NULL,
    attempts     integer     NOT NULL DEFAULT 1,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    -- NULL while running (or interrupted), then 'completed' or 'failed'.
    outcome      text,
    good_records bigint,
    bad_records  bigint,
    error        text
);

CREATE INDEX IF NOT EXISTS task_runs_task ON task_runs (task_id, id);

CREATE TABLE IF NOT EXISTS task_schedule_ticks (
    -- The cron expression: a changed schedule starts its own history.
    schedule  text        NOT NULL,
    tick_at   timestamptz NOT NULL,
    fired_by  text        NOT NULL,
    fired_at  timestamptz NOT NULL DEFAULT now(),
    requested integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (schedule, tick_at)
);

CREATE TABLE IF NOT EXISTS task_webhook_deliveries (
    signature   text        PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);
