//! The PostgreSQL `LISTEN/NOTIFY` channels nodes use to wake each other
//! (`docs/architecture.md`): every statement that notifies binds one of
//! these names, and the bridge (`events::bridge`) listens on all of them.

/// New run events: payload `<node_id>|<run_id>:<from_seq>:<to_seq>[,...]`.
pub const EVENTS: &str = "sked_events";
/// "Runs are queued" (or a slot freed up), for the executors; empty payload.
pub const RUNS: &str = "sked_runs";
/// Cancel requests for running runs (payload: `<run id>|<reason>`), so the
/// node executing the run stops it.
pub const CANCEL: &str = "sked_cancel";
/// Binding changes (empty payload), so schedulers recompute their next
/// wake-up.
pub const BINDINGS: &str = "sked_bindings";

/// Every channel, in the order the bridge listens on them.
pub const ALL: [&str; 4] = [EVENTS, RUNS, BINDINGS, CANCEL];
