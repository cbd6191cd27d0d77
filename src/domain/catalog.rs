//! Snapshot catalog and retention (DOMAIN.md "Schedule and retention"): how
//! a recorded snapshot is classified (base/daily/weekly/monthly), when it
//! expires, and the per-job catalog of retained snapshots.
//!
//! The rule is bcp's, deterministic: a "day" starts at the schedule's
//! reference hour and minute (UTC); the first snapshot ever recorded for the
//! job with `taken_at` in a day is that day's daily; the first daily of an
//! ISO week (Monday first) is also the weekly; the first daily of a calendar
//! month is also the monthly. Classes never change after recording.
//! `expires_at = taken_at + the longest retention among its classes whose
//! retention is not 0` (day 24 h, week 7 days, month 28 days).

use super::event::Event;
use super::periods::{Month, Runs, Week};
use super::schedule::Schedule;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotClass {
    Base,
    Daily,
    Weekly,
    Monthly,
}

/// A retained snapshot, as the catalog and `bcp.query.snapshots` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Snapshot {
    pub snapshot_id: Uuid,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub taken_at: DateTime<Utc>,
    pub size_bytes: u64,
    pub classes: Vec<SnapshotClass>,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub expires_at: DateTime<Utc>,
    pub do_not_delete: bool,
}

impl Snapshot {
    /// Its place in its catalog, which keeps its snapshots in this order
    /// (time, then id: one place per snapshot). `taken_at` never changes,
    /// so a snapshot keeps its place while it is retained.
    pub fn place(&self) -> (DateTime<Utc>, Uuid) {
        (self.taken_at, self.snapshot_id)
    }
}

/// One job's catalog: the retained snapshots in time order, and which days,
/// ISO weeks and months already had their daily/weekly/monthly (every
/// snapshot ever recorded counts, also deleted, expired or purged ones), as
/// runs of consecutive periods (`periods.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub snapshots: Vec<Snapshot>,
    pub daily_days: Runs<NaiveDate>,
    pub weekly_weeks: Runs<Week>,
    pub monthly_months: Runs<Month>,
}

/// What a batch's events changed of one job's catalog, as it stood before
/// them: its classes, and each snapshot an event touched (its place, and
/// its value then: `None`, not there). Enough to put the catalog back and
/// to lay out only the rows that changed, without a copy of the snapshots
/// no event touched: a command costs what it changes of a catalog of
/// hundreds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogBefore {
    /// There was no catalog: the batch's first snapshot made it.
    pub absent: bool,
    pub daily_days: Runs<NaiveDate>,
    pub weekly_weeks: Runs<Week>,
    pub monthly_months: Runs<Month>,
    /// Snapshot id → its place in the catalog as the events left it (where
    /// it is, if it is there), and its value before the first event that
    /// touched it.
    pub snapshots: BTreeMap<Uuid, Touched>,
}

/// A snapshot's place now ([`Snapshot::place`]) and its value before
/// (`None`: not in the catalog).
pub type Touched = ((DateTime<Utc>, Uuid), Option<Snapshot>);

impl CatalogBefore {
    /// Before the first event of a batch that changes `catalog`.
    pub fn of(catalog: Option<&Catalog>) -> CatalogBefore {
        match catalog {
            None => CatalogBefore {
                absent: true,
                ..CatalogBefore::default()
            },
            Some(c) => CatalogBefore {
                absent: false,
                daily_days: c.daily_days.clone(),
                weekly_weeks: c.weekly_weeks.clone(),
                monthly_months: c.monthly_months.clone(),
                snapshots: BTreeMap::new(),
            },
        }
    }

