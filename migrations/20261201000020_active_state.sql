-- The scheduler asks, per contested binding, whether it has a RUNNING run and
-- whether it has a waiting one (db::runs::run_active_state): one probe each
-- on (binding_id, state), however long the binding's backlog of queued runs
-- (a backfill of 10 000 runs used to be read whole on every fire). It serves
-- every former use of runs_active (binding_id first), which it replaces.
CREATE INDEX runs_active_state ON runs (binding_id, state) WHERE state IN ('SCHEDULED', 'QUEUED', 'RUNNING');
DROP INDEX runs_active;

-- The claim's start-time floor reads, per claimed run, the latest end after
-- its clock's now of its tenant's runs: tenant first, so that the lookup is
-- an equality and a range in index order, the cheapest plan under any
-- statistics (on (end_time) alone a plan from stale statistics after a
-- large backfill scanned the table instead).
CREATE INDEX runs_ended_tenant ON runs (tenant_id, end_time) WHERE start_time IS NOT NULL AND end_time IS NOT NULL;
DROP INDEX runs_ended;
