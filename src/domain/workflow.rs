//! Workflows (`docs/semantics.md`, "Workflows"): a definition whose handler
//! is a DAG of named steps. Each step is a handler of its own (command,
//! http, worker or event) with `depends_on`, params, retry policy, timeout
//! and `always`. A workflow run is a run; its steps are child runs created
//! by the database as their dependencies end (migration
//! `20261205000200_workflows.sql`). Here: the shape and its validation
//! (unknown, duplicate and self dependencies and cycles are refused naming
//! the steps, e.g. `steps: a → b → a`).

use serde::{Deserialize, Serialize};

use super::policy::RetryPolicy;
use super::{FieldViolation, Handler, quote};

/// Most steps in one workflow.
pub const MAX_STEPS: usize = 100;
/// Longest step name, bytes (`[a-z0-9][a-z0-9_-]{0,63}`).
pub const MAX_STEP_NAME: usize = 64;
/// Most parallel steps a workflow may ask for (`max_parallel_steps`).
pub const MAX_PARALLEL_STEPS: u32 = 100;
/// Largest step params, bytes of compact JSON: 16 KiB.
pub const MAX_STEP_PARAMS_BYTES: usize = 16 * 1024;
/// Longest step timeout, seconds: 7 days.
pub const MAX_STEP_TIMEOUT_SECS: u32 = 7 * 86_400;

/// What a failed step does to the rest of the workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OnFailure {
    /// No new step starts (`always` steps aside); running ones finish; the
    /// others end `SKIPPED` (`workflow_stopped`); the workflow ends `FAILED`.
    #[default]
    Stop,
    /// Steps that do not depend on the failed one go on; its dependents end
    /// `SKIPPED` (`upstream_failed`); the workflow ends `FAILED`.
    Continue,
}

/// The `workflow` handler: steps and how they run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowHandler {
    /// 1 to [`MAX_STEPS`] steps, unique names, no cycle.
    pub steps: Vec<WorkflowStep>,
    /// What a failed step does to the others.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Most steps active (waiting or running) at once, 1 to
    /// [`MAX_PARALLEL_STEPS`]; `None` = no bound but the step count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_steps: Option<u32>,
    /// One step at a time, in the order given (among the ready ones).
    #[serde(default)]
    pub serial: bool,
}

