-- Defence in depth (issue 12).
--
-- A binding whose stored data cannot be read or computed (a timestamp outside
-- years 1-9999, a schedule or policy document that does not decode, a
-- schedule that cannot be evaluated) is taken out of the due set by the
-- scheduler: next_run_time becomes NULL and broken_reason says why. It can
-- still be read and deleted through the API. NULL = healthy.
ALTER TABLE bindings ADD COLUMN broken_reason text;

-- Per-run cap on stored log output, in bytes (1 KiB - 1 GiB); NULL = the
-- default (64 MiB). Past it lines are counted, not stored.
ALTER TABLE definitions ADD COLUMN max_output_bytes bigint;
