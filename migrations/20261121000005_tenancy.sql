-- Tenancy (SPEC §1 quotas, §6): API keys, audit events, tenant quotas, fair
-- share bookkeeping, definition scope and protection.

-- An API key. The secret is never stored: only its Argon2id hash (PHC
-- string). The key's id is the public part of the token
-- (`sked_<id hex>_<secret hex>`), so a lookup needs no scan.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    name        text        NOT NULL DEFAULT '',
    role        text        NOT NULL,            -- viewer | operator | admin
    tenant_id   text,                            -- NULL = platform key
    secret_hash text        NOT NULL,            -- Argon2id PHC string
    create_time timestamptz NOT NULL,
    created_by  uuid,                            -- key that created it (NULL: CLI or no-auth mode)
    revoke_time timestamptz                      -- set once; a revoked key never authenticates
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, id);

-- One row per successful mutating call.
CREATE TABLE audit_events (
    id        uuid PRIMARY KEY,                  -- UUIDv7: time-ordered
    time      timestamptz NOT NULL,
    key_id    uuid,                              -- NULL: no-auth mode or the CLI
    actor     text        NOT NULL,              -- "key <id>", "cli", "anonymous"
    tenant_id text,                              -- tenant acted on; NULL for platform objects
    method    text        NOT NULL,              -- e.g. sked.v1.BindingService/CreateBinding
    target    text        NOT NULL,              -- e.g. binding/<id>, definition/<name>
    before    jsonb,                             -- summary of the object before (NULL: created)
    after     jsonb                              -- summary after (NULL: deleted)
);
CREATE INDEX audit_events_tenant ON audit_events (tenant_id, id DESC);

-- Per-tenant limits; NULL = unlimited. No row = no limits.
CREATE TABLE tenant_quotas (
    tenant_id           text PRIMARY KEY,
    max_concurrent_runs int,
    max_runs_per_hour   int,
    max_bindings        int,
    update_time         timestamptz NOT NULL
);

-- Fair share: when a tenant last had a run claimed; claims go round-robin
-- from the least recently served tenant.
CREATE TABLE tenant_claims (
    tenant_id       text PRIMARY KEY,
    last_claim_time timestamptz NOT NULL
);

ALTER TABLE definitions
    ADD COLUMN protected boolean NOT NULL DEFAULT false,
    -- NULL = every tenant may bind; otherwise the allow-list
    ADD COLUMN tenant_scope text[];

-- A run that waited because its tenant was at max_concurrent_runs.
ALTER TABLE runs ADD COLUMN throttled boolean NOT NULL DEFAULT false;

-- Hourly budget and usage reports: a tenant's runs by creation time.
CREATE INDEX runs_tenant_create_time ON runs (tenant_id, create_time);
-- Running runs per tenant (quota room).
CREATE INDEX runs_running_tenant ON runs (tenant_id) WHERE state = 'RUNNING';
