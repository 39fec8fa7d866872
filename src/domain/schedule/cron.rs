//! Cron syntax and parsing: the accepted 5- and 6-field expressions, the
//! macros, `L`, the Vixie day-of-month/day-of-week rule, the per-field
//! error messages, and the normalised expression handed to croner.
//!
//! Five or six whitespace-separated fields, with the field semantics of
//! Vixie cron (crontab(5) of Vixie/ISC cron 4.1, which OCPS 1.0, the Open Cron
//! Pattern Specification, codifies). Five fields are minute-first; six fields
//! add a leading seconds field (OCPS 1.1 / croner's optional seconds):
//!
//! | # (5 fields) | # (6 fields) | field        | values                                 |
//! |--------------|--------------|--------------|----------------------------------------|
//! |              | 1            | second       | 0-59                                   |
//! | 1            | 2            | minute       | 0-59                                   |
//! | 2            | 3            | hour         | 0-23                                   |
//! | 3            | 4            | day-of-month | 1-31, or `L`                           |
//! | 4            | 5            | month        | 1-12 or `JAN`-`DEC`                    |
//! | 5            | 6            | day-of-week  | 0-7 or `SUN`-`SAT` (0 and 7 are Sunday)|
//!
//! Each field is a comma-separated list of items; an item is `*`, a value
//! `a`, a range `a-b` (`a <= b`), or a stepped `*/n` or `a-b/n` (`n` from 1
//! to the field's maximum). Names are three letters, case-insensitive; `SUN`
//! at the end of a range means 7, so `FRI-SUN` is Friday to Sunday. `?` is
//! accepted as an alias of `*` in the day-of-month and day-of-week fields only
//! (OCPS 1.4 §4.2). Everything else is rejected with a reason naming the
//! field *as the user numbered it*: `field 2 (hour): 25 is out of range 0-23`
//! for five fields, `field 1 (second): 60 is out of range 0-59` or
//! `field 3 (hour): 25 is out of range 0-23` for six. Deliberately rejected:
//!
//! * `a/n` without a range (croner 4 and OCPS reject it too; write `a-59/n`);
//! * a step larger than the field's maximum (`*/90` in the minute field
//!   selects only minute 0, which is never what "every 90 minutes" meant);
//! * croner's extensions `W`, `#`, `L` in the day-of-week field (`5L`,
//!   `5#L`), `LW`, and the `+` modifier;
//! * seven fields (a year field), and any other count;
//! * day-of-month/month combinations that can never occur when the
//!   day-of-month has to match (`0 0 30 2 *`, `0 0 31 4,6,9,11 *`): such a
//!   binding would never fire.
//!
//! # `L`: the last day of the month
//!
//! `L` (case-insensitive) as a whole item of the day-of-month field means the
//! last day of each month (28, 29, 30 or 31): `0 0 L * *` fires at midnight
//! on 31 January, 28/29 February, 31 March, 30 April, ... This is croner 4's
//! native `L` (croner's README, "Pattern": "the last day of the month"); croner
//! parses it as a list item, so it combines with other items: `0 0 1,L * *`
//! fires on the first and the last day of every month, `0 0 15,L 2 *` on
//! 15 February and on 28/29 February. `L` takes no step or range (`L/2`,
//! `L-3`, `20-L` are rejected), and an `L` field counts as restricted for the
//! Vixie day rule below (`0 0 L * 5`: the last day *or* any Friday).
//!
//! # Macros
//!
//! The Vixie cron macros `@yearly`, `@annually`, `@monthly`, `@weekly`,
//! `@daily`, `@midnight` and `@hourly` are accepted (case-insensitive) and are
//! expanded here to their 5-field forms (`0 0 1 1 *`, `0 0 1 * *`,
//! `0 0 * * 0`, `0 0 * * *`, `0 * * * *`); croner does not know `@midnight`.
//! `@reboot` and anything else starting with `@` is rejected.
//!
//! # Day-of-month and day-of-week
//!
//! Following Vixie cron's source (`entry.c` sets `DOM_STAR` / `DOW_STAR` when
//! the field's first character is `*`; `cron.c` `find_jobs` then ANDs the two
//! day fields if either flag is set and ORs them otherwise): when neither day
//! field starts with `*` (or `?`), a day matches if **either** field matches,
//! so `0 0 13 * 5` fires on every 13th and on every Friday. When either field
//! starts with `*`, both must match, so `0 0 */2 * 1` fires on Mondays that
//! fall on an odd day of the month. (croner 4 and OCPS only treat a field that
//! is exactly `*` as unrestricted and would OR the `*/2` case; this module
//! passes croner an explicit AND/OR mode so the Vixie rule holds.)

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use super::{MAX_CRON_ITEMS, MAX_MONTH_DAYS};

