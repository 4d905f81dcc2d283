//! Kubernetes `resource.Quantity` parsing, exact, plus the two in-container limit values HAMi passes
//! through environment variables.
//!
//! **Quantity grammar** (Kubernetes API reference, "Quantity",
//! <https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/quantity/>):
//!
//! ```text
//! quantity  ::= signedNumber suffix
//! number    ::= digits | digits "." digits | digits "." | "." digits
//! suffix    ::= binarySI | decimalExponent | decimalSI
//! binarySI  ::= Ki | Mi | Gi | Ti | Pi | Ei                      (powers of 1024)
//! decimalSI ::= n | u | m | "" | k | M | G | T | P | E           (powers of 1000; n and u as apimachinery)
//! decimalExponent ::= ("e" | "E") signedInteger
//! ```
//!
//! Values are held exactly as an `i128` count of nano-units (10⁻⁹), which is apimachinery's internal
//! precision (`ParseQuantity` rounds to `Nano` scale). Like apimachinery, a non-zero value finer than 1n
//! is rounded **up in magnitude** to 1n ("if you want some resources, you should get some"). Deviations,
//! all stricter than apimachinery: a magnitude above 2⁶³−1 is an error instead of being capped; a bare
//! sign (`"+"`, `"-"`) or a lone `"."` is an error instead of zero. Leading and trailing whitespace is
//! trimmed; whitespace inside is an error. Suffixes are case-sensitive, so `4ki`, `4KI`, `4GB` and
//! `4GiB` are errors, as in Kubernetes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::env;
use crate::error::{Error, Result};

/// Nano-units per unit.
const NANOS_PER_UNIT: i128 = 1_000_000_000;

/// The largest magnitude a quantity may have, in nano-units: (2⁶³ − 1) × 10⁹ (Kubernetes: "no quantity
/// may represent a number greater than 2^63-1 in magnitude").
const MAX_NANOS: i128 = i64::MAX as i128 * NANOS_PER_UNIT;

/// Any value with this many decimal digits in nano-units exceeds [`MAX_NANOS`] (≈ 9.22 × 10²⁷).
const OVERFLOW_DIGITS: i64 = 29;

/// Exponents beyond this magnitude behave like this one (overflow, or rounding up to 1n), so the
/// exponent is clamped while parsing to keep the arithmetic bounded.
const EXPONENT_CLAMP: i64 = 1_000_000;

/// Bytes per MiB.
const BYTES_PER_MIB: i128 = 1 << 20;

/// A Kubernetes resource quantity, held exactly as a signed count of nano-units (10⁻⁹ of the unit).
///
/// The unit is whatever the resource measures: bytes for memory, cores for CPU, a plain count for
/// extended resources such as `nvidia.com/gpu`. Ordering and equality compare values, so `1Ki == 1024`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Quantity {
    nanos: i128,
}

impl Quantity {
    /// Zero.
    pub const ZERO: Self = Self { nanos: 0 };

    /// A whole number of units.
    #[must_use]
    pub fn from_units(units: i64) -> Self {
        Self {
            nanos: i128::from(units) * NANOS_PER_UNIT,
        }
    }

    /// A quantity from nano-units; errors if the magnitude exceeds (2⁶³ − 1) units.
    pub fn from_nanos(nanos: i128) -> Result<Self> {
        if nanos.unsigned_abs() > MAX_NANOS.unsigned_abs() {
            return Err(Error::InvalidQuantity {
                input: format!("{nanos}n"),
                detail: "magnitude above 2^63-1",
            });
        }
        Ok(Self { nanos })
    }

    /// The exact value in nano-units (10⁻⁹ of the unit).
    #[must_use]
    pub fn nanos(self) -> i128 {
        self.nanos
    }

    /// Whether the value is below zero.
    #[must_use]
    pub fn is_negative(self) -> bool {
        self.nanos < 0
    }

    /// Whether the value is zero.
    #[must_use]
    pub fn is_zero(self) -> bool {
        self.nanos == 0
    }

