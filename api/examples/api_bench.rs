//! API-driven start-up and pause/resume latency of `kiln fc`, next to the CLI path.
//!
//! ```text
//! resources/bench/api/run [--reps N] [--cycles N]
//! cargo run --release -p kiln-api --example api_bench -- --kiln target/release/kiln
//! ```
//!
//! Each repetition starts `kiln --api-sock` with the `hello hold=1` micro guest (it prints its
//! marker and halts) and measures: exec → the socket accepts a connection; the `InstanceStart`
//! request's round trip (Kiln answers once the vCPUs run); `InstanceStart` sent → the guest's
//! marker on Kiln's stdout; and `PATCH /vm` Paused + Resumed round trips on one keep-alive
//! connection. The CLI row is `kiln run` with the same guest: exec → marker.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use kiln_test_guests::{GuestKind, Params, HELLO_MARKER};

struct Options {
    kiln: PathBuf,
    reps: usize,
    cycles: usize,
}

fn options() -> Options {
    let mut options = Options {
        kiln: PathBuf::from("target/release/kiln"),
        reps: 10,
        cycles: 50,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().cloned().unwrap_or_default();
        match arg.as_str() {
            "--kiln" => options.kiln = PathBuf::from(value()),
            "--reps" => options.reps = value().parse().expect("--reps N"),
            "--cycles" => options.cycles = value().parse().expect("--cycles N"),
            "--quick" => {
                options.reps = 1;
                options.cycles = 3;
            }
            other => {
                panic!("unknown argument {other}; use --kiln PATH --reps N --cycles N --quick")
            }
        }
    }
    options
}

/// Reads the child's stdout on a thread; sends once the marker shows.
fn watch_for_marker(child: &mut Child) -> Receiver<Instant> {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (seen, marker) = channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        let mut sent = false;
        while let Ok(count) = stdout.read(&mut buf) {
            if count == 0 {
                break;
            }
            text.extend_from_slice(&buf[..count]);
            if !sent && String::from_utf8_lossy(&text).contains(HELLO_MARKER) {
                let _ = seen.send(Instant::now());
                sent = true;
            }
        }
    });
    marker
}

/// One request on a keep-alive connection; returns the status.
fn call(reader: &mut BufReader<UnixStream>, method: &str, path: &str, body: &str) -> u16 {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    reader.get_mut().write_all(request.as_bytes()).unwrap();
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
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
    let mut rest = vec![0u8; length];
    reader.read_exact(&mut rest).unwrap();
    status.split(' ').nth(1).unwrap().parse().unwrap()
}

struct Sample {
    socket_ready: Duration,
    start_answered: Duration,
    first_output: Duration,
    pause_resume: Vec<Duration>,
}

fn api_run(kiln: &Path, cycles: usize, rep: usize) -> Sample {
    let socket =
        std::env::temp_dir().join(format!("kiln-api-bench-{}-{rep}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let spawned = Instant::now();
    let mut child = Command::new(kiln)
        .arg("--api-sock")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kiln");
    let stream = loop {
        if let Ok(stream) = UnixStream::connect(&socket) {
            break stream;
        }
        assert!(spawned.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_micros(100));
    };
    let socket_ready = spawned.elapsed();
    let marker = watch_for_marker(&mut child);
    let mut api = BufReader::new(stream);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
        GuestKind::Hello.path().display(),
        Params {
            hold: true,
            ..Params::default()
        }
        .cmdline()
    );
    assert_eq!(call(&mut api, "PUT", "/boot-source", &boot), 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    assert_eq!(call(&mut api, "PUT", "/machine-config", machine), 204);
    let sent = Instant::now();
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", start), 204);
    let start_answered = sent.elapsed();
    let seen = marker
        .recv_timeout(Duration::from_secs(10))
        .expect("the guest printed its marker");
    let first_output = seen - sent;
    let pause_resume = (0..cycles)
        .map(|_| {
            let began = Instant::now();
            assert_eq!(
                call(&mut api, "PATCH", "/vm", r#"{"state": "Paused"}"#),
                204
            );
            assert_eq!(
                call(&mut api, "PATCH", "/vm", r#"{"state": "Resumed"}"#),
                204
            );
            began.elapsed()
        })
        .collect();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    child.wait().unwrap();
    Sample {
        socket_ready,
        start_answered,
        first_output,
        pause_resume,
    }
}

fn cli_run(kiln: &Path) -> Duration {
    let spawned = Instant::now();
    let mut child = Command::new(kiln)
        .args(["run", "--kernel"])
        .arg(GuestKind::Hello.path())
        .args(["--memory", "128M", "--cmdline"])
        .arg(
            Params {
                hold: true,
                ..Params::default()
            }
            .cmdline(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kiln");
    let seen = watch_for_marker(&mut child)
        .recv_timeout(Duration::from_secs(10))
        .expect("the guest printed its marker");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    child.wait().unwrap();
    seen - spawned
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let options = options();
    let mut samples = Vec::new();
    let mut cli = Vec::new();
    // One unmeasured warm-up each.
    api_run(&options.kiln, 1, 0);
    cli_run(&options.kiln);
    for rep in 1..=options.reps {
        samples.push(api_run(&options.kiln, options.cycles, rep));
        cli.push(cli_run(&options.kiln));
    }
    let pick = |f: fn(&Sample) -> Duration| median(samples.iter().map(f).collect());
    let cycles: Vec<Duration> = samples
        .iter()
        .flat_map(|s| s.pause_resume.iter().copied())
        .collect();
    let cycle_count = cycles.len();
    let (fastest, slowest) = (
        cycles.iter().min().copied().unwrap_or_default(),
        cycles.iter().max().copied().unwrap_or_default(),
    );
    println!(
        "| Metric (`hello hold=1`, 1 vCPU, 128 MiB; medians of {} runs) | ms |",
        options.reps
    );
    println!("|---|---:|");
    println!(
        "| exec → API socket accepts | {} |",
        ms(pick(|s| s.socket_ready))
    );
    println!(
        "| `InstanceStart` request → 204 (VM built, vCPUs running) | {} |",
        ms(pick(|s| s.start_answered))
    );
    println!(
        "| `InstanceStart` sent → guest's first output | {} |",
        ms(pick(|s| s.first_output))
    );
    println!(
        "| CLI: `kiln run` exec → guest's first output | {} |",
        ms(median(cli))
    );
    println!(
        "| `PATCH /vm` Paused + Resumed round trip ({cycle_count} cycles; min {}, max {}) | {} |",
        ms(fastest),
        ms(slowest),
        ms(median(cycles))
    );
}
