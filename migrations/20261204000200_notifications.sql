-- Failure notifications (issue 16): rules on a definition, replaced per
-- binding, and a durable outbox of signed webhooks (docs/semantics.md,
-- "Failure notifications"; src/executor/notify.rs delivers).

-- A rule: where to post, and when. Owned by a definition (binding_id
-- NULL, tenant_id NULL) or by one binding (the tenant's override, which
-- replaces the definition's rules for that binding). The signing secret is
-- sealed with AES-256-GCM under the node key (SKED_NOTIFY_KEY): `secret` is
-- nonce (12 bytes) || ciphertext || tag; sked shows the clear secret once,
-- in the response that generated it.
CREATE TABLE notify_rules (
    id                   uuid PRIMARY KEY,
    definition           text    NOT NULL REFERENCES definitions (name) ON DELETE CASCADE,
    binding_id           uuid    REFERENCES bindings (id) ON DELETE CASCADE,
    tenant_id            text,
    position             int     NOT NULL,
    name                 text    NOT NULL,
    url                  text    NOT NULL,
    -- FAILURE | CONSECUTIVE_FAILURES | RECOVERY
    trigger              text    NOT NULL,
    -- CONSECUTIVE_FAILURES: the count that fires it (once per streak)
    consecutive_failures int     NOT NULL DEFAULT 0,
    -- FAILURE: every failed attempt (also those retried), not only the final one
    every_attempt        bool    NOT NULL DEFAULT false,
    secret               bytea   NOT NULL,
    create_time          timestamptz NOT NULL,
    CHECK ((binding_id IS NULL) = (tenant_id IS NULL))
);
CREATE UNIQUE INDEX notify_rules_definition_name ON notify_rules (definition, name) WHERE binding_id IS NULL;
CREATE UNIQUE INDEX notify_rules_binding_name ON notify_rules (binding_id, name) WHERE binding_id IS NOT NULL;

-- Bindings whose own rules (possibly none) replace their definition's.
CREATE TABLE notify_overrides (
    binding_id uuid PRIMARY KEY REFERENCES bindings (id) ON DELETE CASCADE,
    tenant_id  text NOT NULL
);

-- The outbox: one row per notification, written by the triggers below in
-- the transaction that ended the run. Delivered by any node: claimed with
-- FOR UPDATE SKIP LOCKED and a lease, posted, then marked DELIVERED (or
-- retried with backoff, FAILED after the last attempt).
CREATE TABLE notifications (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    rule_id              uuid        NOT NULL,
    rule_name            text        NOT NULL,
    tenant_id            text        NOT NULL,
    binding_id           uuid        NOT NULL,
    definition           text        NOT NULL,
    run_id               uuid,
    run_attempt          int,
    run_state            text,
    reason               text,
    -- failure | consecutive_failures | recovery
    event                text        NOT NULL,
    consecutive_failures int         NOT NULL,
    scheduled_time       timestamptz,
    start_time           timestamptz,
    end_time             timestamptz,
    create_time          timestamptz NOT NULL DEFAULT now(),
    -- PENDING | DELIVERED | FAILED
    state                text        NOT NULL DEFAULT 'PENDING',
    attempts             int         NOT NULL DEFAULT 0,
    next_attempt_time    timestamptz NOT NULL DEFAULT now(),
    lease_expires_at     timestamptz,
    node_id              text,
    last_attempt_time    timestamptz,
    last_status          int,
    last_error           text,
    delivered_time       timestamptz
);
CREATE INDEX notifications_due ON notifications (next_attempt_time) WHERE state = 'PENDING';
CREATE INDEX notifications_binding ON notifications (tenant_id, binding_id, create_time DESC);
CREATE INDEX notifications_run ON notifications (run_id);
-- Retention deletes settled notifications with the runs (`--retention`).
CREATE INDEX notifications_settled ON notifications (create_time) WHERE state <> 'PENDING';

-- The rules in force for binding b: its own when it overrides, else its
-- definition's.
CREATE FUNCTION sked_notify_rules_of(b uuid, def text) RETURNS SETOF notify_rules
LANGUAGE sql STABLE AS $$
  SELECT r.* FROM notify_rules r
  WHERE CASE WHEN EXISTS (SELECT 1 FROM notify_overrides o WHERE o.binding_id = b)
             THEN r.binding_id = b
             ELSE r.binding_id IS NULL AND r.definition = def END
$$;

-- Final outcomes: binding_status.consecutive_failures moves only when a
-- final failure ends (up) or a success follows failures (down to the
-- failures after it), so a steady success never fires this trigger (its
-- WHEN clause is the whole cost). FAILURE (not every_attempt) rules fire on
-- each rise, CONSECUTIVE_FAILURES when the count reaches theirs, RECOVERY
-- when a success ends a streak. The run is the binding's last ended run.
CREATE FUNCTION sked_notify_status() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  old_cf int := 0;
  recovered bool := false;
  b record;
BEGIN
  IF TG_OP = 'UPDATE' THEN
    old_cf := OLD.consecutive_failures;
    recovered := old_cf > 0 AND NEW.last_success_time IS DISTINCT FROM OLD.last_success_time;
  END IF;
  SELECT id, tenant_id, definition INTO b FROM bindings WHERE id = NEW.binding_id;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  INSERT INTO notifications (rule_id, rule_name, tenant_id, binding_id, definition, run_id, run_attempt,
                             run_state, reason, event, consecutive_failures, scheduled_time, start_time,
                             end_time)
  SELECT r.id, r.name, b.tenant_id, b.id, b.definition, x.id, x.attempt, x.state,
         coalesce(x.error_summary, x.reason),
         CASE r.trigger WHEN 'FAILURE' THEN 'failure' WHEN 'RECOVERY' THEN 'recovery'
                        ELSE 'consecutive_failures' END,
         NEW.consecutive_failures, x.scheduled_time, x.start_time, x.end_time
  FROM sked_notify_rules_of(b.id, b.definition) r
  LEFT JOIN runs x ON x.id = NEW.last_run_id
  WHERE (r.trigger = 'FAILURE' AND NOT r.every_attempt AND NEW.consecutive_failures > old_cf)
     OR (r.trigger = 'CONSECUTIVE_FAILURES' AND old_cf < r.consecutive_failures
         AND NEW.consecutive_failures >= r.consecutive_failures)
     OR (r.trigger = 'RECOVERY' AND recovered)
  ORDER BY r.position;
  RETURN NULL;
END
$$;

CREATE TRIGGER binding_status_notify_insert AFTER INSERT ON binding_status
FOR EACH ROW WHEN (NEW.consecutive_failures > 0)
EXECUTE FUNCTION sked_notify_status();
CREATE TRIGGER binding_status_notify_update AFTER UPDATE ON binding_status
FOR EACH ROW WHEN (OLD.consecutive_failures IS DISTINCT FROM NEW.consecutive_failures)
EXECUTE FUNCTION sked_notify_status();

-- Every failed attempt, retried or not (FAILURE rules with every_attempt):
-- fired only by a run's move into FAILED or TIMED_OUT; a successful run
-- pays the WHEN clause only.
CREATE FUNCTION sked_notify_attempt() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO notifications (rule_id, rule_name, tenant_id, binding_id, definition, run_id, run_attempt,
                             run_state, reason, event, consecutive_failures, scheduled_time, start_time,
                             end_time)
  SELECT r.id, r.name, NEW.tenant_id, NEW.binding_id, NEW.definition, NEW.id, NEW.attempt, NEW.state,
         coalesce(NEW.error_summary, NEW.reason), 'failure',
         coalesce((SELECT s.consecutive_failures FROM binding_status s WHERE s.binding_id = NEW.binding_id), 0),
         NEW.scheduled_time, NEW.start_time, NEW.end_time
  FROM sked_notify_rules_of(NEW.binding_id, NEW.definition) r
  WHERE r.trigger = 'FAILURE' AND r.every_attempt
  ORDER BY r.position;
  RETURN NULL;
END
$$;

CREATE TRIGGER runs_notify_attempt AFTER UPDATE OF state ON runs
FOR EACH ROW WHEN (NEW.state IN ('FAILED', 'TIMED_OUT') AND OLD.state IS DISTINCT FROM NEW.state)
EXECUTE FUNCTION sked_notify_attempt();
CREATE TRIGGER runs_notify_attempt_insert AFTER INSERT ON runs
FOR EACH ROW WHEN (NEW.state IN ('FAILED', 'TIMED_OUT'))
EXECUTE FUNCTION sked_notify_attempt();
