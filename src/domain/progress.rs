//! Progress a run reports (`docs/semantics.md`, "Progress"): a command's
//! stdout line `::progress <percent> [<step>/<total>] [message]`, or a
//! worker's ReportProgress. Each report is a `progress` run event, and the
//! latest one is the run's `progress`.

use serde::{Deserialize, Serialize};

use super::{FieldViolation, quote};

/// Longest progress message, in bytes (1 KiB of UTF-8).
pub const MAX_PROGRESS_MESSAGE: usize = 1024;

/// The prefix that makes a stdout line a progress report.
pub const PROGRESS_PREFIX: &str = "::progress";

/// How far a run has got, as it reported it.
///
/// Invariants (checked by [`Progress::validate`], guaranteed by
/// [`parse_progress_line`]): `percent` finite, 0 to 100; `current_step <=
/// total_steps` when `total_steps > 0`; `message` at most
/// [`MAX_PROGRESS_MESSAGE`] bytes, no NUL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Percent done, 0.0 to 100.0.
    pub percent: f64,
    /// The step being worked on (1-based); 0 when the run reports no steps.
    #[serde(default)]
    pub current_step: u32,
    /// Steps in all; 0 = the run reports no steps.
    #[serde(default)]
    pub total_steps: u32,
    /// What the run is doing; may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Progress {
    /// Checks the invariants; `prefix` is the API path of the progress
    /// message (e.g. `progress`), so a violation names
    /// `progress.percent`, `progress.current_step` or `progress.message`.
    ///
    /// # Errors
    /// The first [`FieldViolation`] found.
    pub fn validate(&self, prefix: &str) -> Result<(), FieldViolation> {
        let field = |f: &str| {
            if prefix.is_empty() {
                f.to_string()
            } else {
                format!("{prefix}.{f}")
            }
        };
        if !self.percent.is_finite() || !(0.0..=100.0).contains(&self.percent) {
            return Err(FieldViolation::new(
                field("percent"),
                format!("{} must be between 0 and 100", self.percent),
            ));
        }
        if self.total_steps > 0 && self.current_step > self.total_steps {
            return Err(FieldViolation::new(
                field("current_step"),
                format!(
                    "{} must be at most total_steps ({})",
                    self.current_step, self.total_steps
                ),
            ));
        }
        if self.message.len() > MAX_PROGRESS_MESSAGE {
            return Err(FieldViolation::new(
                field("message"),
                format!(
                    "{} is longer than {MAX_PROGRESS_MESSAGE} bytes",
                    quote(&self.message)
                ),
            ));
        }
        if self.message.contains('\0') {
            return Err(FieldViolation::new(
                field("message"),
                "must not contain NUL characters",
            ));
        }
        Ok(())
    }

    /// The line a command prints to report this progress (the inverse of
    /// [`parse_progress_line`] for a valid progress).
    pub fn to_line(&self) -> String {
        let mut s = format!("{PROGRESS_PREFIX} {}", self.percent);
        if self.total_steps > 0 {
            s.push_str(&format!(" {}/{}", self.current_step, self.total_steps));
        }
        if !self.message.is_empty() {
            s.push(' ');
            s.push_str(&self.message);
        }
        s
    }
}

/// Parses a command's stdout line as a progress report:
/// `::progress <percent> [<step>/<total>] [message]`, tokens separated by
/// ASCII whitespace, the line starting with `::progress` (no leading space).
///
/// - `percent`: digits with an optional fraction (`40`, `12.5`), 0 to 100;
/// - `step/total`: whole numbers, `total >= 1` and `step <= total`; a second
///   token that is not two numbers around `/` starts the message instead;
/// - `message`: the rest of the line, surrounding whitespace trimmed, cut to
///   [`MAX_PROGRESS_MESSAGE`] bytes at a character boundary.
///
/// `None` for any other line, including malformed reports (no percent, a
/// percent out of range, `3/2`, `::progressive ...`): they stay log lines.
pub fn parse_progress_line(line: &str) -> Option<Progress> {
    let rest = line.strip_prefix(PROGRESS_PREFIX)?;
    // `::progress` must be a word of its own.
    if !rest.starts_with(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    let (pct, rest) = next_token(rest)?;
    let percent = parse_percent(pct)?;
    let (mut current_step, mut total_steps) = (0, 0);
    let mut message = rest;
    if let Some((tok, after)) = next_token(rest)
        && let Some((step, total)) = tok.split_once('/')
        && is_digits(step)
        && is_digits(total)
    {
        let step: u32 = step.parse().ok()?;
        let total: u32 = total.parse().ok()?;
        if total == 0 || step > total {
            return None;
        }
        (current_step, total_steps) = (step, total);
        message = after;
    }
    Some(Progress {
        percent,
        current_step,
        total_steps,
        message: cut(message.trim_matches(|c: char| c.is_ascii_whitespace())),
    })
}

/// The first whitespace-separated token of `s` and what follows it; `None`
/// when `s` is blank.
fn next_token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    if s.is_empty() {
        return None;
    }
    let end = s.find(|c: char| c.is_ascii_whitespace()).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `40`, `12.5`, `100.0`: digits, an optional `.` and digits; 0 to 100.
fn parse_percent(s: &str) -> Option<f64> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    if !is_digits(int) || frac.is_some_and(|f| !is_digits(f)) {
        return None;
    }
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v)
}

