//! Reading and writing the RFC 3339 timestamps bcp stores, fast.
//!
//! chrono serializes a `DateTime<Utc>` as `YYYY-MM-DDTHH:MM:SS[.f]Z`; its
//! general parser (every offset, relaxed forms, leap seconds) takes a third
//! of a microsecond per timestamp, and its writer goes through `fmt` one
//! character at a time; replay and verify read and write two or three per
//! event. [`parse`] reads that one form directly and hands anything else to
//! chrono, so every input gives exactly what chrono's `Deserialize` gives;
//! [`serialize`] writes the same bytes as chrono's `Serialize` (years 0 to
//! 9999, no leap second; anything else is left to chrono).

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use chrono::{Datelike, Timelike};
use serde::de::{self, Visitor};
use serde::{Deserializer, Serialize, Serializer};
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

/// chrono's RFC 3339 form with `Z`, seconds to the nanosecond as needed
/// (none, 3, 6 or 9 digits), for years 0-9999 and no leap second.
fn format_canonical(t: &DateTime<Utc>, buf: &mut [u8; 30]) -> Option<usize> {
    // UTC: no offset to apply (DateTime's own getters add it each call).
    let t = t.naive_utc();
    let year = t.year();
    let nano = t.nanosecond();
    if !(0..=9999).contains(&year) || nano >= 1_000_000_000 {
        return None;
    }
    fn put(buf: &mut [u8], mut v: u32) {
        for b in buf.iter_mut().rev() {
            *b = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    put(&mut buf[0..4], year as u32);
    buf[4] = b'-';
    put(&mut buf[5..7], t.month());
    buf[7] = b'-';
    put(&mut buf[8..10], t.day());
    buf[10] = b'T';
    put(&mut buf[11..13], t.hour());
    buf[13] = b':';
    put(&mut buf[14..16], t.minute());
    buf[16] = b':';
    put(&mut buf[17..19], t.second());
    let mut n = 19;
    let (digits, value) = if nano == 0 {
        (0, 0)
    } else if nano.is_multiple_of(1_000_000) {
        (3, nano / 1_000_000)
    } else if nano.is_multiple_of(1_000) {
        (6, nano / 1_000)
    } else {
        (9, nano)
    };
    if digits > 0 {
        buf[n] = b'.';
        put(&mut buf[n + 1..n + 1 + digits], value);
        n += 1 + digits;
    }
    buf[n] = b'Z';
    Some(n + 1)
}

/// `#[serde(serialize_with = "…")]` for a `DateTime<Utc>`: the same bytes
/// as chrono's own impl.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 30];
    match format_canonical(t, &mut buf) {
        // ASCII digits and punctuation only.
        Some(n) => s.serialize_str(std::str::from_utf8(&buf[..n]).expect("ascii")),
        None => t.serialize(s),
    }
}

/// [`serialize`] for an `Option<DateTime<Utc>>`.
pub fn serialize_option<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    struct Fast<'a>(&'a DateTime<Utc>);
    impl Serialize for Fast<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            serialize(self.0, s)
        }
    }
    match t {
        Some(t) => s.serialize_some(&Fast(t)),
        None => s.serialize_none(),
    }
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
            "-0001-12-31T23:59:59.5Z",
            "2026-01-01T00:00:00.100Z",
            "2026-01-01T00:00:00.000100Z",
            "2026-01-01T00:00:00.000000100Z",
            "2026-01-01T00:00:00.120000001Z",
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
            if let Some(t) = chrono_says(s) {
                let mut ours = Vec::new();
                serialize(&t, &mut serde_json::Serializer::new(&mut ours)).unwrap();
                assert_eq!(ours, serde_json::to_vec(&t).unwrap(), "{s:?}");
                let mut ours = Vec::new();
                serialize_option(&Some(t), &mut serde_json::Serializer::new(&mut ours)).unwrap();
                assert_eq!(ours, serde_json::to_vec(&Some(t)).unwrap(), "{s:?}");
            }
            assert_eq!(parse(s).ok(), chrono_says(s), "{s:?}");
            let ours: Result<DateTime<Utc>, _> = deserialize(serde_json::Value::String(s.clone()));
            assert_eq!(ours.ok(), chrono_says(s), "{s:?}");
        }
    }
}
