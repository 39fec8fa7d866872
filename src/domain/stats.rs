//! What runs came to: a binding's status ([`BindingStatus`], from its
//! [`RunOutcomes`]) and run statistics over a window ([`RunStats`], summed
//! from pre-aggregated hourly rows, [`HourlyStats`]).
//!
//! # Final outcomes
//!
//! A run's end is a *final outcome* of its execution unless a retry of it
//! was written in the same transaction: a `FAILED` or `TIMED_OUT` attempt
//! with attempts left is not a failure yet, its retry's end decides. Final
//! failures are `FAILED` and `TIMED_OUT` (whatever the reason: `node_lost`,
//! `worker_lost`, `no_worker` alike); `SUCCEEDED` is a success; `CANCELLED`
//! and `SKIPPED` are neither (they do not count as failures and do not end a
//! streak of them). A binding is [`BindingStatus::Failing`] after
//! [`FAILING_AFTER`] final failures in a row.
//!
//! # Histogram buckets
//!
//! Fire lag (`start_time - scheduled_time`, a negative one counted as 0) and
//! duration (`end_time - start_time`) of the runs that started are counted
//! in buckets ([`bucket_of_us`]): bucket 0 holds [0, 1 ms), bucket k ≥ 1
//! holds [2^((k-1)/4), 2^(k/4)) ms, four per doubling, up to bucket
//! [`MAX_BUCKET`] (2^40 ms, about 35 years), which also holds anything
//! longer. A percentile is the upper bound of the bucket holding its rank
//! ([`Histogram::percentile`]), capped at the largest value seen: it is never
//! below the exact value and at most 19 % (2^(1/4)) above it, or 1 ms above
//! it in bucket 0. The database computes buckets with the same formula
//! (`sked_stats_bucket`, migration `20261203000100_run_outcomes.sql`).

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use uuid::Uuid;

use super::RunState;

/// Final failures in a row from which a binding is [`BindingStatus::Failing`].
pub const FAILING_AFTER: u32 = 3;

/// Highest histogram bucket (2^40 ms and longer).
pub const MAX_BUCKET: usize = 160;

/// Histogram buckets per doubling of the value.
pub const BUCKETS_PER_DOUBLING: u32 = 4;

/// A binding's status summary, for people and filters. When several apply,
/// the first in this order wins: `Broken` > `Disabled` > `Paused` >
/// `Completed` > `Failing` > `Active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BindingStatus {
    /// Fires on its schedule (or waits for TriggerRun with a `manual` one)
    /// and its last final outcomes were not all failures.
    Active,
    /// Paused (PauseBinding), with no expiry or one still ahead.
    Paused,
    /// The binding or its definition is disabled.
    Disabled,
    /// The last [`FAILING_AFTER`] final outcomes were failures.
    Failing,
    /// Will not fire again by its schedule: a `once` that has fired, past
    /// `effective_until` (read against the clock), or a schedule with no
    /// fire time left.
    Completed,
    /// Its stored data cannot be read (`broken_reason`); out of scheduling.
    Broken,
}

impl BindingStatus {
    /// Every status, in precedence order (strongest first).
    pub const ALL: [BindingStatus; 6] = [
        BindingStatus::Broken,
        BindingStatus::Disabled,
        BindingStatus::Paused,
        BindingStatus::Completed,
        BindingStatus::Failing,
        BindingStatus::Active,
    ];

    /// The API spelling (`ACTIVE`...).
    pub fn as_str(self) -> &'static str {
        match self {
            BindingStatus::Active => "ACTIVE",
            BindingStatus::Paused => "PAUSED",
            BindingStatus::Disabled => "DISABLED",
            BindingStatus::Failing => "FAILING",
            BindingStatus::Completed => "COMPLETED",
            BindingStatus::Broken => "BROKEN",
        }
    }
}

/// The binding's last ended run (`SKIPPED` runs aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastRun {
    /// Run id.
    pub id: Uuid,
    /// Its (terminal) state.
    pub state: RunState,
    /// Its fire time.
    pub scheduled_time: DateTime<Utc>,
    /// When it ended.
    pub end_time: DateTime<Utc>,
}

/// What a binding's runs came to, kept by the statements that end runs
/// (never recomputed on read). All empty for a binding none of whose runs
/// has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunOutcomes {
    /// The run that ended last (greatest end time), `SKIPPED` ones aside.
    pub last_run: Option<LastRun>,
    /// End time of the latest `SUCCEEDED` run.
    pub last_success_time: Option<DateTime<Utc>>,
    /// End time of the latest final failure (module docs).
    pub last_failure_time: Option<DateTime<Utc>>,
    /// Final failures since the last success.
    pub consecutive_failures: u32,
}

