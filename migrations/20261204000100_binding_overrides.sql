-- Per-binding policy overrides and the active-run cap (docs/semantics.md,
-- "Bindings"). A NULL override inherits the definition's value, read when a
-- run is created (so a later definition change reaches bindings that do
-- not override it).
ALTER TABLE definitions
    -- at most this many active runs (QUEUED, RUNNING, SCHEDULED retries)
    -- per binding under overlap policy ALLOW; NULL = no cap
    ADD COLUMN max_active_runs int;

ALTER TABLE bindings
    ADD COLUMN timeout_secs    int,    -- NULL = the definition's timeout
    ADD COLUMN retry_policy    jsonb,  -- NULL = the definition's retry policy
    ADD COLUMN priority        int,    -- NULL = the definition's priority
    ADD COLUMN max_active_runs int;    -- NULL = the definition's cap; 0 = no cap
