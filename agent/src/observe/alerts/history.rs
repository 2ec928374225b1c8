//! Counter samples of one series, for increases over a window.
//!
//! Bounded: a series keeps samples only within its window, and records a new one only
//! when the last is at least a [`RESOLUTION`]th of the window old, so it holds at most
//! about `RESOLUTION + 2` samples however often it is evaluated. The base of an increase is
//! therefore at most window/RESOLUTION later than the window's start.

use std::{collections::VecDeque, time::Duration};

/// Samples per window.
pub(super) const RESOLUTION: u32 = 32;

/// Counter samples of one series, oldest first.
#[derive(Default)]
pub(super) struct History(VecDeque<(Duration, f64)>);

impl History {
    /// Records `value` at `now` and returns the increase over `window` (a counter reset,
    /// such as a recreated cgroup, counts from zero).
    /// `new_from_zero`: a series first seen now counts from zero (it appeared since the
    /// last evaluation), rather than from its current value.
    pub(super) fn increase(
        &mut self,
        now: Duration,
        value: f64,
        window: Duration,
        new_from_zero: bool,
    ) -> f64 {
        if self.0.is_empty() && new_from_zero {
            self.0.push_back((now, 0.0));
        }
        let step = window / RESOLUTION;
        if self
            .0
            .back()
            .is_none_or(|(t, _)| now.saturating_sub(*t) >= step)
        {
            self.0.push_back((now, value));
        }
        while self
            .0
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > window)
        {
            self.0.pop_front();
        }
        let base = self.0.front().map_or(value, |(_, v)| *v);
        if value >= base {
            value - base
        } else {
            value
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_bounded_and_measures_the_window() {
        let mut h = History::default();
        let window = Duration::from_secs(60);
        let mut last = 0.0;
        for second in 0..1000u64 {
            // One event every second.
            last = h.increase(Duration::from_secs(second), second as f64, window, false);
            assert!(h.len() <= RESOLUTION as usize + 2, "{} samples", h.len());
        }
        // The base is within window/RESOLUTION of the window's start.
        let step = (window / RESOLUTION).as_secs_f64();
        assert!((60.0 - step..=60.0).contains(&last), "{last}");
    }

    #[test]
    fn a_new_series_counts_from_zero_and_a_reset_from_its_value() {
        let mut h = History::default();
        assert_eq!(
            h.increase(Duration::ZERO, 5.0, Duration::from_secs(60), true),
            5.0
        );
        assert_eq!(
            h.increase(Duration::from_secs(10), 2.0, Duration::from_secs(60), true),
            2.0
        );
    }
}