    /// Keep what `event` will change of `catalog` (the catalog before it
    /// is applied). A snapshot id is recorded once: `decide` refuses
    /// another.
    pub fn note(&mut self, catalog: Option<&Catalog>, event: &Event) {
        let found = |id: &Uuid| catalog.and_then(|c| c.get(*id));
        match event {
            Event::SnapshotRecorded {
                snapshot_id,
                taken_at,
                ..
            } => {
                // Its place from now on (one deleted earlier in the batch
                // may come back elsewhere); its value before stays.
                let place = (*taken_at, *snapshot_id);
                (self.snapshots.entry(*snapshot_id))
                    .and_modify(|touched| touched.0 = place)
                    .or_insert((place, None));
            }
            Event::SnapshotDeleted { snapshot_id }
            | Event::SnapshotExpired { snapshot_id, .. }
            | Event::SnapshotExpiryChanged { snapshot_id, .. } => {
                if let Some(s) = found(snapshot_id) {
                    self.keep(s);
                }
            }
            Event::SnapshotsPurged { .. } => {
                for s in catalog.iter().flat_map(|c| &c.snapshots) {
                    self.keep(s);
                }
            }
            // What evolve applies to a catalog is listed above, and in
            // `World::changes_catalog`, which the write path asks first.
            other => assert!(
                !super::world::World::changes_catalog(other),
                "CatalogBefore::note keeps what every catalog event changes"
            ),
        }
    }

    fn keep(&mut self, s: &Snapshot) {
        (self.snapshots.entry(s.snapshot_id)).or_insert_with(|| (s.place(), Some(s.clone())));
    }

    /// Whether the classes `now` has are not the ones kept.
    pub fn classes_changed(&self, now: &Catalog) -> bool {
        (&self.daily_days, &self.weekly_weeks, &self.monthly_months) != now.classes()
    }

    /// Each snapshot touched: its id, its value before and in `now`.
    pub fn changes<'a>(
        &'a self,
        now: Option<&'a Catalog>,
    ) -> impl Iterator<Item = (Uuid, Option<&'a Snapshot>, Option<&'a Snapshot>)> {
        (self.snapshots.iter())
            .map(move |(id, (place, was))| (*id, was.as_ref(), now.and_then(|c| c.at(*place))))
    }

    /// The catalog as it was, from `now`, the same catalog after the events
    /// noted.
    pub fn put_back(self, now: Option<Catalog>) -> Option<Catalog> {
        if self.absent {
            return None;
        }
        let mut c = now.unwrap_or_default();
        c.daily_days = self.daily_days;
        c.weekly_weeks = self.weekly_weeks;
        c.monthly_months = self.monthly_months;
        for (place, was) in self.snapshots.into_values() {
            if let Ok(i) = c.snapshots.binary_search_by_key(&place, Snapshot::place) {
                c.snapshots.remove(i);
            }
            if let Some(s) = was {
                let i = c.snapshots.partition_point(|x| x.place() < s.place());
                c.snapshots.insert(i, s);
            }
        }
        Some(c)
    }
}

/// The "day" a snapshot falls in: its date once shifted back by the
/// reference hour and minute.
pub fn day_of(taken_at: DateTime<Utc>, schedule: &Schedule) -> NaiveDate {
    let offset = i64::from(schedule.reference_hour_of_day) * 60
        + i64::from(schedule.reference_minute_of_hour);
    (taken_at - Duration::minutes(offset)).date_naive()
}

impl Catalog {
    /// Classes a snapshot taken at `taken_at` gets if recorded now.
    pub fn classify(&self, taken_at: DateTime<Utc>, schedule: &Schedule) -> Vec<SnapshotClass> {
        let day = day_of(taken_at, schedule);
        let mut classes = vec![SnapshotClass::Base];
        if !self.daily_days.contains(day) {
            classes.push(SnapshotClass::Daily);
            if !self.weekly_weeks.contains(Week::of(day)) {
                classes.push(SnapshotClass::Weekly);
            }
            if !self.monthly_months.contains(Month::of(day)) {
                classes.push(SnapshotClass::Monthly);
            }
        }
        classes
    }

    /// Which days, weeks and months had their daily, weekly, monthly.
    pub fn classes(&self) -> (&Runs<NaiveDate>, &Runs<Week>, &Runs<Month>) {
        (&self.daily_days, &self.weekly_weeks, &self.monthly_months)
    }

    /// The snapshot at `place` ([`Snapshot::place`]), found by its order.
    pub fn at(&self, place: (DateTime<Utc>, Uuid)) -> Option<&Snapshot> {
        (self.snapshots.binary_search_by_key(&place, Snapshot::place))
            .ok()
            .map(|i| &self.snapshots[i])
    }

