//! The output: a readable table (metric, value, unit, target, verdict) and
//! the final JSON line with every figure.

use serde_json::{Map, Value, json};
use sqlx::PgPool;

use crate::baseline::Baseline;
use crate::env::CpuUse;
use crate::stats::round;

/// The machine the bench ran on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// PostgreSQL server version, e.g. "15.20".
    pub postgres: String,
    /// `"embedded"` or `"url"`.
    pub database: &'static str,
    /// The server's `autovacuum` setting (`"on"`/`"off"`): without it the
    /// firing tables bloat within a run and every figure is slower.
    pub autovacuum: String,
    /// Whether the bench's own connection is TLS-encrypted (`pg_stat_ssl`):
    /// the nodes connect with the same URL, so each round trip pays it.
    pub tls: bool,
}

impl Machine {
    /// Reads the CPU description and asks the server for its version.
    pub async fn read(pool: &PgPool, database: &'static str) -> Machine {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let postgres = sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(pool)
            .await
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_else(|_| "unknown".into());
        let autovacuum = sqlx::query_scalar::<_, String>("SHOW autovacuum")
            .fetch_one(pool)
            .await
            .unwrap_or_else(|_| "unknown".into());
        let tls = sqlx::query_scalar::<_, bool>(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
        )
        .fetch_one(pool)
        .await
        .unwrap_or(false);
        if autovacuum != "on" {
            eprintln!(
                "sked-bench: warning: the server runs with autovacuum {autovacuum}: the firing tables bloat during the run and the figures are not comparable"
            );
        }
        if tls {
            eprintln!(
                "sked-bench: note: connections to the server use TLS (add sslmode=disable to the URL to measure without it)"
            );
        }
        Machine {
            cpus,
            cpu_model,
            postgres,
            database,
            autovacuum,
            tls,
        }
    }
}

/// What a figure is held against.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// No target: reported for information.
    Info,
    /// Met when value ≥ bound.
    AtLeast(f64),
    /// Met when value ≤ bound.
    AtMost(f64),
    /// Met when value < bound.
    Below(f64),
    /// Met when value = bound.
    Equal(f64),
}

impl Target {
    fn describe(&self, unit: &str) -> String {
        let u = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        match self {
            Target::Info => String::new(),
            Target::AtLeast(b) => format!("≥ {}{u}", fmt_num(*b)),
            Target::AtMost(b) => format!("≤ {}{u}", fmt_num(*b)),
            Target::Below(b) => format!("< {}{u}", fmt_num(*b)),
            Target::Equal(b) => format!("= {}{u}", fmt_num(*b)),
        }
    }

    /// "met", "not met" (also when the value is missing) or "info".
    fn verdict(&self, v: Option<f64>) -> &'static str {
        let ok = match (self, v) {
            (Target::Info, _) => return "info",
            (_, None) => false,
            (Target::AtLeast(b), Some(v)) => v >= *b,
            (Target::AtMost(b), Some(v)) => v <= *b,
            (Target::Below(b), Some(v)) => v < *b,
            (Target::Equal(b), Some(v)) => v == *b,
        };
        if ok { "met" } else { "not met" }
    }
}

/// One line of the table and one figure of the JSON.
#[derive(Debug, Clone)]
struct Row {
    key: String,
    label: String,
    value: Value,
    unit: String,
    target: Target,
}

/// A scenario's results.
#[derive(Debug, Clone, Default)]
pub struct Report {
    params: Map<String, Value>,
    rows: Vec<Row>,
    /// Figures in the JSON only (e.g. per-step lists).
    extra: Map<String, Value>,
    /// Lines printed under the table.
    notes: Vec<String>,
}

impl Report {
    /// A report with these `params` (the scenario's flags).
    pub fn new(params: Map<String, Value>) -> Report {
        Report {
            params,
            ..Default::default()
        }
    }

    /// Adds a numeric figure (`None` = could not be measured) with its unit
    /// and target. `key` is the JSON name, `label` the table's.
    pub fn num(&mut self, key: &str, label: &str, value: Option<f64>, unit: &str, target: Target) {
        self.rows.push(Row {
            key: key.into(),
            label: label.into(),
            value: value.map_or(Value::Null, |v| json!(v)),
            unit: unit.into(),
            target,
        });
    }

    /// Adds an integer count.
    pub fn count(&mut self, key: &str, label: &str, value: i64, target: Target) {
        self.rows.push(Row {
            key: key.into(),
            label: label.into(),
            value: json!(value),
            unit: String::new(),
            target,
        });
    }

    /// Adds a yes/no figure; the target, when `Some`, is the wanted answer.
    pub fn flag(&mut self, key: &str, label: &str, value: bool, want: Option<bool>) {
        let target = match want {
            Some(w) => Target::Equal(if w { 1.0 } else { 0.0 }),
            None => Target::Info,
        };
        self.rows.push(Row {
            key: key.into(),
            label: label.into(),
            value: json!(value),
            unit: String::new(),
            target,
        });
    }

