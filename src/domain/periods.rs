//! The catalog's class history as runs of periods: which days, ISO weeks and
//! months of a job already had their daily, weekly and monthly.
//!
//! DOMAIN.md counts every snapshot ever recorded, so this history is never
//! trimmed. Held as a set of single periods it grew by a day, and often a
//! week and a month, for every day a job was snapshotted: about 430 entries
//! a year per job, in memory and in the class row a batch rewrites. A job
//! snapshotted every day instead holds one run per set, however long it
//! runs; the history now grows with the gaps in a job's snapshots, not with
//! time.

use chrono::{Datelike, NaiveDate, Weekday};
use serde::{Deserialize, Serialize};

/// A period on a line where consecutive periods have consecutive ordinals.
pub trait Period: Copy + Ord {
    fn ordinal(self) -> i64;
}

impl Period for NaiveDate {
    fn ordinal(self) -> i64 {
        i64::from(self.num_days_from_ce())
    }
}

/// An ISO week (Monday first): (ISO year, week 1–53), stored as `[2026, 48]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "(i32, u32)")]
pub struct Week(pub i32, pub u32);

impl TryFrom<(i32, u32)> for Week {
    type Error = &'static str;

    fn try_from((year, week): (i32, u32)) -> Result<Self, Self::Error> {
        NaiveDate::from_isoywd_opt(year, week, Weekday::Mon)
            .map(|_| Week(year, week))
            .ok_or("no such ISO week")
    }
}

impl Week {
    pub fn of(day: NaiveDate) -> Week {
        let w = day.iso_week();
        Week(w.year(), w.week())
    }
}

impl Period for Week {
    /// Weeks since the one of 0001-01-01 (a Monday, day 1 from CE).
    fn ordinal(self) -> i64 {
        // A week that does not exist (only constructible by hand: reading
        // refuses it) sorts before every real one.
        let monday = NaiveDate::from_isoywd_opt(self.0, self.1, Weekday::Mon)
            .map_or(i64::from(i32::MIN), |d| i64::from(d.num_days_from_ce()));
        (monday - 1).div_euclid(7)
    }
}

/// A calendar month: (year, month 1–12), stored as `[2026, 11]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "(i32, u32)")]
pub struct Month(pub i32, pub u32);

impl TryFrom<(i32, u32)> for Month {
    type Error = &'static str;

    fn try_from((year, month): (i32, u32)) -> Result<Self, Self::Error> {
        NaiveDate::from_ymd_opt(year, month, 1)
            .map(|_| Month(year, month))
            .ok_or("no such month")
    }
}

impl Month {
    pub fn of(day: NaiveDate) -> Month {
        Month(day.year(), day.month())
    }
}

impl Period for Month {
    fn ordinal(self) -> i64 {
        i64::from(self.0) * 12 + i64::from(self.1) - 1
    }
}

/// A set of periods as sorted, disjoint, non-adjacent runs `[first, last]`.
/// Each set has exactly one such form, so two are equal exactly when they
/// hold the same periods. Stored as a JSON array of `[first, last]` pairs;
/// reading refuses pairs that are not in that form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "Vec<(P, P)>",
    bound(deserialize = "P: Period + Deserialize<'de>")
)]
pub struct Runs<P: Period>(Vec<(P, P)>);

impl<P: Period> Default for Runs<P> {
    fn default() -> Self {
        Runs(Vec::new())
    }
}

impl<P: Period> Runs<P> {
    /// The index of the first run that ends at or after `p`.
    fn at(&self, p: P) -> usize {
        self.0.partition_point(|(_, last)| *last < p)
    }

    pub fn contains(&self, p: P) -> bool {
        self.0.get(self.at(p)).is_some_and(|(first, _)| *first <= p)
    }

    /// Add `p`, joining it to the runs it touches. False if it was there.
    pub fn insert(&mut self, p: P) -> bool {
        let i = self.at(p);
        let next = self.0.get(i).copied();
        if next.is_some_and(|(first, _)| first <= p) {
            return false;
        }
        let n = p.ordinal();
        let joins_prev = i > 0 && self.0[i - 1].1.ordinal() + 1 == n;
        let joins_next = next.is_some_and(|(first, _)| n + 1 == first.ordinal());
        match (joins_prev, joins_next) {
            (true, true) => {
                self.0[i - 1].1 = self.0[i].1;
                self.0.remove(i);
            }
            (true, false) => self.0[i - 1].1 = p,
            (false, true) => self.0[i].0 = p,
            (false, false) => self.0.insert(i, (p, p)),
        }
        true
    }

