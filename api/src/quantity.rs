//! Quantities written by people: memory sizes (`64Mi`, `1G`, `65536`) and
//! durations (`500ms`, `10s`, `2m`, `1h`).

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use std::fmt;
use std::time::Duration;

/// A number of bytes, written as an integer or with a suffix (Ki, Mi, Gi, K, M, G).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub u64);

impl Bytes {
    pub fn parse(s: &str) -> Result<Bytes, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size '{s}': expected a number such as 64Mi"))?;
        let mult: u64 = match unit {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "K" | "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            other => {
                return Err(format!(
                    "invalid size unit '{other}' in '{s}': use Ki, Mi, Gi (or K, M, G)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Bytes)
            .ok_or_else(|| format!("size '{s}' is too large"))
    }
}

impl Bytes {
    /// Rounded to one decimal in the largest binary unit, for tables (`21.2Gi`).
    pub fn human(self) -> String {
        let b = self.0 as f64;
        for (unit, size) in [
            ("Gi", (1u64 << 30) as f64),
            ("Mi", (1u64 << 20) as f64),
            ("Ki", 1024.0),
        ] {
            if b >= size {
                let v = b / size;
                return if v.fract() < 0.05 {
                    format!("{:.0}{unit}", v)
                } else {
                    format!("{v:.1}{unit}")
                };
            }
        }
        format!("{}", self.0)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if b >= size && b.is_multiple_of(size) {
                return write!(f, "{}{unit}", b / size);
            }
        }
        write!(f, "{b}")
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 64Mi or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Bytes, E> {
                u64::try_from(v)
                    .map(Bytes)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
                Bytes::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as `500ms`, `10s`, `2m` or `1h` (stored as milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

impl Millis {
    pub fn parse(s: &str) -> Result<Millis, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration '{s}': expected e.g. 500ms, 10s, 2m"))?;
        let mult = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => {
                return Err(format!(
                    "invalid duration '{s}': give a unit, one of ms, s, m, h"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Millis)
            .ok_or_else(|| format!("duration '{s}' is too large"))
    }

    pub fn as_duration(self) -> Duration {
        Duration::from_millis(self.0)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1_000) && ms > 0 {
            write!(f, "{}s", ms / 1_000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 500ms, 10s or 2m")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Millis, E> {
                Ok(Millis(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Millis, E> {
                u64::try_from(v)
                    .map(Millis)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Millis, E> {
                Millis::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(Bytes::parse("64Mi").unwrap(), Bytes(64 << 20));
        assert_eq!(Bytes::parse("1G").unwrap(), Bytes(1_000_000_000));
        assert_eq!(Bytes::parse("4096").unwrap(), Bytes(4096));
        assert!(Bytes::parse("12Q").unwrap_err().contains("Ki, Mi, Gi"));
        assert!(Bytes::parse("Mi").is_err());
        assert_eq!(Bytes(64 << 20).to_string(), "64Mi");
        assert_eq!(Bytes(1000).to_string(), "1000");
        assert_eq!(Bytes(22_748_859_180).human(), "21.2Gi");
        assert_eq!(Bytes(32 << 20).human(), "32Mi");
    }

    #[test]
    fn durations() {
        assert_eq!(Millis::parse("500ms").unwrap(), Millis(500));
        assert_eq!(Millis::parse("2m").unwrap(), Millis(120_000));
        assert!(Millis::parse("10").unwrap_err().contains("unit"));
        assert_eq!(Millis(2_000).to_string(), "2s");
    }
}
