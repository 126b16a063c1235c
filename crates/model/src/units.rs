//! Sizes as operators type them (`512M`, `1G`, `1.5GiB`) and as machines
//! count them (bytes).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A size in bytes. Parses binary units (K, M, G, T with optional `i`/`iB`
/// suffix, all powers of 1024, as QEMU and operators mean them).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = u64)]
pub struct ByteSize(pub u64);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

impl ByteSize {
    pub const fn bytes(self) -> u64 {
        self.0
    }
    pub const fn mib(n: u64) -> Self {
        Self(n * MIB)
    }
    pub const fn gib(n: u64) -> Self {
        Self(n * GIB)
    }
    pub const fn as_mib(self) -> u64 {
        self.0 / MIB
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (examples: 512M, 1G, 1.5GiB, 1048576)")]
pub struct ParseSizeError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSizeError { input: s.to_owned(), reason };
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(err("missing number"));
        }
        let mult = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KI" | "KB" | "KIB" => KIB,
            "M" | "MI" | "MB" | "MIB" => MIB,
            "G" | "GI" | "GB" | "GIB" => GIB,
            "T" | "TI" | "TB" | "TIB" => TIB,
            _ => return Err(err("unknown unit")),
        };
        let bytes = if let Some((int, frac)) = num.split_once('.') {
            let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| err("bad number"))? };
            if frac.is_empty() || frac.len() > 6 || frac.contains('.') {
                return Err(err("bad fraction"));
            }
            let frac_val: u64 = frac.parse().map_err(|_| err("bad fraction"))?;
            let scale = 10u64.pow(frac.len() as u32);
            int.checked_mul(mult)
                .and_then(|i| i.checked_add(frac_val.checked_mul(mult)? / scale))
                .ok_or_else(|| err("too large"))?
        } else {
            num.parse::<u64>().map_err(|_| err("bad number"))?.checked_mul(mult).ok_or_else(|| err("too large"))?
        };
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    /// In the largest unit it reaches: exact as an integer, else to one decimal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)] {
            if b >= size {
                return if b.is_multiple_of(size) {
                    write!(f, "{}{unit}", b / size)
                } else {
                    write!(f, "{:.1}{unit}", b as f64 / size as f64)
                };
            }
        }
        write!(f, "{b}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_sizes() {
        assert_eq!("512M".parse::<ByteSize>(), Ok(ByteSize::mib(512)));
        assert_eq!("1G".parse::<ByteSize>(), Ok(ByteSize::gib(1)));
        assert_eq!("1GiB".parse::<ByteSize>(), Ok(ByteSize::gib(1)));
        assert_eq!("1.5G".parse::<ByteSize>(), Ok(ByteSize(GIB + GIB / 2)));
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!(" 2 m ".parse::<ByteSize>(), Ok(ByteSize::mib(2)));
    }

    #[test]
    fn refuses_nonsense_with_reason() {
        for bad in ["", "M", "-1G", "12Q", "1..5G", "99999999999999999999T", "1.G"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} parsed");
        }
        let e = "12Q".parse::<ByteSize>().expect_err("must fail");
        assert!(e.to_string().contains("unknown unit"), "{e}");
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(ByteSize::mib(512).to_string(), "512M");
        assert_eq!(ByteSize::gib(2).to_string(), "2G");
        assert_eq!(ByteSize(GIB + GIB / 2).to_string(), "1.5G");
        assert_eq!(ByteSize(24684084 * KIB).to_string(), "23.5G");
        assert_eq!(ByteSize(GIB + 1).to_string(), "1.0G");
        assert_eq!(ByteSize(100).to_string(), "100B");
    }
}
