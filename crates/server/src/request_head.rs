//! Request framing on a client connection, checked before hyper sees a byte of it.
//!
//! hyper answers a request it cannot parse (bad request line, oversize head or target) with
//! an empty-bodied 400, 414 or 431, and offers no hook to change that; SPEC section 3 wants
//! JSON for every error. So the listener runs each connection's bytes through a
//! [`RequestFramer`] first: it parses every request head with the parser hyper uses
//! (`httparse`), under the same or stricter rules, and follows each body's framing
//! (`Content-Length` or chunked) to find where the next head starts. Bytes it has checked go
//! on to hyper unchanged; a head it refuses becomes a [`Refusal`], answered in SPEC's JSON
//! after the responses to the requests before it. The framer is sans-IO: bytes in, a verdict
//! out, so it is tested and fuzzed without sockets.
//!
//! When the framer cannot follow a body exactly as hyper would (malformed chunk syntax, an
//! upgrade or CONNECT), it stops checking and passes everything through: hyper then fails the
//! body and closes the connection itself, and no byte is ever held back or misattributed.

use axum::http::{HeaderName, Method, StatusCode, Uri};
use serde_json::json;
use std::time::Duration;

/// A request line and headers longer than this get 431. Keys are at most 1024 bytes and
/// contexts at most 8 KiB, so honest heads stay far below it; hyper's own limit is higher, so
/// hyper never refuses a head the framer let through.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A request target longer than this gets 414 (a 1024-byte key percent-encodes to 3 KiB).
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// More header fields than this get 431 (hyper's default, too).
pub const MAX_HEADERS: usize = 100;
/// Chunk-extension bytes per chunk that hyper accepts; beyond it hyper fails the body.
const MAX_CHUNK_EXTENSION_BYTES: u32 = 16 * 1024;

/// Why a connection is answered with an error of the listener's own and closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The head is not HTTP/1.x as hyper would parse it.
    BadRequest(String),
    /// The head is longer than [`MAX_HEAD_BYTES`] or has more than [`MAX_HEADERS`] fields.
    HeadTooLarge(String),
    /// The request target is longer than [`MAX_TARGET_BYTES`].
    TargetTooLong(usize),
    /// The head did not arrive in full within `header_timeout_ms`.
    HeadTimeout(Duration),
    /// The node already serves `max_connections` clients.
    TooManyConnections(usize),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::TargetTooLong(_) => StatusCode::URI_TOO_LONG,
            Refusal::HeadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Refusal::TooManyConnections(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::HeadTooLarge(_) | Refusal::TargetTooLong(_) => "too_large",
            Refusal::HeadTimeout(_) => "timeout",
            Refusal::TooManyConnections(_) => "unavailable",
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::BadRequest(why) => format!("malformed request: {why}"),
            Refusal::HeadTooLarge(why) => why.clone(),
            Refusal::TargetTooLong(length) => format!(
                "request target is {length} bytes, more than the {MAX_TARGET_BYTES} allowed"
            ),
            Refusal::HeadTimeout(timeout) => format!(
                "request line and headers not received within {} ms",
                timeout.as_millis()
            ),
            Refusal::TooManyConnections(cap) => {
                format!("this node already serves {cap} client connections; retry later")
            }
        }
    }

    /// The whole HTTP/1.1 response: SPEC's JSON error, and the connection closes after it.
    pub fn response_bytes(&self) -> Vec<u8> {
        let body = json!({ "error": self.code(), "message": self.message() }).to_string();
        let status = self.status();
        let mut bytes = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

/// What the framer makes of the bytes it has not checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The first `n` bytes (at least one) may go to hyper.
    Release(usize),
    /// A head is incomplete: nothing may go on until more bytes arrive.
    NeedMore,
    /// The head is refused; nothing from it goes to hyper.
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// The first hex digit of a chunk-size line.
    Start,
    Size(u64),
    /// Whitespace after the size: no more digits may come.
    SizeWhitespace(u64),
    Extension(u64, u32),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: an empty line ends the body, anything else is a trailer field.
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Head,
    Body(u64),
    Chunked(Chunk),
    /// Checking stopped for good on this connection (see the module doc).
    PassThrough,
}

/// Follows one connection's request stream (see the module doc).
#[derive(Debug, Default)]
pub struct RequestFramer {
    state: State,
    scan: HeadScan,
}

/// How far the current head has been scanned for its end. Parsing is tried only once the
/// blank line that ends a head has arrived: reparsing on every read would let a client that
/// sends a long head a byte at a time cost the node work quadratic in the head's length.
#[derive(Debug, Default)]
struct HeadScan {
    scanned: usize,
    /// Where the request line starts, after any empty lines before it.
    content_start: Option<usize>,
    line_start: usize,
    request_line_end: Option<usize>,
    complete: bool,
}