    /// Parses a Kubernetes quantity string (grammar in the module docs). Surrounding whitespace is
    /// trimmed. Errors name the input and say what is wrong.
    pub fn parse(input: &str) -> Result<Self> {
        parse_quantity(input)
    }

    /// Like [`Quantity::parse`], but a negative value is an error (resource requests and limits).
    pub fn parse_non_negative(input: &str) -> Result<Self> {
        let q = parse_quantity(input)?;
        if q.is_negative() {
            return Err(Error::InvalidQuantity {
                input: input.to_owned(),
                detail: "negative",
            });
        }
        Ok(q)
    }

    /// The value as bytes, rounded up to a whole byte (for memory quantities). Errors if negative.
    pub fn to_bytes_ceil(self) -> Result<u64> {
        self.non_negative_ceil_div(NANOS_PER_UNIT, "too large for u64 bytes")
    }

    /// The value as MiB (2²⁰ bytes), rounded up (for memory quantities such as a device-memory limit).
    /// Errors if negative.
    pub fn to_mib_ceil(self) -> Result<u64> {
        self.non_negative_ceil_div(NANOS_PER_UNIT * BYTES_PER_MIB, "too large for u64 MiB")
    }

    /// The value in milli-units, rounded up (for CPU: milli-vCPU). Errors if negative or above `u64`.
    pub fn to_milli_ceil(self) -> Result<u64> {
        self.non_negative_ceil_div(NANOS_PER_UNIT / 1000, "too large for u64 milli-units")
    }

    /// The value as an exact non-negative whole number (for counts such as `nvidia.com/gpu` or a
    /// percentage). Errors if negative or fractional, e.g. `1500m` or `0.5`.
    pub fn as_integer_exact(self) -> Result<u64> {
        if self.is_negative() {
            return Err(self.conversion_error("negative"));
        }
        if self.nanos % NANOS_PER_UNIT != 0 {
            return Err(self.conversion_error("not a whole number"));
        }
        u64::try_from(self.nanos / NANOS_PER_UNIT).map_err(|_| self.conversion_error("too large"))
    }

    fn non_negative_ceil_div(self, divisor: i128, too_large: &'static str) -> Result<u64> {
        if self.is_negative() {
            return Err(self.conversion_error("negative"));
        }
        // nanos ≥ 0 and divisor > 0, so this is the ceiling without overflow (nanos ≤ MAX_NANOS).
        let ceil = (self.nanos + divisor - 1) / divisor;
        u64::try_from(ceil).map_err(|_| self.conversion_error(too_large))
    }

    fn conversion_error(self, detail: &'static str) -> Error {
        Error::InvalidQuantity {
            input: self.to_string(),
            detail,
        }
    }
}

impl FromStr for Quantity {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for Quantity {
    /// Plain decimal without suffix or exponent, e.g. `1610612736`, `-0.5`, `0.000000001`; parses back to
    /// the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.nanos < 0 { "-" } else { "" };
        let abs = self.nanos.unsigned_abs();
        let units = abs / NANOS_PER_UNIT.unsigned_abs();
        let frac = abs % NANOS_PER_UNIT.unsigned_abs();
        if frac == 0 {
            write!(f, "{sign}{units}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{sign}{units}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl Serialize for Quantity {
    /// Serialized as its [`Display`](fmt::Display) string, like Kubernetes serializes quantities.
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    /// Deserialized from a quantity string (any form [`Quantity::parse`] accepts).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn parse_quantity(input: &str) -> Result<Quantity> {
    let err = |detail: &'static str| Error::InvalidQuantity {
        input: input.to_owned(),
        detail,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(err("contains whitespace"));
    }
    if !s.is_ascii() {
        return Err(err("contains a non-ASCII character"));
    }
    let b = s.as_bytes();
    let mut pos = 0;
    let negative = match b.first() {
        Some(b'-') => {
            pos = 1;
            true
        }
        Some(b'+') => {
            pos = 1;
            false
        }
        _ => false,
    };
    let int_digits = take_digits(b, &mut pos);
    let mut frac_digits: &[u8] = &[];
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        frac_digits = take_digits(b, &mut pos);
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(err("no digits"));
    }
    let (dec_exp, bin_shift) = parse_suffix(&s[pos..]).map_err(err)?;

