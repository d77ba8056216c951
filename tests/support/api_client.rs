//! A client for `kiln` processes that serve Firecracker's API, shared by the test files that
//! drive it (`#[path]`-included: each test file uses part of it).
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `kiln` binary under test.
pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// A path in the temporary directory, unique to this test process.
pub fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-api-{}-{name}", std::process::id()))
}

/// A `kiln --api-sock` process and its outputs.
pub struct Kiln {
    child: Option<Child>,
    pub socket: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Kiln {
    pub fn start(name: &str, extra: &[&str]) -> Self {
        let socket = scratch(&format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let kiln = Self::spawn(
            name,
            &[&["--api-sock", socket.to_str().unwrap()], extra].concat(),
        );
        kiln.wait_for_socket();
        kiln
    }

    pub fn spawn(name: &str, args: &[&str]) -> Self {
        let stdout = scratch(&format!("{name}.stdout"));
        let stderr = scratch(&format!("{name}.stderr"));
        let socket = args
            .iter()
            .position(|a| *a == "--api-sock")
            .map(|i| PathBuf::from(args[i + 1]))
            .unwrap_or_default();
        let child = Command::new(KILN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("start kiln");
        Self {
            child: Some(child),
            socket,
            stdout,
            stderr,
        }
    }

    pub fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the API socket never came up: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// One request on a new connection: status and parsed JSON body (Null when empty).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let request = match body {
            Some(body) => format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
            None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        };
        self.raw(request.as_bytes())
    }

    pub fn raw(&self, bytes: &[u8]) -> (u16, Value) {
        let mut stream = UnixStream::connect(&self.socket).expect("connect to the API socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(bytes).unwrap();
        read_response(&mut BufReader::new(stream))
    }

    pub fn ok(&self, method: &str, path: &str, body: &str) {
        let (status, answer) = self.call(method, path, Some(body));
        assert_eq!(
            status,
            204,
            "{method} {path} {body}: {answer}\nkiln's log: {}",
            self.stderr_text()
        );
    }

    /// A 400 whose fault message contains `fragment`.
    pub fn refused(&self, method: &str, path: &str, body: Option<&str>, fragment: &str) {
        let (status, answer) = self.call(method, path, body);
        assert_eq!(status, 400, "{method} {path}: {answer}");
        let message = answer["fault_message"].as_str().unwrap_or_default();
        assert!(
            message.contains(fragment),
            "{method} {path}: {message:?} lacks {fragment:?}"
        );
    }

    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kiln did not exit within {limit:?}: {}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, signal) };
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for path in [&self.stdout, &self.stderr] {
            let _ = std::fs::remove_file(path);
        }
        // A killed Kiln cannot remove its socket file (the tests that check that Kiln removes
        // it themselves look before this).
        if !self.socket.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// Reads one HTTP response: status and parsed JSON body (Null when empty).
pub fn read_response(reader: &mut BufReader<UnixStream>) -> (u16, Value) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {status_line:?}"));
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    (status, value)
}