impl HeadScan {
    fn scan(&mut self, unchecked: &[u8]) {
        while self.scanned < unchecked.len() && !self.complete {
            let at = self.scanned;
            let byte = unchecked[at];
            self.scanned += 1;
            match (self.content_start, byte) {
                (None, b'\r' | b'\n') => {}
                (None, _) => {
                    self.content_start = Some(at);
                    self.line_start = at;
                }
                (Some(_), b'\n') => {
                    let line = &unchecked[self.line_start..at];
                    if line.is_empty() || line == b"\r" {
                        self.complete = true;
                    }
                    self.request_line_end.get_or_insert(at);
                    self.line_start = at + 1;
                }
                (Some(_), _) => {}
            }
        }
    }
}

impl RequestFramer {
    /// True while the next bytes belong to a request head, which must be complete before any
    /// of it is released.
    pub fn awaiting_head(&self) -> bool {
        self.state == State::Head
    }

    /// Judges `unchecked`, the bytes after everything released so far. After `Release(n)`,
    /// call again with the bytes after those `n`.
    pub fn advance(&mut self, unchecked: &[u8]) -> Verdict {
        if unchecked.is_empty() {
            return Verdict::NeedMore;
        }
        match self.state {
            State::Head => self.head(unchecked),
            State::Body(remaining) => {
                let n = remaining.min(unchecked.len() as u64);
                self.state = match remaining - n {
                    0 => State::Head,
                    left => State::Body(left),
                };
                Verdict::Release(n as usize)
            }
            State::Chunked(chunk) => self.chunked(chunk, unchecked),
            State::PassThrough => Verdict::Release(unchecked.len()),
        }
    }

    fn head(&mut self, unchecked: &[u8]) -> Verdict {
        self.scan.scan(unchecked);
        if !self.scan.complete {
            let request_line = self
                .scan
                .content_start
                .map_or(0, |start| unchecked.len() - start);
            if self.scan.request_line_end.is_none() && request_line > MAX_TARGET_BYTES + 64 {
                return Verdict::Refuse(Refusal::TargetTooLong(request_line));
            }
            if unchecked.len() > MAX_HEAD_BYTES {
                return Verdict::Refuse(Refusal::HeadTooLarge(format!(
                    "request line and headers exceed {MAX_HEAD_BYTES} bytes"
                )));
            }
            return Verdict::NeedMore;
        }
        let verdict = self.parse_head(unchecked);
        if !matches!(verdict, Verdict::NeedMore) {
            self.scan = HeadScan::default();
        }
        verdict
    }

    fn parse_head(&mut self, unchecked: &[u8]) -> Verdict {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let length = match request.parse(unchecked) {
            Ok(httparse::Status::Complete(length)) => length,
            // The scan saw a blank line, so httparse should see the end too; if not, the
            // next blank line tries again.
            Ok(httparse::Status::Partial) => {
                self.scan.complete = false;
                return Verdict::NeedMore;
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Verdict::Refuse(Refusal::HeadTooLarge(format!(
                    "more than {MAX_HEADERS} header fields"
                )))
            }
            Err(httparse::Error::Version) => {
                return Verdict::Refuse(Refusal::BadRequest(
                    "only HTTP/1.0 and HTTP/1.1 are served".into(),
                ))
            }
            Err(e) => return Verdict::Refuse(Refusal::BadRequest(e.to_string())),
        };
        if let Some(target) = request.path.filter(|t| t.len() > MAX_TARGET_BYTES) {
            return Verdict::Refuse(Refusal::TargetTooLong(target.len()));
        }
        if length > MAX_HEAD_BYTES {
            return Verdict::Refuse(Refusal::HeadTooLarge(format!(
                "request line and headers are {length} bytes, more than {MAX_HEAD_BYTES}"
            )));
        }
        match body_framing(&request) {
            Ok(next) => {
                self.state = next;
                Verdict::Release(length)
            }
            Err(refusal) => Verdict::Refuse(refusal),
        }
    }

    fn chunked(&mut self, mut chunk: Chunk, unchecked: &[u8]) -> Verdict {
        let mut at = 0;
        while at < unchecked.len() {
            if let Chunk::Data(remaining) = chunk {
                let n = remaining.min((unchecked.len() - at) as u64);
                at += n as usize;
                chunk = if n == remaining {
                    Chunk::DataCr
                } else {
                    Chunk::Data(remaining - n)
                };
                continue;
            }
            let step = next_chunk_state(chunk, unchecked[at]);
            at += 1;
            match step {
                ChunkStep::Continue(next) => chunk = next,
                ChunkStep::BodyEnd => {
                    self.state = State::Head;
                    return Verdict::Release(at);
                }
                ChunkStep::Malformed => {
                    self.state = State::PassThrough;
                    return Verdict::Release(unchecked.len());
                }
            }
        }
        self.state = State::Chunked(chunk);
        Verdict::Release(at)
    }
}