/// `s` cut to [`MAX_PROGRESS_MESSAGE`] bytes at a character boundary.
fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_PROGRESS_MESSAGE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(percent: f64, step: u32, total: u32, message: &str) -> Progress {
        Progress {
            percent,
            current_step: step,
            total_steps: total,
            message: message.into(),
        }
    }

    #[test]
    fn the_documented_forms_parse() {
        assert_eq!(
            parse_progress_line("::progress 40 2/5 loading rows"),
            Some(p(40.0, 2, 5, "loading rows"))
        );
        assert_eq!(
            parse_progress_line("::progress 12.5"),
            Some(p(12.5, 0, 0, ""))
        );
        assert_eq!(
            parse_progress_line("::progress 100 5/5"),
            Some(p(100.0, 5, 5, ""))
        );
        assert_eq!(
            parse_progress_line("::progress 0 almost  there \t"),
            Some(p(0.0, 0, 0, "almost  there"))
        );
        // A second token that is not step/total starts the message.
        assert_eq!(
            parse_progress_line("::progress 7 a/b c"),
            Some(p(7.0, 0, 0, "a/b c"))
        );
        assert_eq!(
            parse_progress_line("::progress\t50\t1/2\tx"),
            Some(p(50.0, 1, 2, "x"))
        );
    }

    #[test]
    fn malformed_reports_stay_log_lines() {
        for line in [
            "::progress",
            "::progress ",
            "::progress abc",
            "::progress -1",
            "::progress 101",
            "::progress 100.01",
            "::progress 1e2",
            "::progress NaN",
            "::progress inf",
            "::progress .5",
            "::progress 5.",
            "::progress +5",
            "::progress 50%",
            "::progress 40 3/2",
            "::progress 40 0/0",
            "::progress 40 1/99999999999",
            "::progressive 40",
            " ::progress 40",
            "progress 40",
            "",
        ] {
            assert_eq!(parse_progress_line(line), None, "{line:?}");
        }
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_PROGRESS_MESSAGE);
        let got = parse_progress_line(&format!("::progress 1 {long}")).unwrap();
        assert!(got.message.len() <= MAX_PROGRESS_MESSAGE);
        assert!(got.message.len() >= MAX_PROGRESS_MESSAGE - 1);
        assert!(got.validate("progress").is_ok());
    }

    #[test]
    fn validate_names_the_field() {
        assert!(p(40.0, 2, 5, "x").validate("progress").is_ok());
        assert!(p(40.0, 7, 0, "").validate("progress").is_ok());
        assert_eq!(
            p(f64::NAN, 0, 0, "")
                .validate("progress")
                .unwrap_err()
                .field,
            "progress.percent"
        );
        assert_eq!(
            p(100.5, 0, 0, "").validate("p").unwrap_err().field,
            "p.percent"
        );
        assert_eq!(
            p(1.0, 3, 2, "").validate("progress").unwrap_err().field,
            "progress.current_step"
        );
        assert_eq!(
            p(1.0, 0, 0, &"x".repeat(1025))
                .validate("progress")
                .unwrap_err()
                .field,
            "progress.message"
        );
        assert_eq!(
            p(1.0, 0, 0, "a\0b").validate("").unwrap_err().field,
            "message"
        );
    }

    /// Property: any valid progress prints as a line that parses back to
    /// it; any line at all either stays a log line or parses to a valid
    /// progress (random lines built from the grammar's pieces).
    #[test]
    fn lines_round_trip_and_parsing_only_yields_valid_progress() {
        let mut next = crate::domain::xorshift(0x2545_f491_4f6c_dd1d_u64);
        let words = ["rows", "é✓", "a/b", "3/4", "x", "", "  ", "::progress"];
        for case in 0..2000 {
            let total = (next() % 4) as u32 * (next() % 1000) as u32;
            let step = if total > 0 {
                (next() % (u64::from(total) + 1)) as u32
            } else {
                0
            };
            let percent = (next() % 10_001) as f64 / 100.0;
            let mut message = String::new();
            for _ in 0..next() % 4 {
                if !message.is_empty() {
                    message.push(' ');
                }
                message.push_str(words[(next() % 3) as usize]);
            }
            let want = p(percent, step, total, message.trim());
            // A message that itself starts like step/total would be read
            // as steps when the report has none; skip that ambiguity.
            if total == 0 && want.message.starts_with("3/4") {
                continue;
            }
            assert!(want.validate("progress").is_ok(), "case {case}");
            assert_eq!(
                parse_progress_line(&want.to_line()),
                Some(want.clone()),
                "case {case}: {:?}",
                want.to_line()
            );

            let mut line = String::new();
            for _ in 0..next() % 6 {
                let piece = match next() % 9 {
                    0 => "::progress",
                    1 => " ",
                    2 => "40",
                    3 => "100.5",
                    4 => "2/5",
                    5 => "9/3",
                    6 => "é",
                    7 => "\t",
                    _ => words[(next() % words.len() as u64) as usize],
                };
                line.push_str(piece);
            }
            if let Some(got) = parse_progress_line(&line) {
                assert!(got.validate("progress").is_ok(), "{line:?} → {got:?}");
                assert!(line.starts_with(PROGRESS_PREFIX), "{line:?}");
            }
        }
    }
}
