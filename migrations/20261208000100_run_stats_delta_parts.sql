-- Run ends waiting to be folded into the statistics, in 8 partitions by
-- binding (PostgreSQL hash partitioning), so the fold can move them one
-- partition at a time.
--
-- Every node moved the whole table into `run_stats` every 5 s in one
-- statement (db::runs::run_stats_delta_fold). Firing 10 000 one-second
-- bindings, that is 50 000 rows: 0.4-0.9 s of one PostgreSQL core in one
-- go, during which the firing passes had one core less and fell behind
-- (fire lag p99 250-514 ms; 107-152 ms moving by partition, in
-- alternating runs on a 2-core machine). Moving the
-- rows of one partition per statement, with a pause as long as the
-- statement after each, bounds that to a few tens of milliseconds at a
-- time. Slicing by binding keeps each binding's rows in one statement, so
-- a binding's `run_stats` row is still updated once per move (slicing by
-- insertion order would update it in every slice).
--
-- The run-end statements insert into the parent as before (PostgreSQL
-- routes each row by its binding); readers select from the parent, and a
-- read of one binding touches one partition.
ALTER TABLE run_stats_delta RENAME TO run_stats_delta_unsliced;

CREATE TABLE run_stats_delta (
    binding_id  uuid        NOT NULL,
    -- hour of the run's scheduled_time (UTC)
    hour        timestamptz NOT NULL,
    tenant_id   text        NOT NULL,
    definition  text        NOT NULL,
    -- SUCCEEDED, FAILED, TIMED_OUT, CANCELLED or SKIPPED
    state       text        NOT NULL,
    -- sked_stats_bucket of the fire lag and duration; NULL when the run
    -- never started
    lag_b       int,
    dur_b       int,
    -- microseconds, capped at 100 years; NULL when the run never started
    lag_us      bigint,
    dur_us      bigint
) PARTITION BY HASH (binding_id);

-- Partition i is run_stats_delta_<i>; db::runs::RUN_STATS_DELTA_PARTS
-- must match the modulus.
DO $$
BEGIN
  FOR i IN 0..7 LOOP
    EXECUTE format(
      'CREATE TABLE run_stats_delta_%s PARTITION OF run_stats_delta
         FOR VALUES WITH (MODULUS 8, REMAINDER %s)
         WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
               autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000)',
      i, i);
  END LOOP;
END
$$;

INSERT INTO run_stats_delta SELECT * FROM run_stats_delta_unsliced;
DROP TABLE run_stats_delta_unsliced;
