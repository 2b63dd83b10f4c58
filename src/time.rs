//! Time formatting without a calendar dependency: RFC 3339 UTC text from Unix time; and the
//! bounds of the durations a configuration may set.

use std::time::Duration;

/// The longest duration a setting may take: a week. Longer ones are mistakes, and would
/// overflow the clock arithmetic of timers and deadlines.
pub const MAX_SETTING: Duration = Duration::from_secs(7 * 24 * 3600);

/// What is wrong with a duration setting `field` that must be within `min..=MAX_SETTING`.
pub fn duration_problem(field: &str, value: Duration, min: Duration) -> Option<String> {
    if value < min {
        Some(format!("{field}: must be at least {min:?}"))
    } else if value > MAX_SETTING {
        Some(format!("{field}: must be at most a week ({value:?} given)"))
    } else {
        None
    }
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn rfc3339(epoch_secs: i64) -> String {
    let days = epoch_secs.div_euclid(86_400);
    let secs = epoch_secs.rem_euclid(86_400);
    // Civil-from-days, after H. Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Formats milliseconds since the epoch as RFC 3339 with milliseconds.
pub fn rfc3339_millis(epoch_ms: i64) -> String {
    let text = rfc3339(epoch_ms.div_euclid(1000));
    format!(
        "{}.{:03}Z",
        text.trim_end_matches('Z'),
        epoch_ms.rem_euclid(1000)
    )
}

/// Now, as RFC 3339 text.
pub fn now_rfc3339() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    rfc3339_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(
            rfc3339_millis(1_767_225_600_042),
            "2026-01-01T00:00:00.042Z"
        );
    }
}
