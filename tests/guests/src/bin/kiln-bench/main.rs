//! `kiln-bench`: Kiln against QEMU `-M microvm` on the same test guests and /dev/kvm.
//!
//! Run it through `resources/bench/run`, which builds Kiln and this tool in release mode.
//! See docs/benchmarks.md for what each number means.

mod measure;
mod report;
mod suite;
mod vmm;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use measure::Scratch;
use suite::{Bench, Sizes};
use vmm::{Vmm, VmmKind};

/// Anything that stops the benchmark.
#[derive(Debug)]
pub struct BenchError(String);

impl BenchError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        BenchError(message.into())
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

const USAGE: &str = "\
usage: kiln-bench [--quick] [--kiln PATH] [--qemu PATH | --no-qemu] [--floor PATH]
                  [--reps N] [--vms N] [--cycles N] [--out FILE]

  --quick       every benchmark once at tiny sizes (proves the benchmark works)
  --kiln PATH   Kiln binary (default: `kiln` next to this binary)
  --qemu PATH   QEMU binary (default: qemu-system-x86_64 from PATH)
  --no-qemu     Kiln only
  --floor PATH  kvm-floor (resources/bench/floor.c, built): start-up also against this floor
  --reps N      repetitions per measurement (default 5; quick: 1)
  --vms N       VMs started at once in the density test (default 100; quick: 3)
  --cycles N    sequential start/stop cycles in the leak check (default 200; quick: 3)
  --out FILE    also write the Markdown report to FILE";

struct Options {
    sizes: Sizes,
    quick: bool,
    kiln: Option<PathBuf>,
    qemu: Option<PathBuf>,
    no_qemu: bool,
    floor: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Options, BenchError> {
    let quick = args.iter().any(|arg| arg == "--quick");
    let mut options = Options {
        sizes: if quick { Sizes::quick() } else { Sizes::full() },
        quick,
        kiln: None,
        qemu: None,
        no_qemu: false,
        floor: None,
        out: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .ok_or_else(|| BenchError::new(format!("{name} needs a value\n{USAGE}")))
        };
        let count = |name: &str, text: String| {
            text.parse::<usize>()
                .ok()
                .filter(|count| *count > 0)
                .ok_or_else(|| BenchError::new(format!("{name}: '{text}' is not a count above 0")))
        };
        match arg.as_str() {
            "--quick" => {}
            "--kiln" => options.kiln = Some(value("--kiln")?.into()),
            "--qemu" => options.qemu = Some(value("--qemu")?.into()),
            "--no-qemu" => options.no_qemu = true,
            "--floor" => options.floor = Some(value("--floor")?.into()),
            "--out" => options.out = Some(value("--out")?.into()),
            "--reps" => options.sizes.reps = count("--reps", value("--reps")?)?,
            "--vms" => options.sizes.density_vms = count("--vms", value("--vms")?)?,
            "--cycles" => options.sizes.cycles = count("--cycles", value("--cycles")?)?,
            "-h" | "--help" => return Err(BenchError::new(USAGE)),
            other => {
                return Err(BenchError::new(format!(
                    "unknown argument '{other}'\n{USAGE}"
                )))
            }
        }
    }
    Ok(options)
}

/// `name` resolved through PATH when it has no directory part.
fn resolve(binary: &Path) -> PathBuf {
    if binary.components().count() == 1 {
        if let Some(path) = std::env::var_os("PATH") {
            if let Some(found) = std::env::split_paths(&path)
                .map(|dir| dir.join(binary))
                .find(|candidate| candidate.is_file())
            {
                return found;
            }
        }
    }
    binary.to_path_buf()
}

fn read_first_line(path: &str, prefix: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.split_once(':'))
        .map(|(_, value)| value.trim().to_string())
}

fn machine_description() -> String {
    let cpu = read_first_line("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = read_first_line("/proc/meminfo", "MemTotal").unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "PVM (kvm_pvm: guest ring 0 emulated, ring 3 native)"
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel (VT-x)"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd (AMD-V)"
    } else {
        "unknown"
    };
    format!("{cpu}, {cores} CPUs, {memory} RAM, Linux {kernel}, /dev/kvm: {kvm}")
}

