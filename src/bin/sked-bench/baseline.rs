//! `--baseline FILE`: a previous run's JSON line, and each figure of this
//! run as a ratio to it, so that every change shows what it did.
//!
//! The file may be the JSON line alone or a whole saved bench output
//! (`sked-bench stream > before.txt`): the **last line that parses as a JSON
//! object** is the baseline. Its `scenario` must be the one being run (a
//! clear error before anything starts otherwise). After the table, every
//! numeric figure present in both runs is printed as
//! `latency_p99_ms: 43.2 (baseline 87.7, ×0.49)` (new ÷ old); figures nested
//! in objects are compared by their dotted path (`steps.s1.p99_ms`).
//! Booleans, strings, arrays and figures only one run has are left out.
//! The comparison is printed before the JSON line, so that line stays the
//! last of stdout (and this run's output can be the next baseline).

use std::path::Path;

use anyhow::Context;
use serde_json::{Map, Value};

use crate::report::fmt_num;

/// A previous run's JSON line.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// Where it was read from (for the heading).
    pub source: String,
    /// Its `scenario`.
    pub scenario: String,
    /// Its `figures` (empty when it had none).
    pub figures: Map<String, Value>,
    /// Its `params` (empty when it had none).
    pub params: Map<String, Value>,
}

impl Baseline {
    /// Reads `path` and takes its last line that is a JSON object.
    ///
    /// # Errors
    /// The file cannot be read, has no JSON object line, or that line has
    /// no `scenario` string.
    pub fn load(path: &Path) -> anyhow::Result<Baseline> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--baseline {}: cannot read", path.display()))?;
        Baseline::parse(&text, &path.display().to_string())
    }

    /// [`Baseline::load`] on text already read; `source` names it in errors.
    ///
    /// # Errors
    /// As [`Baseline::load`].
    pub fn parse(text: &str, source: &str) -> anyhow::Result<Baseline> {
        let line = text
            .lines()
            .rev()
            .find_map(|l| match serde_json::from_str::<Value>(l.trim()) {
                Ok(Value::Object(m)) => Some(m),
                _ => None,
            })
            .with_context(|| {
                format!(
                    "--baseline {source}: no line is a JSON object (expected a sked-bench output or its last line)"
                )
            })?;
        let scenario = match line.get("scenario") {
            Some(Value::String(s)) => s.clone(),
            _ => anyhow::bail!("--baseline {source}: its JSON line has no \"scenario\""),
        };
        let object = |k: &str| match line.get(k) {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        Ok(Baseline {
            source: source.to_string(),
            scenario,
            figures: object("figures"),
            params: object("params"),
        })
    }

    /// Errors unless the baseline is of `scenario`.
    ///
    /// # Errors
    /// The baseline's scenario differs.
    pub fn check_scenario(&self, scenario: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.scenario == scenario,
            "--baseline {} is a run of scenario {:?}, not {scenario:?}: its figures cannot be compared",
            self.source,
            self.scenario
        );
        Ok(())
    }

    /// The lines printed after this run's table: a heading, the params that
    /// differ (the ratios then compare different loads), and one line per
    /// figure present in both (see [`compare`]).
    pub fn render(&self, figures: &Map<String, Value>, params: &Map<String, Value>) -> Vec<String> {
        let mut out = vec![format!("\ncompared with baseline {}:", self.source)];
        let mut keys: Vec<&String> = params.keys().chain(self.params.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let (new, old) = (params.get(k), self.params.get(k));
            if new != old {
                let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), Value::to_string);
                out.push(format!(
                    "  note: param {k} is {} here, {} in the baseline",
                    show(new),
                    show(old)
                ));
            }
        }
        let rows = compare(figures, &self.figures);
        if rows.is_empty() {
            out.push("  (no numeric figure in common)".into());
        }
        out.extend(rows.iter().map(|r| format!("  {r}")));
        out
    }
}

/// One figure present in both runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    /// Dotted path inside `figures` (`latency_p99_ms`, `steps.s1.p99_ms`).
    pub path: String,
    /// This run's value.
    pub new: f64,
    /// The baseline's value.
    pub old: f64,
}

impl Ratio {
    /// new ÷ old; `None` when old is 0 (or either is not finite).
    pub fn ratio(&self) -> Option<f64> {
        let r = self.new / self.old;
        (self.old != 0.0 && r.is_finite()).then_some(r)
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ratio = match self.ratio() {
            Some(r) => format!("×{}", fmt_ratio(r)),
            None => "×n/a".into(),
        };
        write!(
            f,
            "{}: {} (baseline {}, {ratio})",
            self.path,
            fmt_num(self.new),
            fmt_num(self.old)
        )
    }
}

/// A ratio with two decimals (three below 0.1), trailing zeros kept so the
/// column reads evenly: ×0.49, ×1.00, ×12.35, ×0.012.
fn fmt_ratio(r: f64) -> String {
    if r != 0.0 && r.abs() < 0.1 {
        format!("{r:.3}")
    } else {
        format!("{r:.2}")
    }
}