/// The Vixie cron macros accepted, with their 5-field expansions.
const MACROS: [(&str, &str); 7] = [
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

const FIELD_COUNT_HINT: &str = "expected 5 fields (minute hour day-of-month month day-of-week) \
     or 6 (second minute hour day-of-month month day-of-week)";
const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DOW_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// One of the six cron fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Second,
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Second => "second",
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        }
    }

    fn min(self) -> u32 {
        match self {
            Field::DayOfMonth | Field::Month => 1,
            _ => 0,
        }
    }

    fn max(self) -> u32 {
        match self {
            Field::Second | Field::Minute => 59,
            Field::Hour => 23,
            Field::DayOfMonth => 31,
            Field::Month => 12,
            Field::DayOfWeek => 7,
        }
    }

    /// Value of a three-letter name in this field, if any (case-insensitive).
    fn name_value(self, text: &str) -> Option<u32> {
        let (names, first): (&[&str], u32) = match self {
            Field::Month => (&MONTH_NAMES, 1),
            Field::DayOfWeek => (&DOW_NAMES, 0),
            _ => return None,
        };
        let index = names.iter().position(|n| n.eq_ignore_ascii_case(text))?;
        u32::try_from(index).ok().map(|i| i + first)
    }
}

/// A field and its 1-based position in the expression as the user wrote it
/// (the minute is field 1 of five, field 2 of six).
#[derive(Debug, Clone, Copy)]
struct Slot {
    field: Field,
    number: usize,
}

impl Slot {
    /// `"field 2 (hour): {msg}"`.
    fn error(self, msg: impl std::fmt::Display) -> String {
        format!("field {} ({}): {msg}", self.number, self.field.name())
    }

    /// `"field 4 (month)"`.
    fn label(self) -> String {
        format!("field {} ({})", self.number, self.field.name())
    }
}

/// One parsed field.
#[derive(Debug, Clone)]
struct ParsedField {
    /// Bit `v` set = value `v` matches (day-of-week 7 folded into 0).
    mask: u64,
    /// Day-of-month only: `L` (the last day of the month) is listed.
    last: bool,
    /// The field starts with `*` (or `?`): Vixie's `*_STAR` flags.
    star: bool,
    /// Numeric form handed to croner (names replaced, `?` as `*`).
    normalized: String,
}

/// A pre-checked 5- or 6-field cron expression.
#[derive(Debug, Clone)]
pub(super) struct CronSpec {
    /// `Some` for six fields.
    second: Option<ParsedField>,
    minute: ParsedField,
    hour: ParsedField,
    dom: ParsedField,
    month: ParsedField,
    dow: ParsedField,
}

