//! The socket server with real clients (no VM: requests that need one are the integration
//! tests' business).

use std::io::{BufRead, BufReader, Read};
use std::time::Instant;

use kiln_vmm::ConsoleConfig;

use super::*;
use crate::controller::NoLogging;
use crate::resources::Resources;

struct Fixture {
    server: ApiServer,
    path: PathBuf,
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-api-{}-{name}.sock", std::process::id()))
}

fn serve(name: &str, limits: ServerLimits) -> Fixture {
    let path = socket_path(name);
    let _ = std::fs::remove_file(&path);
    let listener = bind(&path).unwrap();
    let controller = Controller::new(
        "srv",
        Resources::new(ConsoleConfig::None),
        Arc::new(NoLogging),
        Box::new(|_| {}),
    );
    let server =
        ApiServer::start(listener, &path, Arc::new(Mutex::new(controller)), limits).unwrap();
    Fixture { server, path }
}

/// Reads one response: status and body.
fn read_response(reader: &mut BufReader<UnixStream>) -> (u16, String) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .unwrap_or_else(|| panic!("no status in {status_line:?}"))
        .parse()
        .unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

fn exchange(path: &Path, raw: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.write_all(raw.as_bytes()).unwrap();
    read_response(&mut BufReader::new(stream))
}

fn put(path: &str, body: &str) -> String {
    format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn requests_are_answered_and_connections_kept_alive() {
    let fixture = serve("keepalive", ServerLimits::default());
    let stream = UnixStream::connect(&fixture.path).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, body) = read_response(&mut reader);
    assert_eq!(status, 200);
    assert!(body.contains(r#""state":"Not started""#), "{body}");
    writer
        .write_all(
            put(
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
            )
            .as_bytes(),
        )
        .unwrap();
    assert_eq!(read_response(&mut reader), (204, String::new()));
    writer
        .write_all(b"GET /machine-config HTTP/1.1\r\n\r\n")
        .unwrap();
    let (status, body) = read_response(&mut reader);
    assert_eq!(status, 200);
    assert!(body.contains(r#""vcpu_count":2"#), "{body}");
}

#[test]
fn bad_input_gets_its_status_and_message() {
    let fixture = serve("bad", ServerLimits::default());
    let (status, body) = exchange(&fixture.path, "HELLO\r\n\r\n");
    assert_eq!(status, 400);
    assert!(body.contains("not valid HTTP"), "{body}");
    let (status, body) = exchange(
        &fixture.path,
        "PUT /drives/a HTTP/1.1\r\nContent-Length: 51201\r\n\r\n",
    );
    assert_eq!(status, 413);
    assert!(body.contains("51201") && body.contains("51200"), "{body}");
    let (status, body) = exchange(&fixture.path, &put("/machine-config", "{\"vcpu_count\": "));
    assert_eq!(status, 400);
    assert!(body.contains("deserializing the json body"), "{body}");
    let (status, body) = exchange(
        &fixture.path,
        &put(
            "/machine-config",
            r#"{"vcpu_count": "two", "mem_size_mib": 64}"#,
        ),
    );
    assert_eq!(status, 400);
    assert!(body.contains("invalid type: string"), "{body}");
    let (status, body) = exchange(&fixture.path, "POST /actions HTTP/1.1\r\n\r\n");
    assert_eq!(status, 400);
    assert!(
        body.contains("Invalid request method and/or path: POST /actions."),
        "{body}"
    );
    let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(parsed["fault_message"].is_string());
}

#[test]
fn a_stuck_or_vanished_client_blocks_nobody() {
    let fixture = serve("stuck", ServerLimits::default());
    // One client sends half a request and stalls; another goes away mid-body.
    let mut stuck = UnixStream::connect(&fixture.path).unwrap();
    stuck
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
        .unwrap();
    {
        let mut gone = UnixStream::connect(&fixture.path).unwrap();
        gone.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
            .unwrap();
    }
    let began = Instant::now();
    let (status, _) = exchange(&fixture.path, "GET /version HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "a stalled client delayed others by {:?}",
        began.elapsed()
    );
    drop(stuck);
}

#[test]
fn a_stalled_request_times_out() {
    let limits = ServerLimits {
        request_timeout: Duration::from_millis(200),
        ..ServerLimits::default()
    };
    let fixture = serve("timeout", limits);
    let mut stuck = UnixStream::connect(&fixture.path).unwrap();
    stuck.write_all(b"GET / HT").unwrap();
    stuck
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    // The server closes the connection without an answer.
    assert_eq!(stuck.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn a_hundred_clients_at_once_all_get_answers() {
    let fixture = serve("hundred", ServerLimits::default());
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let path = fixture.path.clone();
            std::thread::spawn(move || {
                let memory = 64 + 2 * (i % 8);
                let set = exchange(
                    &path,
                    &put(
                        "/machine-config",
                        &format!(r#"{{"vcpu_count": 1, "mem_size_mib": {memory}}}"#),
                    ),
                );
                let get = exchange(&path, "GET /machine-config HTTP/1.1\r\n\r\n");
                (set, get)
            })
        })
        .collect();
    for client in clients {
        let ((set_status, _), (get_status, body)) = client.join().unwrap();
        assert_eq!(set_status, 204);
        assert_eq!(get_status, 200);
        assert!(body.contains("mem_size_mib"), "{body}");
    }
}

#[test]
fn connections_beyond_the_limit_are_turned_away() {
    let limits = ServerLimits {
        max_connections: 2,
        ..ServerLimits::default()
    };
    let fixture = serve("limit", limits);
    let first = UnixStream::connect(&fixture.path).unwrap();
    let second = UnixStream::connect(&fixture.path).unwrap();
    // Make sure both are being served before the third arrives.
    for stream in [&first, &second] {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        (&*stream).write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut reader).0, 200);
    }
    let third = UnixStream::connect(&fixture.path).unwrap();
    let (status, body) = read_response(&mut BufReader::new(third));
    assert_eq!(status, 503);
    assert!(body.contains("at most 2 API connections"), "{body}");
}

#[test]
fn stale_sockets_are_replaced_live_ones_and_other_files_are_not() {
    let path = socket_path("stale");
    let _ = std::fs::remove_file(&path);
    drop(UnixListener::bind(&path).unwrap()); // its process "died": the file stays
    assert!(path.exists());
    let listener = bind(&path).expect("a stale socket is replaced");
    assert!(matches!(bind(&path), Err(BindError::InUse(_))));
    drop(listener);
    std::fs::remove_file(&path).unwrap();

    std::fs::write(&path, b"precious").unwrap();
    let err = bind(&path).unwrap_err();
    assert!(matches!(err, BindError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn shutdown_removes_the_socket() {
    let mut fixture = serve("shutdown", ServerLimits::default());
    assert!(fixture.path.exists());
    fixture.server.shutdown();
    assert!(!fixture.path.exists());
    assert!(UnixStream::connect(&fixture.path).is_err());
}