/// The 1-minute load average: other work on the host skews every number.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn run(options: Options) -> Result<String, BenchError> {
    let load_at_start = load_average();
    let mut scratch = Scratch::new()?;
    let kiln_binary = match options.kiln {
        Some(path) => path,
        None => std::env::current_exe()
            .map_err(|err| BenchError::new(format!("cannot find this binary: {err}")))?
            .with_file_name("kiln"),
    };
    let kiln = Vmm {
        kind: VmmKind::Kiln,
        binary: resolve(&kiln_binary),
    };
    let probe_timeout = Duration::from_secs(20);
    kiln.probe(&mut scratch, probe_timeout)
        .map_err(|reason| BenchError::new(format!("Kiln cannot run the test guests: {reason}")))?;

    let mut notes = Vec::new();
    let qemu = if options.no_qemu {
        notes.push("QEMU left out (--no-qemu).".to_string());
        None
    } else {
        let qemu = Vmm {
            kind: VmmKind::Qemu,
            binary: resolve(&options.qemu.unwrap_or_else(|| "qemu-system-x86_64".into())),
        };
        match qemu.probe(&mut scratch, probe_timeout) {
            Ok(()) => Some(qemu),
            Err(reason) => {
                notes.push(format!(
                    "QEMU left out: it cannot run the guests here: {reason}"
                ));
                None
            }
        }
    };

    let floor = match options.floor {
        Some(path) => {
            let floor = Vmm {
                kind: VmmKind::Floor,
                binary: path,
            };
            floor
                .probe(&mut scratch, probe_timeout)
                .map_err(|reason| BenchError::new(format!("kvm-floor does not run: {reason}")))?;
            Some(floor)
        }
        None => {
            notes.push("No floor (--floor not given).".to_string());
            None
        }
    };

    let mut header = String::new();
    header.push_str(&format!("Machine: {}\n\n", machine_description()));
    header.push_str(&format!(
        "Kiln: {} ({})\n\n",
        kiln.binary.display(),
        kiln.version()
    ));
    if let Some(qemu) = &qemu {
        header.push_str(&format!(
            "QEMU: {} ({})\n\n",
            qemu.binary.display(),
            qemu.version()
        ));
    }
    let mode = if options.quick { "quick" } else { "full" };
    header.push_str(&format!("Mode: {mode}, {:?}\n\n", options.sizes));

    let mut bench = Bench::new(kiln, qemu, floor, options.sizes)?;
    let mut rows = Vec::new();
    eprintln!("kiln-bench: start-up");
    rows.extend(bench.startup()?);
    eprintln!("kiln-bench: memory overhead");
    rows.extend(bench.memory()?);
    eprintln!("kiln-bench: exit cost");
    rows.extend(bench.exits()?);
    eprintln!("kiln-bench: density");
    rows.extend(bench.density()?);
    eprintln!("kiln-bench: start/stop cycles");
    rows.extend(bench.cycles()?);
    notes.append(&mut bench.notes);
    notes.push(format!(
        "Host load average (1 min): {load_at_start} at the start, {} at the end.",
        load_average()
    ));

    let mut text = header;
    text.push_str(&report::table(&rows, "QEMU microvm", "Kiln/QEMU"));
    if !bench.floor_rows.is_empty() {
        text.push_str("\nKiln against the floor (kvm-floor, same `exit` guest, same run):\n\n");
        text.push_str(&report::table(&bench.floor_rows, "Floor", "Kiln/floor"));
    }
    if !notes.is_empty() {
        text.push('\n');
        for note in notes {
            text.push_str(&format!("- {note}\n"));
        }
    }
    Ok(text)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = parse_args(&args).and_then(|options| {
        let out = options.out.clone();
        let text = run(options)?;
        if let Some(out) = out {
            std::fs::write(&out, &text)
                .map_err(|err| BenchError::new(format!("cannot write {}: {err}", out.display())))?;
        }
        Ok(text)
    });
    match outcome {
        Ok(text) => print!("{text}"),
        Err(err) => {
            eprintln!("kiln-bench: {err}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn quick_and_overrides() {
        let options = parse_args(&args(&["--quick", "--reps", "3", "--no-qemu"])).expect("ok");
        assert!(options.quick && options.no_qemu);
        assert_eq!(options.sizes.reps, 3);
        assert_eq!(options.sizes.density_vms, Sizes::quick().density_vms);
        let options = parse_args(&args(&["--vms", "7"])).expect("ok");
        assert_eq!(options.sizes.density_vms, 7);
        assert_eq!(options.sizes.reps, Sizes::full().reps);
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            &["--reps"][..],
            &["--reps", "0"],
            &["--reps", "x"],
            &["--bogus"],
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
