//! What people type, turned into API values: durations (`90s`, `1h30m`),
//! times (`now-1h`, `2025-03-09 02:30`, RFC 3339), params (`--param k=v`,
//! `--params '{...}'` or `@file`), schedules from flags, and message files
//! (YAML or JSON in the API's field names, `-` for stdin).
//!
//! Bad input is [`Error::Input`] (exit code 2) naming the flag; nothing is
//! sent. The server checks every value again (its limits are in the proto
//! comments).

use chrono::{DateTime, Local, NaiveDate, NaiveDateTime, TimeZone, Utc};
use prost_types::{Duration, Timestamp};

use super::output::from_json_named;
use super::{Error, Result};
use crate::proto::v1 as pb;

/// Parses `90s`, `1h30m`, `1.5s`, `500ms`, `2d`, `1w`, or a bare number of
/// seconds, into a duration (at most 1000 years; negative with a leading `-`).
///
/// # Errors
/// [`Error::Input`] naming `flag`.
pub fn duration(flag: &str, s: &str) -> Result<Duration> {
    let bad = || {
        Error::Input(format!(
            "{flag}: {s:?} is not a duration (e.g. 30s, 5m, 1h30m, 1.5s, 500ms, 2d)"
        ))
    };
    let t = s.trim();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if t.is_empty() {
        return Err(bad());
    }
    let mut nanos: i128 = 0;
    if let Ok(secs) = t.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return Err(bad());
        }
        nanos = (secs * 1e9).round() as i128;
    } else {
        let mut rest = t;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            if num_end == 0 {
                return Err(bad());
            }
            let value: f64 = rest[..num_end].parse().map_err(|_| bad())?;
            let unit_end = rest[num_end..]
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .map_or(rest.len(), |i| num_end + i);
            let unit: f64 = match &rest[num_end..unit_end] {
                "ns" => 1.0,
                "us" | "µs" => 1e3,
                "ms" => 1e6,
                "s" | "sec" | "secs" => 1e9,
                "m" | "min" | "mins" => 60e9,
                "h" | "hr" | "hrs" => 3600e9,
                "d" | "day" | "days" => 86_400e9,
                "w" | "week" | "weeks" => 604_800e9,
                _ => return Err(bad()),
            };
            nanos += (value * unit).round() as i128;
            rest = &rest[unit_end..];
        }
    }
    if nanos > 1000 * 366 * 86_400 * 1_000_000_000i128 {
        return Err(Error::Input(format!("{flag}: {s:?} is too long")));
    }
    if neg {
        nanos = -nanos;
    }
    Ok(Duration {
        seconds: (nanos / 1_000_000_000) as i64,
        nanos: (nanos % 1_000_000_000) as i32,
    })
}

/// Parses a point in time: `now`, `now-1h` / `-1h` (ago), `now+30m` /
/// `+30m` (from now), RFC 3339 (`2025-03-09T07:30:00Z`,
/// `2025-03-09T02:30:00-05:00`), or local time `2025-03-09 02:30[:00]`,
/// `2025-03-09T02:30` or `2025-03-09` (midnight).
///
/// # Errors
/// [`Error::Input`] naming `flag`.
pub fn time(flag: &str, s: &str) -> Result<Timestamp> {
    time_at(flag, s, Utc::now())
}

