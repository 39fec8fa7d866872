-- GetRunStats over a month of a busy tenant (issue 15: 1 000 000 runs in
-- <= 100 ms). Summing `run_stats` (one row per binding and hour) reads
-- bindings x hours rows: 720 000 for 1 000 bindings over 30 days. So the
-- rows are folded, in the background, into rows that a window reads a few
-- hundred of:
--
-- * `run_stats` stays what the run-end statements write (migration
--   20261203000100, unchanged: the hot path is untouched) and becomes the
--   *inbox*: rows not folded yet, about one per binding (its current hour)
--   plus any late ends (a run scheduled hours ago that ended since).
-- * The maintenance leader folds (db::runs::run_stats_fold, every few
--   seconds) the inbox rows of past hours: in one statement it deletes them
--   and adds them to `run_stats_binding` (same key: per binding and hour,
--   for one binding's statistics) and to `run_stats_rollup` (per tenant,
--   per definition, per tenant and definition, and hour). Adding is exact
--   (counts, sums, maxima and histograms all add), a row locked by a
--   run-end statement is skipped (folded next time) and one that a fold
--   deleted is written anew by the next run end, so nothing is counted
--   twice or lost, whoever folds and whenever.
-- * GetRunStats reads, in one statement (one snapshot), the folded rows of
--   its scope plus the inbox rows of its scope: a consistent total even
--   while a fold commits.

-- Folded rows of one binding and hour; the columns of run_stats.
CREATE TABLE run_stats_binding (
    binding_id      uuid        NOT NULL,
    hour            timestamptz NOT NULL,
    tenant_id       text        NOT NULL,
    definition      text        NOT NULL,
    succeeded       int         NOT NULL DEFAULT 0,
    failed          int         NOT NULL DEFAULT 0,
    timed_out       int         NOT NULL DEFAULT 0,
    cancelled       int         NOT NULL DEFAULT 0,
    skipped         int         NOT NULL DEFAULT 0,
    started         int         NOT NULL DEFAULT 0,
    duration_sum_us float8      NOT NULL DEFAULT 0,
    duration_max_us bigint      NOT NULL DEFAULT 0,
    lag_max_us      bigint      NOT NULL DEFAULT 0,
    lag_hist        int[]       NOT NULL DEFAULT '{}',
    duration_hist   int[]       NOT NULL DEFAULT '{}',
    PRIMARY KEY (binding_id, hour)
);

-- Folded rows summed over bindings, per hour:
--   (tenant, '', hour)          every binding of the tenant;
--   (tenant, definition, hour)  the tenant's bindings of a definition;
--   ('', definition, hour)      every tenant's bindings of a definition.
-- '' is never a tenant id or a definition name (both are validated
-- non-empty). Counts are int: a tenant ending 10 000 runs a second writes
-- 36 million an hour, far below 2^31.
CREATE TABLE run_stats_rollup (
    tenant_id       text        NOT NULL,
    definition      text        NOT NULL,
    hour            timestamptz NOT NULL,
    succeeded       int         NOT NULL DEFAULT 0,
    failed          int         NOT NULL DEFAULT 0,
    timed_out       int         NOT NULL DEFAULT 0,
    cancelled       int         NOT NULL DEFAULT 0,
    skipped         int         NOT NULL DEFAULT 0,
    started         int         NOT NULL DEFAULT 0,
    duration_sum_us float8      NOT NULL DEFAULT 0,
    duration_max_us bigint      NOT NULL DEFAULT 0,
    lag_max_us      bigint      NOT NULL DEFAULT 0,
    lag_hist        int[]       NOT NULL DEFAULT '{}',
    duration_hist   int[]       NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, definition, hour)
);

-- Histogram h added element-wise to acc (extended with zeros when
-- shorter), in place: plpgsql edits an array variable without copying it,
-- about 10 times faster per call than sked_hist_merge (migration
-- 20261203000100, a SQL function over unnest), which a fold of a month of a
-- busy tenant calls hundreds of thousands of times.
CREATE FUNCTION sked_hist_acc(acc int[], h int[]) RETURNS int[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  m int := cardinality(acc);
  n int := cardinality(h);
BEGIN
  IF m = 0 THEN RETURN h; END IF;
  IF n > m THEN acc := acc || array_fill(0, ARRAY[n - m]); END IF;
  FOR i IN 1..n LOOP
    acc[i] := acc[i] + h[i];
  END LOOP;
  RETURN acc;
END
$$;

-- Element-wise sum of histograms, as an aggregate: the fold sums many
-- rows' histograms.
CREATE AGGREGATE sked_hist_sum(int[]) (
    SFUNC = sked_hist_acc,
    STYPE = int[],
    INITCOND = '{}'
);
