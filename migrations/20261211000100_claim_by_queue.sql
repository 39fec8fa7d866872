-- The claim indexes split the queued runs by worker queue as well
-- (db::runs::run_claim). Before, a claim read a tenant's (or a binding's)
-- queued runs of its handler kind in claim order and filtered on the queue,
-- so every run of another queue, and every worker run for a claim of
-- commands, was read and dropped: with 10 000 of a tenant's worker runs
-- queued, each command claim (the executor's, on every wake) read all of
-- them, 8 ms per tenant and 81 ms per claim at 100 000, while it held the
-- claim lock every worker claim waits for. Now a claim reads only its own
-- queue's runs (runs of no queue: '', which no queue name can be).
DROP INDEX runs_claim_tenant;
CREATE INDEX runs_claim_tenant ON runs
    (tenant_id, (((handler->>'kind') = 'event')::int), (coalesce(handler->>'queue', '')),
     ((overlap_policy = 'ALLOW')::int), priority DESC, not_before, id)
    WHERE state = 'QUEUED';
DROP INDEX runs_claim_binding;
CREATE INDEX runs_claim_binding ON runs
    (binding_id, (((handler->>'kind') = 'event')::int), (coalesce(handler->>'queue', '')),
     priority DESC, not_before, id)
    WHERE state = 'QUEUED';
