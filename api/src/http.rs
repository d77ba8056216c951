//! The HTTP/1.1 subset Firecracker's API uses: one request at a time per connection
//! (pipelined requests are kept in the buffer and served in order), `Content-Length` bodies
//! only, keep-alive by default. Request heads are parsed by `httparse`; framing, limits and
//! responses are here.

use std::io::{self, Read, Write};

/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 32;

/// Request methods the API knows; anything else is kept by name for the error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// Any other method.
    Other(String),
}

impl Method {
    /// The method as written on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Other(name) => name,
        }
    }
}

/// One request, head and body read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path, without query string.
    pub path: String,
    /// The body; None when there is none (no or zero `Content-Length`).
    pub body: Option<Vec<u8>>,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
}

/// Why no request could be read. Every variant but [`Closed`](Self::Closed) and
/// [`Io`](Self::Io) deserves an answer before the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client closed the connection between requests.
    #[error("connection closed")]
    Closed,
    /// The client went away or timed out in the middle of a request.
    #[error("connection lost in the middle of a request: {0}")]
    Io(io::Error),
    /// The bytes are not an HTTP/1.x request Kiln accepts.
    #[error("{0}")]
    Malformed(String),
    /// The head is longer than [`MAX_HEAD_BYTES`].
    #[error("the request head is longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// The body is longer than the server's limit.
    #[error(
        "Request payload with size {size} is larger than the limit of {limit} bytes allowed by \
         the server (--http-api-max-payload-size)"
    )]
    BodyTooLarge {
        /// `Content-Length` of the request.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl ReadError {
    /// The status to answer with, if the client should get an answer at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadError::Closed | ReadError::Io(_) => None,
            ReadError::Malformed(_) => Some(400),
            ReadError::HeadTooLarge => Some(431),
            ReadError::BodyTooLarge { .. } => Some(413),
        }
    }
}

/// Reads requests from one connection, keeping bytes that belong to the next one.
#[derive(Debug)]
pub struct RequestReader {
    buffer: Vec<u8>,
    max_body: usize,
}

/// What the head of a request says, before its body is read.
struct Head {
    method: Method,
    path: String,
    content_length: usize,
    keep_alive: bool,
    expects_continue: bool,
    head_len: usize,
}