/// [`time`] relative to `now`.
///
/// # Errors
/// [`Error::Input`] naming `flag`.
pub fn time_at(flag: &str, s: &str, now: DateTime<Utc>) -> Result<Timestamp> {
    let t = s.trim();
    let bad = || {
        Error::Input(format!(
            "{flag}: {s:?} is not a time (e.g. now, -1h, +30m, 2025-03-09 02:30, 2025-03-09T07:30:00Z)"
        ))
    };
    let rel = t.strip_prefix("now").map(str::trim);
    let at: DateTime<Utc> = if rel == Some("") {
        now
    } else if let Some(offset) = rel
        .or_else(|| (t.starts_with('-') || t.starts_with('+')).then_some(t))
        .filter(|r| r.starts_with('-') || r.starts_with('+'))
    {
        let d = duration(flag, offset)?;
        let delta = chrono::TimeDelta::try_seconds(d.seconds).ok_or_else(bad)?
            + chrono::TimeDelta::nanoseconds(i64::from(d.nanos));
        now.checked_add_signed(delta).ok_or_else(bad)?
    } else if let Ok(t) = DateTime::parse_from_rfc3339(t) {
        t.with_timezone(&Utc)
    } else {
        let naive = [
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%d %H:%M",
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%dT%H:%M",
        ]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(t, f).ok())
        .or_else(|| {
            NaiveDate::parse_from_str(t, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })
        .ok_or_else(bad)?;
        // A local time in a DST gap is no instant; one in the overlap is
        // taken at its first occurrence, as schedules do.
        Local
            .from_local_datetime(&naive)
            .earliest()
            .ok_or_else(|| {
                Error::Input(format!(
                    "{flag}: {s:?} does not exist in the local time zone (DST gap)"
                ))
            })?
            .with_timezone(&Utc)
    };
    Ok(Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    })
}

/// Reads `-` (stdin), `@path` or `path` as text.
fn read_source(flag: &str, spec: &str) -> Result<(String, String)> {
    let path = spec.strip_prefix('@').unwrap_or(spec);
    if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Error::Input(format!("{flag}: stdin: {e}")))?;
        Ok(("stdin".into(), s))
    } else {
        std::fs::read_to_string(path)
            .map(|s| (path.to_string(), s))
            .map_err(|e| Error::Input(format!("{flag}: {path}: {e}")))
    }
}

/// Parses YAML (or JSON, which is YAML) text into a JSON value; errors name
/// `origin` and the line.
///
/// # Errors
/// [`Error::Input`].
pub fn yaml_value(origin: &str, text: &str) -> Result<serde_json::Value> {
    serde_saphyr::from_str::<serde_json::Value>(text).map_err(|e| {
        Error::Input(format!(
            "{origin}: {}",
            super::connect::one_line(&e.to_string())
        ))
    })
}

/// Reads a message file (`-f FILE`, `-` for stdin) of the proto type
/// `full_name`, YAML or JSON in the API's field names; returns the message
/// and the top-level field names the file sets (snake_case, for an update
/// mask).
///
/// # Errors
/// [`Error::Input`] naming the file and what does not fit.
pub fn message_file<M: prost::Message + Default>(
    flag: &str,
    spec: &str,
    full_name: &str,
) -> Result<(M, Vec<String>)> {
    let (origin, text) = read_source(flag, spec)?;
    let value = yaml_value(&origin, &text)?;
    let fields = match &value {
        serde_json::Value::Object(m) => m.keys().map(|k| snake_case(k)).collect(),
        _ => {
            return Err(Error::Input(format!(
                "{origin}: expected a mapping of {full_name} fields"
            )));
        }
    };
    let msg =
        from_json_named(full_name, value).map_err(|e| Error::Input(format!("{origin}: {e}")))?;
    Ok((msg, fields))
}

