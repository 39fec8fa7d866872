-- Workflows: a definition whose handler is a DAG of steps
-- (src/domain/workflow.rs, docs/semantics.md "Workflows"). A workflow run
-- is a run; its steps are child runs (parent_run_id, step). The DAG
-- advances here, in the database, in the transaction that ends a step (a
-- deferred trigger, so it sees the retry a finishing attempt writes in the
-- same transaction), whichever statement ends it: a finish, a worker's
-- completion, a reaper, a cancel, an event claim. A node that dies between
-- two steps therefore loses nothing: the next step was written with the
-- end of the previous one.
--
-- Concurrency: every advance of a workflow locks the workflow run's row
-- first, so two steps ending at once on two nodes advance one after the
-- other (under READ COMMITTED the second sees the first's steps), and a
-- step is created at most once (the unique index backs this up).

ALTER TABLE runs ADD COLUMN parent_run_id uuid, ADD COLUMN step text;

-- A workflow run's steps (ListRuns by parent, GetRun's steps, the advance).
CREATE INDEX runs_steps ON runs (parent_run_id, step, attempt) WHERE parent_run_id IS NOT NULL;
-- Exactly once: one first attempt per step of a workflow run (retries,
-- retry_of set, are further attempts of it).
CREATE UNIQUE INDEX runs_step_once ON runs (parent_run_id, step)
    WHERE parent_run_id IS NOT NULL AND retry_of IS NULL;

-- A UUIDv7 (time-ordered, as the application's ids): 48 bits of Unix
-- milliseconds over a random v4.
CREATE FUNCTION sked_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE AS $$
  SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                                        PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                                                          FROM 3)
                                        FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
$$;

