//! What the client prints: readable tables and detail views for people
//! (local times, durations like `2m13s`, states in colour on a terminal),
//! or the API's messages as JSON / YAML for scripts.
//!
//! JSON is the canonical proto3 JSON mapping (lowerCamelCase names, enums by
//! name, `Timestamp` as RFC 3339, `Duration` as `"2.500s"`, 64-bit integers
//! as strings, default values left out), produced from the descriptor set
//! the server itself serves (`prost-reflect`), so it is what grpcurl and
//! every other proto3 JSON client read and write. YAML is the same tree.
//!
//! Colour only when stdout is a terminal and `NO_COLOR` is unset or empty
//! (<https://no-color.org>).

use std::io::{IsTerminal, Write};
use std::sync::LazyLock;

use chrono::{DateTime, Local, TimeZone, Utc};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use super::{Error, Result};
use crate::proto::v1 as pb;

/// Output format (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Tables and detail views for people.
    Table,
    /// The API's messages as canonical proto3 JSON (one document; streams:
    /// one object per line).
    Json,
    /// The same as YAML (streams: one document each, `---` separated).
    Yaml,
}

/// Every `sked.v1` message and its imports, as the server's reflection
/// serves them.
pub static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .expect("the crate's own descriptor set decodes")
});

/// `msg` (of the proto type `full_name`) as canonical proto3 JSON.
pub fn to_json_named<M: Message>(full_name: &str, msg: &M) -> serde_json::Value {
    let desc = POOL
        .get_message_by_name(full_name)
        .unwrap_or_else(|| panic!("{full_name} is in the descriptor set"));
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .expect("a message decodes as its own type");
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .expect("JSON of a message")
}

/// `msg` as canonical proto3 JSON.
pub fn to_json<M: Message + prost::Name>(msg: &M) -> serde_json::Value {
    to_json_named(&M::full_name(), msg)
}

/// A message of the proto type `full_name` from proto3 JSON (field names in
/// either the JSON (`displayName`) or the proto (`display_name`) form; enum
/// values by name or number).
///
/// # Errors
/// [`Error::Input`] naming what does not fit (unknown fields too).
pub fn from_json_named<M: Message + Default>(
    full_name: &str,
    value: serde_json::Value,
) -> Result<M> {
    let desc = POOL
        .get_message_by_name(full_name)
        .unwrap_or_else(|| panic!("{full_name} is in the descriptor set"));
    let dynamic = DynamicMessage::deserialize(desc, value)
        .map_err(|e| Error::Input(format!("{full_name}: {e}")))?;
    M::decode(dynamic.encode_to_vec().as_slice())
        .map_err(|e| Error::Input(format!("{full_name}: {e}")))
}

/// [`from_json_named`] for a type that knows its name.
pub fn from_json<M: Message + Default + prost::Name>(value: serde_json::Value) -> Result<M> {
    from_json_named(&M::full_name(), value)
}

/// Writes `value` in `format` (JSON pretty, or YAML) followed by a newline.
///
/// # Errors
/// [`Error::Io`] when stdout is closed.
pub fn print_value(format: Format, value: &serde_json::Value) -> Result<()> {
    let text = match format {
        Format::Yaml => {
            serde_saphyr::to_string(value).map_err(|e| Error::Input(format!("YAML output: {e}")))?
        }
        _ => serde_json::to_string_pretty(value).expect("JSON of a JSON value") + "\n",
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Writes `value` as one item of a stream: one JSON line, or one YAML
/// document.
///
/// # Errors
/// [`Error::Io`] when stdout is closed.
pub fn print_stream_item(format: Format, value: &serde_json::Value) -> Result<()> {
    let text = match format {
        Format::Yaml => {
            let body = serde_saphyr::to_string(value)
                .map_err(|e| Error::Input(format!("YAML output: {e}")))?;
            format!("---\n{}", body.trim_end_matches('\n')) + "\n"
        }
        _ => serde_json::to_string(value).expect("JSON of a JSON value") + "\n",
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Prints a message: JSON/YAML of it, or `table(msg)` for people.
///
/// # Errors
/// [`Error::Io`] when stdout is closed.
pub fn print_message<M: Message + prost::Name>(
    format: Format,
    msg: &M,
    table: impl FnOnce(&M) -> String,
) -> Result<()> {
    match format {
        Format::Table => {
            let text = table(msg);
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
            Ok(())
        }
        f => print_value(f, &to_json(msg)),
    }
}

/// Whether colour is wanted on stdout (module docs).
pub fn color_stdout() -> bool {
    static ON: LazyLock<bool> = LazyLock::new(|| {
        std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    });
    *ON
}

/// Whether colour is wanted on stderr.
pub fn color_stderr() -> bool {
    static ON: LazyLock<bool> = LazyLock::new(|| {
        std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    });
    *ON
}

/// A colour for a table cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    /// Success.
    Green,
    /// Failure.
    Red,
    /// Needs attention (cancelled, paused).
    Yellow,
    /// Going on.
    Cyan,
    /// Waiting.
    Blue,
    /// Unimportant (skipped, disabled).
    Dim,
}

impl Color {
    fn code(self) -> &'static str {
        match self {
            Color::Green => "32",
            Color::Red => "31",
            Color::Yellow => "33",
            Color::Cyan => "36",
            Color::Blue => "34",
            Color::Dim => "2",
        }
    }
}

/// `text` in `color` when `on`.
pub fn paint(text: &str, color: Option<Color>, on: bool) -> String {
    match color {
        Some(c) if on && !text.is_empty() => format!("\x1b[{}m{text}\x1b[0m", c.code()),
        _ => text.to_string(),
    }
}

/// A table cell: text and an optional colour.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    /// What is shown.
    pub text: String,
    /// Its colour on a terminal.
    pub color: Option<Color>,
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell { text, color: None }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        Cell {
            text: text.to_string(),
            color: None,
        }
    }
}

