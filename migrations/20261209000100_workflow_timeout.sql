-- A workflow run's own `timeout` (the definition's, or the binding's
-- override): the executor's check (Executor::time_out_workflows) finds a
-- RUNNING workflow run past start_time + timeout, cancels its waiting steps
-- (reason `timeout`), asks its running ones to stop and marks the run with
-- cancel reason `timeout`; the advance that sees its last step end ends it
-- TIMED_OUT (reason `timeout`) instead of CANCELLED, and retries it by its
-- retry policy as it does a FAILED one. Otherwise sked_workflow_advance is as
-- in migration 20261206000200.

-- What the check reads once a second on every node: the running workflow
-- runs that have a timeout (few), not every running run.
CREATE INDEX runs_workflow_timeout ON runs (start_time)
  WHERE state = 'RUNNING' AND timeout_secs IS NOT NULL AND (handler ->> 'kind') = 'workflow';

-- Advances workflow run `p_id` (no-op unless it is a RUNNING workflow):
-- creates the steps whose dependencies all SUCCEEDED (at most
-- max_parallel_steps active at once, 1 when serial), with the workflow's
-- params merged with the step's plus `steps.<dep>` = each dependency's
-- result; writes the steps that can never start as SKIPPED
-- (`upstream_failed`, or `workflow_stopped` once a step failed under STOP;
-- `always` steps start when their dependencies have ended, whatever they
-- came to); and ends the workflow run when no step is active and none is
-- left: SUCCEEDED when every step did, else FAILED, or CANCELLED when it
-- was asked to cancel (then no step starts), TIMED_OUT when the cancel was
-- its own timeout's; a FAILED or TIMED_OUT one with attempts left gets its
-- retry. Each step's state is its latest attempt's.
-- Idempotent: it recomputes from the rows.
CREATE OR REPLACE FUNCTION sked_workflow_advance(p_id uuid) RETURNS void
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
  woke_local bool := false;
  woke_event bool := false;
  woke_worker bool := false;
  ranges text := '';
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
          -- (A notification carries at most 8000 bytes: 100 steps take
          -- about 4 100; flushed early all the same.)
          IF length(ranges) > 7000 THEN
            PERFORM pg_notify('sked_events', 'workflow|' || substr(ranges, 2));
            ranges := '';
          END IF;
          ranges := ranges || ',' || new_id || ':1:1';
          IF st_state = 'QUEUED' THEN
            CASE spec -> 'handler' ->> 'kind'
              WHEN 'event' THEN woke_event := true;
              WHEN 'worker' THEN woke_worker := true;
              ELSE woke_local := true;
            END CASE;
          END IF;
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
  -- The new steps' events in one notification, and which executor loops
  -- may claim them (db::notify::RUNS payload items).
  IF ranges <> '' THEN
    PERFORM pg_notify('sked_events', 'workflow|' || substr(ranges, 2));
  END IF;
  IF woke_local OR woke_event OR woke_worker THEN
    PERFORM pg_notify('sked_runs', concat_ws(',', CASE WHEN woke_worker THEN 'worker' END,
                                                  CASE WHEN woke_local THEN 'local' END,
                                                  CASE WHEN woke_event THEN 'event' END));
  END IF;
  -- The end: nothing active, and every step decided (or a cancel).
  IF active > 0 OR (NOT cancelling AND (SELECT count(*) FROM jsonb_object_keys(latest)) < n) THEN
    RETURN;
  END IF;
  SELECT string_agg(e.key || ' (' || (e.value ->> 'state') || ')', ', ' ORDER BY e.key)
    INTO bad FROM jsonb_each(latest) e WHERE e.value ->> 'state' <> 'SUCCEEDED';
  -- Stopped by its own timeout (the executor's check marks it 'timeout'):
  -- TIMED_OUT, and retried like a failure.
  end_state := CASE WHEN cancelling AND p.cancel_reason = 'timeout' AND p.timeout_secs IS NOT NULL THEN 'TIMED_OUT'
                    WHEN cancelling THEN 'CANCELLED' WHEN bad IS NULL THEN 'SUCCEEDED' ELSE 'FAILED' END;
  UPDATE runs
     SET state = end_state,
         end_time = GREATEST(now_ts, start_time),
         reason = CASE end_state WHEN 'CANCELLED' THEN p.cancel_reason WHEN 'TIMED_OUT' THEN 'timeout'
                                 WHEN 'FAILED' THEN 'steps_failed' END,
         error_message = CASE end_state
                           WHEN 'FAILED' THEN left('steps did not succeed: ' || bad, 500)
                           WHEN 'TIMED_OUT' THEN 'the workflow run outlived its timeout of ' || p.timeout_secs || ' s'
                         END,
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
                            WHEN 'TIMED_OUT' THEN jsonb_build_object('reason', 'timeout')
                            WHEN 'FAILED' THEN jsonb_build_object('reason', 'steps_failed')
                            ELSE '{}'::jsonb END);
  PERFORM pg_notify('sked_events', 'workflow|' || p_id || ':' || (p.last_seq + 1) || ':' || (p.last_seq + 1));
  -- A failed or timed-out workflow run with attempts left is retried by its own policy,
  -- as a run that fails (NewRun::retry_of): the next attempt, SCHEDULED
  -- after min(initial × coefficient^(attempt−1), max) ± 10 %, while its
  -- binding exists. It starts by taking over the steps that succeeded.
  IF end_state IN ('FAILED', 'TIMED_OUT') AND p.attempt < p.max_attempts
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
    PERFORM pg_notify('sked_runs', 'scheduled');
  END IF;
  -- The binding's next run (a workflow run, claimed by the executors) may
  -- start now (overlap), when one waits.
  IF EXISTS (SELECT 1 FROM runs q
             WHERE q.binding_id = p.binding_id AND q.state = 'QUEUED' AND q.parent_run_id IS NULL) THEN
    PERFORM pg_notify('sked_runs', 'local');
  END IF;
END
$$;
