//! What PostgreSQL's `jsonb` refuses in text that is otherwise valid JSON, found before COPY.
//!
//! A line that PostgreSQL refuses inside a COPY fails the whole batch, so the loader checks each
//! line here first, after `serde_json` has accepted its syntax: raw bytes that are not UTF-8, a
//! `\u0000` escape, a lone UTF-16 surrogate escape, a number outside `numeric`'s range, and
//! nesting deeper than [`MAX_DEPTH`]. What this misses still cannot fail a batch (the loader
//! isolates a refused line by splitting the batch); this check only keeps that slow path rare.
//! It reads bytes and returns a kind and a byte offset, never any of the line's content, so a
//! rejection reason built from it quotes no patient data. No IO.

/// Deepest nesting of objects and arrays accepted. PostgreSQL's own limit depends on its
/// `max_stack_depth` (about 15,000 levels at the default 2 MB); FHIR resources nest a few dozen
/// levels at most, so anything near this is not a resource.
pub const MAX_DEPTH: usize = 512;

/// `numeric` holds at most 131,072 digits before the decimal point: the highest decimal weight
/// (position of the first digit) it accepts.
const MAX_WEIGHT: i64 = 131_071;
/// `numeric` holds at most 16,383 digits after the decimal point.
const MAX_SCALE: i64 = 16_383;

/// Why PostgreSQL would refuse a line, and where (a byte offset into the line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    InvalidUtf8 { at: usize },
    NulEscape { at: usize },
    LoneSurrogate { at: usize },
    NumberOutOfRange { at: usize },
    TooDeep { at: usize },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::InvalidUtf8 { at } => write!(f, "byte {at} is not valid UTF-8"),
            Refusal::NulEscape { at } => write!(
                f,
                "byte {at}: a \\u0000 escape, which PostgreSQL jsonb cannot store"
            ),
            Refusal::LoneSurrogate { at } => write!(
                f,
                "byte {at}: a lone UTF-16 surrogate escape, which PostgreSQL jsonb refuses"
            ),
            Refusal::NumberOutOfRange { at } => write!(
                f,
                "byte {at}: a number outside the range PostgreSQL numeric can hold"
            ),
            Refusal::TooDeep { at } => {
                write!(f, "byte {at}: nested deeper than {MAX_DEPTH} levels")
            }
        }
    }
}

