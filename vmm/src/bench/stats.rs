//! Order statistics of per-iteration cycle counts, and the conversion to nanoseconds.

/// Median, 99th percentile and minimum of a set of samples, in TSC cycles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub p99: f64,
    pub min: f64,
}

impl Summary {
    /// Summarizes `samples`, sorting them in place. `None` when there are none.
    ///
    /// The median of an even count is the mean of the two middle samples; the 99th percentile is
    /// the nearest-rank one (the smallest sample with at least 99% of the samples at or below it).
    pub fn of(samples: &mut [u32]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        let median = if n % 2 == 1 {
            f64::from(samples[n / 2])
        } else {
            (f64::from(samples[n / 2 - 1]) + f64::from(samples[n / 2])) / 2.0
        };
        let rank = (n * 99).div_ceil(100).max(1);
        Some(Summary { median, p99: f64::from(samples[rank - 1]), min: f64::from(samples[0]) })
    }

    /// Each figure less `cycles` (the measurement loop's own median cost). A figure below that is
    /// the loop's noise, not a negative cost: it reads 0. (It happens to the minimum of a kind that
    /// rarely exits, such as rdmsr on PVM, whose cheapest iteration is just the loop.)
    pub fn minus(self, cycles: f64) -> Summary {
        let net = |x: f64| (x - cycles).max(0.0);
        Summary { median: net(self.median), p99: net(self.p99), min: net(self.min) }
    }

    /// Each figure converted from TSC cycles to nanoseconds at `tsc_khz`.
    pub fn to_ns(self, tsc_khz: u32) -> Summary {
        let ns = |cycles: f64| cycles * 1e6 / f64::from(tsc_khz);
        Summary { median: ns(self.median), p99: ns(self.p99), min: ns(self.min) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_even_and_single() {
        let s = Summary::of(&mut [5, 1, 3]).unwrap();
        assert_eq!((s.median, s.p99, s.min), (3.0, 5.0, 1.0));
        let s = Summary::of(&mut [4, 1, 3, 2]).unwrap();
        assert_eq!((s.median, s.p99, s.min), (2.5, 4.0, 1.0));
        let s = Summary::of(&mut [7]).unwrap();
        assert_eq!((s.median, s.p99, s.min), (7.0, 7.0, 7.0));
        assert!(Summary::of(&mut []).is_none());
    }

    #[test]
    fn p99_is_nearest_rank() {
        // 1..=1000: the 990th sample is 990; one outlier in 100 stays out of p99 of 100 samples.
        let mut v: Vec<u32> = (1..=1000).rev().collect();
        assert_eq!(Summary::of(&mut v).unwrap().p99, 990.0);
        let mut v = vec![10u32; 100];
        v[0] = 1_000_000;
        let s = Summary::of(&mut v).unwrap();
        assert_eq!((s.median, s.p99), (10.0, 10.0));
        v.push(1_000_000);
        assert_eq!(Summary::of(&mut v).unwrap().p99, 1_000_000.0);
    }

    #[test]
    fn subtraction_and_units() {
        let s = Summary { median: 3000.0, p99: 6000.0, min: 2000.0 }.minus(1000.0);
        assert_eq!((s.median, s.p99, s.min), (2000.0, 5000.0, 1000.0));
        let below = Summary { median: 1200.0, p99: 2000.0, min: 700.0 }.minus(1000.0);
        assert_eq!((below.median, below.p99, below.min), (200.0, 1000.0, 0.0));
        // 2 GHz: 2 cycles per ns.
        let ns = s.to_ns(2_000_000);
        assert_eq!((ns.median, ns.p99, ns.min), (1000.0, 2500.0, 500.0));
    }
}
