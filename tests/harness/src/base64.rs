//! Standard base64 decoding (RFC 4648, with padding), for the results the virtual KVM host
//! sends back: busybox `base64` output, wrapped at 76 columns.

/// Decodes base64 text, ignoring line breaks and other whitespace.
///
/// Returns `None` on any character outside the alphabet or a truncated final group.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut group = [0u8; 4];
    let mut filled = 0;
    let mut padding = 0;
    for byte in text.bytes() {
        if byte.is_ascii_whitespace() {
            continue;
        }
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                padding += 1;
                0
            }
            _ => return None,
        };
        // Nothing but padding may follow padding.
        if padding > 0 && byte != b'=' {
            return None;
        }
        group[filled] = value;
        filled += 1;
        if filled == 4 {
            let bits = (u32::from(group[0]) << 18)
                | (u32::from(group[1]) << 12)
                | (u32::from(group[2]) << 6)
                | u32::from(group[3]);
            let bytes = bits.to_be_bytes();
            match padding {
                0 => out.extend_from_slice(&bytes[1..4]),
                1 => out.extend_from_slice(&bytes[1..3]),
                2 => out.push(bytes[1]),
                _ => return None,
            }
            filled = 0;
        }
    }
    (filled == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn decodes_rfc4648_vectors() {
        for (encoded, plain) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
        ] {
            assert_eq!(
                decode(encoded).as_deref(),
                Some(plain.as_bytes()),
                "{encoded}"
            );
        }
    }

    #[test]
    fn ignores_line_breaks() {
        assert_eq!(decode("Zm9v\r\nYmFy\n").as_deref(), Some(&b"foobar"[..]));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode("Zm9v!"), None);
        assert_eq!(decode("Zm9"), None);
        assert_eq!(decode("Zg==Zg=="), None);
    }

    #[test]
    fn round_trips_with_gnu_base64() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let Ok(mut child) = std::process::Command::new("base64")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("base64 (coreutils) not installed; skipping the cross-check");
            return;
        };
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&data).unwrap();
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        assert_eq!(decode(&text), Some(data));
    }
}