/// What [`binding_status`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct StatusInputs {
    /// The binding's stored data cannot be read.
    pub broken: bool,
    /// The binding is enabled.
    pub enabled: bool,
    /// Its definition is enabled.
    pub definition_enabled: bool,
    /// Paused, with no expiry or one after now.
    pub paused: bool,
    /// Its effective window ends at or before now.
    pub past_window: bool,
    /// It has a next fire time.
    pub has_next_run_time: bool,
    /// Its schedule is `manual` (never has a next fire time).
    pub manual: bool,
    /// Final failures in a row.
    pub consecutive_failures: u32,
}

/// The status of a binding (precedence in [`BindingStatus`]).
pub fn binding_status(i: StatusInputs) -> BindingStatus {
    if i.broken {
        BindingStatus::Broken
    } else if !i.enabled || !i.definition_enabled {
        BindingStatus::Disabled
    } else if i.paused {
        BindingStatus::Paused
    } else if i.past_window || (!i.has_next_run_time && !i.manual) {
        BindingStatus::Completed
    } else if i.consecutive_failures >= FAILING_AFTER {
        BindingStatus::Failing
    } else {
        BindingStatus::Active
    }
}

/// Runs per terminal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateCounts {
    /// `SUCCEEDED`.
    pub succeeded: u64,
    /// `FAILED` (every attempt, retried or not).
    pub failed: u64,
    /// `TIMED_OUT`.
    pub timed_out: u64,
    /// `CANCELLED`.
    pub cancelled: u64,
    /// `SKIPPED`.
    pub skipped: u64,
}

impl StateCounts {
    /// Every ended run.
    pub fn total(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out + self.cancelled + self.skipped
    }

    fn add(&mut self, o: &StateCounts) {
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.timed_out += o.timed_out;
        self.cancelled += o.cancelled;
        self.skipped += o.skipped;
    }
}

/// One pre-aggregated row: the runs of one binding scheduled in one hour
/// that have ended (the `run_stats` table).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HourlyStats {
    /// Start of the hour (UTC) of the runs' `scheduled_time`.
    pub hour: DateTime<Utc>,
    /// Ended runs by state.
    pub counts: StateCounts,
    /// Runs among them that started (have a lag and a duration).
    pub started: u64,
    /// Sum of their durations, microseconds.
    pub duration_sum_us: f64,
    /// Longest duration, microseconds.
    pub duration_max_us: i64,
    /// Longest fire lag, microseconds.
    pub lag_max_us: i64,
    /// Fire lag histogram: element `k` counts bucket `k` (module docs).
    pub lag_hist: Vec<i32>,
    /// Duration histogram, likewise.
    pub duration_hist: Vec<i32>,
}

/// The bucket of a lag or duration of `us` microseconds (module docs).
pub fn bucket_of_us(us: i64) -> usize {
    if us < 1000 {
        return 0;
    }
    let ms = us as f64 / 1000.0;
    // The database's formula (log10 scaled, nudged up by 1e-9 so that exact
    // powers of two start their bucket).
    let k = (ms.log10() * 13.287_712_379_549_449 + 1e-9).floor() as i64 + 1;
    (k.max(1) as usize).min(MAX_BUCKET)
}

/// The upper bound of bucket `k`, microseconds: 1 ms for bucket 0, else
/// 2^(k/4) ms.
pub fn bucket_upper_us(k: usize) -> i64 {
    if k == 0 {
        return 1000;
    }
    let ms = 2f64.powf(k as f64 / f64::from(BUCKETS_PER_DOUBLING));
    (ms * 1000.0).round() as i64
}

/// Counts per bucket, summed over rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// `counts[k]`: values in bucket `k`.
    pub counts: Vec<u64>,
}

impl Histogram {
    /// Adds a stored histogram (negative counts, which only planted data
    /// could hold, count as 0).
    pub fn add(&mut self, h: &[i32]) {
        if self.counts.len() < h.len() {
            self.counts.resize(h.len().min(MAX_BUCKET + 1), 0);
        }
        for (k, &n) in h.iter().enumerate().take(MAX_BUCKET + 1) {
            self.counts[k] += u64::try_from(n).unwrap_or(0);
        }
    }

    /// Values counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `p`-th percentile (0 < p ≤ 100) by nearest rank — the value at
    /// rank ⌈p/100 · n⌉ of the n values in ascending order — as the upper
    /// bound of its bucket, capped at `max_us` (the largest value seen),
    /// microseconds. `None` when empty.
    pub fn percentile(&self, p: f64, max_us: i64) -> Option<i64> {
        let n = self.total();
        if n == 0 {
            return None;
        }
        let rank = ((p / 100.0 * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (k, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_upper_us(k).min(max_us.max(0)));
            }
        }
        Some(max_us.max(0))
    }
}

