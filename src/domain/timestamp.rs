//! Reading the RFC 3339 timestamps bcp writes, fast.
//!
//! chrono serializes a `DateTime<Utc>` as `YYYY-MM-DDTHH:MM:SS[.f]Z`; its
//! general parser (every offset, relaxed forms, leap seconds) takes a third
//! of a microsecond per timestamp, and replay and verify read two or three
//! per event. [`parse`] reads that one form directly and hands anything else
//! to chrono, so every input gives exactly what chrono's `Deserialize` gives.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde::Deserializer;
use serde::de::{self, Visitor};
use std::fmt;

fn digits<const N: usize>(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b.get(..N)? {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Some(v)
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, or None for anything else (which may
/// still be valid RFC 3339: see [`parse`]).
fn parse_canonical(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[b.len() - 1] != b'Z'
    {
        return None;
    }
    let year = digits::<4>(b)?;
    let month = digits::<2>(&b[5..])?;
    let day = digits::<2>(&b[8..])?;
    let hour = digits::<2>(&b[11..])?;
    let min = digits::<2>(&b[14..])?;
    let sec = digits::<2>(&b[17..])?;
    let frac = &b[19..b.len() - 1];
    let nanos = match frac {
        [] => 0,
        [b'.', f @ ..] if (1..=9).contains(&f.len()) => {
            let mut v = 0u32;
            for &c in f {
                if !c.is_ascii_digit() {
                    return None;
                }
                v = v * 10 + u32::from(c - b'0');
            }
            v * 10u32.pow(9 - f.len() as u32)
        }
        _ => return None,
    };
    // A leap second (60) and out-of-range fields go to chrono.
    if sec > 59 {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    let time = NaiveTime::from_hms_nano_opt(hour, min, sec, nanos)?;
    Some(NaiveDateTime::new(date, time).and_utc())
}

/// What chrono's `Deserialize for DateTime<Utc>` makes of `s`.
pub fn parse(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match parse_canonical(s) {
        Some(t) => Ok(t),
        None => s
            .parse::<DateTime<FixedOffset>>()
            .map(|t| t.with_timezone(&Utc)),
    }
}

struct TimestampVisitor;

impl Visitor<'_> for TimestampVisitor {
    type Value = DateTime<Utc>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an RFC 3339 formatted date and time string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<DateTime<Utc>, E> {
        parse(v).map_err(E::custom)
    }
}

/// `#[serde(deserialize_with = "…")]` for a `DateTime<Utc>`: the same values
/// and errors as chrono's own impl.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    d.deserialize_str(TimestampVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn chrono_says(s: &str) -> Option<DateTime<Utc>> {
        serde_json::from_value::<DateTime<Utc>>(serde_json::Value::String(s.into())).ok()
    }

    #[test]
    fn agrees_with_chrono() {
        let mut cases: Vec<String> = [
            "2026-11-27T05:13:17Z",
            "2026-11-27T05:13:17.5Z",
            "2026-11-27T05:13:17.503587Z",
            "2026-11-27T05:13:17.123456789Z",
            "2026-11-27T05:13:17.1234567891Z",
            "2026-11-27T05:13:17.Z",
            "2026-11-27T05:13:60Z",
            "2016-12-31T23:59:60.5Z",
            "2026-02-29T00:00:00Z",
            "2024-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2026-01-32T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T23:60:00Z",
            "2026-01-01t23:00:00z",
            "2026-01-01 23:00:00Z",
            "2026-01-01T23:00:00+02:00",
            "2026-01-01T23:00:00.25-01:30",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "+12026-01-01T00:00:00Z",
            "2026-1-01T00:00:00Z",
            "2026-01-01T00:00:0xZ",
            "2026-01-01T00:00:00.1x3Z",
            "2026-01-01T00:00:00",
            "",
            "Z",
        ]
        .map(String::from)
        .to_vec();
        let t0 = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap();
        for i in 0..2000i64 {
            let t = t0 + Duration::nanoseconds(i * 987_654_321_123 + i * i * 7);
            cases.push(
                serde_json::to_value(t)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        for s in &cases {
            assert_eq!(parse(s).ok(), chrono_says(s), "{s:?}");
            let ours: Result<DateTime<Utc>, _> = deserialize(serde_json::Value::String(s.clone()));
            assert_eq!(ours.ok(), chrono_says(s), "{s:?}");
        }
    }
}
