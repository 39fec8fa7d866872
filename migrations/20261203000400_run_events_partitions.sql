-- run_events partitioned by day (issue 15, retention), so that retention
-- drops a whole day at once instead of deleting rows.
--
-- The partition key is the run id: run ids are UUIDv7, whose first 48 bits
-- are the unix milliseconds of the run's creation (the node's clock), so a
-- day of runs is one range of ids: [floor(day), floor(day + 1)) where
-- floor(d) is the smallest UUID whose 48-bit time prefix is d 00:00 UTC
-- (the rest zero). All of a run's events fall in one partition, the
-- primary key (run_id, seq) stays unique without a new column, and every
-- query that names a run is pruned to one partition.
--
-- Partitions are named run_events_YYYYMMDD (UTC). The default partition
-- run_events_default catches everything else (ids of days without a
-- partition, ids that are not UUIDv7, and the events of runs still within
-- the retention whose day was dropped), so an insert never fails. The
-- functions below are the only DDL sked runs on these tables; every one
-- takes the same transaction-level advisory lock, so nodes never race.

CREATE FUNCTION sked_run_events_day_floor(day date) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (lpad(to_hex((day - DATE '1970-01-01')::bigint * 86400000), 12, '0')
            || '00000000000000000000')::uuid
$$;

-- The UTC creation day of a UUIDv7 (NULL for other versions).
CREATE FUNCTION sked_uuid_v7_day(id uuid) RETURNS date
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN substr(id::text, 15, 1) = '7' THEN
        DATE '1970-01-01'
        + (('x' || lpad(substr(replace(id::text, '-', ''), 1, 12), 16, '0'))::bit(64)::bigint
           / 86400000)::integer
    END
$$;

ALTER TABLE run_events RENAME TO run_events_unpartitioned;
ALTER INDEX run_events_pkey RENAME TO run_events_unpartitioned_pkey;

CREATE TABLE run_events (
    run_id     uuid        NOT NULL,
    seq        bigint      NOT NULL,
    time       timestamptz NOT NULL,
    tenant_id  text        NOT NULL,
    binding_id uuid        NOT NULL,
    definition text        NOT NULL,
    kind       text        NOT NULL,
    payload    jsonb       NOT NULL,
    PRIMARY KEY (run_id, seq)
) PARTITION BY RANGE (run_id);

CREATE TABLE run_events_default PARTITION OF run_events DEFAULT;

-- Creates (and attaches) the partition of `day` unless a table of that
-- name exists; returns whether it did. Rows of that day the default
-- partition caught move into it first. Created as a plain table and then
-- attached: ATTACH takes only SHARE UPDATE EXCLUSIVE on run_events, so
-- writers of other days never wait (the default partition is locked for
-- the moment of the move).
CREATE FUNCTION sked_run_events_create_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := 'run_events_' || to_char(day, 'YYYYMMDD');
    lo   uuid := sked_run_events_day_floor(day);
    hi   uuid := sked_run_events_day_floor(day + 1);