/// The size of the buckets of a [`RunStats`] series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsInterval {
    /// One bucket per hour (UTC).
    Hour,
    /// One bucket per day (UTC).
    Day,
}

impl StatsInterval {
    /// The start of the series bucket holding `t`.
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let hour = floor_hour(t);
        match self {
            StatsInterval::Hour => hour,
            StatsInterval::Day => hour - TimeDelta::hours(i64::from(hour.hour())),
        }
    }

    /// The length of one series bucket.
    pub fn step(self) -> TimeDelta {
        match self {
            StatsInterval::Hour => TimeDelta::hours(1),
            StatsInterval::Day => TimeDelta::days(1),
        }
    }
}

/// `t` truncated to its hour (UTC).
pub fn floor_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let secs = t.timestamp().div_euclid(3600) * 3600;
    DateTime::from_timestamp(secs, 0).unwrap_or(t)
}

/// `t` rounded up to a whole hour (UTC); `t` itself when it is one.
pub fn ceil_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let f = floor_hour(t);
    if f == t { f } else { f + TimeDelta::hours(1) }
}

/// Statistics of the runs scheduled in a window that have ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStats {
    /// Window start (inclusive), a whole hour.
    pub start: DateTime<Utc>,
    /// Window end (exclusive), a whole hour.
    pub end: DateTime<Utc>,
    /// Series bucket size.
    pub interval: StatsInterval,
    /// Ended runs by state.
    pub counts: StateCounts,
    /// Runs that started.
    pub started: u64,
    /// `SUCCEEDED / (SUCCEEDED + FAILED + TIMED_OUT)` over the runs (every
    /// attempt counts); `None` when that is 0/0.
    pub success_rate: Option<f64>,
    /// Duration percentiles and extremes of the runs that started,
    /// microseconds (`None` when none started).
    pub duration_p50_us: Option<i64>,
    /// 95th percentile duration.
    pub duration_p95_us: Option<i64>,
    /// Longest duration (exact).
    pub duration_max_us: Option<i64>,
    /// Mean duration (exact).
    pub duration_mean_us: Option<i64>,
    /// Fire lag median.
    pub lag_p50_us: Option<i64>,
    /// Fire lag 99th percentile.
    pub lag_p99_us: Option<i64>,
    /// Counts per series bucket, oldest first, one per bucket of the window
    /// (empty ones included).
    pub series: Vec<(DateTime<Utc>, StateCounts)>,
}