// Handlers hold f64s (retry coefficients) only through steps: equality is
// the derived one, Eq asserted for `Handler`'s derive.
impl Eq for WorkflowHandler {}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowStep {
    /// `[a-z0-9][a-z0-9_-]{0,63}`, unique in the workflow.
    pub name: String,
    /// How it executes: command, http, worker or event (not a workflow);
    /// `None` for a step that runs another definition (`definition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<Box<Handler>>,
    /// Another definition the step runs (exactly one of `handler` and
    /// `definition`): its handler, params (under the workflow's and the
    /// step's), retry policy and timeout (unless the step sets its own),
    /// read when the step is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// Steps that must all `SUCCEED` before it starts (names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Its params (a JSON object), merged over the workflow run's.
    #[serde(default = "empty_object")]
    pub params: serde_json::Value,
    /// Its retry policy; `None` = one attempt (a `definition` step: that
    /// definition's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Its attempt's timeout, seconds; `None` = none (a `definition` step:
    /// that definition's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
    /// Runs once its dependencies have ended, whatever they came to (and
    /// under `STOP` too): cleanup. Not after a cancel.
    #[serde(default)]
    pub always: bool,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// Checks a step name: `[a-z0-9][a-z0-9_-]{0,63}`.
///
/// # Errors
/// A violation on `field`.
pub fn validate_step_name(field: &str, name: &str) -> Result<(), FieldViolation> {
    if name.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_rest = name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'));
    if !(ok_first && ok_rest) || name.len() > MAX_STEP_NAME {
        return Err(FieldViolation::new(
            field,
            format!("{} must match [a-z0-9][a-z0-9_-]{{0,63}}", quote(name)),
        ));
    }
    Ok(())
}

impl WorkflowHandler {
    /// Checks the workflow; `prefix` is the handler's API path (e.g.
    /// `definition.workflow`).
    ///
    /// # Errors
    /// The first violation: step count, a name, a duplicate
    /// (`steps[2].name: "a" is also steps[0]`), a step's handler, params,
    /// retry policy or timeout, an unknown or self dependency, or a cycle
    /// (`<prefix>.steps: cycle a → b → a`).
    pub fn validate(&self, prefix: &str) -> Result<(), FieldViolation> {
        let steps_field = format!("{prefix}.steps");
        if self.steps.is_empty() {
            return Err(FieldViolation::new(
                steps_field,
                "at least one step is required",
            ));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(FieldViolation::new(
                steps_field,
                format!("has {} steps; at most {MAX_STEPS}", self.steps.len()),
            ));
        }
        if let Some(n) = self.max_parallel_steps
            && !(1..=MAX_PARALLEL_STEPS).contains(&n)
        {
            return Err(FieldViolation::new(
                format!("{prefix}.max_parallel_steps"),
                format!("{n} is outside 1 ..= {MAX_PARALLEL_STEPS}"),
            ));
        }
        let mut index = std::collections::HashMap::new();
        for (i, s) in self.steps.iter().enumerate() {
            let f = format!("{steps_field}[{i}]");
            validate_step_name(&format!("{f}.name"), &s.name)?;
            if let Some(j) = index.insert(s.name.as_str(), i) {
                return Err(FieldViolation::new(
                    format!("{f}.name"),
                    format!(
                        "duplicate step name {}: steps[{j}] has it too",
                        quote(&s.name)
                    ),
                ));
            }
            match (&s.handler, &s.definition) {
                (Some(h), None) => {
                    if matches!(**h, Handler::Workflow(_)) {
                        return Err(FieldViolation::new(
                            format!("{f}.handler"),
                            "a step cannot be a workflow (depth at most 1): use command, http, worker, event or definition",
                        ));
                    }
                    h.validate(&f)?;
                }
                (None, Some(d)) => super::validate_definition_name(&format!("{f}.definition"), d)?,
                _ => {
                    return Err(FieldViolation::new(
                        format!("{f}.handler"),
                        "exactly one of command, event, http, worker or definition is required",
                    ));
                }
            }
            if !s.params.is_object() {
                return Err(FieldViolation::new(
                    format!("{f}.params"),
                    "must be a JSON object",
                ));
            }
            let len = serde_json::to_vec(&s.params).map_or(usize::MAX, |v| v.len());
            if len > MAX_STEP_PARAMS_BYTES {
                return Err(FieldViolation::new(
                    format!("{f}.params"),
                    format!("is {len} bytes of JSON; at most {MAX_STEP_PARAMS_BYTES} (16 KiB)"),
                ));
            }
            if let Some(r) = &s.retry {
                r.validate(&format!("{f}.retry_policy"))?;
            }
            if let Some(t) = s.timeout_secs
                && !(1..=MAX_STEP_TIMEOUT_SECS).contains(&t)
            {
                return Err(FieldViolation::new(
                    format!("{f}.timeout"),
                    format!("{t} s is outside 1 s ..= 7 days"),
                ));
            }
            if s.depends_on.len() > MAX_STEPS {
                return Err(FieldViolation::new(
                    format!("{f}.depends_on"),
                    format!("has {} names; at most {MAX_STEPS}", s.depends_on.len()),
                ));
            }
        }
        for (i, s) in self.steps.iter().enumerate() {
            let f = format!("{steps_field}[{i}].depends_on");
            let mut seen = std::collections::HashSet::new();
            for d in &s.depends_on {
                if d == &s.name {
                    return Err(FieldViolation::new(
                        steps_field,
                        format!("step {} depends on itself: {d} → {d}", quote(&s.name)),
                    ));
                }
                if !index.contains_key(d.as_str()) {
                    return Err(FieldViolation::new(
                        f,
                        format!(
                            "step {} depends on unknown step {}",
                            quote(&s.name),
                            quote(d)
                        ),
                    ));
                }
                if !seen.insert(d.as_str()) {
                    return Err(FieldViolation::new(
                        f,
                        format!("step {} lists {} twice", quote(&s.name), quote(d)),
                    ));
                }
            }
        }
        if let Some(cycle) = self.find_cycle(&index) {
            return Err(FieldViolation::new(
                steps_field,
                format!("cycle {}", cycle.join(" → ")),
            ));
        }
        Ok(())
    }