/// A coloured cell.
pub fn colored(text: impl Into<String>, color: Option<Color>) -> Cell {
    Cell {
        text: text.into(),
        color,
    }
}

/// Columns aligned with two spaces, headers in capitals.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many cells as headers).
    pub fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text (coloured when stdout takes colour).
    pub fn render(&self) -> String {
        self.render_with(color_stdout())
    }

    /// The table as text, coloured when `color`.
    pub fn render_with(&self, color: bool) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.text.chars().count());
            }
        }
        let mut out = String::new();
        let line = |cells: Vec<(String, Option<Color>)>, out: &mut String| {
            let last = cells.len().saturating_sub(1);
            let mut l = String::new();
            for (i, (text, c)) in cells.into_iter().enumerate() {
                let pad = widths[i].saturating_sub(text.chars().count());
                l.push_str(&paint(&text, c, color));
                if i < last {
                    l.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(
            self.headers.iter().map(|h| (h.to_string(), None)).collect(),
            &mut out,
        );
        for row in &self.rows {
            line(
                row.iter()
                    .take(n)
                    .map(|c| (c.text.replace(['\n', '\t'], " "), c.color))
                    .collect(),
                &mut out,
            );
        }
        out
    }
}

/// A detail view: `Label:  value` lines, labels aligned.
#[derive(Debug, Clone, Default)]
pub struct Details {
    lines: Vec<(String, Cell)>,
}

impl Details {
    /// An empty view.
    pub fn new() -> Details {
        Details::default()
    }

    /// Adds a line (skipped when the value is empty).
    pub fn field(&mut self, label: &str, value: impl Into<Cell>) -> &mut Self {
        let value = value.into();
        if !value.text.is_empty() {
            self.lines.push((label.to_string(), value));
        }
        self
    }

    /// The view as text (coloured when stdout takes colour).
    pub fn render(&self) -> String {
        let width = self
            .lines
            .iter()
            .map(|(l, _)| l.chars().count())
            .max()
            .unwrap_or(0);
        let color = color_stdout();
        let mut out = String::new();
        for (label, value) in &self.lines {
            let pad = " ".repeat(width - label.chars().count() + 2);
            let mut text = value.text.lines();
            let first = text.next().unwrap_or_default();
            out.push_str(&format!(
                "{label}:{pad}{}\n",
                paint(first, value.color, color)
            ));
            for more in text {
                out.push_str(&format!("{}{more}\n", " ".repeat(width + 3)));
            }
        }
        out
    }
}

/// A timestamp as local time, `2025-03-09 03:00:05`; empty when unset.
pub fn local_time(t: &Option<prost_types::Timestamp>) -> String {
    match t.as_ref().and_then(to_utc) {
        Some(t) => t
            .with_timezone(&Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        None => String::new(),
    }
}

/// A timestamp as chrono UTC, if in range.
pub fn to_utc(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(t.seconds, t.nanos.max(0) as u32).single()
}

/// A duration as `2m13s`, `1.5s`, `850ms`, `3d4h` (two units at most).
pub fn duration_std(d: impl Into<DurationLike>) -> String {
    let d = d.into();
    let (neg, secs, nanos) = (d.0 < 0, d.0.unsigned_abs(), d.1.unsigned_abs());
    let sign = if neg { "-" } else { "" };
    let text = if secs == 0 {
        if nanos == 0 {
            "0s".to_string()
        } else if nanos >= 1_000_000 {
            format!("{}ms", nanos / 1_000_000)
        } else {
            format!("{}µs", (nanos / 1000).max(1))
        }
    } else if secs < 10 && nanos >= 100_000_000 {
        format!("{secs}.{}s", nanos / 100_000_000)
    } else if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        let (m, s) = (secs / 60, secs % 60);
        if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{s}s")
        }
    } else if secs < 86_400 {
        let (h, m) = (secs / 3600, secs % 3600 / 60);
        if m == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{m}m")
        }
    } else {
        let (d, h) = (secs / 86_400, secs % 86_400 / 3600);
        if h == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{h}h")
        }
    };
    format!("{sign}{text}")
}

