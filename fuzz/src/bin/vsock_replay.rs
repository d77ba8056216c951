//! Runs inputs through the virtio-vsock harness without libFuzzer (stable Rust):
//!
//!   vsock_replay [FILE|DIR]...            replay files (a corpus, a crash artifact)
//!   vsock_replay --random N [--seed S]    N mutations of the built-in seeds
//!
//! A broken invariant panics, with the input that did it named first. Inputs that take more
//! than 100 ms are reported (the device must never wait on a socket).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kiln_fuzz::{mutate, run_vsock_packets, vsock_seeds, Rng};

fn files(path: &Path) -> Vec<PathBuf> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.sort();
        entries.into_iter().filter(|p| p.is_file()).collect()
    } else {
        vec![path.to_path_buf()]
    }
}

fn run(name: &str, input: &[u8]) {
    eprintln!("input {name} ({} bytes)", input.len());
    let start = Instant::now();
    run_vsock_packets(input);
    let took = start.elapsed();
    if took > Duration::from_millis(100) {
        eprintln!("slow: {name} took {took:?}: {input:?}");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut random = 0u64;
    let mut seed = 1u64;
    let mut inputs = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--random" => {
                random = value.parse().unwrap_or(0);
                i += 1;
            }
            "--seed" => {
                seed = value.parse().unwrap_or(1);
                i += 1;
            }
            path => inputs.extend(files(Path::new(path))),
        }
        i += 1;
    }
    for path in &inputs {
        match std::fs::read(path) {
            Ok(input) => run(&path.display().to_string(), &input),
            Err(err) => {
                eprintln!("cannot read {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let seeds = vsock_seeds();
    let mut rng = Rng::new(seed);
    for round in 0..random {
        let (_, base) = &seeds[rng.below(seeds.len())];
        let input = mutate(base, &mut rng);
        if std::env::var_os("KILN_FUZZ_DUMP").is_some() {
            eprintln!("{input:?}");
        }
        run(&format!("random #{round} (seed {seed})"), &input);
    }
    ExitCode::SUCCESS
}