impl RequestReader {
    /// A reader that refuses bodies longer than `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        Self {
            buffer: Vec::new(),
            max_body,
        }
    }

    /// Whether bytes of a next request are already buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Reads one request from `stream`. `started` is called once the first byte of it is
    /// there (the server then shortens its timeout); `answer_continue` is called before the
    /// body is read when the client asked for `Expect: 100-continue`.
    pub fn read<S: Read>(
        &mut self,
        stream: &mut S,
        mut started: impl FnMut(),
        mut answer_continue: impl FnMut() -> io::Result<()>,
    ) -> Result<Request, ReadError> {
        if self.has_buffered() {
            started();
        }
        let head = loop {
            if let Some(head) = self.parse_head()? {
                break head;
            }
            if self.buffer.len() > MAX_HEAD_BYTES {
                return Err(ReadError::HeadTooLarge);
            }
            let was_empty = self.buffer.is_empty();
            if self.fill(stream)? == 0 {
                return Err(if was_empty {
                    ReadError::Closed
                } else {
                    ReadError::Io(io::ErrorKind::UnexpectedEof.into())
                });
            }
            if was_empty {
                started();
            }
        };
        if head.content_length > self.max_body {
            return Err(ReadError::BodyTooLarge {
                size: head.content_length,
                limit: self.max_body,
            });
        }
        self.buffer.drain(..head.head_len);
        if head.expects_continue && head.content_length > self.buffer.len() {
            answer_continue().map_err(ReadError::Io)?;
        }
        while self.buffer.len() < head.content_length {
            if self.fill(stream)? == 0 {
                return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
        let body: Vec<u8> = self.buffer.drain(..head.content_length).collect();
        Ok(Request {
            method: head.method,
            path: head.path,
            body: (!body.is_empty()).then_some(body),
            keep_alive: head.keep_alive,
        })
    }

    /// Reads what is available; returns how many bytes arrived (0: end of stream).
    fn fill<S: Read>(&mut self, stream: &mut S) -> Result<usize, ReadError> {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(count) => {
                    self.buffer.extend_from_slice(&chunk[..count]);
                    return Ok(count);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(ReadError::Io(err)),
            }
        }
    }

    /// Parses the head if all of it is buffered.
    fn parse_head(&self) -> Result<Option<Head>, ReadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(&self.buffer) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ReadError::Malformed(format!(
                    "the request has more than {MAX_HEADERS} headers"
                )))
            }
            Err(err) => {
                return Err(ReadError::Malformed(format!(
                    "the request is not valid HTTP/1.x ({err})"
                )))
            }
        };
        if head_len > MAX_HEAD_BYTES {
            return Err(ReadError::HeadTooLarge);
        }
        // httparse only completes a head with a method, a target and HTTP/1.0 or 1.1.
        let method = match request.method.unwrap_or_default() {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            other => Method::Other(other.to_string()),
        };
        let path = origin_path(request.path.unwrap_or_default())?;
        let http11 = request.version == Some(1);
        let mut content_length: Option<usize> = None;
        let mut keep_alive = http11;
        let mut expects_continue = false;
        for header in request.headers.iter() {
            let value = std::str::from_utf8(header.value)
                .map_err(|_| {
                    ReadError::Malformed(format!("header {} is not valid UTF-8", header.name))
                })?
                .trim();
            match header.name.to_ascii_lowercase().as_str() {
                "content-length" => {
                    let length = parse_content_length(value)?;
                    if content_length.is_some_and(|earlier| earlier != length) {
                        return Err(ReadError::Malformed(
                            "the request has two different Content-Length headers".into(),
                        ));
                    }
                    content_length = Some(length);
                }
                "transfer-encoding" => {
                    return Err(ReadError::Malformed(format!(
                        "Transfer-Encoding '{value}' is not supported: send the body with a \
                         Content-Length header"
                    )))
                }
                "connection" => {
                    for token in value.split(',').map(|t| t.trim().to_ascii_lowercase()) {
                        match token.as_str() {
                            "close" => keep_alive = false,
                            "keep-alive" => keep_alive = true,
                            _ => {}
                        }
                    }
                }
                "expect" if value.eq_ignore_ascii_case("100-continue") => expects_continue = true,
                "expect" => {
                    return Err(ReadError::Malformed(format!(
                        "Expect '{value}' is not supported"
                    )))
                }
                _ => {}
            }
        }
        Ok(Some(Head {
            method,
            path,
            content_length: content_length.unwrap_or(0),
            keep_alive,
            expects_continue,
            head_len,
        }))
    }
}

/// The path of an origin-form (`/x?y`) or absolute-form (`http://host/x`) request target.
fn origin_path(target: &str) -> Result<String, ReadError> {
    let target = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |slash| &rest[slash..]),
        None => target,
    };
    if !target.starts_with('/') {
        return Err(ReadError::Malformed(format!(
            "request target '{target}' is not a path"
        )));
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");
    Ok(path.to_string())
}

fn parse_content_length(value: &str) -> Result<usize, ReadError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ReadError::Malformed(format!(
            "Content-Length '{value}' is not a number"
        )));
    }
    // Too large for usize is larger than any limit: report it as the largest size.
    Ok(value.parse().unwrap_or(usize::MAX))
}

/// The reason phrase of the statuses Kiln sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body, if any (204 has none).
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// A JSON body with `status`.
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            body: Some(body),
        }
    }

    /// `{"fault_message": message}` with `status`.
    pub fn fault(status: u16, message: &str) -> Self {
        Self::json(
            status,
            serde_json::json!({ "fault_message": message }).to_string(),
        )
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut text = format!(
            "HTTP/1.1 {} {}\r\nServer: Kiln API\r\nConnection: {}\r\n",
            self.status,
            reason(self.status),
            if keep_alive { "keep-alive" } else { "close" }
        );
        if let Some(body) = &self.body {
            text.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else if self.status == 204 {
            text.push_str("\r\n");
        } else {
            text.push_str("Content-Length: 0\r\n\r\n");
        }
        text.into_bytes()
    }

    /// Writes the response.
    pub fn write_to<W: Write>(&self, stream: &mut W, keep_alive: bool) -> io::Result<()> {
        stream.write_all(&self.to_bytes(keep_alive))?;
        stream.flush()
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
