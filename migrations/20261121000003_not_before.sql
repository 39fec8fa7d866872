-- A queued run is claimed no earlier than not_before: its fire time plus the
-- schedule's deterministic jitter (and, later, retry backoff or a delayed
-- trigger's run_time).
ALTER TABLE runs ADD COLUMN not_before timestamptz;
UPDATE runs SET not_before = scheduled_time;
ALTER TABLE runs ALTER COLUMN not_before SET NOT NULL;
DROP INDEX runs_queued;
CREATE INDEX runs_queued ON runs (not_before) WHERE state = 'QUEUED';
