//! [`TimeOfDay`]: construction, parsing, display and serde (`"HH:MM:SS"`).

use chrono::NaiveTime;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::TimeOfDay;

impl TimeOfDay {
    /// `hour:minute:second`, each checked (`hour` 0-23, `minute` and `second`
    /// 0-59).
    ///
    /// # Errors
    ///
    /// The reason, e.g. `hour 24 is out of range 0-23`.
    pub fn new(hour: u8, minute: u8, second: u8) -> Result<TimeOfDay, String> {
        let t = TimeOfDay {
            hour,
            minute,
            second,
        };
        t.check()?;
        Ok(t)
    }

    /// Parses `"HH:MM"` or `"HH:MM:SS"` (exactly two digits each, 24-hour
    /// clock, `00:00` to `23:59:59`), e.g. `"02:30"` → 02:30:00,
    /// `"02:30:15"` → 02:30:15.
    ///
    /// # Errors
    ///
    /// The reason, e.g. `expected "HH:MM" or "HH:MM:SS", got "2:30"` or
    /// `minute 60 is out of range 0-59`.
    pub fn parse(text: &str) -> Result<TimeOfDay, String> {
        let bad = || format!("expected \"HH:MM\" or \"HH:MM:SS\" (24-hour clock), got \"{text}\"");
        let parts: Vec<&str> = text.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(bad());
        }
        let mut values = [0u8; 3];
        for (slot, part) in values.iter_mut().zip(&parts) {
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            *slot = part.parse::<u8>().map_err(|_| bad())?;
        }
        let [hour, minute, second] = values;
        TimeOfDay::new(hour, minute, second)
    }

    /// Why this value is out of range, if it is.
    pub(super) fn check(&self) -> Result<(), String> {
        for (name, value, max) in [
            ("hour", self.hour, 23),
            ("minute", self.minute, 59),
            ("second", self.second, 59),
        ] {
            if value > max {
                return Err(format!("{name} {value} is out of range 0-{max}"));
            }
        }
        Ok(())
    }

    /// As a chrono time, `None` if out of range.
    pub(super) fn to_naive_time(self) -> Option<NaiveTime> {
        NaiveTime::from_hms_opt(
            u32::from(self.hour),
            u32::from(self.minute),
            u32::from(self.second),
        )
    }
}

impl std::fmt::Display for TimeOfDay {
    /// `"HH:MM:SS"`, zero-padded.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}:{:02}", self.hour, self.minute, self.second)
    }
}

impl std::str::FromStr for TimeOfDay {
    type Err = String;

    /// Same as [`TimeOfDay::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TimeOfDay::parse(s)
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        TimeOfDay::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;

    #[test]
    fn time_of_day_parse_display_serde() {
        assert_eq!(
            TimeOfDay::parse("02:30"),
            Ok(TimeOfDay {
                hour: 2,
                minute: 30,
                second: 0
            })
        );
        assert_eq!(
            TimeOfDay::parse("02:30:15"),
            Ok(TimeOfDay {
                hour: 2,
                minute: 30,
                second: 15
            })
        );
        assert_eq!(
            TimeOfDay::parse("23:59:59").map(|t| t.to_string()),
            Ok("23:59:59".to_string())
        );
        assert_eq!(
            "00:00".parse::<TimeOfDay>().map(|t| t.to_string()),
            Ok("00:00:00".to_string())
        );
        let shape = |text: &str| {
            format!("expected \"HH:MM\" or \"HH:MM:SS\" (24-hour clock), got \"{text}\"")
        };
        for bad in [
            "2:30",
            "02:3",
            "0230",
            "",
            ":",
            "02:30:",
            "02:30:15:00",
            "+2:30",
            "02:3x",
            " 02:30",
            "٠٢:30",
        ] {
            assert_eq!(TimeOfDay::parse(bad), Err(shape(bad)), "{bad:?}");
        }
        assert_eq!(
            TimeOfDay::parse("24:00"),
            Err("hour 24 is out of range 0-23".to_string())
        );
        assert_eq!(
            TimeOfDay::parse("12:60"),
            Err("minute 60 is out of range 0-59".to_string())
        );
        assert_eq!(
            TimeOfDay::parse("12:00:60"),
            Err("second 60 is out of range 0-59".to_string())
        );
        assert_eq!(
            TimeOfDay::new(99, 0, 0),
            Err("hour 99 is out of range 0-23".to_string())
        );
        assert_eq!(
            serde_json::to_string(&tod("07:05")).ok().as_deref(),
            Some("\"07:05:00\"")
        );
        assert_eq!(
            serde_json::from_str::<TimeOfDay>("\"07:05\"").ok(),
            Some(tod("07:05:00"))
        );
        assert!(serde_json::from_str::<TimeOfDay>("\"25:00\"").is_err());
        assert!(serde_json::from_str::<TimeOfDay>("725").is_err());
        // An out-of-range value built in code serializes without panicking
        // and never fires.
        let wild = TimeOfDay {
            hour: 255,
            minute: 255,
            second: 255,
        };
        assert_eq!(wild.to_string(), "255:255:255");
        let s = Schedule::new(ScheduleKind::Daily { time_of_day: wild }, "UTC");
        assert_eq!(s.next_after(utc("2025-01-01T00:00:00Z")), None);
    }
}
