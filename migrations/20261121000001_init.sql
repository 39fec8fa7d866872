-- sked schema v1: task definitions, tenant bindings, runs and their events.
-- Timestamps are timestamptz (UTC); schedules, handlers and params are JSON
-- documents owned by the domain layer (src/domain).

CREATE TABLE definitions (
    name          text PRIMARY KEY,
    display_name  text        NOT NULL DEFAULT '',
    description   text        NOT NULL DEFAULT '',
    labels        jsonb       NOT NULL DEFAULT '{}',
    handler       jsonb       NOT NULL,
    schedule      jsonb       NOT NULL,
    params        jsonb       NOT NULL DEFAULT '{}',
    create_time   timestamptz NOT NULL,
    update_time   timestamptz NOT NULL,
    -- bumped on every update; the API's etag
    version       bigint      NOT NULL DEFAULT 1
);

CREATE TABLE bindings (
    id                 uuid PRIMARY KEY,
    tenant_id          text        NOT NULL,
    definition         text        NOT NULL REFERENCES definitions (name),
    -- overrides as the tenant gave them (NULL = inherit)
    schedule           jsonb,
    params             jsonb,
    -- the schedule actually used (override or definition's, interval anchor resolved)
    effective_schedule jsonb       NOT NULL,
    -- next fire time; NULL = will not fire again. Advanced by the scheduler
    -- in the same transaction that creates the run for the previous time.
    next_run_time      timestamptz,
    create_time        timestamptz NOT NULL,
    update_time        timestamptz NOT NULL,
    version            bigint      NOT NULL DEFAULT 1,
    CONSTRAINT bindings_tenant_definition_key UNIQUE (tenant_id, definition)
);
CREATE INDEX bindings_due ON bindings (next_run_time) WHERE next_run_time IS NOT NULL;
CREATE INDEX bindings_definition ON bindings (definition);

CREATE TABLE runs (
    id               uuid PRIMARY KEY,           -- UUIDv7
    tenant_id        text        NOT NULL,
    binding_id       uuid        NOT NULL,       -- no FK: history outlives the binding
    definition       text        NOT NULL,
    trigger          text        NOT NULL,       -- SCHEDULE | MANUAL
    state            text        NOT NULL,       -- QUEUED | RUNNING | SUCCEEDED | FAILED
    attempt          int         NOT NULL DEFAULT 1,
    scheduled_time   timestamptz NOT NULL,
    create_time      timestamptz NOT NULL,
    start_time       timestamptz,
    end_time         timestamptz,
    handler          jsonb       NOT NULL,       -- snapshot taken when the run was created
    params           jsonb       NOT NULL,
    result           jsonb,
    error_message    text,
    error_summary    text,
    exit_code        int,
    node_id          text,
    reason           text,
    lease_expires_at timestamptz,
    -- highest event seq allocated; events get last_seq+1.. in the same transaction
    last_seq         bigint      NOT NULL DEFAULT 0
);
-- exactly once: one run per (binding, fire time) for schedule fires
CREATE UNIQUE INDEX runs_binding_scheduled_time_key ON runs (binding_id, scheduled_time)
    WHERE trigger = 'SCHEDULE';
CREATE INDEX runs_queued ON runs (scheduled_time) WHERE state = 'QUEUED';
CREATE INDEX runs_tenant_id ON runs (tenant_id, id DESC);
CREATE INDEX runs_binding_id ON runs (binding_id, id DESC);

CREATE TABLE run_events (
    run_id     uuid        NOT NULL,
    seq        bigint      NOT NULL,
    time       timestamptz NOT NULL,
    tenant_id  text        NOT NULL,
    binding_id uuid        NOT NULL,
    definition text        NOT NULL,
    kind       text        NOT NULL,             -- state_changed | log
    payload    jsonb       NOT NULL,
    PRIMARY KEY (run_id, seq)
);
