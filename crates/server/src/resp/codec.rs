//! RESP2 and RESP3 frames: a bounded decoder and an encoder, hand-written (a few hundred
//! lines; no allocation is sized by the input before the bytes are there).
//!
//! The decoder takes a buffer and answers a whole frame and the bytes it used, `None` when
//! the frame is not complete yet, or an error when the bytes can never be a frame (the
//! connection is then answered an error and closed). Bounds: a bulk string is at most
//! `max_bulk` bytes, an aggregate at most `max_array` elements and `MAX_DEPTH` deep, a line
//! (inline command, simple string, length) at most `max_inline` bytes. It never panics.
//!
//! Types decoded: `+` `-` `:` `$` `*` (RESP2), `_` `#` `%` `~` `>` (RESP3; sets and pushes
//! decode as arrays). Anything else starting a frame is an inline command: a line split on
//! spaces, as Redis takes from telnet.

/// One RESP value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Integer(i64),
    Bulk(Vec<u8>),
    /// `$-1` and `*-1` in RESP2, `_` in RESP3.
    Null,
    Boolean(bool),
    Array(Vec<Frame>),
    /// A RESP3 map; in RESP2 a flat array of keys and values.
    Map(Vec<(Frame, Frame)>),
}

impl Frame {
    pub fn ok() -> Frame {
        Frame::Simple(b"OK".to_vec())
    }

    pub fn simple(text: &str) -> Frame {
        Frame::Simple(text.as_bytes().to_vec())
    }

    pub fn error(text: impl Into<String>) -> Frame {
        Frame::Error(text.into().into_bytes())
    }

    pub fn bulk(bytes: impl Into<Vec<u8>>) -> Frame {
        Frame::Bulk(bytes.into())
    }
}

/// Bounds on what the decoder accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bulk: usize,
    pub max_array: usize,
    pub max_inline: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: 1 << 20,
            max_array: 1024 * 1024,
            max_inline: 64 * 1024,
        }
    }
}

/// Aggregates nested deeper than this are refused (commands are flat arrays).
pub const MAX_DEPTH: usize = 8;
/// Elements reserved ahead for an aggregate, whatever length it declares.
const MAX_PREALLOCATED: usize = 1024;

/// Bytes that can never be a frame under the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid bulk length")]
    BadBulkLength,
    #[error("invalid multibulk length")]
    BadArrayLength,
    #[error("bulk string longer than {0} bytes")]
    BulkTooLarge(usize),
    #[error("aggregate longer than {0} elements")]
    ArrayTooLarge(usize),
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("aggregates nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("invalid integer")]
    BadInteger,
    #[error("invalid boolean")]
    BadBoolean,
    #[error("bulk string not terminated by CRLF")]
    BadTerminator,
    #[error("unbalanced quotes or bad type byte")]
    BadInline,
}

type Step<T> = Result<Option<(T, usize)>, ProtocolError>;

/// Decodes one frame from the start of `buf`.
pub fn decode(buf: &[u8], limits: &Limits) -> Step<Frame> {
    decode_at(buf, 0, limits, 0)
}

/// The line starting at `at` and the position after its end. A typed line (`strict`) ends
/// in CRLF and holds no other CR or LF; an inline command may end in a bare LF (telnet).
fn line(buf: &[u8], at: usize, limits: &Limits, strict: bool) -> Step<std::ops::Range<usize>> {
    let rest = buf.get(at..).unwrap_or_default();
    match rest.iter().position(|b| *b == b'\n') {
        Some(end) if end > limits.max_inline + 1 => {
            Err(ProtocolError::LineTooLong(limits.max_inline))
        }
        Some(end) => {
            let content = if end > 0 && rest[end - 1] == b'\r' {
                end - 1
            } else if strict {
                return Err(ProtocolError::BadTerminator);
            } else {
                end
            };
            if strict && rest[..content].contains(&b'\r') {
                return Err(ProtocolError::BadTerminator);
            }
            Ok(Some((at..at + content, at + end + 1)))
        }
        None if rest.len() > limits.max_inline + 1 => {
            Err(ProtocolError::LineTooLong(limits.max_inline))
        }
        None => Ok(None),
    }
}

