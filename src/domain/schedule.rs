//! Snapshot schedule and retention settings, with Ops Manager's allowed values
//! (DOMAIN.md "Schedule and retention"). A [`SchedulePatch`] is what a body
//! carries (any subset); [`Schedule::apply`] checks every value and names the
//! field and the allowed values when one is out of range.

use serde::{Deserialize, Serialize};

/// A job's complete schedule. Field names are the contract's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    #[schemars(extend("enum" = [6, 8, 12, 24]))]
    pub snapshot_interval_hours: u32,
    /// 2-30 when `snapshot_interval_hours` is 24, else 2-5.
    #[schemars(range(min = 2, max = 30))]
    pub snapshot_retention_days: u32,
    /// 0 (off) or 1-365.
    #[schemars(range(max = 365))]
    pub daily_retention_days: u32,
    /// 0 (off) or 1-52.
    #[schemars(range(max = 52))]
    pub weekly_retention_weeks: u32,
    /// 0 (off) or 1-36.
    #[schemars(range(max = 36))]
    pub monthly_retention_months: u32,
    #[schemars(range(min = 1, max = 168))]
    pub point_in_time_window_hours: u32,
    #[schemars(range(max = 23))]
    pub reference_hour_of_day: u32,
    #[schemars(range(max = 59))]
    pub reference_minute_of_hour: u32,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            snapshot_interval_hours: 24,
            snapshot_retention_days: 2,
            daily_retention_days: 0,
            weekly_retention_weeks: 2,
            monthly_retention_months: 1,
            point_in_time_window_hours: 24,
            reference_hour_of_day: 0,
            reference_minute_of_hour: 0,
        }
    }
}

/// Any subset of the schedule settings, as a command body carries them.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct SchedulePatch {
    /// 6, 8, 12 or 24.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = [6, 8, 12, 24, null]))]
    pub snapshot_interval_hours: Option<u32>,
    /// 2-30 when the schedule's `snapshot_interval_hours` is 24, else 2-5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 30))]
    pub snapshot_retention_days: Option<u32>,
    /// 0 (off) or 1-365.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 365))]
    pub daily_retention_days: Option<u32>,
    /// 0 (off) or 1-52.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 52))]
    pub weekly_retention_weeks: Option<u32>,
    /// 0 (off) or 1-36.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 36))]
    pub monthly_retention_months: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 168))]
    pub point_in_time_window_hours: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 23))]
    pub reference_hour_of_day: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 59))]
    pub reference_minute_of_hour: Option<u32>,
}

/// A schedule value outside what Ops Manager allows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("schedule.{field} = {value} is not allowed; allowed: {allowed}")]
pub struct InvalidSetting {
    pub field: &'static str,
    pub value: u32,
    pub allowed: &'static str,
}

fn check(
    field: &'static str,
    value: u32,
    ok: bool,
    allowed: &'static str,
) -> Result<(), InvalidSetting> {
    if ok {
        Ok(())
    } else {
        Err(InvalidSetting {
            field,
            value,
            allowed,
        })
    }
}

