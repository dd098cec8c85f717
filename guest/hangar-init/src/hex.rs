//! Hex decoding for the identity's entropy (no dependency for twenty lines).

/// Decodes a string of hex digit pairs (either case; surrounding whitespace ignored).
pub fn decode(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim().as_bytes();
    if !text.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", text.len()));
    }
    text.chunks(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

fn digit(c: u8) -> Result<u8, String> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("invalid hex digit {:?}", c as char)),
    }
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn decodes_both_cases() {
        assert_eq!(decode("00ff7Fa0").unwrap(), vec![0x00, 0xff, 0x7f, 0xa0]);
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
        assert_eq!(decode(" 0a\n").unwrap(), vec![0x0a]);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(decode("abc").unwrap_err().contains("odd"));
        assert!(decode("zz").unwrap_err().contains("invalid hex digit"));
    }
}
