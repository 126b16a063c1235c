//! Rates as `tc` prints them: `40Mbit`, `1Gbit`, `500Kbit`, `800bit`.

/// The smallest bucket: several full-size frames, so that a low rate does
/// not drop every frame that meets a nearly empty bucket.
const MIN_BURST_BYTES: u64 = 32 * 1024;

/// The token bucket size for `rate_bps`: 10 ms worth of traffic, at least
/// 32 KiB. A bucket much smaller than what the kernel can send per timer
/// tick caps below the rate.
pub fn burst_bytes(rate_bps: u64) -> u64 {
    (rate_bps / 8 / 100).max(MIN_BURST_BYTES)
}

/// Bits per second of a `tc` rate, `None` if it is not one.
pub fn parse(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let scale = match unit {
        "bit" => 1.0,
        "Kbit" => 1e3,
        "Mbit" => 1e6,
        "Gbit" => 1e9,
        "Tbit" => 1e12,
        _ => return None,
    };
    Some((n * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bursts_are_ten_milliseconds_but_not_tiny() {
        assert_eq!(super::burst_bytes(1_000_000), super::MIN_BURST_BYTES);
        assert_eq!(super::burst_bytes(1_000_000_000), 1_250_000);
    }

    #[test]
    fn tc_rates_parse() {
        assert_eq!(super::parse("40Mbit"), Some(40_000_000));
        assert_eq!(super::parse("1Gbit"), Some(1_000_000_000));
        assert_eq!(super::parse("1.5Mbit"), Some(1_500_000));
        assert_eq!(super::parse("800bit"), Some(800));
        assert_eq!(super::parse("40MB"), None);
    }
}
