//! Exponential time decay as pure functions of event time.
//!
//! A [`Decayed`] value is anchored at `as_of` (event time, ms). Adding an amount at
//! time `t` first moves the anchor forward when `t` is later, or decays the amount
//! back to the anchor when `t` is earlier (a late event). The result is that the
//! value at any time `T >= max(ts)` is `sum(amount_i * 2^-((T - t_i) / half_life))`
//! regardless of arrival order: out-of-order events give the same state.

use serde::{Deserialize, Serialize};

pub const MS_PER_HOUR: f64 = 3_600_000.0;

/// `2^(-dt / half_life)`; 1 for non-positive `dt`.
pub fn decay_factor(dt_ms: i64, half_life_ms: f64) -> f64 {
    if dt_ms <= 0 {
        1.0
    } else {
        (-(dt_ms as f64) * std::f64::consts::LN_2 / half_life_ms).exp()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Decayed {
    pub value: f64,
    pub as_of: i64,
}

impl Decayed {
    /// The value seen at event time `t` (never grows when looking back).
    pub fn value_at(self, t: i64, half_life_ms: f64) -> f64 {
        self.value * decay_factor(t - self.as_of, half_life_ms)
    }

    /// The sum of two decayed values, anchored at the later of the two.
    pub fn merge(self, other: Decayed, half_life_ms: f64) -> Decayed {
        let as_of = self.as_of.max(other.as_of);
        Decayed {
            value: self.value_at(as_of, half_life_ms) + other.value_at(as_of, half_life_ms),
            as_of,
        }
    }

    /// Adds `amount` observed at event time `t`.
    pub fn add(self, amount: f64, t: i64, half_life_ms: f64) -> Decayed {
        if t >= self.as_of {
            Decayed {
                value: self.value_at(t, half_life_ms) + amount,
                as_of: t,
            }
        } else {
            Decayed {
                value: self.value + amount * decay_factor(self.as_of - t, half_life_ms),
                as_of: self.as_of,
            }
        }
    }
}

/// Popularity and trending counters kept for an item or a genre.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Momentum {
    /// Decayed with the long (popularity) half-life.
    pub long: Decayed,
    /// Decayed with the short (trending) half-life.
    pub short: Decayed,
    /// Undecayed number of positive events.
    pub count: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HalfLives {
    pub long_ms: f64,
    pub short_ms: f64,
}

impl Momentum {
    /// The counters of two disjoint event sets (e.g. two partitions) combined.
    pub fn merge(self, other: Momentum, hl: HalfLives) -> Momentum {
        Momentum {
            long: self.long.merge(other.long, hl.long_ms),
            short: self.short.merge(other.short, hl.short_ms),
            count: self.count + other.count,
        }
    }

    pub fn add(self, amount: f64, t: i64, hl: HalfLives) -> Momentum {
        Momentum {
            long: self.long.add(amount, t, hl.long_ms),
            short: self.short.add(amount, t, hl.short_ms),
            count: self.count + 1,
        }
    }

    pub fn popularity_at(&self, t: i64, hl: HalfLives) -> f64 {
        self.long.value_at(t, hl.long_ms)
    }

    /// Trending: the short-window rate over the long-window rate, smoothed by one
    /// pseudo-event so that a single event on a cold item is not "trending", and
    /// damped by the short-window volume. Steady traffic scores `ln(1 + short)`.
    pub fn trending_at(&self, t: i64, hl: HalfLives) -> f64 {
        self.trending_at_with_long(t, hl, self.long.value_at(t, hl.long_ms))
    }

    /// [`Momentum::trending_at`] given `long = self.long.value_at(t, hl.long_ms)`,
    /// for callers that already have it.
    pub fn trending_at_with_long(&self, t: i64, hl: HalfLives, long: f64) -> f64 {
        let short = self.short.value_at(t, hl.short_ms);
        let expected_short = long * hl.short_ms / hl.long_ms;
        let ratio = (short + 1.0) / (expected_short + 1.0);
        ratio * (1.0 + short).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HL: f64 = 10_000.0;

    #[test]
    fn one_half_life_halves() {
        let d = Decayed {
            value: 8.0,
            as_of: 0,
        };
        assert!((d.value_at(10_000, HL) - 4.0).abs() < 1e-12);
        assert_eq!(d.value_at(-5, HL), 8.0);
    }

    #[test]
    fn a_burst_trends_above_steady_traffic() {
        let hl = HalfLives {
            long_ms: 7.0 * 24.0 * MS_PER_HOUR,
            short_ms: 6.0 * MS_PER_HOUR,
        };
        let hour = MS_PER_HOUR as i64;
        let mut steady = Momentum::default();
        let mut burst = Momentum::default();
        for h in 0..240 {
            steady = steady.add(1.0, h * hour, hl);
        }
        for i in 0..30 {
            burst = burst.add(1.0, 239 * hour + i, hl);
        }
        let now = 240 * hour;
        assert!(burst.trending_at(now, hl) > steady.trending_at(now, hl));
        assert!(steady.popularity_at(now, hl) > burst.popularity_at(now, hl));
    }

    proptest! {
        #[test]
        fn arrival_order_does_not_matter(events in prop::collection::vec((0i64..1_000_000, 0.0f64..10.0), 1..40)) {
            let fold = |evs: &[(i64, f64)]| evs.iter().fold(Decayed::default(), |d, &(t, a)| d.add(a, t, HL));
            let mut sorted = events.clone();
            sorted.sort_by_key(|e| e.0);
            let now = 2_000_000;
            let a = fold(&events).value_at(now, HL);
            let b = fold(&sorted).value_at(now, HL);
            prop_assert!((a - b).abs() <= 1e-9 * (1.0 + a.abs()), "{} vs {}", a, b);
        }

        #[test]
        fn merging_split_streams_equals_one_stream(events in prop::collection::vec((0i64..1_000_000, 0.0f64..10.0, any::<bool>()), 1..40)) {
            let fold = |evs: &mut dyn Iterator<Item = &(i64, f64, bool)>| evs.fold(Decayed::default(), |d, &(t, a, _)| d.add(a, t, HL));
            let whole = fold(&mut events.iter());
            let left = fold(&mut events.iter().filter(|e| e.2));
            let right = fold(&mut events.iter().filter(|e| !e.2));
            let merged = left.merge(right, HL);
            let now = 2_000_000;
            let (a, b) = (whole.value_at(now, HL), merged.value_at(now, HL));
            prop_assert!((a - b).abs() <= 1e-9 * (1.0 + a.abs()), "{} vs {}", a, b);
        }

        #[test]
        fn value_never_increases_without_events(v in 0.0f64..1e6, t0 in 0i64..1_000_000, dt1 in 0i64..1_000_000, dt2 in 0i64..1_000_000) {
            let d = Decayed { value: v, as_of: t0 };
            let early = d.value_at(t0 + dt1, HL);
            let late = d.value_at(t0 + dt1 + dt2, HL);
            prop_assert!(late <= early);
            prop_assert!(late >= 0.0);
        }

        #[test]
        fn decay_composes(dt1 in 0i64..10_000_000, dt2 in 0i64..10_000_000) {
            let whole = decay_factor(dt1 + dt2, HL);
            let parts = decay_factor(dt1, HL) * decay_factor(dt2, HL);
            prop_assert!((whole - parts).abs() < 1e-12);
        }
    }
}