impl Schedule {
    /// The settings of `self` overridden by those present in `patch`, checked
    /// as a whole (base retention's range depends on the interval).
    pub fn apply(&self, patch: &SchedulePatch) -> Result<Schedule, InvalidSetting> {
        let s = Schedule {
            snapshot_interval_hours: patch
                .snapshot_interval_hours
                .unwrap_or(self.snapshot_interval_hours),
            snapshot_retention_days: patch
                .snapshot_retention_days
                .unwrap_or(self.snapshot_retention_days),
            daily_retention_days: patch
                .daily_retention_days
                .unwrap_or(self.daily_retention_days),
            weekly_retention_weeks: patch
                .weekly_retention_weeks
                .unwrap_or(self.weekly_retention_weeks),
            monthly_retention_months: patch
                .monthly_retention_months
                .unwrap_or(self.monthly_retention_months),
            point_in_time_window_hours: patch
                .point_in_time_window_hours
                .unwrap_or(self.point_in_time_window_hours),
            reference_hour_of_day: patch
                .reference_hour_of_day
                .unwrap_or(self.reference_hour_of_day),
            reference_minute_of_hour: patch
                .reference_minute_of_hour
                .unwrap_or(self.reference_minute_of_hour),
        };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let interval = self.snapshot_interval_hours;
        check(
            "snapshot_interval_hours",
            interval,
            matches!(interval, 6 | 8 | 12 | 24),
            "6, 8, 12, 24",
        )?;
        let base = self.snapshot_retention_days;
        if interval == 24 {
            check(
                "snapshot_retention_days",
                base,
                (2..=30).contains(&base),
                "2-30 when snapshot_interval_hours is 24",
            )?;
        } else {
            check(
                "snapshot_retention_days",
                base,
                (2..=5).contains(&base),
                "2-5 when snapshot_interval_hours is 6, 8 or 12",
            )?;
        }
        check(
            "daily_retention_days",
            self.daily_retention_days,
            self.daily_retention_days <= 365,
            "0 (off) or 1-365",
        )?;
        check(
            "weekly_retention_weeks",
            self.weekly_retention_weeks,
            self.weekly_retention_weeks <= 52,
            "0 (off) or 1-52",
        )?;
        check(
            "monthly_retention_months",
            self.monthly_retention_months,
            self.monthly_retention_months <= 36,
            "0 (off) or 1-36",
        )?;
        let pit = self.point_in_time_window_hours;
        check(
            "point_in_time_window_hours",
            pit,
            (1..=168).contains(&pit),
            "1-168",
        )?;
        check(
            "reference_hour_of_day",
            self.reference_hour_of_day,
            self.reference_hour_of_day <= 23,
            "0-23",
        )?;
        check(
            "reference_minute_of_hour",
            self.reference_minute_of_hour,
            self.reference_minute_of_hour <= 59,
            "0-59",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Schedule::default().validate(), Ok(()));
    }

    #[test]
    fn base_retention_depends_on_interval() {
        let d = Schedule::default();
        let p = SchedulePatch {
            snapshot_retention_days: Some(30),
            ..Default::default()
        };
        assert_eq!(d.apply(&p).unwrap().snapshot_retention_days, 30);
        let p = SchedulePatch {
            snapshot_interval_hours: Some(6),
            snapshot_retention_days: Some(30),
            ..Default::default()
        };
        let e = d.apply(&p).unwrap_err();
        assert_eq!(e.field, "snapshot_retention_days");
        assert!(e.to_string().contains("2-5"), "{e}");
        let p = SchedulePatch {
            snapshot_interval_hours: Some(6),
            snapshot_retention_days: Some(5),
            ..Default::default()
        };
        assert!(d.apply(&p).is_ok());
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let d = Schedule::default();
        let cases: &[(SchedulePatch, &str)] = &[
            (
                SchedulePatch {
                    snapshot_interval_hours: Some(7),
                    ..Default::default()
                },
                "snapshot_interval_hours",
            ),
            (
                SchedulePatch {
                    snapshot_retention_days: Some(1),
                    ..Default::default()
                },
                "snapshot_retention_days",
            ),
            (
                SchedulePatch {
                    daily_retention_days: Some(366),
                    ..Default::default()
                },
                "daily_retention_days",
            ),
            (
                SchedulePatch {
                    weekly_retention_weeks: Some(53),
                    ..Default::default()
                },
                "weekly_retention_weeks",
            ),
            (
                SchedulePatch {
                    monthly_retention_months: Some(37),
                    ..Default::default()
                },
                "monthly_retention_months",
            ),
            (
                SchedulePatch {
                    point_in_time_window_hours: Some(0),
                    ..Default::default()
                },
                "point_in_time_window_hours",
            ),
            (
                SchedulePatch {
                    point_in_time_window_hours: Some(169),
                    ..Default::default()
                },
                "point_in_time_window_hours",
            ),
            (
                SchedulePatch {
                    reference_hour_of_day: Some(24),
                    ..Default::default()
                },
                "reference_hour_of_day",
            ),
            (
                SchedulePatch {
                    reference_minute_of_hour: Some(60),
                    ..Default::default()
                },
                "reference_minute_of_hour",
            ),
        ];
        for (patch, field) in cases {
            assert_eq!(d.apply(patch).unwrap_err().field, *field);
        }
    }
}
