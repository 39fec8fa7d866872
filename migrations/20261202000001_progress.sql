-- Progress a run reports (issue 14): the latest `::progress` line of a
-- command, or a worker's ReportProgress, as the domain's Progress JSON
-- ({"percent", "current_step", "total_steps", "message"}). NULL until the run
-- reports any. Written in the statement that appends the progress event, so
-- it costs no extra round trip. Nullable without a default: adding it
-- rewrites nothing.
ALTER TABLE runs ADD COLUMN progress jsonb;
