//! Human-readable sizes and rates: `256M`, `1G`, `16GiB`, `200MB/s`.
//!
//! Binary multiples throughout (`M` = MiB), as operators of VMs expect for memory sizes;
//! rates accept the same suffixes with an optional `/s`.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot read {input:?} as a size (examples: 4096, 256M, 1G, 16GiB, 200MB/s)")]
pub struct ParseSizeError {
    pub input: String,
}

/// Parses a size in bytes: a number with an optional `K`, `M`, `G` or `T` suffix (binary),
/// optionally followed by `B`/`iB`, and for rates by `/s`.
pub fn parse_size(input: &str) -> Result<u64, ParseSizeError> {
    let err = || ParseSizeError {
        input: input.to_string(),
    };
    let s = input.trim();
    let s = s.strip_suffix("/s").unwrap_or(s).trim();
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(err());
    }
    let value: f64 = num.parse().map_err(|_| err())?;
    let suffix = suffix.trim().to_ascii_uppercase();
    let suffix = suffix.trim_end_matches('B').trim_end_matches('I');
    let multiplier: u64 = match suffix {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(err()),
    };
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes for people: `1.00 GiB`, `512.0 MiB`, `4.0 KiB`, `17 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if v >= 100.0 {
                format!("{v:.0} {name}")
            } else {
                format!("{v:.2} {name}")
            };
        }
    }
    format!("{bytes} B")
}

/// Formats a rate: `3.21 GiB/s`.
pub fn format_rate(bytes_per_s: f64) -> String {
    format!("{}/s", format_bytes(bytes_per_s.max(0.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("16GiB"), Ok(16 << 30));
        assert_eq!(parse_size("200MB/s"), Ok(200 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(" 0 "), Ok(0));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(17), "17 B");
        assert_eq!(format_bytes(1 << 30), "1.00 GiB");
        assert_eq!(format_rate(512.0 * 1024.0 * 1024.0), "512 MiB/s");
    }
}
