-- Nodes and the maintenance leader (issue 15).
--
-- Every node upserts its row every few seconds (src/cluster.rs): what it
-- runs, whether it drains. `heartbeat_time` is the database's clock, so
-- nodes whose clocks disagree still agree on who is stale. The leader
-- prunes rows whose heartbeat is long gone; a node that stops cleanly
-- deletes its own.
CREATE TABLE nodes (
    node_id            text        PRIMARY KEY,
    version            text        NOT NULL,
    -- the node's own clock, when it started
    start_time         timestamptz NOT NULL,
    -- the database's clock (clock_timestamp()) at the last heartbeat
    heartbeat_time     timestamptz NOT NULL,
    -- runs it executes, and runs its connected workers hold
    running_runs       integer     NOT NULL DEFAULT 0,
    -- its TailRun / WatchEvents subscriptions
    stream_subscribers integer     NOT NULL DEFAULT 0,
    draining           boolean     NOT NULL DEFAULT false
);

-- One row per leadership ('maintenance'): who holds the lease, until when
-- (the database's clock), and its term, which grows by one each time the
-- lease changes hands or is taken again after it lapsed. A node acts as
-- leader only while it holds an unexpired lease, and stops acting before
-- the lease can expire when it cannot renew it.
CREATE TABLE leader_leases (
    name         text        PRIMARY KEY,
    node_id      text        NOT NULL,
    term         bigint      NOT NULL,
    acquire_time timestamptz NOT NULL,
    expire_time  timestamptz NOT NULL
);