BEGIN
    IF day < DATE '1970-01-02' OR day > DATE '9999-12-30' THEN
        RAISE EXCEPTION 'run_events partition day % out of range', day;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('sked.run_events_partitions'));
    IF to_regclass(quote_ident(part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE run_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
    LOCK TABLE run_events_default IN ACCESS EXCLUSIVE MODE;
    EXECUTE format(
        'WITH m AS (DELETE FROM run_events_default WHERE run_id >= $1 AND run_id < $2 RETURNING *)
         INSERT INTO %I SELECT * FROM m', part) USING lo, hi;
    EXECUTE format('ALTER TABLE run_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lo, hi);
    RETURN true;
END
$$;

-- The day tables: attached partitions and tables detached by retention
-- but not dropped yet (their archive is still to be written), with their
-- size on disk (bytes, indexes included).
CREATE FUNCTION sked_run_events_days()
RETURNS TABLE (day date, attached boolean, bytes bigint)
LANGUAGE sql STABLE AS $$
    SELECT to_date(substr(c.relname::text, 12), 'YYYYMMDD'),
           EXISTS (SELECT 1 FROM pg_inherits i
                   WHERE i.inhrelid = c.oid AND i.inhparent = 'run_events'::regclass),
           pg_total_relation_size(c.oid)
    FROM pg_class c
    WHERE c.relkind = 'r' AND c.relname ~ '^run_events_[0-9]{8}$' AND pg_table_is_visible(c.oid)
    ORDER BY 1
$$;

-- Retention of one day: detaches the partition of `day` and moves back
-- into run_events (the default partition: the day's range is free now)
-- the events of the day's runs that are still within the retention — not
-- ended, or ended at or after `cutoff` — so a run younger than the
-- retention never loses an event. Returns how many events moved, NULL
-- when the day has no attached partition. What is left in the detached
-- table is exactly what retention removes: sked archives it, then drops
-- it (sked_run_events_drop_detached).
--
-- DETACH takes ACCESS EXCLUSIVE on run_events for the transaction: callers
-- set a short lock_timeout and try again later rather than queue writers
-- behind them, and delete the day's old runs first so that the scan of
-- runs below finds few rows.
CREATE FUNCTION sked_run_events_detach(day date, cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    part  text := 'run_events_' || to_char(day, 'YYYYMMDD');
    keep  uuid[];
    moved bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('sked.run_events_partitions'));
    IF NOT EXISTS (SELECT 1 FROM pg_inherits
                   WHERE inhrelid = to_regclass(quote_ident(part))
                     AND inhparent = 'run_events'::regclass) THEN
        RETURN NULL;
    END IF;
    EXECUTE format('ALTER TABLE run_events DETACH PARTITION %I', part);
    -- Under the lock, so no event of the day can be written meanwhile; by
    -- primary key (the day's deletable runs are gone already), and the
    -- events by theirs: nothing here scans the day's events.
    SELECT array_agg(id) INTO keep FROM runs
    WHERE id >= sked_run_events_day_floor(day) AND id < sked_run_events_day_floor(day + 1)
      AND NOT (state IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED')
               AND COALESCE(end_time, create_time) < cutoff);
    IF keep IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format(
        'WITH m AS (DELETE FROM %I WHERE run_id = ANY($1) RETURNING *)
         INSERT INTO run_events SELECT * FROM m', part)
        USING keep;
    GET DIAGNOSTICS moved = ROW_COUNT;
    RETURN moved;
END
$$;

-- Up to `n` events of the detached day table of `day` after (after_run,
-- after_seq), in (run_id, seq) order: the archive reads it page by page.
CREATE FUNCTION sked_run_events_detached_page(day date, after_run uuid, after_seq bigint, n integer)
RETURNS SETOF run_events
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT * FROM %I WHERE (run_id, seq) > ($1, $2) ORDER BY run_id, seq LIMIT $3',
        'run_events_' || to_char(day, 'YYYYMMDD'))
        USING after_run, after_seq, n;
END
$$;

-- Drops the detached day table of `day`; false when there is none. Refuses
-- an attached partition (detach it first).
CREATE FUNCTION sked_run_events_drop_detached(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := 'run_events_' || to_char(day, 'YYYYMMDD');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('sked.run_events_partitions'));
    IF to_regclass(quote_ident(part)) IS NULL THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_inherits
               WHERE inhrelid = to_regclass(quote_ident(part))
                 AND inhparent = 'run_events'::regclass) THEN
        RAISE EXCEPTION 'run_events partition % is attached: detach it first', part;
    END IF;
    EXECUTE format('DROP TABLE %I', part);
    RETURN true;
END
$$;

-- The existing events move into their days: one partition per UTC day
-- their run ids name (within the last ten years), today's and the next
-- seven days' (so a fresh node can write at once); ids of other days or
-- versions go to the default partition.
DO $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    d date;
BEGIN
    FOR d IN
        SELECT g::date FROM generate_series(today, today + 7, interval '1 day') AS g
        UNION
        SELECT DISTINCT sked_uuid_v7_day(run_id) FROM run_events_unpartitioned
        WHERE sked_uuid_v7_day(run_id) BETWEEN today - 3660 AND today + 7
    LOOP
        PERFORM sked_run_events_create_partition(d);
    END LOOP;
END
$$;

INSERT INTO run_events SELECT * FROM run_events_unpartitioned;
DROP TABLE run_events_unpartitioned;
