-- Fair delivery of failure notifications (docs/semantics.md, "Failure
-- notifications"; src/executor/notify.rs). The claim takes at most a few
-- due rows per tenant (those a node already has in flight count), round
-- robin across tenants, so one tenant's many notifications to a receiver
-- that never answers cannot fill every delivery slot. It walks the tenants
-- with pending rows (a skip scan: one probe per tenant) and reads each
-- one's due rows oldest first, a few rows each: this index serves both, and
-- a tenant's backlog costs the claim nothing beyond its first rows.
CREATE INDEX notifications_tenant_due ON notifications (tenant_id, next_attempt_time)
    WHERE state = 'PENDING';