/// Seconds and nanoseconds, from any duration type.
#[derive(Debug, Clone, Copy)]
pub struct DurationLike(i64, i32);

impl From<prost_types::Duration> for DurationLike {
    fn from(d: prost_types::Duration) -> Self {
        DurationLike(d.seconds, d.nanos)
    }
}

impl From<std::time::Duration> for DurationLike {
    fn from(d: std::time::Duration) -> Self {
        DurationLike(
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos() as i32,
        )
    }
}

impl From<chrono::TimeDelta> for DurationLike {
    fn from(d: chrono::TimeDelta) -> Self {
        DurationLike(d.num_seconds(), d.subsec_nanos())
    }
}

/// An optional proto duration as text; empty when unset.
pub fn duration_opt(d: &Option<prost_types::Duration>) -> String {
    d.map(duration_std).unwrap_or_default()
}

/// How long a run took (or has taken so far, while running); empty before
/// it started.
pub fn run_duration(r: &pb::Run) -> String {
    let Some(start) = r.start_time.as_ref().and_then(to_utc) else {
        return String::new();
    };
    let end = r
        .end_time
        .as_ref()
        .and_then(to_utc)
        .unwrap_or_else(Utc::now);
    duration_std(end - start)
}

/// An enum's value name without its type prefix: `RUN_STATE_FAILED` →
/// `FAILED`.
pub fn short<'a>(name: &'a str, prefix: &str) -> &'a str {
    name.strip_prefix(prefix).unwrap_or(name)
}

/// A run state's short name (`FAILED`).
pub fn state_name(state: i32) -> String {
    pb::RunState::try_from(state)
        .map(|s| short(s.as_str_name(), "RUN_STATE_").to_string())
        .unwrap_or_else(|_| state.to_string())
}

/// A run state as a coloured cell.
pub fn state_cell(state: i32) -> Cell {
    colored(state_name(state), state_color(state))
}

/// The colour of a run state.
pub fn state_color(state: i32) -> Option<Color> {
    use pb::RunState as S;
    match S::try_from(state).ok()? {
        S::Succeeded => Some(Color::Green),
        S::Failed | S::TimedOut => Some(Color::Red),
        S::Cancelled => Some(Color::Yellow),
        S::Running => Some(Color::Cyan),
        S::Queued | S::Scheduled => Some(Color::Blue),
        S::Skipped => Some(Color::Dim),
        S::Unspecified => None,
    }
}

/// Whether a run in `state` has ended.
pub fn is_terminal(state: i32) -> bool {
    use pb::RunState as S;
    matches!(
        S::try_from(state),
        Ok(S::Succeeded | S::Failed | S::TimedOut | S::Cancelled | S::Skipped)
    )
}