    // value = digits × 2^bin_shift × 10^(dec_exp − frac_len); nanos = value × 10^9.
    let mut digits: Vec<u8> = int_digits.iter().chain(frac_digits).map(|d| d - b'0').collect();
    strip_leading_zeros(&mut digits);
    if digits.is_empty() {
        return Ok(Quantity::ZERO);
    }
    for _ in 0..bin_shift / 10 {
        mul_small(&mut digits, 1024);
    }
    let frac_len = i64::try_from(frac_digits.len()).unwrap_or(i64::MAX);
    let exp10 = dec_exp.saturating_add(9).saturating_sub(frac_len);
    let magnitude = scale_digits(&digits, exp10).ok_or_else(|| err("magnitude above 2^63-1"))?;
    Ok(Quantity {
        nanos: if negative { -magnitude } else { magnitude },
    })
}

/// Advances `pos` over ASCII digits and returns them.
fn take_digits<'a>(b: &'a [u8], pos: &mut usize) -> &'a [u8] {
    let start = *pos;
    while b.get(*pos).is_some_and(u8::is_ascii_digit) {
        *pos += 1;
    }
    &b[start..*pos]
}

/// The suffix as (decimal exponent, binary shift).
fn parse_suffix(suffix: &str) -> std::result::Result<(i64, u32), &'static str> {
    Ok(match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let Some(exp) = suffix.strip_prefix(['e', 'E']) else {
                return Err(
                    "unknown suffix (expected n, u, m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei \
                            or an exponent such as e3)",
                );
            };
            (
                parse_exponent(exp).ok_or(
                    "unknown suffix or malformed exponent (expected n, u, m, k, M, G, T, P, E, Ki, Mi, Gi, \
                 Ti, Pi, Ei or an exponent such as e3)",
                )?,
                0,
            )
        }
    })
}

/// A signed decimal integer, clamped to ±[`EXPONENT_CLAMP`].
fn parse_exponent(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut value: i64 = 0;
    for c in digits.bytes() {
        value = (value * 10 + i64::from(c - b'0')).min(EXPONENT_CLAMP);
    }
    Some(if negative { -value } else { value })
}

fn strip_leading_zeros(digits: &mut Vec<u8>) {
    let zeros = digits.iter().take_while(|&&d| d == 0).count();
    digits.drain(..zeros);
}

/// Multiplies a big-endian decimal digit vector by `factor` in place.
fn mul_small(digits: &mut Vec<u8>, factor: u64) {
    let mut carry = 0u64;
    for d in digits.iter_mut().rev() {
        let v = u64::from(*d) * factor + carry;
        *d = (v % 10) as u8;
        carry = v / 10;
    }
    while carry > 0 {
        digits.insert(0, (carry % 10) as u8);
        carry /= 10;
    }
}

/// `ceil(digits × 10^exp10)` for a non-empty digit vector without leading zeros, or `None` when the
/// result exceeds [`MAX_NANOS`].
fn scale_digits(digits: &[u8], exp10: i64) -> Option<i128> {
    let len = i64::try_from(digits.len()).ok()?;
    let to_int = |ds: &[u8]| ds.iter().fold(0i128, |acc, &d| acc * 10 + i128::from(d));
    let value = if exp10 >= 0 {
        if len.saturating_add(exp10) >= OVERFLOW_DIGITS {
            return None;
        }
        // At most 28 digits in all: fits an i128.
        to_int(digits) * 10i128.pow(u32::try_from(exp10).ok()?)
    } else {
        let drop = exp10.unsigned_abs();
        let keep = u64::try_from(len).ok()?.saturating_sub(drop);
        if keep == 0 {
            // A non-zero value below 1n rounds up to 1n.
            1
        } else {
            if keep >= OVERFLOW_DIGITS.unsigned_abs() {
                return None;
            }
            let keep = usize::try_from(keep).ok()?;
            let (kept, dropped) = digits.split_at(keep);
            to_int(kept) + i128::from(dropped.iter().any(|&d| d != 0))
        }
    };
    (value <= MAX_NANOS).then_some(value)
}