    /// A dependency cycle as step names, first name repeated at the end
    /// (`[a, b, a]`), following `depends_on` edges; `None` for a DAG.
    fn find_cycle(&self, index: &std::collections::HashMap<&str, usize>) -> Option<Vec<String>> {
        // 0 = unvisited, 1 = on the stack, 2 = done. Iterative DFS (100 steps
        // at most, but no recursion on user input anyway).
        let n = self.steps.len();
        let mut color = vec![0u8; n];
        for root in 0..n {
            if color[root] != 0 {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
            color[root] = 1;
            while let Some(&mut (v, ref mut next)) = stack.last_mut() {
                let deps = &self.steps[v].depends_on;
                if *next < deps.len() {
                    let w = index[deps[*next].as_str()];
                    *next += 1;
                    match color[w] {
                        0 => {
                            color[w] = 1;
                            stack.push((w, 0));
                        }
                        1 => {
                            let from = stack.iter().position(|(x, _)| *x == w).unwrap_or(0);
                            let mut names: Vec<String> = stack[from..]
                                .iter()
                                .map(|(x, _)| self.steps[*x].name.clone())
                                .collect();
                            names.push(self.steps[w].name.clone());
                            return Some(names);
                        }
                        _ => {}
                    }
                } else {
                    color[v] = 2;
                    stack.pop();
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, deps: &[&str]) -> WorkflowStep {
        WorkflowStep {
            name: name.into(),
            handler: Some(Box::new(Handler::Event)),
            definition: None,
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            params: serde_json::json!({}),
            retry: None,
            timeout_secs: None,
            always: false,
        }
    }

    fn wf(steps: Vec<WorkflowStep>) -> WorkflowHandler {
        WorkflowHandler {
            steps,
            on_failure: OnFailure::Stop,
            max_parallel_steps: None,
            serial: false,
        }
    }

    #[test]
    fn a_diamond_is_valid() {
        let w = wf(vec![
            step("a", &[]),
            step("b", &["a"]),
            step("c", &["a"]),
            step("d", &["b", "c"]),
        ]);
        assert_eq!(w.validate("definition.workflow"), Ok(()));
    }

    #[test]
    fn cycles_unknown_self_and_duplicates_are_named() {
        let e = wf(vec![step("a", &["b"]), step("b", &["a"])])
            .validate("w")
            .unwrap_err();
        assert_eq!(e.field, "w.steps");
        assert!(e.reason.contains("a → b → a"), "{e}");
        let e = wf(vec![
            step("a", &[]),
            step("b", &["c"]),
            step("c", &["d"]),
            step("d", &["b"]),
        ])
        .validate("w")
        .unwrap_err();
        assert!(e.reason.contains("b → c → d → b"), "{e}");
        let e = wf(vec![step("a", &["a"])]).validate("w").unwrap_err();
        assert!(e.reason.contains("a → a"), "{e}");
        let e = wf(vec![step("a", &["zz"])]).validate("w").unwrap_err();
        assert_eq!(e.field, "w.steps[0].depends_on");
        assert!(e.reason.contains("\"zz\""), "{e}");
        let e = wf(vec![step("a", &[]), step("a", &[])])
            .validate("w")
            .unwrap_err();
        assert_eq!(e.field, "w.steps[1].name");
        let e = wf(vec![]).validate("w").unwrap_err();
        assert_eq!(e.field, "w.steps");
        let e = wf((0..101).map(|i| step(&format!("s{i}"), &[])).collect())
            .validate("w")
            .unwrap_err();
        assert!(e.reason.contains("at most 100"), "{e}");
        let e = wf(vec![step("A", &[])]).validate("w").unwrap_err();
        assert_eq!(e.field, "w.steps[0].name");
    }

    #[test]
    fn steps_round_trip_as_json() {
        let w = wf(vec![step("a", &[]), step("b", &["a"])]);
        let h = Handler::Workflow(w);
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["kind"], "workflow");
        assert_eq!(v["steps"][0]["handler"]["kind"], "event");
        let back: Handler = serde_json::from_value(v).unwrap();
        assert_eq!(back, h);
    }
}