/// Sums `rows` (hours inside `[start, end)`, whole hours) into [`RunStats`]
/// with a series of `interval` buckets. Rows outside the window are ignored.
pub fn summarize(
    rows: &[HourlyStats],
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    interval: StatsInterval,
) -> RunStats {
    let mut counts = StateCounts::default();
    let (mut lag, mut dur) = (Histogram::default(), Histogram::default());
    let (mut started, mut dur_sum, mut dur_max, mut lag_max) = (0u64, 0f64, 0i64, 0i64);
    let first = interval.floor(start);
    let mut series: Vec<(DateTime<Utc>, StateCounts)> = Vec::new();
    let mut t = first;
    while t < end {
        series.push((t, StateCounts::default()));
        t += interval.step();
    }
    for r in rows.iter().filter(|r| r.hour >= start && r.hour < end) {
        counts.add(&r.counts);
        started += r.started;
        dur_sum += r.duration_sum_us;
        dur_max = dur_max.max(r.duration_max_us);
        lag_max = lag_max.max(r.lag_max_us);
        lag.add(&r.lag_hist);
        dur.add(&r.duration_hist);
        let slot = (interval.floor(r.hour) - first).num_seconds() / interval.step().num_seconds();
        if let Some((_, c)) = usize::try_from(slot).ok().and_then(|i| series.get_mut(i)) {
            c.add(&r.counts);
        }
    }
    let judged = counts.succeeded + counts.failed + counts.timed_out;
    let ran = started > 0;
    RunStats {
        start,
        end,
        interval,
        counts,
        started,
        success_rate: (judged > 0).then(|| counts.succeeded as f64 / judged as f64),
        duration_p50_us: dur.percentile(50.0, dur_max),
        duration_p95_us: dur.percentile(95.0, dur_max),
        duration_max_us: ran.then_some(dur_max),
        duration_mean_us: ran.then(|| (dur_sum / started as f64).round() as i64),
        lag_p50_us: lag.percentile(50.0, lag_max),
        lag_p99_us: lag.percentile(99.0, lag_max),
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> StatusInputs {
        StatusInputs {
            broken: false,
            enabled: true,
            definition_enabled: true,
            paused: false,
            past_window: false,
            has_next_run_time: true,
            manual: false,
            consecutive_failures: 0,
        }
    }

    #[test]
    fn status_precedence() {
        let s = |f: fn(&mut StatusInputs)| {
            let mut i = inputs();
            f(&mut i);
            binding_status(i)
        };
        assert_eq!(s(|_| {}), BindingStatus::Active);
        assert_eq!(s(|i| i.consecutive_failures = 2), BindingStatus::Active);
        assert_eq!(s(|i| i.consecutive_failures = 3), BindingStatus::Failing);
        assert_eq!(
            s(|i| {
                i.consecutive_failures = 9;
                i.has_next_run_time = false;
            }),
            BindingStatus::Completed
        );
        // manual schedules never have a next fire time and are not done
        assert_eq!(
            s(|i| {
                i.has_next_run_time = false;
                i.manual = true;
            }),
            BindingStatus::Active
        );
        assert_eq!(
            s(|i| {
                i.past_window = true;
                i.manual = true;
            }),
            BindingStatus::Completed
        );
        assert_eq!(
            s(|i| {
                i.past_window = true;
                i.paused = true;
            }),
            BindingStatus::Paused
        );
        assert_eq!(
            s(|i| {
                i.paused = true;
                i.definition_enabled = false;
            }),
            BindingStatus::Disabled
        );
        assert_eq!(
            s(|i| {
                i.enabled = false;
                i.broken = true;
            }),
            BindingStatus::Broken
        );
    }

    #[test]
    fn buckets_follow_the_documented_bounds() {
        assert_eq!(bucket_of_us(0), 0);
        assert_eq!(bucket_of_us(-5), 0);
        assert_eq!(bucket_of_us(999), 0);
        assert_eq!(bucket_of_us(1000), 1);
        assert_eq!(bucket_of_us(8000), 13);
        assert_eq!(bucket_of_us(7999), 12);
        assert_eq!(bucket_of_us(i64::MAX), MAX_BUCKET);
        for us in [1000, 1500, 8000, 12_345, 999_999, 3_600_000_000] {
            let k = bucket_of_us(us);
            assert!(us < bucket_upper_us(k), "{us} in {k}");
            assert!(us >= bucket_upper_us(k - 1), "{us} in {k}");
            // the documented resolution
            assert!(bucket_upper_us(k) as f64 <= us as f64 * 2f64.powf(0.25) + 1.0);
        }
    }

    #[test]
    fn percentiles_by_nearest_rank_within_a_bucket() {
        let values: Vec<i64> = (1..=100).map(|i| i * 1000).collect(); // 1..100 ms
        let mut h = Histogram::default();
        let mut raw = vec![0i32; MAX_BUCKET + 1];
        for v in &values {
            raw[bucket_of_us(*v)] += 1;
        }
        h.add(&raw);
        let p50 = h.percentile(50.0, 100_000).expect("values");
        assert!(
            (50_000..=(50_000.0 * 2f64.powf(0.25)) as i64).contains(&p50),
            "{p50}"
        );
        assert_eq!(h.percentile(100.0, 100_000), Some(100_000), "capped at max");
        assert_eq!(Histogram::default().percentile(50.0, 0), None);
    }

    #[test]
    fn summarize_sums_rows_and_fills_the_series() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .expect("time")
            .to_utc();
        let row = |h: i64, ok: u64, failed: u64| HourlyStats {
            hour: t0 + TimeDelta::hours(h),
            counts: StateCounts {
                succeeded: ok,
                failed,
                ..StateCounts::default()
            },
            started: ok + failed,
            duration_sum_us: ((ok + failed) * 2000) as f64,
            duration_max_us: 2000,
            lag_max_us: 500,
            lag_hist: vec![(ok + failed) as i32],
            duration_hist: vec![0, 0, 0, 0, 0, (ok + failed) as i32],
        };
        let rows = vec![row(0, 3, 1), row(25, 1, 0), row(48, 5, 5)];
        let s = summarize(&rows, t0, t0 + TimeDelta::hours(48), StatsInterval::Day);
        assert_eq!(s.counts.succeeded, 4);
        assert_eq!(s.counts.failed, 1);
        assert_eq!(s.series.len(), 2);
        assert_eq!(s.series[1].1.succeeded, 1);
        assert_eq!(s.success_rate, Some(0.8));
        assert_eq!(s.duration_mean_us, Some(2000));
        assert_eq!(s.duration_p95_us, Some(2000), "capped at the max");
        assert_eq!(s.lag_p99_us, Some(500));
        let h = summarize(&rows, t0, t0 + TimeDelta::hours(2), StatsInterval::Hour);
        assert_eq!(h.series.len(), 2);
        assert_eq!(h.counts.total(), 4);
    }
}