enum ChunkStep {
    Continue(Chunk),
    BodyEnd,
    Malformed,
}

/// One byte of chunked framing, with the rules of hyper's decoder (`proto/h1/decode.rs`).
fn next_chunk_state(chunk: Chunk, byte: u8) -> ChunkStep {
    use ChunkStep::{BodyEnd, Continue, Malformed};
    let digit = (byte as char).to_digit(16).map(u64::from);
    let grow = |size: u64, digit: u64| match size.checked_mul(16).and_then(|s| s.checked_add(digit))
    {
        Some(size) => Continue(Chunk::Size(size)),
        None => Malformed,
    };
    match (chunk, byte) {
        (Chunk::Start, _) => match digit {
            Some(digit) => grow(0, digit),
            None => Malformed,
        },
        (Chunk::Size(size), _) if digit.is_some() => grow(size, digit.unwrap_or(0)),
        (Chunk::Size(size) | Chunk::SizeWhitespace(size), b'\t' | b' ') => {
            Continue(Chunk::SizeWhitespace(size))
        }
        (Chunk::Size(size) | Chunk::SizeWhitespace(size), b';') => {
            Continue(Chunk::Extension(size, 0))
        }
        (Chunk::Size(size) | Chunk::SizeWhitespace(size) | Chunk::Extension(size, _), b'\r') => {
            Continue(Chunk::SizeLf(size))
        }
        (Chunk::Extension(_, _), b'\n') => Malformed,
        (Chunk::Extension(size, bytes), _) => {
            if bytes + 1 >= MAX_CHUNK_EXTENSION_BYTES {
                Malformed
            } else {
                Continue(Chunk::Extension(size, bytes + 1))
            }
        }
        (Chunk::SizeLf(0), b'\n') => Continue(Chunk::EndCr),
        (Chunk::SizeLf(size), b'\n') => Continue(Chunk::Data(size)),
        (Chunk::DataCr, b'\r') => Continue(Chunk::DataLf),
        (Chunk::DataLf, b'\n') => Continue(Chunk::Start),
        (Chunk::EndCr, b'\r') => Continue(Chunk::EndLf),
        (Chunk::Trailer, b'\r') => Continue(Chunk::TrailerLf),
        (Chunk::EndCr | Chunk::Trailer, _) => Continue(Chunk::Trailer),
        (Chunk::TrailerLf, b'\n') => Continue(Chunk::EndCr),
        (Chunk::EndLf, b'\n') => BodyEnd,
        _ => Malformed,
    }
}

/// Checks a complete head as hyper's `Server::parse` would, and tells how its body is framed.
fn body_framing(request: &httparse::Request<'_, '_>) -> Result<State, Refusal> {
    let bad = |why: &str| Refusal::BadRequest(why.to_string());
    let method = request.method.unwrap_or_default();
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| bad("invalid method"))?;
    let target = request.path.unwrap_or_default();
    if target.len() > MAX_TARGET_BYTES {
        return Err(Refusal::TargetTooLong(target.len()));
    }
    target
        .parse::<Uri>()
        .map_err(|e| Refusal::BadRequest(format!("invalid request target: {e}")))?;
    let is_http_11 = request.version == Some(1);
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut wants_upgrade = method == Method::CONNECT;
    for header in request.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| bad("invalid header name"))?;
        if name == axum::http::header::TRANSFER_ENCODING {
            if !is_http_11 {
                return Err(bad("HTTP/1.0 requests cannot use Transfer-Encoding"));
            }
            transfer_encoding = true;
            chunked = header
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == axum::http::header::CONTENT_LENGTH && !transfer_encoding {
            let length = decimal(header.value).ok_or_else(|| bad("invalid Content-Length"))?;
            if content_length.is_some_and(|previous| previous != length) {
                return Err(bad("conflicting Content-Length headers"));
            }
            content_length = Some(length);
        } else if name == axum::http::header::UPGRADE {
            wants_upgrade = is_http_11;
        }
    }
    if transfer_encoding && !chunked {
        return Err(bad("Transfer-Encoding must end with chunked"));
    }
    Ok(if wants_upgrade {
        State::PassThrough
    } else if chunked {
        State::Chunked(Chunk::Start)
    } else {
        match content_length {
            // hyper refuses lengths it cannot represent; leave that error to it.
            Some(length) if length >= u64::MAX - 1 => State::PassThrough,
            Some(0) | None => State::Head,
            Some(length) => State::Body(length),
        }
    })
}