/// Every numeric figure of `new` that `old` also has at the same path, in
/// `new`'s order (objects descended into, paths joined with `.`). Integers
/// and floats compare alike; booleans, strings, nulls and arrays are left
/// out.
pub fn compare(new: &Map<String, Value>, old: &Map<String, Value>) -> Vec<Ratio> {
    let mut out = Vec::new();
    walk("", new, old, &mut out);
    out
}

fn walk(prefix: &str, new: &Map<String, Value>, old: &Map<String, Value>, out: &mut Vec<Ratio>) {
    for (k, v) in new {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (v, old.get(k)) {
            (Value::Number(n), Some(Value::Number(o))) => {
                if let (Some(n), Some(o)) = (n.as_f64(), o.as_f64()) {
                    out.push(Ratio {
                        path,
                        new: n,
                        old: o,
                    });
                }
            }
            (Value::Object(n), Some(Value::Object(o))) => walk(&path, n, o, out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn the_last_json_object_line_of_a_saved_output_is_the_baseline() {
        let text = "\
sked-bench stream
metric  value
{\"scenario\":\"stream\",\"figures\":{\"latency_p99_ms\":1.0}}
note: something
{\"scenario\":\"stream\",\"params\":{\"lines\":10},\"figures\":{\"latency_p99_ms\":87.7}}
[1, 2]
not json {
";
        let b = Baseline::parse(text, "before.txt").unwrap();
        assert_eq!(b.scenario, "stream");
        assert_eq!(b.figures.get("latency_p99_ms"), Some(&json!(87.7)));
        assert_eq!(b.params.get("lines"), Some(&json!(10)));
        // A single line works too.
        let b = Baseline::parse("{\"scenario\":\"fire\"}", "x").unwrap();
        assert_eq!(b.scenario, "fire");
        assert!(b.figures.is_empty());
    }

    #[test]
    fn a_file_without_a_json_object_or_scenario_is_an_error() {
        let e = Baseline::parse("hello\n[1]\n", "f.txt").unwrap_err();
        assert!(e.to_string().contains("no line is a JSON object"), "{e}");
        let e = Baseline::parse("{\"figures\":{}}", "f.txt").unwrap_err();
        assert!(e.to_string().contains("no \"scenario\""), "{e}");
    }

    #[test]
    fn a_baseline_of_another_scenario_is_refused() {
        let b = Baseline::parse("{\"scenario\":\"fire\"}", "fire.json").unwrap();
        assert!(b.check_scenario("fire").is_ok());
        let e = b.check_scenario("stream").unwrap_err().to_string();
        assert!(e.contains("\"fire\"") && e.contains("\"stream\""), "{e}");
    }

    #[test]
    fn numeric_figures_in_both_are_compared_by_path() {
        let new = map(json!({
            "latency_p99_ms": 43.2,
            "lines": 200000,
            "only_new": 5,
            "ok": true,
            "state": "SUCCEEDED",
            "missing": null,
            "list": [1, 2],
            "steps": {"s1": {"p99_ms": 10.0, "n": 3}, "s2": {"p99_ms": 4.0}},
            "type_changed": 1.0,
        }));
        let old = map(json!({
            "latency_p99_ms": 87.7,
            "lines": 100000,
            "ok": false,
            "state": "FAILED",
            "missing": 3,
            "list": [1, 2],
            "steps": {"s1": {"p99_ms": 20.0}, "s3": {"p99_ms": 1.0}},
            "type_changed": {"x": 1},
            "only_old": 2,
        }));
        let rows = compare(&new, &old);
        let paths: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["latency_p99_ms", "lines", "steps.s1.p99_ms"]);
        assert_eq!(rows[1].ratio(), Some(2.0));
        assert_eq!(rows[2].ratio(), Some(0.5));
        assert_eq!(
            rows[0].to_string(),
            "latency_p99_ms: 43.2 (baseline 87.7, ×0.49)"
        );
        assert_eq!(
            rows[1].to_string(),
            "lines: 200000 (baseline 100000, ×2.00)"
        );
    }

    #[test]
    fn a_zero_baseline_has_no_ratio() {
        let rows = compare(&map(json!({"x": 3})), &map(json!({"x": 0})));
        assert_eq!(rows[0].ratio(), None);
        assert_eq!(rows[0].to_string(), "x: 3 (baseline 0, ×n/a)");
        let rows = compare(&map(json!({"x": 0})), &map(json!({"x": 0.0})));
        assert_eq!(rows[0].to_string(), "x: 0 (baseline 0, ×n/a)");
    }

    #[test]
    fn render_names_differing_params() {
        let b = Baseline::parse(
            "{\"scenario\":\"stream\",\"params\":{\"lines\":10,\"nodes\":1},\"figures\":{\"p\":2}}",
            "b.json",
        )
        .unwrap();
        let lines = b.render(
            &map(json!({"p": 1})),
            &map(json!({"lines": 20, "nodes": 1, "new": true})),
        );
        assert_eq!(
            lines,
            [
                "\ncompared with baseline b.json:",
                "  note: param lines is 20 here, 10 in the baseline",
                "  note: param new is true here, (absent) in the baseline",
                "  p: 1 (baseline 2, ×0.50)",
            ]
        );
    }
}