    pub fn get(&self, id: Uuid) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.snapshot_id == id)
    }

    /// Add a recorded snapshot, in time order, and remember its classes.
    pub fn record(&mut self, snap: Snapshot, schedule_day: NaiveDate) {
        if snap.classes.contains(&SnapshotClass::Daily) {
            self.daily_days.insert(schedule_day);
        }
        if snap.classes.contains(&SnapshotClass::Weekly) {
            self.weekly_weeks.insert(Week::of(schedule_day));
        }
        if snap.classes.contains(&SnapshotClass::Monthly) {
            self.monthly_months.insert(Month::of(schedule_day));
        }
        let at = self.snapshots.partition_point(|s| s.place() < snap.place());
        self.snapshots.insert(at, snap);
    }

    pub fn remove(&mut self, id: Uuid) -> Option<Snapshot> {
        let i = self.snapshots.iter().position(|s| s.snapshot_id == id)?;
        Some(self.snapshots.remove(i))
    }

    /// Retained snapshots due at `now`: `expires_at <= now`, not do_not_delete.
    pub fn due(&self, now: DateTime<Utc>) -> impl Iterator<Item = &Snapshot> {
        self.snapshots
            .iter()
            .filter(move |s| !s.do_not_delete && s.expires_at <= now)
    }
}

/// `taken_at` + the longest retention among `classes` whose retention is on.
pub fn expires_at(
    taken_at: DateTime<Utc>,
    classes: &[SnapshotClass],
    s: &Schedule,
) -> DateTime<Utc> {
    let days = classes
        .iter()
        .map(|c| match c {
            SnapshotClass::Base => s.snapshot_retention_days,
            SnapshotClass::Daily => s.daily_retention_days,
            SnapshotClass::Weekly => s.weekly_retention_weeks * 7,
            SnapshotClass::Monthly => s.monthly_retention_months * 28,
        })
        .max()
        .unwrap_or(0);
    taken_at + Duration::days(i64::from(days))
}

