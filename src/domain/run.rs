//! Run vocabulary shared by the scheduler, the executor, the API and the
//! database layer: why sked itself skipped, cancelled or ended a run.

/// Why sked skipped, cancelled or ended a run, as stored in `runs.reason`,
/// `runs.cancel_reason` and `state_changed` events (glossary: "reason").
///
/// The stored text ([`RunReason::as_str`]) is fixed: rows written by older
/// nodes keep parsing. A reason column may also hold free text that is not
/// one of these (a failed attempt's message, a CancelRun caller's reason);
/// [`RunReason::parse`] answers `None` for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunReason {
    /// A fire skipped, or a run cancelled, by the binding's overlap policy.
    Overlap,
    /// A fire time that passed while no node could fire it, outside the
    /// catch-up window (a summary row starts with `misfire:` too).
    Misfire,
    /// A fire skipped because its tenant's hourly budget was spent.
    Quota,
    /// Runs a DeleteBinding (or a forced DeleteDefinition) ended: waiting
    /// ones `CANCELLED` at once, running ones cancelled on their node. Not
    /// retried.
    BindingDeleted,
    /// Runs cancelled by their node's shutdown (retried per policy).
    Shutdown,
    /// Runs whose node stopped renewing their lease, ended `FAILED` by a
    /// reaper (retried per policy).
    NodeLost,
    /// A run ended `FAILED` because its stored data cannot be read (not
    /// retried: its policy cannot be read either).
    Corrupt,
    /// A run that outlived its timeout (`TIMED_OUT`).
    Timeout,
    /// A CancelRun that gave no reason of its own.
    Cancelled,
    /// A run this node stopped because another node's reaper took it; the
    /// reaper's state stands, so this text is never stored.
    LeaseLost,
}

impl RunReason {
    /// Every reason, for tests and exhaustive lookups.
    pub const ALL: [RunReason; 10] = [
        RunReason::Overlap,
        RunReason::Misfire,
        RunReason::Quota,
        RunReason::BindingDeleted,
        RunReason::Shutdown,
        RunReason::NodeLost,
        RunReason::Corrupt,
        RunReason::Timeout,
        RunReason::Cancelled,
        RunReason::LeaseLost,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            RunReason::Overlap => "overlap",
            RunReason::Misfire => "misfire",
            RunReason::Quota => "quota",
            RunReason::BindingDeleted => "binding_deleted",
            RunReason::Shutdown => "shutdown",
            RunReason::NodeLost => "node_lost",
            RunReason::Corrupt => "corrupt",
            RunReason::Timeout => "timeout",
            RunReason::Cancelled => "cancelled",
            RunReason::LeaseLost => "lease lost",
        }
    }

    /// Parses the stored text; `None` for free text (a failure message, a
    /// caller's cancel reason).
    pub fn parse(s: &str) -> Option<RunReason> {
        RunReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for RunReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_round_trips_and_is_unchanged() {
        for r in RunReason::ALL {
            assert_eq!(RunReason::parse(r.as_str()), Some(r));
        }
        // Existing rows hold these spellings; they must never change.
        assert_eq!(RunReason::NodeLost.as_str(), "node_lost");
        assert_eq!(RunReason::BindingDeleted.as_str(), "binding_deleted");
        assert_eq!(RunReason::parse("exit code 1"), None);
    }
}