    /// Adds a JSON-only figure.
    pub fn extra(&mut self, key: &str, value: Value) {
        self.extra.insert(key.into(), value);
    }

    /// Adds a line printed under the table.
    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    /// Adds what the load generator and the machine as a whole used in a
    /// window, `<prefix>_bench_cpu_percent` (% of a core) and
    /// `<prefix>_machine_busy_percent` (% of all cores): whether a latency
    /// was spent queueing for a CPU, and how much of the CPU went to the
    /// bench's own clients rather than to sked and PostgreSQL.
    pub fn machine_cpu(&mut self, prefix: &str, when: &str, cpu: &CpuUse) {
        self.num(
            &format!("{prefix}_bench_cpu_percent"),
            &format!("the bench's own CPU {when}"),
            Some(round(cpu.bench, 1)),
            "% of a core",
            Target::Info,
        );
        self.num(
            &format!("{prefix}_machine_busy_percent"),
            &format!("the whole machine busy {when}"),
            cpu.machine_busy.map(|v| round(v, 1)),
            "% of all cores",
            Target::Info,
        );
    }

    /// Every figure as the JSON line's `figures` (rows, then extras).
    pub fn figures(&self) -> Map<String, Value> {
        let mut figures = Map::new();
        for r in &self.rows {
            figures.insert(r.key.clone(), r.value.clone());
        }
        for (k, v) in &self.extra {
            figures.insert(k.clone(), v.clone());
        }
        figures
    }

    /// Prints the table, the notes, with a `baseline` each figure's ratio
    /// to it ([`Baseline::render`]), and the JSON line (last line of
    /// stdout).
    pub fn print(&self, scenario: &str, machine: &Machine, baseline: Option<&Baseline>) {
        let mut lines: Vec<[String; 5]> = vec![[
            "metric".into(),
            "value".into(),
            "unit".into(),
            "target".into(),
            "verdict".into(),
        ]];
        let figures = self.figures();
        let mut targets = Map::new();
        for r in &self.rows {
            let (shown, numeric) = match &r.value {
                Value::Null => ("n/a".to_string(), None),
                Value::Bool(b) => (
                    if *b { "yes" } else { "no" }.to_string(),
                    Some(if *b { 1.0 } else { 0.0 }),
                ),
                Value::Number(n) => {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    let s = if n.is_i64() || n.is_u64() {
                        n.to_string()
                    } else {
                        fmt_num(f)
                    };
                    (s, Some(f))
                }
                other => (other.to_string(), None),
            };
            let target = match (&r.target, &r.value) {
                (Target::Equal(b), Value::Bool(_)) => {
                    if *b == 1.0 {
                        "yes".into()
                    } else {
                        "no".into()
                    }
                }
                (t, _) => t.describe(&r.unit),
            };
            let verdict = r.target.verdict(numeric);
            lines.push([
                r.label.clone(),
                shown,
                r.unit.clone(),
                target.clone(),
                verdict.into(),
            ]);
            if !matches!(r.target, Target::Info) {
                targets.insert(r.key.clone(), json!({"target": target, "verdict": verdict}));
            }
        }
        let mut widths = [0usize; 5];
        for l in &lines {
            for (i, c) in l.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        println!("\nsked-bench {scenario}");
        for (n, l) in lines.iter().enumerate() {
            let mut out = String::new();
            for (i, c) in l.iter().enumerate() {
                let pad = widths[i] - c.chars().count();
                if i == 1 {
                    // numbers right-aligned
                    out.push_str(&" ".repeat(pad));
                    out.push_str(c);
                } else {
                    out.push_str(c);
                    if i < 4 {
                        out.push_str(&" ".repeat(pad));
                    }
                }
                if i < 4 {
                    out.push_str("  ");
                }
            }
            println!("{}", out.trim_end());
            if n == 0 {
                println!("{}", "-".repeat(widths.iter().sum::<usize>() + 8));
            }
        }
        for n in &self.notes {
            println!("note: {n}");
        }
        if let Some(b) = baseline {
            for l in b.render(&figures, &self.params) {
                println!("{l}");
            }
        }
        // Written by hand so that "scenario" comes first (serde_json sorts
        // the keys of its maps).
        let machine = json!({
            "cpus": machine.cpus,
            "cpu_model": machine.cpu_model,
            "postgres": machine.postgres,
            "database": machine.database,
            "autovacuum": machine.autovacuum,
            "tls": machine.tls,
        });
        println!(
            "{{\"scenario\":{},\"machine\":{machine},\"params\":{},\"figures\":{},\"targets\":{}}}",
            Value::from(scenario),
            Value::Object(self.params.clone()),
            Value::Object(figures),
            Value::Object(targets),
        );
    }
}

/// A number for the table: integers as they are, others with up to 3
/// significant decimals (1 for values ≥ 100).
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v == v.trunc() && v.abs() < 1e15 {
        return format!("{}", v as i64);
    }
    let s = if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}