impl CronSpec {
    /// Parses and range-checks `expression`; the error is the reason text.
    pub(super) fn parse(expression: &str) -> Result<CronSpec, String> {
        let trimmed = expression.trim();
        let expanded = if trimmed.starts_with('@') {
            MACROS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(trimmed))
                .map(|(_, body)| *body)
                .ok_or_else(|| {
                    let names: Vec<&str> = MACROS.iter().map(|(name, _)| *name).collect();
                    format!(
                        "unsupported macro \"{trimmed}\" (supported: {})",
                        names.join(", ")
                    )
                })?
        } else {
            trimmed
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        let (second, rest) = match parts[..] {
            [_, _, _, _, _] => (None, &parts[..]),
            [s, ref rest @ ..] if parts.len() == 6 => (Some(s), rest),
            _ => {
                let hint = if parts.len() == 7 {
                    " (a year field is not supported)"
                } else {
                    ""
                };
                return Err(format!("{FIELD_COUNT_HINT}, got {}{hint}", parts.len()));
            }
        };
        let [minute, hour, dom, month, dow] = rest[..] else {
            return Err(format!("{FIELD_COUNT_HINT}, got {}", parts.len()));
        };
        let first = usize::from(second.is_some()) + 1;
        let slot = |field: Field, index: usize| Slot {
            field,
            number: first + index,
        };
        Ok(CronSpec {
            second: second
                .map(|s| {
                    parse_field(
                        Slot {
                            field: Field::Second,
                            number: 1,
                        },
                        s,
                    )
                })
                .transpose()?,
            minute: parse_field(slot(Field::Minute, 0), minute)?,
            hour: parse_field(slot(Field::Hour, 1), hour)?,
            dom: parse_field(slot(Field::DayOfMonth, 2), dom)?,
            month: parse_field(slot(Field::Month, 3), month)?,
            dow: parse_field(slot(Field::DayOfWeek, 4), dow)?,
        })
    }

    /// The slot of `field` in this expression (for messages).
    fn slot(&self, field: Field) -> Slot {
        let offset = usize::from(self.second.is_some());
        let number = match field {
            Field::Second => 1,
            Field::Minute => 1 + offset,
            Field::Hour => 2 + offset,
            Field::DayOfMonth => 3 + offset,
            Field::Month => 4 + offset,
            Field::DayOfWeek => 5 + offset,
        };
        Slot { field, number }
    }

    /// Vixie cron's wildcard job: the minute or hour field (or, with six
    /// fields, the second field) starts with `*`.
    fn is_wildcard_job(&self) -> bool {
        self.second.as_ref().is_some_and(|s| s.star) || self.minute.star || self.hour.star
    }

    /// Vixie cron ANDs the day fields when either starts with `*`.
    fn dom_and_dow(&self) -> bool {
        self.dom.star || self.dow.star
    }

    /// Why the expression can never fire, if it can't: only possible when
    /// the day-of-month must match (AND mode) and none of its days exists in
    /// any of the months. In OR mode the day-of-week always matches some day,
    /// and every (month, day) pair recurs on every weekday within 28 years.
    /// `L` exists in every month.
    pub(super) fn never_fires_reason(&self) -> Option<String> {
        if self.dom.star || !self.dow.star || self.dom.last {
            return None;
        }
        let possible = (1u32..=12).any(|month| {
            self.month.mask & (1 << month) != 0
                && MAX_MONTH_DAYS
                    .get(month as usize - 1)
                    .is_some_and(|&len| (1..=len).any(|day| self.dom.mask & (1 << day) != 0))
        });
        (!possible).then(|| {
            format!(
                "never fires: no month in {} has a day listed in {}",
                self.slot(Field::Month).label(),
                self.slot(Field::DayOfMonth).label()
            )
        })
    }

    /// Parses the normalised expression with croner (5 fields without
    /// seconds, or 6 with; no years; AND/OR mode per Vixie).
    pub(super) fn to_croner(&self) -> Result<Cron, croner::errors::CronError> {
        let body = format!(
            "{} {} {} {} {}",
            self.minute.normalized,
            self.hour.normalized,
            self.dom.normalized,
            self.month.normalized,
            self.dow.normalized
        );
        let (normalized, seconds) = match &self.second {
            Some(s) => (format!("{} {body}", s.normalized), Seconds::Required),
            None => (body, Seconds::Disallowed),
        };
        CronParser::builder()
            .seconds(seconds)
            .year(Year::Disallowed)
            .dom_and_dow(self.dom_and_dow())
            .build()
            .parse(&normalized)
    }

    /// The whole spec as a cron matcher, with the fixed-time / wildcard
    /// classification.
    pub(super) fn compile(&self) -> Option<CompiledCron> {
        Some(CompiledCron {
            cron: self.to_croner().ok()?,
            wildcard: self.is_wildcard_job(),
        })
    }
}

