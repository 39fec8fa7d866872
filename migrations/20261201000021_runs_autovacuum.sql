-- runs is a queue: every run is inserted, updated two or three times and
-- leaves the QUEUED partial indexes. PostgreSQL's defaults vacuum and
-- analyze a table after 20 % / 10 % of it changed, which for a large table
-- lets dead index entries and stale statistics (after a burst of backfilled
-- runs) pile up for long: claims then walk dead entries, and plans made from
-- the old statistics read the whole queue. Vacuum and analyze after 1 % (at
-- least 1000 rows) instead, as queue tables are usually tuned.
ALTER TABLE runs SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_analyze_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_vacuum_insert_threshold = 1000
);
