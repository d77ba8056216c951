//! Kiln as a library: build a VM from a config, start it, pause, resume and stop it, with the
//! same operations the REST API has (`kiln fc` is a thin layer over these).
//!
//! ```text
//! cargo run --release -p kiln-vmm --example lifecycle -- KERNEL [INITRD] [-- KERNEL ARGS]
//! ```
//!
//! With a Linux kernel (and initramfs) the guest boots on the console; any ELF guest works,
//! e.g. the `count` test guest of `tests/guests`. Needs read-write /dev/kvm.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_vmm::config::HugePages;
use kiln_vmm::{ConsoleConfig, Vm, VmConfig, VmOutcome, VmState};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(kernel) = args.next() else {
        eprintln!("usage: lifecycle KERNEL [INITRD] [-- KERNEL ARGS]");
        std::process::exit(2);
    };
    let rest: Vec<String> = args.collect();
    let (files, cmdline) = match rest.iter().position(|arg| arg == "--") {
        Some(split) => (&rest[..split], rest[split + 1..].join(" ")),
        None => (&rest[..], String::new()),
    };

    // 1. Describe the VM. Everything is checked by `Vm::new` before KVM is touched.
    let mut config = VmConfig::new(kernel);
    config.initrd = files.first().map(PathBuf::from);
    config.cmdline = (!cmdline.is_empty()).then_some(cmdline);
    config.cpus = 1;
    config.memory_mib = 128;
    config.huge_pages = HugePages::Transparent;
    config.console = ConsoleConfig::Stdio;

    // 2. Build it (memory, kernel, devices, vCPUs) and start it on its own thread.
    let vm = Vm::new(config, Instant::now())?;
    let running = vm.start()?;
    let handle = running.handle(); // cheap to clone, usable from any thread
    eprintln!("[lifecycle] started: {:?}", handle.state());
    std::thread::sleep(Duration::from_secs(1));

    // 3. Pause: returns once every vCPU is parked and every device quiesced. The guest's
    //    clock stands still until the resume.
    let began = Instant::now();
    handle.pause()?;
    eprintln!(
        "[lifecycle] paused in {:?}: {:?}, guest clock {} ms, {:?}",
        began.elapsed(),
        handle.state(),
        handle.guest_clock_ns()? / 1_000_000,
        handle.metrics().vcpu
    );
    assert_eq!(handle.state(), VmState::Paused);
    std::thread::sleep(Duration::from_millis(500));

    // 4. Resume where it stopped.
    let began = Instant::now();
    handle.resume()?;
    eprintln!(
        "[lifecycle] resumed in {:?}: guest clock {} ms",
        began.elapsed(),
        handle.guest_clock_ns()? / 1_000_000
    );
    std::thread::sleep(Duration::from_secs(1));

    // 5. Stop it (or let the guest power off by itself) and collect the outcome.
    handle.stop();
    let outcome = running.wait()?;
    eprintln!(
        "[lifecycle] ended: {outcome:?}; totals {:?}",
        handle.metrics()
    );
    match outcome {
        VmOutcome::Stopped | VmOutcome::PowerOff | VmOutcome::Reset => Ok(()),
        VmOutcome::Panic => Err("the guest kernel panicked".into()),
    }
}
