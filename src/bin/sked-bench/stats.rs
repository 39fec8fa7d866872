//! Small numeric helpers: rounding and a fixed-memory latency histogram.

/// `v` rounded to `d` decimals.
pub fn round(v: f64, d: i32) -> f64 {
    let m = 10f64.powi(d);
    (v * m).round() / m
}

/// `v` (milliseconds) rounded to 0.1 ms.
pub fn ms1(v: f64) -> f64 {
    round(v, 1)
}

/// `Option` version of [`ms1`].
pub fn ms1o(v: Option<f64>) -> Option<f64> {
    v.map(ms1)
}

/// A latency histogram in microseconds with bounded memory (~68 KiB):
/// 0.1 ms buckets below 100 ms, 1 ms buckets below 10 s, 100 ms buckets below
/// 600 s, one overflow bucket. The exact maximum is kept aside. Recording is
/// allocation-free.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u32>,
    count: u64,
    max_us: u64,
}

const FINE: u64 = 1_000; // 0.1 ms buckets up to 100 ms
const MID: u64 = 9_900; // 1 ms buckets from 100 ms up to 10 s
const COARSE: u64 = 5_900; // 100 ms buckets from 10 s up to 600 s

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; (FINE + MID + COARSE + 1) as usize],
            count: 0,
            max_us: 0,
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        let i = if us < 100_000 {
            us / 100
        } else if us < 10_000_000 {
            FINE + (us - 100_000) / 1_000
        } else if us < 600_000_000 {
            FINE + MID + (us - 10_000_000) / 100_000
        } else {
            FINE + MID + COARSE
        };
        i as usize
    }

    /// Upper edge of bucket `i`, µs.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < FINE {
            (i + 1) * 100
        } else if i < FINE + MID {
            100_000 + (i - FINE + 1) * 1_000
        } else if i < FINE + MID + COARSE {
            10_000_000 + (i - FINE - MID + 1) * 100_000
        } else {
            u64::MAX
        }
    }

    /// Records one latency, µs.
    #[inline]
    pub fn record(&mut self, us: u64) {
        self.buckets[Self::index(us)] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The `q` quantile (0..=1) in milliseconds: the upper edge of the bucket
    /// holding it (at most the maximum), so at worst 0.1 ms high below 100 ms.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return Some(Self::upper(i).min(self.max_us) as f64 / 1e3);
            }
        }
        Some(self.max_us as f64 / 1e3)
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest recorded value, ms.
    pub fn max_ms(&self) -> Option<f64> {
        (self.count > 0).then(|| self.max_us as f64 / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_edges() {
        let mut h = Histogram::default();
        for us in [50, 150, 250, 120_000, 20_000_000] {
            h.record(us);
        }
        assert_eq!(h.quantile_ms(0.2), Some(0.1));
        assert_eq!(h.quantile_ms(0.6), Some(0.3));
        assert_eq!(h.quantile_ms(0.8), Some(121.0));
        assert_eq!(h.quantile_ms(1.0), Some(20_000.0));
        assert_eq!(h.max_ms(), Some(20_000.0));
    }
}