fn parse_integer(bytes: &[u8]) -> Option<i64> {
    let (negative, digits) = match bytes.split_first() {
        Some((b'-', digits)) => (true, digits),
        _ => (false, bytes),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut value: i64 = 0;
    for digit in digits {
        let d = i64::from(digit - b'0');
        value = value.checked_mul(10)?;
        value = if negative {
            value.checked_sub(d)?
        } else {
            value.checked_add(d)?
        };
    }
    Some(value)
}

fn decode_at(buf: &[u8], at: usize, limits: &Limits, depth: usize) -> Step<Frame> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' | b'_' | b'#' => {
            let Some((range, next)) = line(buf, at + 1, limits, true)? else {
                return Ok(None);
            };
            let text = &buf[range];
            let frame = match kind {
                b'+' => Frame::Simple(text.to_vec()),
                b'-' => Frame::Error(text.to_vec()),
                b':' => Frame::Integer(parse_integer(text).ok_or(ProtocolError::BadInteger)?),
                b'_' => Frame::Null,
                _ => match text {
                    b"t" => Frame::Boolean(true),
                    b"f" => Frame::Boolean(false),
                    _ => return Err(ProtocolError::BadBoolean),
                },
            };
            Ok(Some((frame, next)))
        }
        b'$' => {
            let Some((range, next)) = line(buf, at + 1, limits, true)? else {
                return Ok(None);
            };
            let length = parse_integer(&buf[range]).ok_or(ProtocolError::BadBulkLength)?;
            if length == -1 {
                return Ok(Some((Frame::Null, next)));
            }
            let length = usize::try_from(length).map_err(|_| ProtocolError::BadBulkLength)?;
            if length > limits.max_bulk {
                return Err(ProtocolError::BulkTooLarge(limits.max_bulk));
            }
            let end = next + length;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError::BadTerminator);
            }
            Ok(Some((Frame::Bulk(buf[next..end].to_vec()), end + 2)))
        }
        b'*' | b'%' | b'~' | b'>' => {
            if depth >= MAX_DEPTH {
                return Err(ProtocolError::TooDeep);
            }
            let Some((range, mut next)) = line(buf, at + 1, limits, true)? else {
                return Ok(None);
            };
            let length = parse_integer(&buf[range]).ok_or(ProtocolError::BadArrayLength)?;
            if length == -1 && kind == b'*' {
                return Ok(Some((Frame::Null, next)));
            }
            let length = usize::try_from(length).map_err(|_| ProtocolError::BadArrayLength)?;
            if length > limits.max_array {
                return Err(ProtocolError::ArrayTooLarge(limits.max_array));
            }
            let elements = if kind == b'%' { length * 2 } else { length };
            let mut items = Vec::with_capacity(elements.min(MAX_PREALLOCATED));
            for _ in 0..elements {
                let Some((item, after)) = decode_at(buf, next, limits, depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                next = after;
            }
            if kind == b'%' {
                let mut pairs = Vec::with_capacity(length.min(MAX_PREALLOCATED));
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    pairs.push((k, v));
                }
                return Ok(Some((Frame::Map(pairs), next)));
            }
            Ok(Some((Frame::Array(items), next)))
        }
        _ => {
            let Some((range, next)) = line(buf, at, limits, false)? else {
                return Ok(None);
            };
            let words: Vec<Frame> = buf[range]
                .split(|b| *b == b' ' || *b == b'\t')
                .filter(|w| !w.is_empty())
                .map(|w| Frame::Bulk(w.to_vec()))
                .collect();
            if words.len() > limits.max_array {
                return Err(ProtocolError::ArrayTooLarge(limits.max_array));
            }
            Ok(Some((Frame::Array(words), next)))
        }
    }
}

/// Protocol version of a connection (`HELLO 3` switches to RESP3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Resp2,
    Resp3,
}

/// Simple strings and errors cannot hold CR or LF: they become spaces.
fn write_line(out: &mut Vec<u8>, kind: u8, text: &[u8]) {
    out.push(kind);
    out.extend(
        text.iter()
            .map(|b| if *b == b'\r' || *b == b'\n' { b' ' } else { *b }),
    );
    out.extend_from_slice(b"\r\n");
}