/// A short form of a schedule: `cron 30 2 * * * (America/New_York)`,
/// `every 2s`, `once 2025-...`, `manual`, `daily 09:00`, ...
pub fn schedule_summary(s: &Option<pb::Schedule>) -> String {
    use pb::schedule::Kind;
    let Some(s) = s else {
        return String::new();
    };
    let tod = |t: &Option<pb::TimeOfDay>| {
        let t = t.unwrap_or_default();
        if t.seconds == 0 {
            format!("{:02}:{:02}", t.hours, t.minutes)
        } else {
            format!("{:02}:{:02}:{:02}", t.hours, t.minutes, t.seconds)
        }
    };
    let mut text = match &s.kind {
        Some(Kind::Cron(c)) => format!("cron {}", c.expression),
        Some(Kind::Interval(i)) => format!("every {}", duration_opt(&i.every)),
        Some(Kind::Once(o)) => format!("once {}", local_time(&o.at)),
        Some(Kind::Manual(_)) => "manual".into(),
        Some(Kind::Daily(d)) => format!("daily {}", tod(&d.time_of_day)),
        Some(Kind::Weekly(w)) => {
            let days: Vec<&str> = w
                .days_of_week
                .iter()
                .map(|d| {
                    pb::DayOfWeek::try_from(*d)
                        .map(|d| &short(d.as_str_name(), "DAY_OF_WEEK_")[..3])
                        .unwrap_or("?")
                })
                .collect();
            format!("weekly {} {}", days.join(","), tod(&w.time_of_day))
        }
        Some(Kind::Monthly(m)) => {
            let day = if m.day_of_month == -1 {
                "last day".to_string()
            } else {
                format!("day {}", m.day_of_month)
            };
            format!("monthly {day} {}", tod(&m.time_of_day))
        }
        Some(Kind::Yearly(y)) => {
            format!("yearly {:02}-{:02} {}", y.month, y.day, tod(&y.time_of_day))
        }
        None => "(none)".into(),
    };
    let wall_clock = !matches!(
        s.kind,
        Some(Kind::Interval(_) | Kind::Once(_) | Kind::Manual(_)) | None
    );
    if wall_clock {
        let tz = if s.timezone.is_empty() {
            "UTC"
        } else {
            &s.timezone
        };
        text.push_str(&format!(" ({tz})"));
    }
    if let Some(j) = s.jitter.filter(|j| j.seconds > 0 || j.nanos > 0) {
        text.push_str(&format!(" +jitter {}", duration_std(j)));
    }
    text
}

/// A `google.protobuf.Struct` as compact JSON; empty when unset or empty.
pub fn struct_json(s: &Option<prost_types::Struct>) -> String {
    match s {
        Some(s) if !s.fields.is_empty() => to_json_named("google.protobuf.Struct", s).to_string(),
        _ => String::new(),
    }
}

/// `yes` or `no`.
pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Prints the hint for the next page on stderr (table output only).
pub fn next_page_hint(token: &str) {
    if !token.is_empty() {
        eprintln!("(more: --page-token {token})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: i64, n: i32) -> String {
        duration_std(prost_types::Duration {
            seconds: s,
            nanos: n,
        })
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(d(0, 0), "0s");
        assert_eq!(d(0, 850_000_000), "850ms");
        assert_eq!(d(1, 500_000_000), "1.5s");
        assert_eq!(d(42, 0), "42s");
        assert_eq!(d(133, 0), "2m13s");
        assert_eq!(d(120, 0), "2m");
        assert_eq!(d(3600 + 120, 0), "1h2m");
        assert_eq!(d(86_400 * 3 + 3600 * 4, 0), "3d4h");
        assert_eq!(d(-5, 0), "-5s");
    }

    #[test]
    fn json_is_the_canonical_mapping() {
        let run = pb::Run {
            id: "r1".into(),
            state: pb::RunState::Failed as i32,
            attempt: 2,
            timeout: Some(prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000,
            }),
            exit_code: Some(3),
            ..Default::default()
        };
        let v = to_json(&run);
        assert_eq!(v["state"], "RUN_STATE_FAILED");
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["timeout"], "2.500s");
        assert_eq!(v["exitCode"], 3);
        assert!(v.get("nodeId").is_none(), "defaults are left out: {v}");
        let back: pb::Run = from_json(v).unwrap();
        assert_eq!(back, run);
    }

    #[test]
    fn tables_align_and_colour_only_when_asked() {
        let mut t = Table::new(&["ID", "STATE"]);
        t.row(vec!["a".into(), state_cell(pb::RunState::Failed as i32)]);
        t.row(vec![
            "bbbb".into(),
            state_cell(pb::RunState::Succeeded as i32),
        ]);
        assert_eq!(
            t.render_with(false),
            "ID    STATE\na     FAILED\nbbbb  SUCCEEDED\n"
        );
        assert!(t.render_with(true).contains("\x1b[31mFAILED\x1b[0m"));
    }

    #[test]
    fn schedules_read_short() {
        let s = pb::Schedule {
            kind: Some(pb::schedule::Kind::Cron(pb::CronSchedule {
                expression: "30 2 * * *".into(),
            })),
            timezone: "America/New_York".into(),
            ..Default::default()
        };
        assert_eq!(
            schedule_summary(&Some(s)),
            "cron 30 2 * * * (America/New_York)"
        );
    }
}
