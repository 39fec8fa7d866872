-- What runs came to (issue 15): each binding's status and hourly run
-- statistics, both kept by the statements that end runs, in the same
-- statement or transaction (db::runs, "run-end bookkeeping"), never
-- recomputed on read.

-- A binding's last ended run and its final outcomes. One row per binding
-- that has had a run end; apart from `bindings`, whose rows every scheduler
-- pass reads and locks. The row stays when the binding is deleted (a run may
-- still end after it); it is only read through `bindings`.
CREATE TABLE binding_status (
    binding_id              uuid PRIMARY KEY,
    -- the run that ended last (greatest end_time), SKIPPED runs aside
    last_run_id             uuid,
    last_run_state          text,
    last_run_scheduled_time timestamptz,
    last_run_end_time       timestamptz,
    -- end time of the latest SUCCEEDED run
    last_success_time       timestamptz,
    -- end time of the latest final failure: FAILED or TIMED_OUT with no
    -- retry written for it (a failed attempt that is retried is not final)
    last_failure_time       timestamptz,
    -- final failures since the last SUCCEEDED run (CANCELLED and SKIPPED
    -- runs neither count nor reset)
    consecutive_failures    int NOT NULL DEFAULT 0
) WITH (fillfactor = 50);  -- room for HOT updates: rewritten on every run end
-- Updated all the time, like runs (migration 20261201000021): vacuumed and
-- analyzed after 1 % of it changed, so HOT updates find room on their page.
ALTER TABLE binding_status SET (
    autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.01, autovacuum_analyze_threshold = 1000
);

-- Ended runs per binding and hour of their scheduled_time (UTC), by state,
-- with histograms of fire lag (start_time - scheduled_time) and duration
-- (end_time - start_time) of those that started. GetRunStats sums these
-- rows; it never reads runs.
--
-- Histograms are int arrays; element i (1-based) counts bucket i - 1, and an
-- array ends at its highest non-empty bucket. Bucket 0 holds [0, 1 ms),
-- bucket k >= 1 holds [2^((k-1)/4), 2^(k/4)) ms (4 buckets per doubling, so a
-- bucket's upper bound is at most 19 % above any value in it); bucket 160
-- (2^40 ms, 35 years) also holds everything longer. A negative lag (clocks
-- of nodes apart) counts as 0. src/domain/stats.rs reads them.
CREATE TABLE run_stats (
    binding_id      uuid        NOT NULL,
    hour            timestamptz NOT NULL,
    tenant_id       text        NOT NULL,
    definition      text        NOT NULL,
    succeeded       int         NOT NULL DEFAULT 0,
    failed          int         NOT NULL DEFAULT 0,
    timed_out       int         NOT NULL DEFAULT 0,
    cancelled       int         NOT NULL DEFAULT 0,
    skipped         int         NOT NULL DEFAULT 0,
    -- runs that started (have a lag and a duration): each histogram sums to it
    started         int         NOT NULL DEFAULT 0,
    -- a float: a sum that cannot overflow (exact to 2^53 us, 285 years)
    duration_sum_us float8      NOT NULL DEFAULT 0,
    -- longest duration and lag, capped at 100 years
    duration_max_us bigint      NOT NULL DEFAULT 0,
    lag_max_us      bigint      NOT NULL DEFAULT 0,
    lag_hist        int[]       NOT NULL DEFAULT '{}',
    duration_hist   int[]       NOT NULL DEFAULT '{}',
    PRIMARY KEY (binding_id, hour)
) WITH (fillfactor = 50);  -- room for HOT updates, as binding_status
ALTER TABLE run_stats SET (
    autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.01, autovacuum_analyze_threshold = 1000
);
CREATE INDEX run_stats_tenant ON run_stats (tenant_id, hour);
CREATE INDEX run_stats_definition ON run_stats (definition, hour);

-- The histogram bucket of a lag or duration (see run_stats); NULL for NULL
-- (a run that did not start). Inlined by the planner.
CREATE FUNCTION sked_stats_bucket(d interval) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN d IS NULL THEN NULL
              WHEN d < interval '1 millisecond' THEN 0
              -- 4 * log2(ms), nudged so that an exact power of two (8 ms
              -- = 8000 us) lands in the bucket it starts, not the one
              -- below; no whole microsecond lies that close to a bound.
              ELSE least(160, floor(log(extract(epoch FROM d)::float8 * 1000)
                                    * 13.287712379549449 + 1e-9)::int + 1) END
$$;

-- Histogram h with n added at 1-based position k (extended with zeros when
-- shorter). Inlined: the usual update of a row adds one bucket.
CREATE FUNCTION sked_hist_inc(h int[], k int, n int) RETURNS int[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN k <= cardinality(h) THEN h[:k - 1] || (h[k] + n) || h[k + 1:]
              ELSE h || array_fill(0, ARRAY[k - 1 - cardinality(h)]) || n END
$$;

-- Element-wise sum of two histograms (the rarer update that adds several
-- buckets at once).
CREATE FUNCTION sked_hist_merge(a int[], b int[]) RETURNS int[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT coalesce(array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i), '{}')
  FROM unnest(a, b) WITH ORDINALITY AS u(x, y, i)
$$;

-- The histogram of a list of bucket numbers (NULLs ignored).
CREATE FUNCTION sked_hist_of(buckets int[]) RETURNS int[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT coalesce(array_agg((SELECT count(*) FROM unnest(buckets) x WHERE x = k)::int ORDER BY k), '{}')
  FROM generate_series(0, (SELECT max(x) FROM unnest(buckets) x)) k
$$;