/// A parsed, croner-compiled cron expression.
pub(super) struct CompiledCron {
    pub(super) cron: Cron,
    pub(super) wildcard: bool,
}

/// Parses one field: a comma-separated list of `*`, `?`, `a`, `a-b`, `*/n`,
/// `a-b/n`, and (day-of-month only) `L`.
fn parse_field(slot: Slot, text: &str) -> Result<ParsedField, String> {
    let field = slot.field;
    let mut mask = 0u64;
    let mut last = false;
    let mut items = Vec::new();
    if text.split(',').count() > MAX_CRON_ITEMS {
        return Err(slot.error(format_args!(
            "has {} list items; at most {MAX_CRON_ITEMS}",
            text.split(',').count()
        )));
    }
    for item in text.split(',') {
        if item.is_empty() {
            return Err(slot.error(format_args!("empty list element in \"{text}\"")));
        }
        if field == Field::DayOfMonth && item.eq_ignore_ascii_case("L") {
            last = true;
            items.push("L".to_string());
            continue;
        }
        let (range_text, step_text) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let step = step_text.map(|s| parse_step(slot, item, s)).transpose()?;

        let (lo, hi, range_norm) = if range_text == "*" || (range_text == "?" && step.is_none()) {
            if range_text == "?" && !matches!(field, Field::DayOfMonth | Field::DayOfWeek) {
                return Err(slot.error("\"?\" is only allowed in day-of-month and day-of-week"));
            }
            (field.min(), field.max(), "*".to_string())
        } else if let Some((a, b)) = range_text.split_once('-') {
            if a.is_empty() || b.is_empty() {
                return Err(slot.error(format_args!("invalid range \"{range_text}\"")));
            }
            let lo = parse_value(slot, a)?;
            let mut hi = parse_value(slot, b)?;
            // `SUN` ends a range as 7 (FRI-SUN), but SUN-SUN stays Sunday only.
            if field == Field::DayOfWeek && hi == 0 && lo > 0 && b.eq_ignore_ascii_case("SUN") {
                hi = 7;
            }
            if lo > hi {
                let hint = if field == Field::DayOfWeek && hi == 0 {
                    "; use 7 for Sunday at the end of a range"
                } else {
                    ""
                };
                return Err(slot.error(format_args!(
                    "range {range_text} is reversed (start must not be greater than end{hint})"
                )));
            }
            (lo, hi, format!("{lo}-{hi}"))
        } else if range_text.is_empty() && step.is_some() {
            return Err(slot.error(format_args!(
                "\"{item}\" needs \"*\" or a range before \"/\""
            )));
        } else {
            let value = parse_value(slot, range_text)?;
            if let Some(step) = step {
                return Err(slot.error(format_args!(
                    "\"{item}\" needs \"*\" or a range before \"/\" (write \"{value}-{}/{step}\")",
                    field.max()
                )));
            }
            (value, value, value.to_string())
        };

        let step_by = step.unwrap_or(1);
        let mut value = lo;
        while value <= hi {
            mask |= 1 << value;
            value += step_by;
        }
        items.push(match step {
            Some(step) => format!("{range_norm}/{step}"),
            None => range_norm,
        });
    }
    if field == Field::DayOfWeek && mask & (1 << 7) != 0 {
        mask = (mask & !(1 << 7)) | 1;
    }
    Ok(ParsedField {
        mask,
        last,
        star: text.starts_with('*') || text.starts_with('?'),
        normalized: items.join(","),
    })
}

/// Parses the step after `/`: digits, from 1 to the field's maximum.
fn parse_step(slot: Slot, item: &str, text: &str) -> Result<u32, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(slot.error(format_args!("invalid step \"{text}\" in \"{item}\"")));
    }
    let step = text.parse::<u32>().unwrap_or(u32::MAX);
    if step == 0 {
        return Err(slot.error(format_args!(
            "step 0 in \"{item}\" is invalid (must be at least 1)"
        )));
    }
    if step > slot.field.max() {
        return Err(slot.error(format_args!(
            "step {text} is out of range 1-{}",
            slot.field.max()
        )));
    }
    Ok(step)
}

