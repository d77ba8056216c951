//! Snapshot benchmark: create time, restore → guest running latency, memory file sizes, for
//! guests of two memory sizes (restore must not grow with memory size). Direct /dev/kvm with
//! the `count` micro guest. Run by `resources/bench/snapshot/run`; prints a Markdown table.
//!
//! Usage: snapshot_bench GUEST_ELF [REPS] [SIZES_MIB...]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_vmm::memory::GuestMemory;
use kiln_vmm::snapshot::{RestoreConfig, SnapshotKind};
use kiln_vmm::vm_memory::{Bytes, GuestAddress};
use kiln_vmm::{ConsoleConfig, RunningVm, Vm, VmConfig};

/// Where the `count` guest keeps its counter (tests/guests: COUNT_ADDR).
const COUNT_ADDR: u64 = 3 << 20;

fn count(memory: &GuestMemory) -> u64 {
    memory.read_obj(GuestAddress(COUNT_ADDR)).unwrap_or(0)
}

/// Waits until the counter passes `from`; returns how long that took.
fn until_counting(memory: &GuestMemory, from: u64, vm: &RunningVm) -> Duration {
    let started = Instant::now();
    while count(memory) <= from {
        assert!(!vm.is_finished(), "the guest ended");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the guest does not count"
        );
        std::hint::spin_loop();
    }
    started.elapsed()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn allocated_mib(path: &Path) -> f64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0.0, |m| (m.blocks() * 512) as f64 / (1 << 20) as f64)
}

struct Row {
    memory_mib: u32,
    create_full_ms: f64,
    create_diff_ms: f64,
    restore_ms: f64,
    restore_to_running_ms: f64,
    full_file_mib: f64,
    diff_file_mib: f64,
}

fn measure(guest: &Path, memory_mib: u32, reps: usize, dir: &Path) -> Row {
    let (mut full, mut diff, mut restore, mut running) = (vec![], vec![], vec![], vec![]);
    let (mut full_size, mut diff_size) = (0.0, 0.0);
    for rep in 0..reps {
        let mut config = VmConfig::new(guest);
        config.memory_mib = memory_mib;
        config.cpus = 2;
        config.console = ConsoleConfig::None;
        config.cmdline = Some(format!("n={}", 1u64 << 60));
        config.track_dirty_pages = true;
        let vm = Vm::new(config, Instant::now()).expect("build the VM (is /dev/kvm usable?)");
        let memory = vm.guest_memory();
        // A quarter of RAM in use, as a guest's page cache and heap would be.
        let chunk = vec![0xa5u8; 1 << 20];
        for mib in (64..u64::from(memory_mib)).step_by(4) {
            memory
                .write_slice(&chunk, GuestAddress(mib << 20))
                .expect("fill");
        }
        let vm = vm.start().expect("start");
        let handle = vm.handle();
        until_counting(&memory, 0, &vm);
        handle.pause().expect("pause");
        let (state, mem) = (
            dir.join(format!("{rep}.state")),
            dir.join(format!("{rep}.mem")),
        );
        let started = Instant::now();
        handle.snapshot(&state, &mem).expect("full snapshot");
        full.push(started.elapsed().as_secs_f64() * 1e3);
        full_size = allocated_mib(&mem);
        handle.resume().expect("resume");
        let at = count(&memory);
        until_counting(&memory, at + 10_000_000, &vm);
        handle.pause().expect("pause");
        let (diff_state, diff_mem) = (
            dir.join(format!("{rep}d.state")),
            dir.join(format!("{rep}d.mem")),
        );
        let started = Instant::now();
        handle
            .snapshot_of_kind(SnapshotKind::Diff, &diff_state, &diff_mem)
            .expect("diff snapshot");
        diff.push(started.elapsed().as_secs_f64() * 1e3);
        diff_size = allocated_mib(&diff_mem);
        handle.stop();
        vm.wait().expect("run");

        let started = Instant::now();
        let mut config = RestoreConfig::new(&state, &mem);
        config.console = ConsoleConfig::None;
        config.track_dirty_pages = Some(false);
        let restored = Vm::restore(&config, started).expect("restore");
        restore.push(started.elapsed().as_secs_f64() * 1e3);
        let restored_memory = restored.guest_memory();
        let from = count(&restored_memory);
        let vm = restored.start().expect("start the restored VM");
        until_counting(&restored_memory, from, &vm);
        running.push(started.elapsed().as_secs_f64() * 1e3);
        vm.handle().stop();
        vm.wait().expect("run");
        for file in [&state, &mem, &diff_state, &diff_mem] {
            let _ = std::fs::remove_file(file);
        }
    }
    Row {
        memory_mib,
        create_full_ms: median(full),
        create_diff_ms: median(diff),
        restore_ms: median(restore),
        restore_to_running_ms: median(running),
        full_file_mib: full_size,
        diff_file_mib: diff_size,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let guest = PathBuf::from(
        args.next()
            .expect("usage: snapshot_bench GUEST_ELF [REPS] [MIB...]"),
    );
    let reps: usize = args
        .next()
        .map_or(5, |r| r.parse().expect("REPS is a number"));
    let mut sizes: Vec<u32> = args.map(|s| s.parse().expect("sizes in MiB")).collect();
    if sizes.is_empty() {
        sizes = vec![128, 2048];
    }
    let dir = std::env::temp_dir().join(format!("kiln-snapshot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    println!("| guest memory | create full (ms) | create diff (ms) | restore: Vm::restore (ms) | restore → guest running (ms) | full memory file (MiB on disk) | diff memory file (MiB on disk) |");
    println!("|---|---|---|---|---|---|---|");
    for size in sizes {
        let row = measure(&guest, size, reps, &dir);
        println!(
            "| {} MiB | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} |",
            row.memory_mib,
            row.create_full_ms,
            row.create_diff_ms,
            row.restore_ms,
            row.restore_to_running_ms,
            row.full_file_mib,
            row.diff_file_mib
        );
    }
    println!("\nmedians of {reps}; a quarter of guest RAM filled before the full snapshot; the diff after 10M more guest counts");
    let _ = std::fs::remove_dir_all(&dir);
}