-- JSON Merge Patch (RFC 7396) of `p` over `t`, as domain::merge_params.
CREATE FUNCTION sked_json_merge(t jsonb, p jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  k text;
  v jsonb;
  o jsonb;
BEGIN
  IF p IS NULL OR jsonb_typeof(p) <> 'object' THEN
    RETURN p;
  END IF;
  o := CASE WHEN jsonb_typeof(t) = 'object' THEN t ELSE '{}'::jsonb END;
  FOR k, v IN SELECT * FROM jsonb_each(p) LOOP
    IF jsonb_typeof(v) = 'null' THEN
      o := o - k;
    ELSE
      o := jsonb_set(o, ARRAY[k], sked_json_merge(o -> k, v));
    END IF;
  END LOOP;
  RETURN o;
END
$$;

-- A retry of a step (automatic, or RetryRun of the step) is a further
-- attempt of the same step of the same workflow run.
CREATE FUNCTION sked_step_inherit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  SELECT p.parent_run_id, p.step INTO NEW.parent_run_id, NEW.step FROM runs p WHERE p.id = NEW.retry_of;
  RETURN NEW;
END
$$;
CREATE TRIGGER runs_step_inherit BEFORE INSERT ON runs
FOR EACH ROW WHEN (NEW.retry_of IS NOT NULL AND NEW.parent_run_id IS NULL)
EXECUTE FUNCTION sked_step_inherit();

-- What step `st` (one element of a workflow handler's `steps`) runs, as
-- {handler, params, retry, timeout_secs, missing}: its own handler (params
-- {}, its retry policy or one attempt, its timeout); or, for a step naming
-- a `definition`, that definition's handler (a command with the
-- definition's output cap), params, and retry policy and timeout unless the
-- step sets its own. A definition gone (or become a workflow) gives
-- `missing` and an `event` handler placeholder.
CREATE FUNCTION sked_step_spec(st jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
  d definitions%ROWTYPE;
  h jsonb;
BEGIN
  IF NOT (st ? 'definition') THEN
    RETURN jsonb_build_object('handler', st -> 'handler', 'params', '{}'::jsonb,
                              'retry', coalesce(st -> 'retry', '{"max_attempts": 1}'::jsonb),
                              'timeout_secs', st -> 'timeout_secs', 'missing', false);
  END IF;
  SELECT * INTO d FROM definitions WHERE name = st ->> 'definition';
  IF NOT FOUND OR (d.handler ->> 'kind') = 'workflow' THEN
    RETURN jsonb_build_object('handler', '{"kind": "event"}'::jsonb, 'params', '{}'::jsonb,
                              'retry', '{"max_attempts": 1}'::jsonb, 'timeout_secs', NULL, 'missing', true);
  END IF;
  h := d.handler;
  IF (h ->> 'kind') = 'command' AND d.max_output_bytes IS NOT NULL THEN
    h := jsonb_set(h, '{max_output_bytes}', to_jsonb(d.max_output_bytes));
  END IF;
  RETURN jsonb_build_object('handler', h, 'params', d.params,
                            'retry', coalesce(st -> 'retry', d.retry_policy),
                            'timeout_secs', coalesce(st -> 'timeout_secs', to_jsonb(d.timeout_secs)),
                            'missing', false);
END
$$;

-- Advances workflow run `p_id` (no-op unless it is a RUNNING workflow):
-- creates the steps whose dependencies all SUCCEEDED (at most
-- max_parallel_steps active at once, 1 when serial), with the workflow's
-- params merged with the step's plus `steps.<dep>` = each dependency's
-- result; writes the steps that can never start as SKIPPED
-- (`upstream_failed`, or `workflow_stopped` once a step failed under STOP;
-- `always` steps start when their dependencies have ended, whatever they
-- came to); and ends the workflow run when no step is active and none is
-- left: SUCCEEDED when every step did, else FAILED, or CANCELLED when it
-- was asked to cancel (then no step starts); a FAILED one with attempts
-- left gets its retry. Each step's state is its latest attempt's.
-- Idempotent: it recomputes from the rows.
CREATE FUNCTION sked_workflow_advance(p_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  p runs%ROWTYPE;
  steps jsonb;
  st jsonb;
  nm text;
  latest jsonb;
  n int;
  i int;
  all_ok bool;
  all_ended bool;
  any_bad bool;
  stopped bool;
  cancelling bool;
  cap int;
  active int;
  changed bool;
  go bool;
  skip_reason text;
  now_ts timestamptz := clock_timestamp();
  new_id uuid;
  prm jsonb;
  results jsonb;
  end_state text;
  bad text;
  woke bool := false;
  spec jsonb;
  st_state text;
BEGIN
  SELECT * INTO p FROM runs WHERE id = p_id FOR UPDATE;
  IF NOT FOUND OR p.state <> 'RUNNING' OR (p.handler ->> 'kind') IS DISTINCT FROM 'workflow' THEN
    RETURN;
  END IF;
  steps := p.handler -> 'steps';
  n := jsonb_array_length(steps);
  cancelling := p.cancel_reason IS NOT NULL;
  cap := CASE WHEN coalesce((p.handler ->> 'serial')::bool, false) THEN 1
              ELSE coalesce((p.handler ->> 'max_parallel_steps')::int, n) END;
  SELECT coalesce(jsonb_object_agg(s.step, jsonb_build_object('state', s.state, 'result', s.result)), '{}')
    INTO latest
    FROM (SELECT DISTINCT ON (r.step) r.step, r.state, r.result FROM runs r
          WHERE r.parent_run_id = p_id ORDER BY r.step, r.attempt DESC, r.create_time DESC) s;
  SELECT count(*) INTO active FROM jsonb_each(latest) e
    WHERE e.value ->> 'state' IN ('SCHEDULED', 'QUEUED', 'RUNNING');
  LOOP
    changed := false;
    EXIT WHEN cancelling;
    stopped := coalesce(p.handler ->> 'on_failure', 'STOP') = 'STOP'
               AND EXISTS (SELECT 1 FROM jsonb_each(latest) e
                           WHERE e.value ->> 'state' IN ('FAILED', 'TIMED_OUT', 'CANCELLED'));
    FOR i IN 0 .. n - 1 LOOP
      st := steps -> i;
      nm := st ->> 'name';
      CONTINUE WHEN latest ? nm;
      SELECT coalesce(bool_and(coalesce(latest -> d ->> 'state', '') = 'SUCCEEDED'), true),
             coalesce(bool_and(coalesce(latest -> d ->> 'state', '')
                               IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED')), true),
             coalesce(bool_or(coalesce(latest -> d ->> 'state', '')
                              IN ('FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED')), false)
        INTO all_ok, all_ended, any_bad
        FROM jsonb_array_elements_text(coalesce(st -> 'depends_on', '[]'::jsonb)) d;
      go := false;
      skip_reason := NULL;
      IF coalesce((st ->> 'always')::bool, false) THEN
        go := all_ended;
      ELSIF stopped THEN
        skip_reason := 'workflow_stopped';
      ELSIF any_bad THEN
        skip_reason := 'upstream_failed';
      ELSE
        go := all_ok;
      END IF;
      IF skip_reason IS NOT NULL OR (go AND active < cap) THEN
        -- What the step runs: its handler, or the definition it names as
        -- that definition is now.
        spec := sked_step_spec(st);
        IF skip_reason IS NULL AND (spec ->> 'missing')::bool THEN
          skip_reason := 'definition_missing';
        END IF;
        SELECT coalesce(jsonb_object_agg(d, latest -> d -> 'result'), '{}')
          INTO results
          FROM jsonb_array_elements_text(coalesce(st -> 'depends_on', '[]'::jsonb)) d;
        prm := sked_json_merge(sked_json_merge(spec -> 'params', p.params), coalesce(st -> 'params', '{}'));
        IF results <> '{}'::jsonb THEN
          prm := prm || jsonb_build_object('steps',
                   CASE WHEN jsonb_typeof(prm -> 'steps') = 'object' THEN prm -> 'steps' ELSE '{}'::jsonb END
                   || results);
        END IF;
        -- A step that cannot start ends at once: SKIPPED, or FAILED when
        -- the definition it names is gone (a failure like any other).
        st_state := CASE WHEN skip_reason IS NULL THEN 'QUEUED'
                         WHEN skip_reason = 'definition_missing' THEN 'FAILED'
                         ELSE 'SKIPPED' END;
        new_id := sked_uuid_v7();
        INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state, scheduled_time, not_before,
                          create_time, end_time, handler, params, reason, error_message, last_seq, attempt,
                          max_attempts, retry_policy, timeout_secs, overlap_policy, priority, manual,
                          parent_run_id, step)
        VALUES (new_id, p.tenant_id, p.binding_id, p.definition, 'STEP', st_state, now_ts, now_ts,
                now_ts, CASE WHEN st_state <> 'QUEUED' THEN now_ts END, spec -> 'handler', prm, skip_reason,
                CASE WHEN st_state = 'FAILED' THEN 'no definition ' || (st ->> 'definition') END, 1, 1,
                coalesce((spec -> 'retry' ->> 'max_attempts')::int, 1), spec -> 'retry',
                (spec ->> 'timeout_secs')::int, 'ALLOW', p.priority, p.manual, p_id, nm)
        ON CONFLICT (parent_run_id, step) WHERE parent_run_id IS NOT NULL AND retry_of IS NULL DO NOTHING;
        IF FOUND THEN
          INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
          VALUES (new_id, 1, now_ts, p.tenant_id, p.binding_id, p.definition, 'state_changed',
                  jsonb_build_object('kind', 'state_changed', 'from', NULL, 'to', st_state)
                  || CASE WHEN skip_reason IS NULL THEN '{}'::jsonb
                          ELSE jsonb_build_object('reason', skip_reason) END);
          PERFORM pg_notify('sked_events', 'workflow|' || new_id || ':1:1');
          woke := woke OR st_state = 'QUEUED';
        END IF;
        latest := latest || jsonb_build_object(nm, jsonb_build_object('state', st_state, 'result', NULL));
        IF st_state = 'QUEUED' THEN
          active := active + 1;
        ELSE
          changed := true;
        END IF;
      END IF;
    END LOOP;
    EXIT WHEN NOT changed;
  END LOOP;
  IF woke THEN
    PERFORM pg_notify('sked_runs', '');
  END IF;
  -- The end: nothing active, and every step decided (or a cancel).
  IF active > 0 OR (NOT cancelling AND (SELECT count(*) FROM jsonb_object_keys(latest)) < n) THEN
    RETURN;
  END IF;
  SELECT string_agg(e.key || ' (' || (e.value ->> 'state') || ')', ', ' ORDER BY e.key)
    INTO bad FROM jsonb_each(latest) e WHERE e.value ->> 'state' <> 'SUCCEEDED';
  end_state := CASE WHEN cancelling THEN 'CANCELLED' WHEN bad IS NULL THEN 'SUCCEEDED' ELSE 'FAILED' END;
  UPDATE runs
     SET state = end_state,
         end_time = GREATEST(now_ts, start_time),
         reason = CASE end_state WHEN 'CANCELLED' THEN p.cancel_reason WHEN 'FAILED' THEN 'steps_failed' END,
         error_message = CASE WHEN end_state = 'FAILED' THEN left('steps did not succeed: ' || bad, 500) END,
         result = jsonb_build_object('steps', (SELECT coalesce(jsonb_object_agg(e.key, e.value -> 'result'), '{}')
                                               FROM jsonb_each(latest) e
                                               WHERE e.value ->> 'state' = 'SUCCEEDED')),
         lease_expires_at = NULL,
         last_seq = last_seq + 1
   WHERE id = p_id;
  INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
  VALUES (p_id, p.last_seq + 1, GREATEST(now_ts, p.start_time), p.tenant_id, p.binding_id, p.definition,
          'state_changed',
          jsonb_build_object('kind', 'state_changed', 'from', 'RUNNING', 'to', end_state)
          || CASE end_state WHEN 'CANCELLED' THEN jsonb_build_object('reason', p.cancel_reason)
                            WHEN 'FAILED' THEN jsonb_build_object('reason', 'steps_failed')
                            ELSE '{}'::jsonb END);
  PERFORM pg_notify('sked_events', 'workflow|' || p_id || ':' || (p.last_seq + 1) || ':' || (p.last_seq + 1));
  -- A failed workflow run with attempts left is retried by its own policy,
  -- as a run that fails (NewRun::retry_of): the next attempt, SCHEDULED
  -- after min(initial × coefficient^(attempt−1), max) ± 10 %, while its
  -- binding exists. It starts by taking over the steps that succeeded.
  IF end_state = 'FAILED' AND p.attempt < p.max_attempts
     AND EXISTS (SELECT 1 FROM bindings b WHERE b.id = p.binding_id) THEN
    new_id := sked_uuid_v7();
    now_ts := GREATEST(now_ts, p.start_time)
              + make_interval(secs => least(coalesce((p.retry_policy ->> 'initial_backoff_ms')::float8, 1000)
                                            * power(coalesce((p.retry_policy ->> 'backoff_coefficient')::float8, 2),
                                                    p.attempt - 1),
                                            coalesce((p.retry_policy ->> 'max_backoff_ms')::float8, 100000))
                                      * (1 + (random() * 2 - 1) * 0.1) / 1000);
    INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state, scheduled_time, not_before,
                      create_time, handler, params, last_seq, attempt, retry_of, max_attempts, retry_policy,
                      timeout_secs, overlap_policy, priority, manual)
    VALUES (new_id, p.tenant_id, p.binding_id, p.definition, 'RETRY', 'SCHEDULED', now_ts, now_ts,
            clock_timestamp(), p.handler, p.params, 1, p.attempt + 1, p_id, p.max_attempts, p.retry_policy,
            p.timeout_secs, p.overlap_policy, p.priority, false);
    INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
    VALUES (new_id, 1, clock_timestamp(), p.tenant_id, p.binding_id, p.definition, 'state_changed',
            '{"kind": "state_changed", "from": null, "to": "SCHEDULED"}'::jsonb);
    PERFORM pg_notify('sked_events', 'workflow|' || new_id || ':1:1');
  END IF;
  -- The binding's next run may start now (overlap), or a retry waits.
  PERFORM pg_notify('sked_runs', '');
END
$$;

-- sked_workflow_advance, guarded: a workflow run whose DAG cannot be
-- advanced (unreadable stored steps: planted or corrupt data) ends FAILED
-- with reason `corrupt` instead of failing the transaction that ended its
-- step (which would then never commit). Transient errors (deadlock,
-- serialization, lock or cancel) are raised: that transaction is retried.
CREATE FUNCTION sked_workflow_advance_guarded(p_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  msg text;
  r runs%ROWTYPE;
BEGIN
  BEGIN
    PERFORM sked_workflow_advance(p_id);
  EXCEPTION
    WHEN deadlock_detected OR serialization_failure OR lock_not_available OR query_canceled THEN
      RAISE;
    WHEN OTHERS THEN
      msg := SQLERRM;
      UPDATE runs SET state = 'FAILED', reason = 'corrupt', end_time = GREATEST(clock_timestamp(), start_time),
                      error_message = left('workflow cannot advance: ' || msg, 500), lease_expires_at = NULL,
                      last_seq = last_seq + 1
       WHERE id = p_id AND state = 'RUNNING'
      RETURNING * INTO r;
      IF FOUND THEN
        INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
        VALUES (r.id, r.last_seq, r.end_time, r.tenant_id, r.binding_id, r.definition, 'state_changed',
                '{"kind": "state_changed", "from": "RUNNING", "to": "FAILED", "reason": "corrupt"}'::jsonb);
        PERFORM pg_notify('sked_events', 'workflow|' || r.id || ':' || r.last_seq || ':' || r.last_seq);
      END IF;
  END;
END
$$;

-- A claimed workflow run holds no lease: no node executes it, so no
-- reaper may end it; its steps hold theirs.
CREATE FUNCTION sked_workflow_unlease() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.lease_expires_at := NULL;
  RETURN NEW;
END
$$;
CREATE TRIGGER runs_workflow_unlease BEFORE UPDATE ON runs
FOR EACH ROW WHEN (OLD.state = 'QUEUED' AND NEW.state = 'RUNNING' AND (NEW.handler ->> 'kind') = 'workflow')
EXECUTE FUNCTION sked_workflow_unlease();

-- A workflow run that starts (the claim) creates its first steps in the
-- claim's statement. A retry of a workflow run (RetryRun) first takes
-- over, as SUCCEEDED steps with reason `reused` and the same result, the
-- steps that succeeded in the run it retries: only the others run again.
CREATE FUNCTION sked_workflow_started() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  now_ts timestamptz := clock_timestamp();
BEGIN
  IF NEW.retry_of IS NOT NULL THEN
    WITH prev AS (
      SELECT DISTINCT ON (r.step) r.* FROM runs r
      WHERE r.parent_run_id = NEW.retry_of
      ORDER BY r.step, r.attempt DESC, r.create_time DESC),
    ins AS (
      INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state, scheduled_time, not_before,
                        create_time, start_time, end_time, handler, params, result, reason, last_seq, attempt,
                        max_attempts, retry_policy, timeout_secs, overlap_policy, priority, manual, parent_run_id,
                        step)
      SELECT sked_uuid_v7(), NEW.tenant_id, NEW.binding_id, NEW.definition, 'STEP', 'SUCCEEDED', now_ts, now_ts,
             now_ts, now_ts, now_ts, prev.handler, prev.params, prev.result, 'reused', 1, 1, 1, prev.retry_policy,
             prev.timeout_secs, 'ALLOW', NEW.priority, NEW.manual, NEW.id, prev.step
      FROM prev
      WHERE prev.state = 'SUCCEEDED'
        AND prev.step IN (SELECT s ->> 'name' FROM jsonb_array_elements(NEW.handler -> 'steps') s)
      ON CONFLICT (parent_run_id, step) WHERE parent_run_id IS NOT NULL AND retry_of IS NULL DO NOTHING
      RETURNING id, tenant_id, binding_id, definition)
    INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
    SELECT ins.id, 1, now_ts, ins.tenant_id, ins.binding_id, ins.definition, 'state_changed',
           '{"kind": "state_changed", "from": null, "to": "SUCCEEDED", "reason": "reused"}'::jsonb
    FROM ins;
  END IF;
  PERFORM sked_workflow_advance_guarded(NEW.id);
  RETURN NULL;
END
$$;
CREATE TRIGGER runs_workflow_started AFTER UPDATE ON runs
FOR EACH ROW WHEN (OLD.state = 'QUEUED' AND NEW.state = 'RUNNING' AND (NEW.handler ->> 'kind') = 'workflow')
EXECUTE FUNCTION sked_workflow_started();

-- A step that ended advances its workflow, at commit: by then the retry a
-- finishing attempt may write in the same transaction exists (and is the
-- step's latest attempt).
CREATE FUNCTION sked_step_ended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM sked_workflow_advance_guarded(NEW.parent_run_id);
  RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER runs_step_ended AFTER UPDATE ON runs
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.parent_run_id IS NOT NULL
                   AND NEW.state IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED')
                   AND OLD.state NOT IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED'))
EXECUTE FUNCTION sked_step_ended();
