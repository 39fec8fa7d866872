//! The PostgreSQL `LISTEN/NOTIFY` channels nodes use to wake each other
//! (`docs/architecture.md`): every statement that notifies binds one of
//! these names, and the bridge (`events::bridge`) listens on all of them.

/// New run events: payload `<node_id>|<run_id>:<from_seq>:<to_seq>[,...]`.
pub const EVENTS: &str = "sked_events";
/// "Runs are waiting" (queued, or a slot freed up), for the executors and
/// the worker dispatch. Payload: which runs, a comma-separated subset of
/// [`RUNS_SCHEDULED`], [`RUNS_WORKER`], [`RUNS_LOCAL`] and [`RUNS_EVENT`];
/// empty means any
/// (every listener looks), so a node wakes only the loop that can act.
/// A sender that has woken its own loops appends `@<its node id>`, and its
/// own bridge ignores the notification (`db::runs::Waiting::payload_from`).
pub const RUNS: &str = "sked_runs";
/// [`RUNS`] payload item: `SCHEDULED` runs were written; executors
/// recompute when to promote them (no claim). As
/// `scheduled:<microseconds since the Unix epoch>` it names when the first
/// is due, and executors need not read it (`db::runs::Waiting::parse`).
pub const RUNS_SCHEDULED: &str = "scheduled";
/// [`RUNS`] payload item: `QUEUED` runs of `worker` handlers; the worker
/// dispatch claims.
pub const RUNS_WORKER: &str = "worker";
/// [`RUNS`] payload item: `QUEUED` runs a node executes itself (every
/// other handler but `event`); the executors claim.
pub const RUNS_LOCAL: &str = "local";
/// [`RUNS`] payload item: `QUEUED` runs of `event` handlers; the
/// executors' event claim loops complete them.
pub const RUNS_EVENT: &str = "event";
/// Cancel requests for running runs (payload: `<run id>|<reason>`), so the
/// node executing the run stops it.
pub const CANCEL: &str = "sked_cancel";
/// Binding changes (empty payload), so schedulers recompute their next
/// wake-up.
pub const BINDINGS: &str = "sked_bindings";

/// Every channel, in the order the bridge listens on them.
pub const ALL: [&str; 4] = [EVENTS, RUNS, BINDINGS, CANCEL];
