-- The reaper ends worker runs nobody took within their schedule-to-start
-- timeout (db::runs::run_fail_no_worker). It read the queued worker runs
-- in not_before order and tested each run's own deadline, so every reap
-- of every node read the whole worker backlog (35 ms at 100 000 runs
-- waiting for workers of 24-hour timeouts, to end none of them). Keyed by
-- the deadline itself, a reap reads only the runs past it.
--
-- A run's deadline: when it became due (not_before) or, if it was created
-- later (a backfill of past fire times, a catch-up after an outage), when
-- it was created; plus its handler's schedule_to_start_secs, or
-- domain::DEFAULT_SCHEDULE_TO_START_SECS (600; a test compares them).
-- Counted from not_before alone, a backfill of last week's fire times
-- ended FAILED no_worker at the first reap, workers or not.
-- Computed in UTC timestamps (timestamp + interval is immutable, where
-- timestamptz + interval depends on the session's time zone), so the body
-- is immutable as declared and PostgreSQL inlines it: no function call per
-- index entry. A value that is not a number counts as absent and any
-- number (read exactly, as numeric: 1e400 does not overflow) is held to
-- 0 ..= 366 days, so no stored handler can make a write of a run fail
-- here.
CREATE FUNCTION sked_start_deadline(not_before timestamptz, create_time timestamptz, handler jsonb)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT ((GREATEST(not_before, create_time) AT TIME ZONE 'UTC')
          + make_interval(secs => least(greatest(
              coalesce(CASE WHEN jsonb_typeof(handler -> 'schedule_to_start_secs') = 'number'
                            THEN (handler -> 'schedule_to_start_secs')::numeric END, 600), 0), 31622400)::float8))
         AT TIME ZONE 'UTC'
$$;

DROP INDEX runs_queued_worker;
CREATE INDEX runs_queued_worker ON runs (sked_start_deadline(not_before, create_time, handler))
    WHERE state = 'QUEUED' AND (handler ->> 'kind') = 'worker';
