//! Runs image files through the qcow2 harness without libFuzzer (stable Rust):
//!
//!   qcow2_replay [FILE|DIR]...            replay files (a corpus, a crash artifact)
//!   qcow2_replay --random N [--seed S]    N mutations of the built-in seeds
//!   qcow2_replay --write-seeds DIR        write the built-in seeds as files (a starting corpus)
//!
//! A broken invariant panics, with the input that did it named first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kiln_fuzz::qcow2::{mutate_image, qcow2_seeds, run_qcow2_image};
use kiln_fuzz::Rng;

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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut random = 0u64;
    let mut seed = 1u64;
    let mut inputs = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--random" => {
                random = value(i).parse().unwrap_or(0);
                i += 1;
            }
            "--seed" => {
                seed = value(i).parse().unwrap_or(1);
                i += 1;
            }
            "--write-seeds" => {
                let dir = PathBuf::from(value(i));
                if let Err(err) = std::fs::create_dir_all(&dir) {
                    eprintln!("cannot create {}: {err}", dir.display());
                    return ExitCode::FAILURE;
                }
                for (name, input) in qcow2_seeds() {
                    let path = dir.join(format!("seed-{name}"));
                    if let Err(err) = std::fs::write(&path, input) {
                        eprintln!("cannot write {}: {err}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                i += 1;
            }
            path => inputs.extend(files(Path::new(path))),
        }
        i += 1;
    }
    for path in &inputs {
        eprintln!("replaying {}", path.display());
        match std::fs::read(path) {
            Ok(data) => eprintln!("  opened: {}", run_qcow2_image(&data)),
            Err(err) => eprintln!("cannot read {}: {err}", path.display()),
        }
    }
    let seeds = qcow2_seeds();
    let mut rng = Rng::new(seed);
    for n in 0..random {
        let (_, base) = &seeds[rng.below(seeds.len())];
        let input = mutate_image(base, &mut rng);
        if std::panic::catch_unwind(|| run_qcow2_image(&input)).is_err() {
            let path = format!("qcow2-replay-crash-seed{seed}-{n}");
            let _ = std::fs::write(&path, &input);
            eprintln!("input {n} broke an invariant; saved as {path}");
            return ExitCode::FAILURE;
        }
    }
    println!(
        "{} files replayed, {random} random inputs run",
        inputs.len()
    );
    ExitCode::SUCCESS
}
