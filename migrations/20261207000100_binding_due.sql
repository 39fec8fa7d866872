-- Each binding's next fire time in a narrow table of its own (fire path
-- cost, issue 18).
--
-- The scheduler advances next_run_time on every fire: 10 000 one-second
-- bindings rewrite 10 000 rows a second. In `bindings` that rewrote the
-- whole wide row (schedule, params, overrides; ~400 bytes) and, since the
-- due index covers the column, added an entry to each of its four indexes
-- (measured: ~49 us of the ~170 us of database time per fired run). Here a
-- row is ~60 bytes with two indexes: ~10 us for the same update.
--
-- Locking, unchanged in effect: whoever changes a binding's next fire time
-- holds that binding's `bindings` row lock and this row's. The scheduler's
-- pass takes both with FOR UPDATE OF b, nd SKIP LOCKED; the API reads a
-- binding to change it with FOR UPDATE OF b, nd (so it waits for a pass
-- and reads the time the pass advanced) and updates both rows. Locking
-- this row in the pass also makes a pass whose snapshot predates another
-- pass's commit re-read the advanced time (EvalPlanQual) instead of firing
-- the binding again.
--
-- Every binding has exactly one row (inserted with the binding, deleted
-- with it); NULL = will not fire again.
CREATE TABLE binding_due (
    binding_id    uuid PRIMARY KEY REFERENCES bindings (id) ON DELETE CASCADE,
    next_run_time timestamptz
) WITH (
    -- rewritten every fire: vacuum early, as the runs queue is
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_analyze_threshold = 1000
);

INSERT INTO binding_due (binding_id, next_run_time) SELECT id, next_run_time FROM bindings;

CREATE INDEX binding_due_time ON binding_due (next_run_time) WHERE next_run_time IS NOT NULL;

DROP INDEX bindings_due;
ALTER TABLE bindings DROP COLUMN next_run_time;