/// The first thing in `line` that PostgreSQL's jsonb would refuse. `line` must already be
/// valid JSON syntax (checked by `serde_json`); on other input the answer is unspecified but
/// the function still returns without panicking.
pub fn refusal(line: &[u8]) -> Option<Refusal> {
    if let Err(e) = std::str::from_utf8(line) {
        return Some(Refusal::InvalidUtf8 {
            at: e.valid_up_to(),
        });
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < line.len() {
        match line[i] {
            b'"' => match string_end(line, i + 1) {
                Ok(end) => i = end,
                Err(refusal) => return Some(refusal),
            },
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(Refusal::TooDeep { at: i });
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let (end, in_range) = number(line, i);
                if !in_range {
                    return Some(Refusal::NumberOutOfRange { at: i });
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    None
}

/// Scans a string from just after its opening quote. `Ok(end)` is the offset after the closing
/// quote (or the line's length); an escape PostgreSQL refuses is the `Err`.
fn string_end(line: &[u8], mut i: usize) -> Result<usize, Refusal> {
    loop {
        let Some(found) = memchr::memchr2(b'"', b'\\', &line[i..]) else {
            return Ok(line.len());
        };
        i += found;
        if line[i] == b'"' {
            return Ok(i + 1);
        }
        // A backslash: the escaped character follows.
        let at = i;
        match line.get(i + 1) {
            Some(b'u') => {
                let unit = hex4(line, i + 2);
                match unit {
                    Some(0) => return Err(Refusal::NulEscape { at }),
                    Some(0xD800..=0xDBFF) => {
                        let low = (line.get(i + 6) == Some(&b'\\')
                            && line.get(i + 7) == Some(&b'u'))
                        .then(|| hex4(line, i + 8))
                        .flatten();
                        if !matches!(low, Some(0xDC00..=0xDFFF)) {
                            return Err(Refusal::LoneSurrogate { at });
                        }
                        i += 12;
                    }
                    Some(0xDC00..=0xDFFF) => return Err(Refusal::LoneSurrogate { at }),
                    _ => i += 6,
                }
            }
            _ => i += 2,
        }
        if i >= line.len() {
            return Ok(line.len());
        }
    }
}

fn hex4(line: &[u8], at: usize) -> Option<u32> {
    let digits = line.get(at..at + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(text, 16).ok()
}

/// Scans a number starting at `start`; returns the offset after it and whether PostgreSQL's
/// `numeric` can hold it. The test follows `numeric_in`: the weight of the first digit
/// (integer digits − 1 + exponent) and the scale (fraction digits − exponent) are bounded,
/// whatever the value (`0e-20000` is refused as well).
fn number(line: &[u8], start: usize) -> (usize, bool) {
    let mut i = start;
    if line.get(i) == Some(&b'-') {
        i += 1;
    }
    let int_start = i;
    while line.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int_digits = (i - int_start) as i64;
    let mut frac_digits = 0i64;
    if line.get(i) == Some(&b'.') {
        i += 1;
        let frac_start = i;
        while line.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac_digits = (i - frac_start) as i64;
    }
    let mut exponent = 0i64;
    if matches!(line.get(i), Some(b'e' | b'E')) {
        i += 1;
        let negative = match line.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        while let Some(digit) = line.get(i).filter(|b| b.is_ascii_digit()) {
            // Saturates far beyond either limit, so an absurd exponent cannot overflow.
            exponent = (exponent * 10 + i64::from(digit - b'0')).min(1 << 40);
            i += 1;
        }
        if negative {
            exponent = -exponent;
        }
    }
    // An integer part of "0" has no weight of its own; counting it as one digit only makes the
    // check stricter by one place.
    let weight = int_digits - 1 + exponent;
    let scale = frac_digits - exponent;
    (i.max(start + 1), weight <= MAX_WEIGHT && scale <= MAX_SCALE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_postgresql_refuses() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let cases: &[(&[u8], Option<Refusal>)] = &[
            (br#"{"a":"b","n":[1,2.5,-3e10]}"#, None),
            (br#"{"a":"\ud83d\ude00"}"#, None),
            (br#"{"a":"\\u0000 and \\ud800 are text"}"#, None),
            (br#"{"a":"\u00e9\n"}"#, None),
            (br#"{"a":1e131071,"b":1e-16383,"c":12.5e-16382}"#, None),
            (br#"{"a":"\u0000"}"#, Some(Refusal::NulEscape { at: 6 })),
            (br#"{"a":"\ud800"}"#, Some(Refusal::LoneSurrogate { at: 6 })),
            (
                br#"{"a":"\ud800\u0041"}"#,
                Some(Refusal::LoneSurrogate { at: 6 }),
            ),
            (
                br#"{"a":"x\udc00"}"#,
                Some(Refusal::LoneSurrogate { at: 7 }),
            ),
            (
                br#"{"a":1e200000}"#,
                Some(Refusal::NumberOutOfRange { at: 5 }),
            ),
            (
                br#"{"a":1e131072}"#,
                Some(Refusal::NumberOutOfRange { at: 5 }),
            ),
            (
                br#"{"a":0e-20000}"#,
                Some(Refusal::NumberOutOfRange { at: 5 }),
            ),
            (
                br#"{"a":12.5e-16383}"#,
                Some(Refusal::NumberOutOfRange { at: 5 }),
            ),
            (
                br#"{"a":1e99999999999999999999999}"#,
                Some(Refusal::NumberOutOfRange { at: 5 }),
            ),
            (b"{\"a\":\"\xff\"}", Some(Refusal::InvalidUtf8 { at: 6 })),
            (deep.as_bytes(), Some(Refusal::TooDeep { at: MAX_DEPTH })),
        ];
        for (line, expected) in cases {
            assert_eq!(
                refusal(line),
                *expected,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn never_panics_on_truncated_input() {
        for line in [
            &b"\"\\"[..],
            b"\"\\u12",
            b"\"\\ud800\\u",
            b"-",
            b"1e",
            b"\"abc",
        ] {
            let _ = refusal(line);
        }
    }
}
