-- Worker runs (handler kind "worker", issue 14): the lease of a run held by
-- a remote worker carries a fencing token, minted by the claim; every
-- completion, failure and heartbeat names it and is conditional on it, so
-- a worker whose lease was lost changes nothing. `worker_name` says which
-- worker holds (held) the run, for people.
ALTER TABLE runs ADD COLUMN lease_token uuid, ADD COLUMN worker_name text;

-- Completions and heartbeats find a running run by its token.
CREATE UNIQUE INDEX runs_lease_token ON runs (lease_token) WHERE state = 'RUNNING';

-- The maintenance pass ends worker runs nobody took within their
-- schedule-to-start timeout (reason no_worker): the QUEUED ones, oldest
-- first.
CREATE INDEX runs_queued_worker ON runs (not_before)
    WHERE state = 'QUEUED' AND (handler->>'kind') = 'worker';
