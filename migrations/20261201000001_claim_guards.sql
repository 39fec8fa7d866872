-- Claim guards (issue 12): stopped bindings hold their runs, and a run never
-- starts before the end of a run whose slot it takes.

-- The run is a TriggerRun or RetryRun (an explicit request), or an
-- automatic retry of such a run: it may start while its binding is paused or
-- disabled (a disabled definition still holds it). Set on insert; a retry
-- inherits it from the attempt it retries.
ALTER TABLE runs ADD COLUMN manual boolean NOT NULL DEFAULT false;

-- Runs that ran, by end time. The claim reads the few that ended after its
-- own clock's now (a finish that committed between the claim's clock read
-- and its snapshot, or a node whose clock is ahead) and starts the runs that
-- take their slots no earlier than they ended (db::runs::run_claim).
CREATE INDEX runs_ended ON runs (end_time) WHERE start_time IS NOT NULL AND end_time IS NOT NULL;

-- The claim holds back the runs of paused or disabled bindings and of
-- disabled definitions; it reads those few through these.
CREATE INDEX bindings_stopped ON bindings (id) WHERE paused OR NOT enabled;
CREATE INDEX definitions_disabled ON definitions (name) WHERE NOT enabled;
