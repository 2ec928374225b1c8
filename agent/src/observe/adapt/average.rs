//! A user's usage over a penalty rule's window, from the samples of each round.

use std::{collections::VecDeque, time::Duration};

use crate::model::adapt::{UserSample, UserSignal};

/// A user's usage averaged over `window` ending at the newest sample; `None` until the
/// samples cover the window.
pub(super) fn averaged(
    samples: &VecDeque<(Duration, UserSample)>,
    window: Duration,
    signal: UserSignal,
) -> Option<f64> {
    let &(now, _) = samples.back()?;
    let start = now.checked_sub(window)?;
    // The baseline: the newest sample at or before the window's start.
    let (t0, _) = *samples.iter().rev().find(|(t, _)| *t <= start)?;
    let span = (now - t0).as_secs_f64();
    if span <= 0.0 {
        return None;
    }
    let rate = |f: fn(&UserSample) -> Option<u64>| {
        let values: Vec<u64> = samples
            .iter()
            .filter(|(t, _)| *t >= t0)
            .map(|(_, s)| f(s))
            .collect::<Option<_>>()?;
        // As Prometheus' increase(): a counter that went back was reset (UID counters
        // retired while idle, a cgroup made again) and counts from 0.
        let increase: u64 = values
            .windows(2)
            .map(|w| if w[1] >= w[0] { w[1] - w[0] } else { w[1] })
            .sum();
        Some(increase as f64 / span)
    };
    let mean = |f: fn(&UserSample) -> Option<u64>| {
        let values: Vec<f64> = samples
            .iter()
            .filter(|(t, _)| *t > t0)
            .map(|(_, s)| f(s).map(|v| v as f64))
            .collect::<Option<_>>()?;
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    match signal {
        // usage_usec per second of wall time: 1e6 is one CPU, 100%.
        UserSignal::Cpu => rate(|s| s.cpu_usec).map(|r| r / 10_000.0),
        UserSignal::Memory => mean(|s| s.memory),
        UserSignal::Pids => mean(|s| s.pids),
        UserSignal::DenialsPerMin => rate(|s| s.denied).map(|r| r * 60.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn averages_need_a_full_window_and_count_a_reset_counter_from_zero() {
        let sample = |t: u64, cpu: u64| {
            (
                s(t),
                UserSample {
                    cpu_usec: Some(cpu),
                    ..Default::default()
                },
            )
        };
        let mut h: VecDeque<_> = [sample(1, 0), sample(3, 2_000_000)].into();
        assert_eq!(
            averaged(&h, s(5), UserSignal::Cpu),
            None,
            "2 s of a 5 s window"
        );
        h.push_back(sample(6, 5_000_000));
        assert_eq!(averaged(&h, s(5), UserSignal::Cpu), Some(100.0));
        h.push_back(sample(7, 1_000_000));
        // From the baseline at 1 s: +2 s, +3 s, then a reset to 1 s of CPU: 6 s in 6 s.
        assert_eq!(averaged(&h, s(5), UserSignal::Cpu), Some(100.0));
    }
}
