//! Latency samples and their summaries.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentiles of `samples` (sorted in place); `None` when there are none.
pub fn summary(samples: &mut [Duration]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    samples.sort();
    let at = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        ms(samples[index.min(samples.len() - 1)])
    };
    Some(Summary {
        n: samples.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        min_ms: ms(samples[0]),
        max_ms: ms(samples[samples.len() - 1]),
    })
}

/// Like [`summary`], but all zero when there are no samples (the narrower benchmarks
/// report every figure).
pub fn summary_or_zero(samples: &mut [Duration]) -> Summary {
    summary(samples).unwrap_or(Summary {
        n: 0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        min_ms: 0.0,
        max_ms: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(summary(&mut []), None);
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = summary(&mut samples).unwrap();
        assert_eq!((s.n, s.min_ms, s.max_ms), (100, 1.0, 100.0));
        assert_eq!((s.p50_ms, s.p99_ms), (51.0, 99.0));
        let one = summary(&mut [Duration::from_millis(7)]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
    }
}