    /// The runs, in order.
    pub fn runs(&self) -> &[(P, P)] {
        &self.0
    }
}

impl<P: Period> FromIterator<P> for Runs<P> {
    fn from_iter<I: IntoIterator<Item = P>>(iter: I) -> Self {
        let mut runs = Runs::default();
        for p in iter {
            runs.insert(p);
        }
        runs
    }
}

impl<P: Period> TryFrom<Vec<(P, P)>> for Runs<P> {
    type Error = &'static str;

    fn try_from(runs: Vec<(P, P)>) -> Result<Self, Self::Error> {
        if runs.iter().any(|(first, last)| first > last) {
            return Err("a run ends before it starts");
        }
        if runs
            .windows(2)
            .any(|w| w[0].1.ordinal() + 1 >= w[1].0.ordinal())
        {
            return Err("runs overlap, touch or are out of order");
        }
        Ok(Runs(runs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    proptest! {
        /// Runs hold exactly the periods a BTreeSet would, in one form.
        #[test]
        fn runs_are_a_set_of_days(days in proptest::collection::vec(0u32..120, 0..80)) {
            let base = day(2026, 12, 1);
            let mut runs = Runs::default();
            let mut set = BTreeSet::new();
            for d in &days {
                let p = base + chrono::Duration::days(i64::from(*d));
                prop_assert_eq!(runs.insert(p), set.insert(p));
            }
            for d in 0..125u32 {
                let p = base + chrono::Duration::days(i64::from(d));
                prop_assert_eq!(runs.contains(p), set.contains(&p));
            }
            // Canonical: rebuilt in any other order, the runs are the same,
            // and they survive a round trip through their stored form.
            prop_assert_eq!(set.iter().rev().copied().collect::<Runs<_>>(), runs.clone());
            let json = serde_json::to_vec(&runs).unwrap();
            prop_assert_eq!(serde_json::from_slice::<Runs<NaiveDate>>(&json).unwrap(), runs);
        }
    }

    #[test]
    fn three_years_of_daily_snapshots_are_one_run_of_each() {
        let start = day(2026, 1, 1);
        let days: Vec<_> = (0..3 * 365)
            .map(|d| start + chrono::Duration::days(d))
            .collect();
        let daily: Runs<_> = days.iter().copied().collect();
        let weekly: Runs<_> = days.iter().map(|d| Week::of(*d)).collect();
        let monthly: Runs<_> = days.iter().map(|d| Month::of(*d)).collect();
        assert_eq!(daily.runs(), &[(start, day(2028, 12, 30))]);
        // 2026 has an ISO week 53: it and week 1 of 2027 are neighbours.
        assert_eq!(weekly.runs(), &[(Week(2026, 1), Week(2028, 52))]);
        assert_eq!(monthly.runs(), &[(Month(2026, 1), Month(2028, 12))]);
        assert!(weekly.contains(Week(2026, 53)) && weekly.contains(Week(2027, 1)));
        assert_eq!(Week(2027, 1).ordinal(), Week(2026, 53).ordinal() + 1);
        assert_eq!(Month(2027, 1).ordinal(), Month(2026, 12).ordinal() + 1);
    }

    #[test]
    fn stored_runs_out_of_form_are_refused() {
        let read = |s: &str| serde_json::from_str::<Runs<Month>>(s).map(|_| ());
        assert!(read("[[[2026,1],[2026,3]],[[2026,5],[2026,5]]]").is_ok());
        let err = read("[[[2026,13],[2026,13]]]").unwrap_err().to_string();
        assert!(err.contains("no such month"), "{err}");
        let week = serde_json::from_str::<Runs<Week>>("[[[2026,54],[2026,54]]]");
        assert!(week.unwrap_err().to_string().contains("no such ISO week"));
        for bad in [
            "[[[2026,3],[2026,1]]]",                     // ends before it starts
            "[[[2026,1],[2026,3]],[[2026,4],[2026,5]]]", // touching: one run
            "[[[2026,5],[2026,6]],[[2026,1],[2026,2]]]", // out of order
            "[[[2026,1],[2026,3]],[[2026,2],[2026,5]]]", // overlapping
        ] {
            let err = read(bad).unwrap_err().to_string();
            assert!(err.contains("run"), "{bad}: {err}");
        }
    }
}