fn write_length(out: &mut Vec<u8>, kind: u8, length: usize) {
    out.push(kind);
    out.extend_from_slice(length.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `frame` to `out` in `version`'s encoding.
pub fn encode(frame: &Frame, version: Version, out: &mut Vec<u8>) {
    match frame {
        Frame::Simple(text) => write_line(out, b'+', text),
        Frame::Error(text) => write_line(out, b'-', text),
        Frame::Integer(n) => write_line(out, b':', n.to_string().as_bytes()),
        Frame::Bulk(bytes) => {
            write_length(out, b'$', bytes.len());
            out.extend_from_slice(bytes);
            out.extend_from_slice(b"\r\n");
        }
        Frame::Null => match version {
            Version::Resp2 => out.extend_from_slice(b"$-1\r\n"),
            Version::Resp3 => out.extend_from_slice(b"_\r\n"),
        },
        Frame::Boolean(b) => match version {
            Version::Resp2 => write_line(out, b':', if *b { b"1" } else { b"0" }),
            Version::Resp3 => write_line(out, b'#', if *b { b"t" } else { b"f" }),
        },
        Frame::Array(items) => {
            write_length(out, b'*', items.len());
            for item in items {
                encode(item, version, out);
            }
        }
        Frame::Map(pairs) => {
            match version {
                Version::Resp2 => write_length(out, b'*', pairs.len() * 2),
                Version::Resp3 => write_length(out, b'%', pairs.len()),
            }
            for (k, v) in pairs {
                encode(k, version, out);
                encode(v, version, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Step<Frame> {
        decode(bytes, &Limits::default())
    }

    fn bulks(words: &[&str]) -> Frame {
        Frame::Array(words.iter().map(|w| Frame::bulk(w.as_bytes())).collect())
    }

    #[test]
    fn decodes_a_command_array() {
        let bytes = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        assert_eq!(
            one(bytes),
            Ok(Some((bulks(&["SET", "k", "hello"]), bytes.len())))
        );
    }

    #[test]
    fn incomplete_frames_wait_for_more_bytes() {
        let bytes = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        for cut in 0..bytes.len() {
            assert_eq!(one(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(one(bytes).unwrap().is_some());
    }

    #[test]
    fn inline_commands_split_on_spaces() {
        assert_eq!(
            one(b"PING  hello\r\nrest"),
            Ok(Some((bulks(&["PING", "hello"]), 13)))
        );
    }

    #[test]
    fn bounds_are_enforced_before_the_bytes_arrive() {
        let limits = Limits {
            max_bulk: 10,
            max_array: 4,
            max_inline: 16,
        };
        assert_eq!(
            decode(b"$11\r\n", &limits),
            Err(ProtocolError::BulkTooLarge(10))
        );
        assert_eq!(
            decode(b"*5\r\n", &limits),
            Err(ProtocolError::ArrayTooLarge(4))
        );
        assert_eq!(
            decode(&[b'x'; 40], &limits),
            Err(ProtocolError::LineTooLong(16))
        );
        assert_eq!(
            one(b"$99999999999999999999\r\n"),
            Err(ProtocolError::BadBulkLength)
        );
        assert_eq!(
            decode(b"$-2\r\n", &limits),
            Err(ProtocolError::BadBulkLength)
        );
        assert_eq!(
            decode(b"$2\r\nabcd", &limits),
            Err(ProtocolError::BadTerminator)
        );
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
        assert_eq!(
            decode(deep.as_bytes(), &limits),
            Err(ProtocolError::TooDeep)
        );
    }

    #[test]
    fn every_type_round_trips_in_resp3() {
        let frame = Frame::Array(vec![
            Frame::simple("OK"),
            Frame::error("ERR bad"),
            Frame::Integer(-42),
            Frame::Integer(i64::MIN),
            Frame::bulk(b"a\r\nb".to_vec()),
            Frame::Null,
            Frame::Boolean(true),
            Frame::Map(vec![(Frame::bulk("k"), Frame::Integer(1))]),
            Frame::Array(vec![]),
        ]);
        let mut out = Vec::new();
        encode(&frame, Version::Resp3, &mut out);
        assert_eq!(one(&out), Ok(Some((frame, out.len()))));
    }

    #[test]
    fn resp2_encodes_null_and_maps_the_resp2_way() {
        let mut out = Vec::new();
        encode(&Frame::Null, Version::Resp2, &mut out);
        encode(
            &Frame::Map(vec![(Frame::bulk("a"), Frame::bulk("b"))]),
            Version::Resp2,
            &mut out,
        );
        assert_eq!(out, b"$-1\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n");
    }

    #[test]
    fn fuzz_decoding_never_panics_and_round_trips() {
        let limits = Limits {
            max_bulk: 64,
            max_array: 16,
            max_inline: 64,
        };
        bolero::check!()
            .with_iterations(3000)
            .for_each(|bytes: &[u8]| {
                let mut at = 0;
                while let Ok(Some((frame, used))) = decode(&bytes[at..], &limits) {
                    assert!(used > 0 && at + used <= bytes.len());
                    at += used;
                    for version in [Version::Resp2, Version::Resp3] {
                        let mut out = Vec::new();
                        encode(&frame, version, &mut out);
                        let relaxed = Limits {
                            max_bulk: usize::MAX / 4,
                            max_array: usize::MAX / 4,
                            max_inline: usize::MAX / 4,
                        };
                        let (again, used_again) = decode(&out, &relaxed)
                            .expect("an encoded frame decodes")
                            .expect("an encoded frame is complete");
                        assert_eq!(used_again, out.len());
                        if version == Version::Resp3 {
                            assert_eq!(again, frame);
                        }
                    }
                }
            });
    }
}
