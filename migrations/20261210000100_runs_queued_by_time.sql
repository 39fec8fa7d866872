-- The first QUEUED run by `not_before` is read on every pass of every
-- node's executor (when a jittered run becomes claimable:
-- run_next_due_time) and by the cluster status (the oldest queued run).
-- `runs_queued` was (priority DESC, not_before), so such a read walked
-- every queued run: with 150 000 queued, 2.2 ms with a plan for the
-- value and 31 ms with the generic plan (a parallel sequential scan), on
-- every pass while a backlog drains. Keyed by `not_before` alone it is one
-- probe. Nothing reads all queued runs by priority: the claim reads each
-- tenant's by `runs_claim_tenant`.
DROP INDEX runs_queued;
CREATE INDEX runs_queued ON runs (not_before) WHERE state = 'QUEUED';