/// Parses the value of HAMi's in-container memory limit, `CUDA_DEVICE_MEMORY_LIMIT` /
/// `CUDA_DEVICE_MEMORY_LIMIT_<i>`, into bytes (peer bug C07).
///
/// Accepted, after trimming surrounding whitespace: decimal digits (leading zeros are decimal, never
/// octal: `08G` is 8 GiB), optionally with a fraction, then one unit:
///
/// | unit | multiplier | source |
/// |---|---|---|
/// | none | bytes | HAMi-core `get_limit_from_env` |
/// | `K` `k` `Ki` | 2¹⁰ | HAMi-core (either case), Kubernetes `Ki` |
/// | `M` `m` `Mi` | 2²⁰ | HAMi-core; HAMi's device plugin writes `"<MiB>m"` (`plugin/server.go`) |
/// | `G` `g` `Gi` | 2³⁰ | HAMi-core, Kubernetes `Gi` |
/// | `Ti` | 2⁴⁰ | Kubernetes |
///
/// Note that `m` means MiB here, as HAMi-core reads it, not Kubernetes' milli.
///
/// A fraction is accepted only if the result is a whole number of bytes (`1.5G` = 1610612736).
/// Errors (never "unlimited", never a few bytes): empty, `0` (a zero limit), a sign (`-1`), `50%`,
/// garbage, any other unit (`4GB`, `4GiB`, `4gb`, `4T`), whitespace inside, and values above `u64`.
pub fn parse_memory_limit_env(input: &str) -> Result<u64> {
    let err = |detail: &'static str| Error::InvalidEnvValue {
        var: env::CUDA_DEVICE_MEMORY_LIMIT,
        input: input.to_owned(),
        detail,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err(
            "empty (a memory limit must be a size; empty never means unlimited)",
        ));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(err("contains whitespace"));
    }
    let b = s.as_bytes();
    match b.first() {
        Some(b'-') => return Err(err("negative (a memory limit must be a positive size)")),
        Some(b'+') => return Err(err("a sign is not allowed")),
        _ => {}
    }
    let mut pos = 0;
    let int_digits = take_digits(b, &mut pos);
    if int_digits.is_empty() {
        return Err(err(
            "expected a decimal number of bytes with an optional unit K, M, G, Ki, Mi, Gi, Ti",
        ));
    }
    let mut frac_digits: &[u8] = &[];
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        frac_digits = take_digits(b, &mut pos);
        if frac_digits.is_empty() {
            return Err(err("expected digits after the decimal point"));
        }
    }
    let shift = match &s[pos..] {
        "" => 0u32,
        "K" | "k" | "Ki" => 10,
        "M" | "m" | "Mi" => 20,
        "G" | "g" | "Gi" => 30,
        "Ti" => 40,
        rest if rest.contains('%') => return Err(err("a percentage is not a memory size")),
        _ => {
            return Err(err(
                "unknown unit (expected none, K, k, Ki, M, m, Mi, G, g, Gi or Ti)",
            ));
        }
    };
    let overflow = || err("too large (above 2^64-1 bytes)");
    // Trailing zeros of the fraction do not change the value.
    let frac_digits = &frac_digits[..frac_digits.iter().rposition(|&d| d != b'0').map_or(0, |i| i + 1)];
    let mut numerator: u128 = 0;
    for &d in int_digits.iter().chain(frac_digits) {
        numerator = numerator
            .checked_mul(10)
            .and_then(|n| n.checked_add(u128::from(d - b'0')))
            .ok_or_else(overflow)?;
    }
    let denominator = u32::try_from(frac_digits.len())
        .ok()
        .and_then(|n| 10u128.checked_pow(n))
        .ok_or_else(|| err("too many fractional digits"))?;
    let scaled = numerator.checked_mul(1u128 << shift).ok_or_else(overflow)?;
    if scaled % denominator != 0 {
        return Err(err("not a whole number of bytes"));
    }
    let bytes = u64::try_from(scaled / denominator).map_err(|_| overflow())?;
    if bytes == 0 {
        return Err(err(
            "zero (a zero memory limit is invalid; it never means unlimited)",
        ));
    }
    Ok(bytes)
}