/// `displayName` → `display_name` (already snake_case names pass through).
pub fn snake_case(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `display_name` → `displayName` (the proto3 JSON name of a field).
pub fn camel_case(s: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in s.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A value given inline (JSON/YAML text), or as `@file` / `@-`.
fn inline_or_file(flag: &str, s: &str) -> Result<serde_json::Value> {
    if s.starts_with('@') {
        let (origin, text) = read_source(flag, s)?;
        yaml_value(&origin, &text)
    } else {
        yaml_value(flag, s)
    }
}

/// Params from `--params JSON|@file` and `--param key=value` (each value
/// read as JSON when it parses, else as a string; later keys win); `None`
/// when neither is given.
///
/// # Errors
/// [`Error::Input`] for text that is not an object or a `key=value`.
pub fn params(object: Option<&str>, pairs: &[String]) -> Result<Option<prost_types::Struct>> {
    if object.is_none() && pairs.is_empty() {
        return Ok(None);
    }
    let mut map = match object {
        Some(s) => match inline_or_file("--params", s)? {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            _ => return Err(Error::Input("--params: expected a JSON object".into())),
        },
        None => serde_json::Map::new(),
    };
    for p in pairs {
        let (k, v) = key_value("--param", p)?;
        let v = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
        map.insert(k, v);
    }
    from_json_named("google.protobuf.Struct", serde_json::Value::Object(map))
        .map(Some)
        .map_err(|e| Error::Input(format!("params: {e}")))
}

/// Splits `key=value`.
///
/// # Errors
/// [`Error::Input`] naming `flag` when there is no `=` or no key.
pub fn key_value(flag: &str, s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(Error::Input(format!("{flag}: {s:?} is not key=value"))),
    }
}

/// Parses `HH:MM[:SS]`.
///
/// # Errors
/// [`Error::Input`] naming `flag`.
pub fn time_of_day(flag: &str, s: &str) -> Result<pb::TimeOfDay> {
    let bad = || Error::Input(format!("{flag}: {s:?} is not HH:MM or HH:MM:SS"));
    let parts: Vec<&str> = s.trim().split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let n = |i: usize| -> Result<i32> {
        parts
            .get(i)
            .map_or(Ok(0), |p| p.parse::<i32>().map_err(|_| bad()))
    };
    Ok(pb::TimeOfDay {
        hours: n(0)?,
        minutes: n(1)?,
        seconds: n(2)?,
    })
}

/// Schedule flags shared by `def`, `binding` and `preview`: one kind
/// (`--cron`, `--every`, `--at`, `--daily`, `--manual` or a whole
/// `--schedule`), plus `--tz` and `--jitter`.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Schedule")]
pub struct ScheduleArgs {
    /// Cron expression: 5 fields (min hour dom month dow), 6 with leading
    /// seconds, or a macro (@daily, @hourly, ...); evaluated in --tz.
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,
    /// Fire every DURATION (e.g. 30s, 5m, 1h) in absolute time.
    #[arg(long, value_name = "DURATION")]
    pub every: Option<String>,
    /// Instant --every counts from (default: the binding's creation).
    #[arg(
        long,
        value_name = "TIME",
        requires = "every",
        allow_hyphen_values = true
    )]
    pub anchor: Option<String>,
    /// Fire once, at TIME (RFC 3339, `2025-03-09 02:30` local, `+1h`).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// Fire every day at HH:MM[:SS] in --tz.
    #[arg(long, value_name = "HH:MM")]
    pub daily: Option<String>,
    /// Never fire by itself (runs start only with `sked run trigger`).
    #[arg(long)]
    pub manual: bool,
    /// Any schedule as proto3 JSON/YAML (or @file), e.g.
    /// '{"weekly": {"daysOfWeek": ["DAY_OF_WEEK_MONDAY"], "timeOfDay": {"hours": 9}}}'.
    #[arg(long, value_name = "JSON")]
    pub schedule: Option<String>,
    /// IANA time zone of wall-clock schedules, e.g. Europe/Berlin (default UTC).
    #[arg(long, value_name = "ZONE")]
    pub tz: Option<String>,
    /// Maximum random delay added to each fire (whole seconds, e.g. 5m).
    #[arg(long, value_name = "DURATION")]
    pub jitter: Option<String>,
}

impl ScheduleArgs {
    /// Whether any schedule flag is given.
    pub fn any(&self) -> bool {
        self.kind_count() > 0 || self.tz.is_some() || self.jitter.is_some()
    }

