//! The stable (no libFuzzer) driver the `*_replay` binaries share:
//!
//!   NAME_replay [FILE|DIR]...            replay files (a corpus, a crash artifact)
//!   NAME_replay --random N [--seed S]    N mutations of the built-in seeds
//!   NAME_replay --write-seeds DIR        write the built-in seeds as files (a starting corpus)
//!
//! A broken invariant panics, with the input that did it named first; a random input that
//! does is also saved as `NAME-replay-crash-seedS-N`. `KILN_FUZZ_DUMP` prints every random
//! input before it runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::Rng;

/// One fuzz target, as its replay binary runs it.
pub struct ReplayTarget {
    /// Short name (`blk`, `vsock`, `qcow2`): names crash files.
    pub name: &'static str,
    /// The built-in seeds.
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
    /// Derives a new input from a seed.
    pub mutate: fn(&[u8], &mut Rng) -> Vec<u8>,
    /// Runs one input; says what it did (printed for replayed files).
    pub run: fn(&[u8]) -> String,
    /// Inputs slower than this are reported (None: no time check).
    pub slow_after: Option<Duration>,
}

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

impl ReplayTarget {
    fn run_named(&self, name: &str, input: &[u8]) -> String {
        eprintln!("input {name} ({} bytes)", input.len());
        let start = Instant::now();
        let outcome = (self.run)(input);
        let took = start.elapsed();
        if self.slow_after.is_some_and(|limit| took > limit) {
            eprintln!("slow: {name} took {took:?}: {input:?}");
        }
        outcome
    }

    fn write_seeds(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        for (name, input) in (self.seeds)() {
            let path = dir.join(format!("seed-{name}"));
            std::fs::write(&path, input)
                .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        }
        Ok(())
    }

    /// The replay binary's `main`, over its command line.
    pub fn main(&self) -> ExitCode {
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
                "--write-seeds" => {
                    if let Err(err) = self.write_seeds(Path::new(&value)) {
                        eprintln!("{err}");
                        return ExitCode::FAILURE;
                    }
                    i += 1;
                }
                path => inputs.extend(files(Path::new(path))),
            }
            i += 1;
        }
        for path in &inputs {
            match std::fs::read(path) {
                Ok(input) => {
                    let outcome = self.run_named(&path.display().to_string(), &input);
                    eprintln!("  {outcome}");
                }
                Err(err) => {
                    eprintln!("cannot read {}: {err}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        let seeds = (self.seeds)();
        let mut rng = Rng::new(seed);
        for n in 0..random {
            let (_, base) = &seeds[rng.below(seeds.len())];
            let input = (self.mutate)(base, &mut rng);
            if std::env::var_os("KILN_FUZZ_DUMP").is_some() {
                eprintln!("{input:?}");
            }
            let name = format!("random #{n} (seed {seed})");
            if std::panic::catch_unwind(|| self.run_named(&name, &input)).is_err() {
                let path = format!("{}-replay-crash-seed{seed}-{n}", self.name);
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
}
