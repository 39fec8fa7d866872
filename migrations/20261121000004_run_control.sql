-- Run control (SPEC §3): overlap policy, retries, timeouts, priority,
-- enable/pause, cancel requests, idempotency keys.

ALTER TABLE definitions
    ADD COLUMN overlap_policy text    NOT NULL DEFAULT 'SKIP',   -- SKIP | ALLOW | BUFFER_ONE | CANCEL_PREVIOUS
    ADD COLUMN retry_policy   jsonb   NOT NULL DEFAULT '{"max_attempts": 1}',
    ADD COLUMN timeout_secs   int,                               -- NULL = no limit
    ADD COLUMN priority       int     NOT NULL DEFAULT 0,
    ADD COLUMN enabled        boolean NOT NULL DEFAULT true;

ALTER TABLE bindings
    ADD COLUMN enabled           boolean NOT NULL DEFAULT true,
    ADD COLUMN paused            boolean NOT NULL DEFAULT false,
    ADD COLUMN pause_note        text    NOT NULL DEFAULT '',
    -- a paused binding resumes by itself at this instant (NULL = stays paused)
    ADD COLUMN pause_expire_time timestamptz;

-- Runs snapshot the policies they were created with, so a later definition
-- change never alters a run in flight.
ALTER TABLE runs
    ADD COLUMN max_attempts    int  NOT NULL DEFAULT 1,
    ADD COLUMN retry_of        uuid,
    ADD COLUMN retry_policy    jsonb NOT NULL DEFAULT '{"max_attempts": 1}',
    ADD COLUMN timeout_secs    int,
    ADD COLUMN overlap_policy  text NOT NULL DEFAULT 'ALLOW',
    ADD COLUMN priority        int  NOT NULL DEFAULT 0,
    ADD COLUMN idempotency_key text,
    -- set when a cancel was requested while the run was RUNNING; the
    -- executing node (told by NOTIFY on sked_cancel, or by its heartbeat)
    -- terminates it and ends it CANCELLED with this reason
    ADD COLUMN cancel_reason   text;

-- At most one RUNNING run per binding unless its overlap policy is ALLOW:
-- the database, not timing, keeps overlap-free bindings overlap-free.
CREATE UNIQUE INDEX runs_one_running ON runs (binding_id)
    WHERE state = 'RUNNING' AND overlap_policy <> 'ALLOW';
-- Active runs of a binding (overlap decisions).
CREATE INDEX runs_active ON runs (binding_id) WHERE state IN ('SCHEDULED', 'QUEUED', 'RUNNING');
-- Claim order: priority, then due time.
DROP INDEX runs_queued;
CREATE INDEX runs_queued ON runs (priority DESC, not_before) WHERE state = 'QUEUED';
CREATE INDEX runs_scheduled ON runs (not_before) WHERE state = 'SCHEDULED';
-- Reaper: running runs by lease expiry.
CREATE INDEX runs_lease ON runs (lease_expires_at) WHERE state = 'RUNNING';
CREATE INDEX runs_idempotency ON runs (binding_id, idempotency_key, create_time)
    WHERE idempotency_key IS NOT NULL;