    fn kind_count(&self) -> usize {
        [
            self.cron.is_some(),
            self.every.is_some(),
            self.at.is_some(),
            self.daily.is_some(),
            self.manual,
            self.schedule.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
    }

    /// The schedule the flags describe: a new one when a kind is given
    /// (over `--schedule`'s fields), else `base` with `--tz` / `--jitter`
    /// changed; `None` when no schedule flag is given.
    ///
    /// # Errors
    /// [`Error::Input`] for two kinds at once, `--tz`/`--jitter` with
    /// neither a kind nor a base, or unparsable values.
    pub fn to_schedule(&self, base: Option<&pb::Schedule>) -> Result<Option<pb::Schedule>> {
        use pb::schedule::Kind;
        if self.kind_count() > 1 {
            return Err(Error::Input(
                "give one of --cron, --every, --at, --daily, --manual, --schedule".into(),
            ));
        }
        let kind = if let Some(c) = &self.cron {
            Some(Kind::Cron(pb::CronSchedule {
                expression: c.clone(),
            }))
        } else if let Some(e) = &self.every {
            Some(Kind::Interval(pb::IntervalSchedule {
                every: Some(duration("--every", e)?),
                anchor_time: self
                    .anchor
                    .as_deref()
                    .map(|a| time("--anchor", a))
                    .transpose()?,
            }))
        } else if let Some(a) = &self.at {
            Some(Kind::Once(pb::OnceSchedule {
                at: Some(time("--at", a)?),
            }))
        } else if let Some(d) = &self.daily {
            Some(Kind::Daily(pb::DailySchedule {
                time_of_day: Some(time_of_day("--daily", d)?),
            }))
        } else if self.manual {
            Some(Kind::Manual(pb::ManualSchedule {}))
        } else {
            None
        };
        let mut schedule = if let Some(s) = &self.schedule {
            from_json_named::<pb::Schedule>("sked.v1.Schedule", inline_or_file("--schedule", s)?)
                .map_err(|e| Error::Input(format!("--schedule: {e}")))?
        } else if let Some(kind) = kind {
            pb::Schedule {
                kind: Some(kind),
                ..Default::default()
            }
        } else if self.tz.is_some() || self.jitter.is_some() {
            match base {
                Some(b) => b.clone(),
                None => {
                    return Err(Error::Input(
                        "--tz and --jitter go with a schedule: give --cron, --every, --daily, ..."
                            .into(),
                    ));
                }
            }
        } else {
            return Ok(None);
        };
        if let Some(tz) = &self.tz {
            schedule.timezone = tz.clone();
        }
        if let Some(j) = &self.jitter {
            schedule.jitter = Some(duration("--jitter", j)?);
        }
        Ok(Some(schedule))
    }
}

/// Overlap policies by their short names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Overlap {
    /// Record the fire as SKIPPED (reason overlap).
    Skip,
    /// Run both.
    Allow,
    /// Keep at most one run waiting.
    BufferOne,
    /// Cancel the active run, then start the new one.
    CancelPrevious,
}

impl From<Overlap> for pb::OverlapPolicy {
    fn from(o: Overlap) -> Self {
        match o {
            Overlap::Skip => pb::OverlapPolicy::Skip,
            Overlap::Allow => pb::OverlapPolicy::Allow,
            Overlap::BufferOne => pb::OverlapPolicy::BufferOne,
            Overlap::CancelPrevious => pb::OverlapPolicy::CancelPrevious,
        }
    }
}

/// Run states by their short names (`failed`, `timed-out`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum State {
    /// Waiting for a future time (backoff, delayed trigger).
    Scheduled,
    /// Due, waiting for a slot.
    Queued,
    /// Executing.
    Running,
    /// Ended well.
    Succeeded,
    /// Ended with an error.
    Failed,
    /// Ran past its timeout.
    TimedOut,
    /// Cancelled.
    Cancelled,
    /// A fire that did not run.
    Skipped,
}

