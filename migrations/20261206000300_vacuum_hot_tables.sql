-- Tables rewritten at the fire rate: every fire updates its binding's
-- next_run_time (an indexed column, so never a HOT update) and its status
-- row, and every run end appends a run_stats_delta row that a fold deletes
-- seconds later. At 10 000 one-second bindings that is 10 000 dead tuples a
-- second in `bindings`; with the default thresholds (20 % of the table)
-- autovacuum came once a minute at best, `bindings` grew to 45 MB for 10 000
-- rows, its due index kept growing, and the scheduler's due-binding read
-- (an index scan from the oldest next_run_time) slowed to ~4 ms. Vacuum
-- them after a fixed number of dead tuples instead. How often autovacuum
-- looks at all is the server's autovacuum_naptime (the embedded server sets
-- 1 s; docs/operations.md, "PostgreSQL settings").
ALTER TABLE bindings SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);
ALTER TABLE binding_status SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);
ALTER TABLE run_stats_delta SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000);