/// Parses a number or a three-letter name and checks the field's range.
fn parse_value(slot: Slot, text: &str) -> Result<u32, String> {
    let field = slot.field;
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let value = text.parse::<u32>().unwrap_or(u32::MAX);
        if value < field.min() || value > field.max() {
            return Err(slot.error(format_args!(
                "{text} is out of range {}-{}",
                field.min(),
                field.max()
            )));
        }
        return Ok(value);
    }
    if let Some(value) = field.name_value(text) {
        return Ok(value);
    }
    let extension = text
        .chars()
        .any(|c| matches!(c.to_ascii_uppercase(), 'L' | 'W' | '#' | '+'));
    if extension && field == Field::DayOfMonth {
        return Err(slot.error(format_args!(
            "invalid value \"{text}\" (of the L, W, # and + extensions only a plain \"L\", \
             the last day of the month, is supported, as a list item without range or step)"
        )));
    }
    if extension && field == Field::DayOfWeek {
        return Err(slot.error(format_args!(
            "invalid value \"{text}\" (the L, W, # and + extensions are not supported)"
        )));
    }
    Err(slot.error(format_args!("invalid value \"{text}\"")))
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;

    #[test]
    fn day_of_month_and_day_of_week() {
        run_cases(&[
            // 2025-01-01 is a Wednesday; 2025-01-13 a Monday; 2025-02-13 a Thursday.
            Case {
                name: "Vixie OR: the 13th or any Friday",
                expr: "0 0 13 * 5",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &[
                    "2025-01-03T00:00:00Z", // Fri
                    "2025-01-10T00:00:00Z", // Fri
                    "2025-01-13T00:00:00Z", // 13th (Mon)
                    "2025-01-17T00:00:00Z", // Fri
                    "2025-01-24T00:00:00Z", // Fri
                    "2025-01-31T00:00:00Z", // Fri
                    "2025-02-07T00:00:00Z", // Fri
                    "2025-02-13T00:00:00Z", // 13th (Thu)
                    "2025-02-14T00:00:00Z", // Fri
                ],
            },
            Case {
                name: "day-of-month starting with * ANDs (Vixie DOM_STAR)",
                expr: "0 0 */2 * 1",
                tz: "UTC",
                after: "2024-12-31T12:00:00Z",
                expected: &[
                    "2025-01-13T00:00:00Z", // odd Monday
                    "2025-01-27T00:00:00Z",
                    "2025-02-03T00:00:00Z",
                    "2025-02-17T00:00:00Z",
                ],
            },
            Case {
                name: "the same days written as a range OR",
                expr: "0 0 1-31/2 * MON",
                tz: "UTC",
                after: "2024-12-31T12:00:00Z",
                expected: &[
                    "2025-01-01T00:00:00Z", // odd day (Wed)
                    "2025-01-03T00:00:00Z", // odd day
                    "2025-01-05T00:00:00Z", // odd day
                    "2025-01-06T00:00:00Z", // Monday
                ],
            },
            Case {
                name: "? as day-of-month",
                expr: "0 12 ? * sun",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &["2025-01-05T12:00:00Z", "2025-01-12T12:00:00Z"],
            },
            Case {
                name: "names, SUN as 7, FRI-SUN",
                expr: "0 9 * jan-Feb FRI-SUN",
                tz: "UTC",
                after: "2025-01-30T00:00:00Z",
                expected: &[
                    "2025-01-31T09:00:00Z", // Fri
                    "2025-02-01T09:00:00Z", // Sat
                    "2025-02-02T09:00:00Z", // Sun
                    "2025-02-07T09:00:00Z", // Fri
                ],
            },
            Case {
                name: "7 is Sunday",
                expr: "0 0 * * 7",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &["2025-01-05T00:00:00Z"],
            },
        ]);
    }

    #[test]
    fn macros() {
        run_cases(&[
            Case {
                name: "@daily",
                expr: "@daily",
                tz: "Europe/Berlin",
                after: "2025-06-01T12:00:00Z",
                expected: &["2025-06-01T22:00:00Z"],
            },
            Case {
                name: "@MIDNIGHT",
                expr: " @MIDNIGHT ",
                tz: "UTC",
                after: "2025-06-01T12:00:00Z",
                expected: &["2025-06-02T00:00:00Z"],
            },
            Case {
                name: "@weekly is Sunday midnight",
                expr: "@weekly",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &["2025-01-05T00:00:00Z"],
            },
            Case {
                name: "@yearly",
                expr: "@yearly",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &["2026-01-01T00:00:00Z"],
            },
            Case {
                name: "@hourly is a wildcard job",
                expr: "@hourly",
                tz: "America/New_York",
                after: "2025-11-02T04:30:00Z",
                expected: &["2025-11-02T05:00:00Z", "2025-11-02T06:00:00Z"],
            },
        ]);
    }

    #[test]
    fn cron_validation_errors_name_the_field() {
        let fields = "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (second minute hour day-of-month month day-of-week)";
        let dom_ext = "(of the L, W, # and + extensions only a plain \"L\", the last day of the month, is supported, as a list item without range or step)";
        let table: Vec<(&str, String)> = vec![
            ("0 25 * * *", "field 2 (hour): 25 is out of range 0-23".into()),
            ("1 2 3", format!("{fields}, got 3")),
            ("", format!("{fields}, got 0")),
            ("0 0 0 * * * 2025", format!("{fields}, got 7 (a year field is not supported)")),
            ("0 0 0 0 * * * 2025", format!("{fields}, got 8")),
            ("x * * * *", "field 1 (minute): invalid value \"x\"".into()),
            ("60 * * * *", "field 1 (minute): 60 is out of range 0-59".into()),
            ("0 0 0 * *", "field 3 (day-of-month): 0 is out of range 1-31".into()),
            ("0 0 32 * *", "field 3 (day-of-month): 32 is out of range 1-31".into()),
            ("0 0 * 13 *", "field 4 (month): 13 is out of range 1-12".into()),
            ("0 0 * 0 *", "field 4 (month): 0 is out of range 1-12".into()),
            ("0 0 * * 8", "field 5 (day-of-week): 8 is out of range 0-7".into()),
            ("99999999999 * * * *", "field 1 (minute): 99999999999 is out of range 0-59".into()),
            ("-1 * * * *", "field 1 (minute): invalid range \"-1\"".into()),
            ("+5 * * * *", "field 1 (minute): invalid value \"+5\"".into()),
            ("1,,2 * * * *", "field 1 (minute): empty list element in \"1,,2\"".into()),
            ("0 0 * * 5-0", "field 5 (day-of-week): range 5-0 is reversed (start must not be greater than end; use 7 for Sunday at the end of a range)".into()),
            ("0 17-9 * * *", "field 2 (hour): range 17-9 is reversed (start must not be greater than end)".into()),
            ("*/0 * * * *", "field 1 (minute): step 0 in \"*/0\" is invalid (must be at least 1)".into()),
            ("*/x * * * *", "field 1 (minute): invalid step \"x\" in \"*/x\"".into()),
            ("*/ * * * *", "field 1 (minute): invalid step \"\" in \"*/\"".into()),
            ("*/90 * * * *", "field 1 (minute): step 90 is out of range 1-59".into()),
            ("5/15 * * * *", "field 1 (minute): \"5/15\" needs \"*\" or a range before \"/\" (write \"5-59/15\")".into()),
            ("/15 * * * *", "field 1 (minute): \"/15\" needs \"*\" or a range before \"/\"".into()),
            ("? * * * *", "field 1 (minute): \"?\" is only allowed in day-of-month and day-of-week".into()),
            ("0 0 * MON *", "field 4 (month): invalid value \"MON\"".into()),
            ("0 0 * * JAN", "field 5 (day-of-week): invalid value \"JAN\"".into()),
            ("0 0 * * MONDAY", "field 5 (day-of-week): invalid value \"MONDAY\"".into()),
            ("0 0 15W * *", format!("field 3 (day-of-month): invalid value \"15W\" {dom_ext}")),
            ("0 0 LW * *", format!("field 3 (day-of-month): invalid value \"LW\" {dom_ext}")),
            ("0 0 L-3 * *", format!("field 3 (day-of-month): invalid value \"L\" {dom_ext}")),
            ("0 0 20-L * *", format!("field 3 (day-of-month): invalid value \"L\" {dom_ext}")),
            ("0 0 L/2 * *", format!("field 3 (day-of-month): invalid value \"L\" {dom_ext}")),
            ("0 0 * * 5L", "field 5 (day-of-week): invalid value \"5L\" (the L, W, # and + extensions are not supported)".into()),
            ("0 0 * * 5#L", "field 5 (day-of-week): invalid value \"5#L\" (the L, W, # and + extensions are not supported)".into()),
            ("L 0 * * *", "field 1 (minute): invalid value \"L\"".into()),
            ("0 0 * * 5#2", "field 5 (day-of-week): invalid value \"5#2\" (the L, W, # and + extensions are not supported)".into()),
            ("0 0 1 * +MON", "field 5 (day-of-week): invalid value \"+MON\" (the L, W, # and + extensions are not supported)".into()),
            ("0 0 30 2 *", "never fires: no month in field 4 (month) has a day listed in field 3 (day-of-month)".into()),
            ("0 0 31 4,6,9,11 ?", "never fires: no month in field 4 (month) has a day listed in field 3 (day-of-month)".into()),
            ("@reboot", "unsupported macro \"@reboot\" (supported: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)".into()),
            ("@daily 5", "unsupported macro \"@daily 5\" (supported: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)".into()),
        ];
        for (expr, reason) in table {
            let s = cron(expr, "UTC");
            assert_eq!(
                s.validate("definition.schedule"),
                Err(ScheduleError {
                    field: "definition.schedule.cron.expression".to_string(),
                    reason,
                }),
                "{expr:?}"
            );
            // Invalid schedules never fire and never panic.
            assert_eq!(s.next_after(utc("2025-01-01T00:00:00Z")), None, "{expr:?}");
        }
    }

    #[test]
    fn cron_accepts_valid_syntax() {
        for expr in [
            "* * * * *",
            "0 0 29 2 *", // leap days only
            "0 0 30 2 1", // OR: Mondays in February
            "0 0 31 * *",
            "0-59/5 9-17 * * 1-5",
            "5,10-20/5,*/30 */6 1,15 */3 *",
            "0 0 ? * ?",
            "0 0 * * SUN-SAT",
            "0 0 * * sun,Sat",
            "\t0  0\t* *   *  ",
            "0 0 * JAN-DEC 0-7",
            "*/59 */23 */31 */12 */7",
            "@annually",
            "@Monthly",
        ] {
            assert_eq!(cron(expr, "UTC").validate("s"), Ok(()), "{expr:?}");
            assert!(
                cron(expr, "UTC")
                    .next_after(utc("2025-01-01T00:00:00Z"))
                    .is_some(),
                "{expr:?}"
            );
        }
        // SUN-SUN is Sunday only (not the whole week).
        let s = cron("0 0 * * SUN-SUN", "UTC");
        assert_eq!(
            s.next_after(utc("2025-01-01T00:00:00Z")),
            Some(utc("2025-01-05T00:00:00Z"))
        );
        // Leap day: next after 2025 is 2028-02-29.
        let s = cron("0 0 29 2 *", "UTC");
        assert_eq!(
            s.next_after(utc("2025-01-01T00:00:00Z")),
            Some(utc("2028-02-29T00:00:00Z"))
        );
    }

    #[test]
    fn six_field_cron_numbers_fields_as_written() {
        let table: Vec<(&str, String)> = vec![
            ("60 * * * * *", "field 1 (second): 60 is out of range 0-59".into()),
            ("*/60 * * * * *", "field 1 (second): step 60 is out of range 1-59".into()),
            ("x * * * * *", "field 1 (second): invalid value \"x\"".into()),
            ("? * * * * *", "field 1 (second): \"?\" is only allowed in day-of-month and day-of-week".into()),
            ("0 60 * * * *", "field 2 (minute): 60 is out of range 0-59".into()),
            ("0 0 25 * * *", "field 3 (hour): 25 is out of range 0-23".into()),
            ("0 0 0 32 * *", "field 4 (day-of-month): 32 is out of range 1-31".into()),
            ("0 0 0 * 13 *", "field 5 (month): 13 is out of range 1-12".into()),
            ("0 0 0 * * 8", "field 6 (day-of-week): 8 is out of range 0-7".into()),
            ("0 0 0 * * 5#2", "field 6 (day-of-week): invalid value \"5#2\" (the L, W, # and + extensions are not supported)".into()),
            ("0 0 0 30 2 *", "never fires: no month in field 5 (month) has a day listed in field 4 (day-of-month)".into()),
            // 5-field messages are unchanged.
            ("60 * * * *", "field 1 (minute): 60 is out of range 0-59".into()),
            ("0 0 30 2 *", "never fires: no month in field 4 (month) has a day listed in field 3 (day-of-month)".into()),
        ];
        for (expr, reason) in table {
            assert_eq!(
                cron(expr, "UTC").validate("p"),
                Err(ScheduleError {
                    field: "p.cron.expression".to_string(),
                    reason,
                }),
                "{expr:?}"
            );
        }
        for expr in [
            "*/10 * * * * *",
            "0 */5 * * * *",
            "0-59/15 30 2 * * MON-FRI",
            "59 59 23 31 12 *",
            "0 0 0 L * ?",
            "0 0 0 1,L,15 * *",
            "0 0 0 l 2 *",
            "0 0 L * 5",
            "0 0 31,L 4 *",
        ] {
            assert_eq!(cron(expr, "UTC").validate("p"), Ok(()), "{expr:?}");
            assert!(
                cron(expr, "UTC")
                    .next_after(utc("2025-01-01T00:00:00Z"))
                    .is_some(),
                "{expr:?}"
            );
        }
        // L in OR mode with a day-of-week: the last day or any Friday
        // (2025-04-25 is a Friday, 30 April a Wednesday).
        let s = cron("0 0 L * 5", "UTC");
        assert_eq!(
            fires(&s, utc("2025-04-24T00:00:00Z"), 3),
            vec![
                utc("2025-04-25T00:00:00Z"),
                utc("2025-04-30T00:00:00Z"),
                utc("2025-05-02T00:00:00Z"),
            ]
        );
        // L with a dow starting with `*`: AND. `*/5` in day-of-week is
        // Sunday and Friday, so: last days that are a Sunday or a Friday.
        let s = cron("0 0 L * */5", "UTC");
        assert_eq!(
            fires(&s, utc("2025-01-01T00:00:00Z"), 4),
            vec![
                utc("2025-01-31T00:00:00Z"), // Fri
                utc("2025-02-28T00:00:00Z"), // Fri
                utc("2025-08-31T00:00:00Z"), // Sun
                utc("2025-10-31T00:00:00Z"), // Fri
            ]
        );
    }

    /// The most expensive expressions the limits allow still compute a fire
    /// time in well under a millisecond (debug build: allow 5 ms on a loaded
    /// machine; the point is "not 10 ms per fire").
    #[test]
    fn a_fire_time_of_any_accepted_cron_is_cheap() {
        let minutes: Vec<String> = (0..60).map(|m| m.to_string()).collect();
        let list = minutes[..MAX_CRON_ITEMS.min(60)].join(",");
        let exprs = [
            format!("{list} 0 29 2 *"),
            format!("0 {list} 29 2 1"),
            "0 0 31 2,4,6,9,11,12 *".to_string(),
            format!(
                "59 23 {} 2 *",
                (1..=29)
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ];
        for e in exprs {
            let s = Schedule::new(
                ScheduleKind::Cron {
                    expression: e.chars().take(MAX_CRON_LEN).collect(),
                },
                "America/New_York",
            );
            if s.validate("s").is_err() {
                continue;
            }
            let start = std::time::Instant::now();
            let mut t = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
            for _ in 0..100 {
                match s.next_after(t) {
                    Some(n) => t = n,
                    None => break,
                }
            }
            let per = start.elapsed() / 100;
            eprintln!("{e}: {per:?} per fire");
            assert!(per < std::time::Duration::from_millis(5), "{e}: {per:?}");
        }
    }
}
