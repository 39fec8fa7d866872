-- Claims (db::runs::run_claim) cost O(tenants with queued runs × limit)
-- instead of sorting the whole QUEUED backlog on every claim: a loose index
-- scan finds the tenants, and each tenant's runs are read in claim order
-- (priority DESC, not_before, id) only as far as the claim needs, split by
-- handler kind (event runs are claimed apart) and by whether the overlap
-- policy is ALLOW (only non-ALLOW runs are held to one per binding).
-- Those two are int, not boolean: the planner folds `b = false` to `NOT b`
-- and `NOT (x = 'y')` to `x <> 'y'`, which no longer matches the index
-- column, so a boolean column would serve only one side of each split.
CREATE INDEX runs_claim_tenant ON runs
    (tenant_id, (((handler->>'kind') = 'event')::int), ((overlap_policy = 'ALLOW')::int),
     priority DESC, not_before, id)
    WHERE state = 'QUEUED';
-- A binding's first due queued run of a kind (the one a non-ALLOW binding may
-- start next; earlier runs of any policy count).
CREATE INDEX runs_claim_binding ON runs
    (binding_id, (((handler->>'kind') = 'event')::int), priority DESC, not_before, id)
    WHERE state = 'QUEUED';
-- The bindings of a tenant with queued non-ALLOW runs, for a tenant whose
-- first runs are mostly a few bindings' backlog (a backfill): their first
-- runs are looked up per binding instead of reading through the backlog.
CREATE INDEX runs_claim_held ON runs (tenant_id, binding_id)
    WHERE state = 'QUEUED' AND overlap_policy <> 'ALLOW';
