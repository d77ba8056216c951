use std::io::Cursor;

use super::*;

/// A stream that hands out at most `step` bytes per read.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    step: usize,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let count = self.step.min(buf.len()).min(self.data.len() - self.at);
        buf[..count].copy_from_slice(&self.data[self.at..self.at + count]);
        self.at += count;
        Ok(count)
    }
}

fn read_one(bytes: &[u8]) -> Result<Request, ReadError> {
    RequestReader::new(51200).read(&mut Cursor::new(bytes.to_vec()), || {}, || Ok(()))
}

#[test]
fn a_get_and_a_put_parse() {
    let get = read_one(b"GET /machine-config HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    assert_eq!(
        get,
        Request {
            method: Method::Get,
            path: "/machine-config".into(),
            body: None,
            keep_alive: true,
        }
    );
    let put = read_one(
        b"PUT /actions HTTP/1.1\r\nContent-Type: application/json\r\ncontent-length: 31\r\n\r\n\
          {\"action_type\":\"InstanceStart\"}",
    )
    .unwrap();
    assert_eq!(put.method, Method::Put);
    assert_eq!(
        put.body.as_deref(),
        Some(&b"{\"action_type\":\"InstanceStart\"}"[..])
    );
}

#[test]
fn pipelined_requests_come_out_in_order_and_byte_by_byte_input_works() {
    let bytes = b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}\
                  GET / HTTP/1.1\r\n\r\n"
        .to_vec();
    for step in [1, 3, 4096] {
        let mut stream = Trickle {
            data: bytes.clone(),
            at: 0,
            step,
        };
        let mut reader = RequestReader::new(100);
        let first = reader.read(&mut stream, || {}, || Ok(())).unwrap();
        assert_eq!(first.method, Method::Patch);
        assert_eq!(first.body.as_deref(), Some(&b"{\"state\":\"Paused\"}"[..]));
        let second = reader.read(&mut stream, || {}, || Ok(())).unwrap();
        assert_eq!((second.method, second.path.as_str()), (Method::Get, "/"));
        assert!(matches!(
            reader.read(&mut stream, || {}, || Ok(())),
            Err(ReadError::Closed)
        ));
    }
}

#[test]
fn the_start_callback_runs_once_the_first_byte_is_there() {
    let mut started = 0;
    let mut reader = RequestReader::new(100);
    let mut stream = Trickle {
        data: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        at: 0,
        step: 2,
    };
    reader
        .read(&mut stream, || started += 1, || Ok(()))
        .unwrap();
    assert_eq!(started, 1);
}

#[test]
fn connection_handling_follows_the_version_and_header() {
    assert!(!read_one(b"GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
    assert!(
        read_one(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .keep_alive
    );
    assert!(
        !read_one(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .keep_alive
    );
}

#[test]
fn targets_lose_their_query_and_absolute_form_is_accepted() {
    assert_eq!(
        read_one(b"GET /vm/config?x=1 HTTP/1.1\r\n\r\n")
            .unwrap()
            .path,
        "/vm/config"
    );
    assert_eq!(
        read_one(b"GET http://localhost/version HTTP/1.1\r\n\r\n")
            .unwrap()
            .path,
        "/version"
    );
    assert!(matches!(
        read_one(b"GET * HTTP/1.1\r\n\r\n"),
        Err(ReadError::Malformed(_))
    ));
}

#[test]
fn other_methods_are_kept_by_name() {
    assert_eq!(
        read_one(b"DELETE /drives/a HTTP/1.1\r\n\r\n")
            .unwrap()
            .method,
        Method::Other("DELETE".into())
    );
}

#[test]
fn malformed_heads_are_refused_with_a_reason() {
    for (bytes, reason) in [
        (&b"garbage\r\n\r\n"[..], "not valid HTTP"),
        (b"GET / HTTP/2.0\r\n\r\n", "not valid HTTP"),
        (b"GET /\r\n\r\n", "not valid HTTP"),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            "is not a number",
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "two different Content-Length",
        ),
        (
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding 'chunked' is not supported",
        ),
        (
            b"PUT / HTTP/1.1\r\nExpect: something\r\n\r\n",
            "Expect 'something'",
        ),
    ] {
        match read_one(bytes) {
            Err(ReadError::Malformed(message)) => {
                assert!(message.contains(reason), "{bytes:?}: {message}")
            }
            other => panic!("{bytes:?}: {other:?}"),
        }
    }
    let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
    let err = read_one(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).unwrap_err();
    assert!(err.to_string().contains("more than 32 headers"), "{err}");
    assert_eq!(err.status(), Some(400));
}

#[test]
fn oversized_heads_and_bodies_are_refused_before_reading_them() {
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
    let err = read_one(long.as_bytes()).unwrap_err();
    assert!(matches!(err, ReadError::HeadTooLarge), "{err:?}");
    assert_eq!(err.status(), Some(431));
    // Only the head is sent: the limit is enforced from Content-Length alone.
    let err = read_one(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 51201\r\n\r\n").unwrap_err();
    assert!(matches!(
        err,
        ReadError::BodyTooLarge {
            size: 51201,
            limit: 51200
        }
    ));
    assert_eq!(err.status(), Some(413));
    let huge = read_one(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
    assert!(matches!(huge, Err(ReadError::BodyTooLarge { .. })));
}

#[test]
fn a_client_that_goes_away_mid_request_gets_no_answer() {
    for bytes in [
        &b"PUT /actions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"action"[..],
        b"GET / HTT",
    ] {
        let err = read_one(bytes).unwrap_err();
        assert!(matches!(err, ReadError::Io(_)), "{err:?}");
        assert_eq!(err.status(), None);
    }
    assert!(matches!(read_one(b""), Err(ReadError::Closed)));
}

/// A stream that hands out one chunk per read.
struct Chunks(Vec<Vec<u8>>);

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() {
            return Ok(0);
        }
        let chunk = self.0.remove(0);
        buf[..chunk.len()].copy_from_slice(&chunk);
        Ok(chunk.len())
    }
}

#[test]
fn expect_continue_is_answered_before_the_body_is_read() {
    let head = b"PUT /logger HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
    let mut continued = false;
    let request = RequestReader::new(100)
        .read(
            &mut Chunks(vec![head.to_vec(), b"{}".to_vec()]),
            || {},
            || {
                continued = true;
                Ok(())
            },
        )
        .unwrap();
    assert!(continued);
    assert_eq!(request.body.as_deref(), Some(&b"{}"[..]));
    // A body that came along with the head needs no interim answer.
    let mut continued = false;
    let mut whole = head.to_vec();
    whole.extend_from_slice(b"{}");
    RequestReader::new(100)
        .read(
            &mut Chunks(vec![whole]),
            || {},
            || {
                continued = true;
                Ok(())
            },
        )
        .unwrap();
    assert!(!continued);
}

#[test]
fn responses_are_framed() {
    assert_eq!(
        String::from_utf8(Response::no_content().to_bytes(true)).unwrap(),
        "HTTP/1.1 204 No Content\r\nServer: Kiln API\r\nConnection: keep-alive\r\n\r\n"
    );
    let fault = String::from_utf8(Response::fault(400, "bad \"x\"").to_bytes(false)).unwrap();
    assert!(fault.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{fault}");
    assert!(fault.contains("Connection: close\r\n"));
    assert!(fault.contains("Content-Type: application/json\r\n"));
    let body = r#"{"fault_message":"bad \"x\""}"#;
    assert!(fault.ends_with(&format!("Content-Length: {}\r\n\r\n{body}", body.len())));
}