/// Parses the value of HAMi's `CUDA_DEVICE_SM_LIMIT`: percent of the GPU's SMs, `0..=100` (0 = no
/// throttling, as HAMi-core reads it; `reference/hami.md` §1.5). Surrounding whitespace is trimmed;
/// errors for empty, signs, fractions, `%`, garbage and values above 100.
pub fn parse_sm_limit_env(input: &str) -> Result<u32> {
    let err = |detail: &'static str| Error::InvalidEnvValue {
        var: env::CUDA_DEVICE_SM_LIMIT,
        input: input.to_owned(),
        detail,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s.starts_with('-') {
        return Err(err("negative (expected a percentage 0..=100)"));
    }
    if !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(err("expected a whole percentage 0..=100 without sign or unit"));
    }
    let digits = s.trim_start_matches('0');
    if digits.len() > 3 {
        return Err(err("above 100"));
    }
    let value = digits.bytes().fold(0u32, |acc, c| acc * 10 + u32::from(c - b'0'));
    if value > 100 {
        return Err(err("above 100"));
    }
    Ok(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap()
    }

    fn units(n: i64) -> i128 {
        i128::from(n) * NANOS_PER_UNIT
    }

    #[test]
    fn plain_numbers_and_decimals() {
        assert_eq!(q("0").nanos(), 0);
        assert_eq!(q("1").nanos(), units(1));
        assert_eq!(q("+1").nanos(), units(1));
        assert_eq!(q("-1").nanos(), units(-1));
        assert_eq!(q("1.5").nanos(), 1_500_000_000);
        assert_eq!(q("1.").nanos(), units(1));
        assert_eq!(q(".5").nanos(), 500_000_000);
        assert_eq!(q("007").nanos(), units(7));
        assert_eq!(q("0.000000001").nanos(), 1);
        assert_eq!(q(" 5 ").nanos(), units(5), "surrounding whitespace is trimmed");
    }

    #[test]
    fn suffixes() {
        let cases: &[(&str, i128)] = &[
            ("1n", 1),
            ("1u", 1_000),
            ("100m", 100_000_000),
            ("1k", units(1_000)),
            ("1M", units(1_000_000)),
            ("1G", units(1_000_000_000)),
            ("1T", units(1_000_000_000_000)),
            ("1P", units(1_000_000_000_000_000)),
            ("1E", units(1_000_000_000_000_000_000)),
            ("1Ki", units(1 << 10)),
            ("1Mi", units(1 << 20)),
            ("1Gi", units(1 << 30)),
            ("1Ti", units(1 << 40)),
            ("1Pi", units(1 << 50)),
            ("1Ei", units(1 << 60)),
            ("1.5Gi", units(1_610_612_736)),
            ("0.5Ki", units(512)),
            ("1e3", units(1_000)),
            ("1E3", units(1_000)),
            ("1e+3", units(1_000)),
            ("1e-3", 1_000_000),
            ("1.5e3", units(1_500)),
            ("12e-10", 2), // 1.2n rounds up to 2n
            ("0e999999999999", 0),
        ];
        for &(s, nanos) in cases {
            assert_eq!(q(s).nanos(), nanos, "{s}");
        }
    }

    #[test]
    fn sub_nano_values_round_up_in_magnitude() {
        assert_eq!(q("0.1n").nanos(), 1);
        assert_eq!(q("1e-100").nanos(), 1);
        assert_eq!(q("-0.1n").nanos(), -1);
        assert_eq!(q("1.0000000001").nanos(), 1_000_000_001);
        assert_eq!(q("1.0000000000").nanos(), units(1));
    }

    #[test]
    fn limits() {
        assert_eq!(q("9223372036854775807").nanos(), MAX_NANOS);
        assert_eq!(q("-9223372036854775807").nanos(), -MAX_NANOS);
        assert_eq!(q("7Ei").nanos(), units(7 << 60));
        for s in [
            "9223372036854775808",
            "8Ei",
            "10E",
            "1e19",
            "1e1000000000000",
            "99999999999999999999999999999999999999999",
        ] {
            let e = Quantity::parse(s).unwrap_err();
            assert_eq!(
                e,
                Error::InvalidQuantity {
                    input: s.into(),
                    detail: "magnitude above 2^63-1"
                },
                "{s}"
            );
        }
    }

    #[test]
    fn rejects_invalid_forms() {
        for s in [
            "", "   ", "-", "+", ".", "abc", "1 Gi", "1\tGi", "4GB", "4GiB", "4gb", "1ki", "1mi", "1gi",
            "1Gb", "1K", "1KI", "1i", "1e", "1e+", "1e3.5", "1e3k", "1.5.5", "0x10", "1_000", "--1", "+-1",
            "Mi", "e3", "１", "1%", "1 000",
        ] {
            let e = Quantity::parse(s).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidQuantity { input, .. } if input == s),
                "{s}: {e}"
            );
        }
    }

    #[test]
    fn non_negative_and_conversions() {
        assert!(Quantity::parse_non_negative("-1").is_err());
        assert!(Quantity::parse_non_negative("-0").is_ok());
        assert_eq!(q("1Gi").to_bytes_ceil().unwrap(), 1 << 30);
        assert_eq!(q("1.5").to_bytes_ceil().unwrap(), 2);
        assert_eq!(q("1Gi").to_mib_ceil().unwrap(), 1024);
        assert_eq!(q("1G").to_mib_ceil().unwrap(), 954); // 953.67 MiB rounds up
        assert_eq!(q("1").to_mib_ceil().unwrap(), 1);
        assert_eq!(q("0").to_mib_ceil().unwrap(), 0);
        assert_eq!(q("250m").to_milli_ceil().unwrap(), 250);
        assert_eq!(q("2").to_milli_ceil().unwrap(), 2000);
        assert_eq!(q("0.0001").to_milli_ceil().unwrap(), 1);
        assert_eq!(q("100n").to_milli_ceil().unwrap(), 1);
        assert!(q("9223372036854775807").to_milli_ceil().is_err());
        assert_eq!(q("3").as_integer_exact().unwrap(), 3);
        assert_eq!(q("3000m").as_integer_exact().unwrap(), 3);
        assert_eq!(q("1k").as_integer_exact().unwrap(), 1000);
        let e = q("1500m").as_integer_exact().unwrap_err();
        assert_eq!(
            e,
            Error::InvalidQuantity {
                input: "1.5".into(),
                detail: "not a whole number"
            }
        );
        assert!(q("-1").as_integer_exact().is_err());
        assert!(q("-1").to_bytes_ceil().is_err());
        assert!(q("-1").to_mib_ceil().is_err());
        assert!(q("-1m").to_milli_ceil().is_err());
    }

    #[test]
    fn display_and_serde() {
        assert_eq!(q("1.5Gi").to_string(), "1610612736");
        assert_eq!(q("-500m").to_string(), "-0.5");
        assert_eq!(q("1n").to_string(), "0.000000001");
        assert_eq!(serde_json::to_string(&q("1Ki")).unwrap(), "\"1024\"");
        let back: Quantity = serde_json::from_str("\"2Gi\"").unwrap();
        assert_eq!(back, q("2Gi"));
        assert!(serde_json::from_str::<Quantity>("\"2GB\"").is_err());
        assert_eq!(Quantity::from_units(5), q("5"));
        assert!(Quantity::from_nanos(MAX_NANOS + 1).is_err());
    }

    /// Peer bug C07: every input of the table and its exact outcome.
    #[test]
    fn memory_limit_env_c07_table() {
        const GIB: u64 = 1 << 30;
        let ok: &[(&str, u64)] = &[
            ("4G", 4 * GIB),
            ("4096M", 4 * GIB),
            ("4096m", 4 * GIB),
            ("4194304", 4_194_304),
            ("4Gi", 4 * GIB),
            ("4096Mi", 4 * GIB),
            (" 4G ", 4 * GIB),
            ("\t4G\n", 4 * GIB),
            ("08G", 8 * GIB),
            ("1.5G", 1_610_612_736),
            ("4K", 4096),
            ("4k", 4096),
            ("4Ki", 4096),
            ("4g", 4 * GIB),
            ("1Ti", 1 << 40),
            ("3000m", 3000 << 20),
            ("0.5K", 512),
            ("1.50G", 1_610_612_736),
            ("18446744073709551615", u64::MAX),
        ];
        for &(s, bytes) in ok {
            assert_eq!(parse_memory_limit_env(s).unwrap(), bytes, "{s:?}");
        }
        let rejected = [
            "4GB",
            "4GiB",
            "4gb",
            "-1",
            "50%",
            "",
            "   ",
            "0",
            "0G",
            "0.0M",
            "abc",
            "18446744073709551616",
            "17179869184G",
            "99999999999999999999999999999999999999999999",
            "1.3",
            "1.3K",
            "4 G",
            "4T",
            "4t",
            "+4G",
            "4.G",
            ".5G",
            "0x10",
        ];
        for s in rejected {
            let e = parse_memory_limit_env(s).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidEnvValue { var: "CUDA_DEVICE_MEMORY_LIMIT", input, .. } if input == s),
                "{s:?}: {e}"
            );
        }
    }

    #[test]
    fn sm_limit_env() {
        for (s, v) in [
            ("0", 0),
            ("50", 50),
            ("100", 100),
            (" 25 ", 25),
            ("007", 7),
            ("0000000100", 100),
        ] {
            assert_eq!(parse_sm_limit_env(s).unwrap(), v, "{s:?}");
        }
        for s in [
            "",
            "101",
            "1000",
            "-1",
            "+5",
            "50%",
            "abc",
            "5.5",
            "99999999999999999999",
            "1 0",
        ] {
            assert!(parse_sm_limit_env(s).is_err(), "{s:?}");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(nanos in -MAX_NANOS..=MAX_NANOS) {
            let x = Quantity::from_nanos(nanos).unwrap();
            prop_assert_eq!(Quantity::parse(&x.to_string()).unwrap(), x);
        }

        #[test]
        fn integers_with_suffixes_match_arithmetic(n in 0i64..8192, sfx in 0usize..9) {
            let (suffix, mult): (&str, i128) = [
                ("", 1), ("k", 1_000), ("M", 1_000_000), ("G", 1_000_000_000), ("Ki", 1 << 10),
                ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40), ("Pi", 1 << 50),
            ][sfx];
            let parsed = Quantity::parse(&format!("{n}{suffix}")).unwrap();
            prop_assert_eq!(parsed.nanos(), i128::from(n) * mult * NANOS_PER_UNIT);
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = Quantity::parse(&s);
            let _ = parse_memory_limit_env(&s);
            let _ = parse_sm_limit_env(&s);
        }

        #[test]
        fn never_panics_on_quantity_like_text(s in "[+-]?[0-9]{0,30}(\\.[0-9]{0,30})?([eE][+-]?[0-9]{0,25}|[numkMGTPE]i?)?") {
            let _ = Quantity::parse(&s);
            let _ = parse_memory_limit_env(&s);
        }

        #[test]
        fn memory_limit_mib_form_is_exact(mib in 1u64..=(u64::MAX >> 20)) {
            prop_assert_eq!(parse_memory_limit_env(&format!("{mib}m")).unwrap(), mib << 20);
            prop_assert_eq!(parse_memory_limit_env(&format!("{mib}Mi")).unwrap(), mib << 20);
        }
    }
}
