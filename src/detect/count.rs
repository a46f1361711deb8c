//! The `count` condition's model of a usual count: how many (negative) stories a group's window
//! holds at this time of the week, as a negative binomial fitted to the same slot's past windows
//! (a Poisson when they vary no more than a Poisson's would). Volumes of news are overdispersed: a
//! Poisson would call every busy afternoon a surge.

use super::rules::Season;

/// Slots of the week a window's start falls in, by [`Season`] (UTC).
pub fn slot(season: Season, start_ms: i64) -> u32 {
    // Plain arithmetic, not a calendar: a reading compares hundreds of windows' slots. Day 0 of
    // the Unix epoch (1 January 1970) was a Thursday: weekday 3 counting Monday as 0.
    const HOUR_MS: i64 = 3_600_000;
    let hour = start_ms.div_euclid(HOUR_MS).rem_euclid(24) as u32;
    let weekend = (start_ms.div_euclid(24 * HOUR_MS) + 3).rem_euclid(7) >= 5;
    match season {
        Season::None => 0,
        Season::Day => hour,
        Season::Week => hour + if weekend { 24 } else { 0 },
    }
}

/// Mean and dispersion of a count: variance `mean + mean² / r`, or a Poisson's (`r` = None).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CountModel {
    pub mean: f64,
    pub r: Option<f64>,
}

/// Terms summed at most for one tail or threshold: counts beyond are not news volumes.
const MAX_TERMS: u64 = 1_000_000;

impl CountModel {
    /// Fitted by moments to past counts (at least two). Half a story is added to their sum, so that
    /// a slot that never had one does not make a single story impossible.
    pub fn fit(counts: &[f64]) -> Option<CountModel> {
        if counts.len() < 2 {
            return None;
        }
        let n = counts.len() as f64;
        let raw = counts.iter().sum::<f64>() / n;
        let variance = counts.iter().map(|c| (c - raw).powi(2)).sum::<f64>() / (n - 1.0);
        let mean = raw + 0.5 / n;
        let r = (variance > raw && raw > 0.0).then(|| raw * raw / (variance - raw));
        Some(CountModel { mean, r })
    }

    fn ln_pmf_zero(self) -> f64 {
        match self.r {
            None => -self.mean,
            Some(r) => r * (r / (r + self.mean)).ln(),
        }
    }

    /// pmf(j) / pmf(j − 1).
    fn step(self, j: f64) -> f64 {
        match self.r {
            None => self.mean / j,
            Some(r) => (j - 1.0 + r) / j * (self.mean / (r + self.mean)),
        }
    }

    /// P(X ≥ k). Below the mean from the lower sum; above it the tail itself is summed, so that
    /// tails of 1e-12 keep their digits.
    pub fn tail(self, k: u64) -> f64 {
        if k == 0 {
            return 1.0;
        }
        let mut ln_pmf = self.ln_pmf_zero();
        if (k as f64) <= self.mean {
            let mut below = ln_pmf.exp();
            for j in 1..k {
                ln_pmf += self.step(j as f64).ln();
                below += ln_pmf.exp();
            }
            return (1.0 - below).clamp(0.0, 1.0);
        }
        for j in 1..k.min(MAX_TERMS) {
            ln_pmf += self.step(j as f64).ln();
        }
        let mut term = (ln_pmf + self.step(k as f64).ln()).exp();
        let mut tail = 0.0;
        let mut j = k;
        while term > 0.0 && j < k + MAX_TERMS {
            tail += term;
            if term < tail * 1e-17 {
                break;
            }
            j += 1;
            term *= self.step(j as f64);
        }
        tail.min(1.0)
    }

    /// The smallest k with P(X ≥ k) < `alpha` (the tail falls as k grows: doubling, then halving).
    pub fn threshold(self, alpha: f64) -> Option<u64> {
        let mut hi = (self.mean.ceil() as u64).max(1);
        while self.tail(hi) >= alpha {
            hi *= 2;
            if hi > MAX_TERMS {
                return None;
            }
        }
        let mut lo = 0;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.tail(mid) < alpha { hi = mid } else { lo = mid }
        }
        Some(hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden tails from scipy.stats (`poisson.sf(k - 1, mu)`, `nbinom.sf(k - 1, r, r / (r + mu))`).
    #[test]
    fn tails_match_scipy() {
        let cases = [
            (1.9, None, 12, 8.077941613402692e-07),
            (1.9, Some(2.0), 12, 0.0012788144158809075),
            (5.0, None, 12, 0.0054530919130093445),
            (5.0, Some(4.0), 12, 0.04641717527315195),
            (0.5, None, 3, 0.014387677966970684),
            (10.0, Some(1.0), 40, 0.022094928152179987),
            (20.0, None, 20, 0.5297427331607607),
            (3.0, Some(0.5), 15, 0.03293630592563783),
        ];
        for (mean, r, k, want) in cases {
            let got = CountModel { mean, r }.tail(k);
            assert!((got - want).abs() <= want * 1e-9, "mean {mean}, r {r:?}, k {k}: {got} against {want}");
        }
        assert_eq!(CountModel { mean: 3.0, r: None }.tail(0), 1.0);
    }

    #[test]
    fn the_threshold_is_the_first_count_under_alpha() {
        for model in [CountModel { mean: 1.9, r: None }, CountModel { mean: 1.9, r: Some(2.0) }, CountModel { mean: 40.0, r: Some(8.0) }] {
            let k = model.threshold(1e-4).unwrap();
            assert!(model.tail(k) < 1e-4 && model.tail(k - 1) >= 1e-4, "{model:?}: {k}");
        }
    }

    #[test]
    fn overdispersed_counts_fit_a_negative_binomial_and_steady_ones_a_poisson() {
        let steady = CountModel::fit(&[4.0, 5.0, 4.0, 5.0, 4.0]).unwrap();
        assert_eq!(steady.r, None);
        assert!((steady.mean - 4.5).abs() < 1e-9);
        let bursty = CountModel::fit(&[0.0, 1.0, 9.0, 2.0, 0.0, 8.0]).unwrap();
        assert!(bursty.r.is_some_and(|r| r > 0.0 && r < 2.0), "{bursty:?}");
        let never = CountModel::fit(&[0.0, 0.0, 0.0, 0.0]).unwrap();
        assert!(never.mean > 0.0 && never.tail(1) < 1.0, "a slot that never had a story: {never:?}");
        assert!(CountModel::fit(&[3.0]).is_none(), "a spread needs two windows");
    }

    #[test]
    fn slots_part_weekday_hours_from_weekend_hours() {
        let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis();
        // 1987-03-03 was a Tuesday, 1987-03-07 a Saturday.
        assert_eq!(slot(Season::Week, at("1987-03-03T14:00:00Z")), 14);
        assert_eq!(slot(Season::Week, at("1987-03-07T14:00:00Z")), 38);
        assert_eq!(slot(Season::Day, at("1987-03-07T14:00:00Z")), 14);
        assert_eq!(slot(Season::None, at("1987-03-07T14:00:00Z")), 0);
    }
}
