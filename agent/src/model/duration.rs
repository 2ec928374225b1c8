//! Durations in the config: `30s`, `5m`, `1h`, or `0`.

use std::time::Duration;

/// Parses `<whole number><s|m|h>` or `0`; `None` for anything else (never panics, whatever
/// the input: the unit is split off by character, not by byte).
pub fn parse(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let unit = text.chars().last()?;
    let number = &text[..text.len() - unit.len_utf8()];
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = number.parse().ok()?;
    let secs = match unit {
        's' => n,
        'm' => n.checked_mul(60)?,
        'h' => n.checked_mul(3600)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_refusals() {
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse("15s"), Some(Duration::from_secs(15)));
        assert_eq!(parse("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse("2h"), Some(Duration::from_secs(7200)));
        for bad in [
            "",
            "s",
            "5",
            "5d",
            "-5s",
            "+5s",
            "1.5m",
            "99999999999999999999h",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_multi_byte_last_character_is_refused_not_a_panic() {
        for bad in ["1é", "é", "5m€", "🦀", "1\u{301}"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
