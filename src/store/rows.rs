//! How a job's snapshot catalog is laid out in rows of
//! [`JOB_ROWS`](super::tables::JOB_ROWS): one row per retained snapshot
//! ([`JobRow::Snapshot`]) and one row of the job's class history, which
//! days, weeks and months already had their daily, weekly, monthly
//! ([`JobRow::Classes`]). A batch writes only the snapshots it added,
//! changed or removed, and the class row only when it changed, so recording
//! a snapshot costs one small row however large the catalog is.

use super::tables::JobRow;
use crate::domain::{Catalog, Job, Snapshot};
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use uuid::Uuid;

/// A row to write under key `K`; `None`: remove the row.
pub type Row<K> = (K, Option<Vec<u8>>);

/// A key of [`JOB_ROWS`](super::tables::JOB_ROWS).
pub type JobKey = (u128, u8, u128);

/// The class row: everything of a catalog but its snapshots.
#[derive(Serialize)]
struct ClassesRef<'a> {
    daily_days: &'a BTreeSet<NaiveDate>,
    weekly_weeks: &'a BTreeSet<(i32, u32)>,
    monthly_months: &'a BTreeSet<(i32, u32)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Classes {
    daily_days: BTreeSet<NaiveDate>,
    weekly_weeks: BTreeSet<(i32, u32)>,
    monthly_months: BTreeSet<(i32, u32)>,
}

pub fn classes_row(c: &Catalog) -> Vec<u8> {
    serde_json::to_vec(&ClassesRef {
        daily_days: &c.daily_days,
        weekly_weeks: &c.weekly_weeks,
        monthly_months: &c.monthly_months,
    })
    .expect("catalog classes serialize")
}

/// A job's view row ([`JobRow::Job`]).
pub fn job_row(j: &Job) -> Vec<u8> {
    serde_json::to_vec(j).expect("job serializes")
}

pub fn snapshot_row(s: &Snapshot) -> Vec<u8> {
    serde_json::to_vec(s).expect("snapshot serializes")
}

pub fn snapshot_key(job_id: Uuid, snapshot_id: Uuid) -> JobKey {
    JobRow::Snapshot.key(job_id.as_u128(), snapshot_id.as_u128())
}

/// A catalog from its class row and its snapshot rows (in any order).
pub fn read_catalog(
    classes: &[u8],
    snapshots: impl IntoIterator<Item = Result<Snapshot, serde_json::Error>>,
) -> Result<Catalog, serde_json::Error> {
    let Classes {
        daily_days,
        weekly_weeks,
        monthly_months,
    } = serde_json::from_slice(classes)?;
    let mut snapshots = snapshots.into_iter().collect::<Result<Vec<_>, _>>()?;
    snapshots.sort_by_key(|s| (s.taken_at, s.snapshot_id));
    Ok(Catalog {
        snapshots,
        daily_days,
        weekly_weeks,
        monthly_months,
    })
}

/// The rows that turn a job's stored catalog `before` into `after`.
pub fn catalog_rows(
    job_id: Uuid,
    before: Option<&Catalog>,
    after: Option<&Catalog>,
) -> Vec<Row<JobKey>> {
    let mut rows = Vec::new();
    let classes_key = JobRow::Classes.key(job_id.as_u128(), 0);
    let empty = Catalog::default();
    let (was, is) = (before.unwrap_or(&empty), after.unwrap_or(&empty));
    let classes_changed = was.daily_days != is.daily_days
        || was.weekly_weeks != is.weekly_weeks
        || was.monthly_months != is.monthly_months;
    match after {
        Some(c) if before.is_none() || classes_changed => {
            rows.push((classes_key, Some(classes_row(c))));
        }
        None if before.is_some() => rows.push((classes_key, None)),
        _ => {}
    }
    for s in &is.snapshots {
        if was.get(s.snapshot_id) != Some(s) {
            rows.push((snapshot_key(job_id, s.snapshot_id), Some(snapshot_row(s))));
        }
    }
    for s in &was.snapshots {
        if is.get(s.snapshot_id).is_none() {
            rows.push((snapshot_key(job_id, s.snapshot_id), None));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SnapshotClass;
    use chrono::{TimeZone, Utc};

    fn snap(n: u128, day: u32) -> Snapshot {
        let taken_at = Utc.with_ymd_and_hms(2026, 11, day, 6, 0, 0).unwrap();
        Snapshot {
            snapshot_id: Uuid::from_u128(n),
            taken_at,
            size_bytes: 1,
            classes: vec![SnapshotClass::Base],
            expires_at: taken_at + chrono::Duration::days(2),
            do_not_delete: false,
        }
    }

    fn catalog(snaps: &[Snapshot], days: &[u32]) -> Catalog {
        Catalog {
            snapshots: snaps.to_vec(),
            daily_days: days
                .iter()
                .map(|d| NaiveDate::from_ymd_opt(2026, 11, *d).unwrap())
                .collect(),
            ..Catalog::default()
        }
    }

    /// (kind, sub, written?) of each row, sorted.
    fn summary(rows: &[Row<JobKey>]) -> Vec<(u8, u128, bool)> {
        let mut s: Vec<_> = rows.iter().map(|(k, v)| (k.1, k.2, v.is_some())).collect();
        s.sort();
        s
    }

    #[test]
    fn only_what_changed_is_written_and_the_rows_read_back_as_the_catalog() {
        let job = Uuid::from_u128(7);
        let (classes, snapshot) = (JobRow::Classes as u8, JobRow::Snapshot as u8);
        let before = catalog(&[snap(1, 1), snap(2, 2)], &[1, 2]);
        // One recorded on a day that already had its daily: one row.
        let mut after = before.clone();
        after.snapshots.push(snap(3, 2));
        let rows = catalog_rows(job, Some(&before), Some(&after));
        assert_eq!(summary(&rows), vec![(snapshot, 3, true)]);
        assert!(rows.iter().all(|(k, _)| k.0 == job.as_u128()));
        // Expired one, changed another, recorded a daily: two rows and the classes.
        let mut later = after.clone();
        later.snapshots.remove(0);
        later.snapshots[0].do_not_delete = true;
        later.snapshots.push(snap(4, 3));
        later
            .daily_days
            .insert(NaiveDate::from_ymd_opt(2026, 11, 3).unwrap());
        let rows = catalog_rows(job, Some(&after), Some(&later));
        assert_eq!(
            summary(&rows),
            vec![
                (classes, 0, true),
                (snapshot, 1, false),
                (snapshot, 2, true),
                (snapshot, 4, true)
            ]
        );
        // A new catalog writes its classes; the rows read back, in time order.
        let rows = catalog_rows(job, None, Some(&later));
        let classes_bytes = rows
            .iter()
            .find(|(k, _)| k.1 == classes)
            .and_then(|(_, v)| v.clone())
            .expect("classes row");
        let snapshots = rows
            .iter()
            .rev()
            .filter(|(k, _)| k.1 == snapshot)
            .map(|(_, v)| serde_json::from_slice(v.as_ref().unwrap()));
        assert_eq!(read_catalog(&classes_bytes, snapshots).unwrap(), later);
        assert!(catalog_rows(job, Some(&later), Some(&later)).is_empty());
    }
}