#[cfg(test)]
mod tests {
    use super::SnapshotClass::*;
    use super::*;
    use crate::domain::schedule::SchedulePatch;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    /// Record snapshots in the given order; return each one's classes.
    fn record_all(schedule: &Schedule, times: &[DateTime<Utc>]) -> Vec<Vec<SnapshotClass>> {
        let mut c = Catalog::default();
        times
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let classes = c.classify(*t, schedule);
                let snap = Snapshot {
                    snapshot_id: Uuid::from_u128(i as u128),
                    taken_at: *t,
                    size_bytes: 1,
                    classes: classes.clone(),
                    expires_at: expires_at(*t, &classes, schedule),
                    do_not_delete: false,
                };
                c.record(snap, day_of(*t, schedule));
                classes
            })
            .collect()
    }

    #[test]
    fn first_of_day_week_month_across_boundaries() {
        let s = Schedule::default();
        // 2026-11-29 is a Sunday, 11-30 a Monday, 12-01 a Tuesday.
        let got = record_all(
            &s,
            &[
                at(2026, 11, 29, 0, 0), // first ever: daily, weekly (ISO week 48), monthly (Nov)
                at(2026, 11, 29, 18, 0), // same day
                at(2026, 11, 30, 0, 0), // Monday: new ISO week 49, still November
                at(2026, 11, 30, 6, 0),
                at(2026, 12, 1, 0, 0),    // new month, same ISO week
                at(2026, 12, 31, 23, 59), // Thursday, week 53 of 2026
                at(2027, 1, 1, 0, 0),     // new year, but still ISO week 53 of 2026
            ],
        );
        assert_eq!(
            got,
            vec![
                vec![Base, Daily, Weekly, Monthly],
                vec![Base],
                vec![Base, Daily, Weekly],
                vec![Base],
                vec![Base, Daily, Monthly],
                vec![Base, Daily, Weekly],
                vec![Base, Daily, Monthly],
            ]
        );
    }

    #[test]
    fn reference_time_shifts_the_day() {
        let s = Schedule::default()
            .apply(&SchedulePatch {
                reference_hour_of_day: Some(6),
                reference_minute_of_hour: Some(30),
                ..Default::default()
            })
            .unwrap();
        // 2026-11-02 06:29 still belongs to the day of 11-01; 06:30 starts 11-02.
        assert_eq!(
            day_of(at(2026, 11, 2, 6, 29), &s),
            NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()
        );
        assert_eq!(
            day_of(at(2026, 11, 2, 6, 30), &s),
            NaiveDate::from_ymd_opt(2026, 11, 2).unwrap()
        );
        // Month boundary moves with it: 2026-12-01 03:00 is still a November day.
        let got = record_all(
            &s,
            &[
                at(2026, 11, 30, 12, 0),
                at(2026, 12, 1, 3, 0),
                at(2026, 12, 1, 7, 0),
            ],
        );
        assert_eq!(got[1], vec![Base]);
        assert_eq!(got[2], vec![Base, Daily, Monthly]);
    }

    #[test]
    fn leap_day_is_its_own_day_and_february() {
        let s = Schedule::default();
        let got = record_all(
            &s,
            &[
                at(2028, 2, 28, 12, 0),
                at(2028, 2, 29, 12, 0),
                at(2028, 3, 1, 0, 0),
            ],
        );
        assert_eq!(got[1], vec![Base, Daily]); // Tue 02-29: same ISO week, same month
        assert_eq!(got[2], vec![Base, Daily, Monthly]);
        let expiry = expires_at(at(2028, 2, 28, 12, 0), &[Base, Daily], &s);
        assert_eq!(expiry, at(2028, 3, 1, 12, 0)); // 2 days across the leap day
    }

    #[test]
    fn out_of_order_reports_count_in_recording_order() {
        let s = Schedule::default();
        let got = record_all(&s, &[at(2026, 11, 5, 18, 0), at(2026, 11, 5, 6, 0)]);
        assert_eq!(got[0], vec![Base, Daily, Weekly, Monthly]);
        assert_eq!(
            got[1],
            vec![Base],
            "the earlier-taken one was recorded second"
        );
    }

    #[test]
    fn expiry_takes_the_longest_enabled_retention_at_min_and_max() {
        let t = at(2026, 1, 1, 0, 0);
        let sched = |p: SchedulePatch| Schedule::default().apply(&p).unwrap();
        let all = [Base, Daily, Weekly, Monthly];
        // minimums: base 2, daily 1, weekly 1 week, monthly 1 month (28 days)
        let min = sched(SchedulePatch {
            snapshot_retention_days: Some(2),
            daily_retention_days: Some(1),
            weekly_retention_weeks: Some(1),
            monthly_retention_months: Some(1),
            ..Default::default()
        });
        assert_eq!(expires_at(t, &[Base], &min), t + Duration::days(2));
        assert_eq!(expires_at(t, &[Base, Daily], &min), t + Duration::days(2));
        assert_eq!(
            expires_at(t, &[Base, Daily, Weekly], &min),
            t + Duration::days(7)
        );
        assert_eq!(expires_at(t, &all, &min), t + Duration::days(28));
        // maximums: base 30 (24 h interval), daily 365, weekly 52 weeks, monthly 36 months
        let max = sched(SchedulePatch {
            snapshot_retention_days: Some(30),
            daily_retention_days: Some(365),
            weekly_retention_weeks: Some(52),
            monthly_retention_months: Some(36),
            ..Default::default()
        });
        assert_eq!(expires_at(t, &[Base], &max), t + Duration::days(30));
        assert_eq!(expires_at(t, &[Base, Daily], &max), t + Duration::days(365));
        assert_eq!(
            expires_at(t, &[Base, Daily, Weekly], &max),
            t + Duration::days(365)
        ); // daily 365 > weekly 364
        assert_eq!(
            expires_at(t, &[Base, Weekly], &max),
            t + Duration::days(364)
        );
        assert_eq!(expires_at(t, &all, &max), t + Duration::days(36 * 28));
        // base max is 5 days for sub-daily intervals
        let six = sched(SchedulePatch {
            snapshot_interval_hours: Some(6),
            snapshot_retention_days: Some(5),
            ..Default::default()
        });
        assert_eq!(expires_at(t, &[Base], &six), t + Duration::days(5));
        // retention 0 (off) classes do not extend: daily off, weekly off, monthly off
        let off = sched(SchedulePatch {
            daily_retention_days: Some(0),
            weekly_retention_weeks: Some(0),
            monthly_retention_months: Some(0),
            ..Default::default()
        });
        assert_eq!(expires_at(t, &all, &off), t + Duration::days(2));
    }
}