impl From<State> for pb::RunState {
    fn from(s: State) -> Self {
        match s {
            State::Scheduled => pb::RunState::Scheduled,
            State::Queued => pb::RunState::Queued,
            State::Running => pb::RunState::Running,
            State::Succeeded => pb::RunState::Succeeded,
            State::Failed => pb::RunState::Failed,
            State::TimedOut => pb::RunState::TimedOut,
            State::Cancelled => pb::RunState::Cancelled,
            State::Skipped => pb::RunState::Skipped,
        }
    }
}

/// Page flags of list subcommands.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PageArgs {
    /// Results per page, 1-1000 (default 50).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub limit: Option<i32>,
    /// Where to go on: the token printed after the previous page.
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
}

impl PageArgs {
    /// The page size to send (0 = the server's default).
    pub fn size(&self) -> i32 {
        self.limit.unwrap_or(0)
    }
    /// The page token to send.
    pub fn token(&self) -> String {
        self.page_token.clone().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let d = |s| duration("--x", s).map(|d| (d.seconds, d.nanos));
        assert_eq!(d("90s").unwrap(), (90, 0));
        assert_eq!(d("1h30m").unwrap(), (5400, 0));
        assert_eq!(d("1.5s").unwrap(), (1, 500_000_000));
        assert_eq!(d("500ms").unwrap(), (0, 500_000_000));
        assert_eq!(d("2d").unwrap(), (172_800, 0));
        assert_eq!(d("30").unwrap(), (30, 0));
        assert_eq!(d("-1h").unwrap(), (-3600, 0));
        for bad in ["", "s", "1x", "h1", "1h-2m", "nan"] {
            let e = d(bad).unwrap_err().to_string();
            assert!(e.starts_with("--x:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn times_parse_relative_and_absolute() {
        let now = Utc.with_ymd_and_hms(2025, 3, 9, 12, 0, 0).unwrap();
        let t = |s| time_at("--from", s, now).map(|t| t.seconds);
        assert_eq!(t("now").unwrap(), now.timestamp());
        assert_eq!(t("-1h").unwrap(), now.timestamp() - 3600);
        assert_eq!(t("now-1h").unwrap(), now.timestamp() - 3600);
        assert_eq!(t("+30m").unwrap(), now.timestamp() + 1800);
        assert_eq!(
            t("2025-03-09T02:30:00-05:00").unwrap(),
            Utc.with_ymd_and_hms(2025, 3, 9, 7, 30, 0)
                .unwrap()
                .timestamp()
        );
        assert!(t("yesterday").is_err());
        assert!(t("2025-03-09 02:30").is_ok());
    }

    #[test]
    fn params_merge_object_and_pairs() {
        let p = params(
            Some(r#"{"a": 1, "b": "x"}"#),
            &["b=2".into(), "c=hello".into()],
        )
        .unwrap()
        .unwrap();
        let v = super::super::output::to_json_named("google.protobuf.Struct", &p);
        assert_eq!(v, serde_json::json!({"a": 1.0, "b": 2.0, "c": "hello"}));
        assert!(params(None, &[]).unwrap().is_none());
        assert!(params(None, &["novalue".into()]).is_err());
    }

    #[test]
    fn one_schedule_kind_at_a_time() {
        let a = ScheduleArgs {
            cron: Some("* * * * *".into()),
            every: Some("1s".into()),
            ..Default::default()
        };
        assert!(a.to_schedule(None).is_err());
        let a = ScheduleArgs {
            every: Some("2s".into()),
            ..Default::default()
        };
        let s = a.to_schedule(None).unwrap().unwrap();
        assert!(matches!(s.kind, Some(pb::schedule::Kind::Interval(_))));
        let tz_only = ScheduleArgs {
            tz: Some("Europe/Berlin".into()),
            ..Default::default()
        };
        assert!(tz_only.to_schedule(None).is_err());
        assert_eq!(
            tz_only.to_schedule(Some(&s)).unwrap().unwrap().timezone,
            "Europe/Berlin"
        );
    }
}