/// A Content-Length value as hyper reads it: decimal digits only, no sign, no overflow.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |total, byte| {
        let digit = (*byte as char).to_digit(10)?;
        total.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `piece` bytes as a socket would, and returns the bytes
    /// released in order and the refusal, if any.
    fn run(input: &[u8], piece: usize) -> (Vec<u8>, Option<Refusal>) {
        let mut framer = RequestFramer::default();
        let mut received = Vec::new();
        let mut released = 0;
        for piece in input.chunks(piece.max(1)) {
            received.extend_from_slice(piece);
            loop {
                match framer.advance(&received[released..]) {
                    Verdict::Release(n) => {
                        assert!(n > 0 && released + n <= received.len());
                        released += n;
                    }
                    Verdict::NeedMore => break,
                    Verdict::Refuse(refusal) => {
                        return (received[..released].to_vec(), Some(refusal))
                    }
                }
            }
        }
        (received[..released].to_vec(), None)
    }

    /// Well-formed pipelined requests (sized, chunked with extensions and trailers, bodiless)
    /// are released whole, however the bytes are split.
    #[test]
    fn well_formed_requests_pass_unchanged() {
        let input: &[u8] = b"PUT /kv/t/a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
            PUT /kv/t/b HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
            3\r\nabc\r\n2 ;x=y\r\nde\r\n0\r\nX-T: 1\r\n\r\n\
            \r\nGET /health HTTP/1.0\r\n\r\n";
        for piece in [1, 2, 7, input.len()] {
            assert_eq!(run(input, piece), (input.to_vec(), None), "piece {piece}");
        }
    }

    /// A refused head after good requests: everything before it is released, nothing of it.
    #[test]
    fn a_bad_head_is_refused_after_the_requests_before_it() {
        let good: &[u8] = b"PUT /kv/t/a HTTP/1.1\r\nContent-Length: 9\r\n\r\nGARBAGE\r\n";
        let cases: Vec<(Vec<u8>, StatusCode)> = vec![
            (b"GARBAGE\r\n\r\n".to_vec(), StatusCode::BAD_REQUEST),
            (b"GET / HTTP/2.0\r\n\r\n".to_vec(), StatusCode::BAD_REQUEST),
            (
                b"GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(),
                StatusCode::BAD_REQUEST,
            ),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(),
                StatusCode::BAD_REQUEST,
            ),
            (
                b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
                StatusCode::BAD_REQUEST,
            ),
            (
                b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                StatusCode::BAD_REQUEST,
            ),
            (
                b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
                StatusCode::BAD_REQUEST,
            ),
            (
                format!("GET /{} HTTP/1.1\r\n\r\n", "k".repeat(MAX_TARGET_BYTES)).into_bytes(),
                StatusCode::URI_TOO_LONG,
            ),
            (
                format!(
                    "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
                    "v".repeat(MAX_HEAD_BYTES)
                )
                .into_bytes(),
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ),
            (
                format!(
                    "GET / HTTP/1.1\r\n{}\r\n",
                    "X: y\r\n".repeat(MAX_HEADERS + 1)
                )
                .into_bytes(),
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ),
        ];
        for (bad, status) in cases {
            let input = [good, &bad].concat();
            for piece in [1, 5, input.len()] {
                let (released, refusal) = run(&input, piece);
                assert_eq!(released, good, "{:?}", String::from_utf8_lossy(&bad));
                let refusal = refusal.expect("refused");
                assert_eq!(refusal.status(), status, "{refusal:?}");
            }
        }
    }

    /// Chunk syntax the framer cannot follow hands the connection to hyper, which fails the
    /// body itself: every byte is released, none is judged as a head.
    #[test]
    fn malformed_chunks_pass_through() {
        let head: &[u8] = b"PUT /kv/t/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in [
            &b"zz\r\nabc\r\n"[..],
            b"3\nabc",
            b"3;a\nb\r\n",
            b"3\r\nabcX\r\n",
        ] {
            let input = [head, body, b"GARBAGE\r\n\r\n"].concat();
            assert_eq!(run(&input, 3), (input.clone(), None));
        }
    }

    /// The refusal is a complete HTTP/1.1 response whose body is SPEC's JSON.
    #[test]
    fn refusals_are_json_responses() {
        let bytes = Refusal::HeadTimeout(Duration::from_millis(300)).response_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "timeout");
        assert!(json["message"].as_str().unwrap().contains("300 ms"));
    }

    /// Arbitrary bytes never panic the framer, and releases never overrun the input.
    #[test]
    fn arbitrary_bytes_never_panic() {
        bolero::check!()
            .with_iterations(2000)
            .for_each(|input: &[u8]| {
                let (released, _) = run(input, 1 + input.first().copied().unwrap_or(0) as usize);
                assert!(input.starts_with(&released));
            });
    }
}
