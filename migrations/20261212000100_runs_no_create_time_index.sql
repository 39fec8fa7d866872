-- The hourly budget and quota usage counted a tenant's runs "created in
-- the last hour" through runs_tenant_create_time (tenant_id, create_time).
-- Run ids are UUIDv7 minted by the clock that stamps create_time, so the
-- same reads now bound themselves by id on runs_tenant_id (tenant_id,
-- id DESC) and test create_time exactly (db::tenancy::created_floor).
-- The index cost every write of a run an entry: an insert and each
-- non-HOT update (a claim, an end), three per worker run.
DROP INDEX IF EXISTS runs_tenant_create_time;
