//! The benchmarks: start-up, memory overhead, exit cost, density and start/stop cycles.
//!
//! Every measured run is checked (exit status 0 and the guest's marker or done line with the
//! expected parameters), so a crashed guest can never pass for a fast one. Runs of the two
//! VMMs are interleaved (A B, B A, ...) so that slow drifts of the shared host hit both alike.

use std::thread;
use std::time::{Duration, Instant};

use kiln_test_guests::{parse_done, Done, GuestKind, Params, HELLO_MARKER};

use crate::measure::{
    become_subreaper, children, current_rss_kib, host_file_handles, mem_available_kib, open_fds,
    run_once, Running, Sample, Scratch,
};
use crate::report::Row;
use crate::vmm::{VmSpec, Vmm, VmmKind};
use crate::BenchError;

/// How big and how often.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Repetitions of each measurement per VMM.
    pub reps: usize,
    /// One unmeasured run per VMM first (page cache, lazy binding).
    pub warmup: bool,
    /// Guest RAM in MiB for every VM.
    pub memory_mib: u64,
    /// MiB the `touch` guest writes.
    pub touch_mib: u64,
    /// Small and large loop counts of `pio-loop`.
    pub pio: (u64, u64),
    /// Small and large loop counts of `mmio-loop`.
    pub mmio: (u64, u64),
    /// VMs started at once for the density test.
    pub density_vms: usize,
    /// Repetitions of the density test per VMM.
    pub density_reps: usize,
    /// Sequential start/stop cycles for the leak check.
    pub cycles: usize,
    /// Deadline of any single VM run.
    pub timeout: Duration,
}

impl Sizes {
    /// The full benchmark (a few minutes on 2 cores).
    pub fn full() -> Self {
        Sizes {
            reps: 5,
            warmup: true,
            memory_mib: 128,
            touch_mib: 120,
            pio: (1_000, 100_000),
            mmio: (1_000, 20_000),
            density_vms: 100,
            density_reps: 2,
            cycles: 200,
            timeout: Duration::from_secs(300),
        }
    }

    /// Everything once at tiny sizes: proves the benchmark works (CI).
    pub fn quick() -> Self {
        Sizes {
            reps: 1,
            warmup: false,
            memory_mib: 128,
            touch_mib: 8,
            pio: (10, 100),
            mmio: (10, 100),
            density_vms: 3,
            density_reps: 1,
            cycles: 3,
            timeout: Duration::from_secs(120),
        }
    }
}

/// Samples of one metric for each VMM.
#[derive(Default)]
struct PerVmm {
    kiln: Vec<f64>,
    qemu: Vec<f64>,
    floor: Vec<f64>,
}

impl PerVmm {
    fn push(&mut self, vmm: &Vmm, value: f64) {
        match vmm.kind {
            VmmKind::Kiln => self.kiln.push(value),
            VmmKind::Qemu => self.qemu.push(value),
            VmmKind::Floor => self.floor.push(value),
        }
    }

    fn row(&self, metric: impl Into<String>) -> Row {
        Row::from_samples(metric, &self.kiln, &self.qemu)
    }

    /// Kiln against the floor.
    fn floor_row(&self, metric: impl Into<String>) -> Row {
        Row::from_samples(metric, &self.kiln, &self.floor)
    }
}

/// What a run must show to count.
enum Expect {
    /// Exit status 0 and nothing else.
    Clean,
    /// Status 0 and the hello marker.
    Hello,
    /// Status 0 and this done line.
    Done(Done),
}

/// The benchmark runner.
pub struct Bench {
    kiln: Vmm,
    qemu: Option<Vmm>,
    floor: Option<Vmm>,
    sizes: Sizes,
    scratch: Scratch,
    /// Observations worth a sentence in the report.
    pub notes: Vec<String>,
    /// Kiln against the floor (start-up only), once [`Bench::startup`] ran with a floor.
    pub floor_rows: Vec<Row>,
}

impl Bench {
    /// A runner comparing `kiln` with `qemu` (Kiln alone when `qemu` is `None`), and Kiln's
    /// start-up with `floor`'s.
    pub fn new(
        kiln: Vmm,
        qemu: Option<Vmm>,
        floor: Option<Vmm>,
        sizes: Sizes,
    ) -> Result<Self, BenchError> {
        Ok(Bench {
            kiln,
            qemu,
            floor,
            sizes,
            scratch: Scratch::new()?,
            notes: Vec::new(),
            floor_rows: Vec::new(),
        })
    }

    /// The VMMs in the order of repetition `rep`: A B, then B A, ...
    fn order(&self, rep: usize) -> Vec<Vmm> {
        let mut vmms = vec![self.kiln.clone()];
        vmms.extend(self.qemu.clone());
        if rep % 2 == 1 {
            vmms.reverse();
        }
        vmms
    }

    /// As [`Bench::order`], with the floor too: A B C, then C B A, ...
    fn order_with_floor(&self, rep: usize) -> Vec<Vmm> {
        let mut vmms = vec![self.kiln.clone()];
        vmms.extend(self.qemu.clone());
        vmms.extend(self.floor.clone());
        if rep % 2 == 1 {
            vmms.reverse();
        }
        vmms
    }

    fn spec(&self, guest: GuestKind, params: Params) -> VmSpec {
        VmSpec {
            guest,
            cmdline: params.cmdline(),
            memory_mib: self.sizes.memory_mib,
            cpus: 1,
        }
    }

    /// Runs one VM to its end and checks the outcome.
    fn run(&mut self, vmm: &Vmm, spec: &VmSpec, expect: &Expect) -> Result<Sample, BenchError> {
        let sample = run_once(
            &mut vmm.command(spec),
            &mut self.scratch,
            self.sizes.timeout,
        )?;
        let problem = if sample.code != 0 {
            Some("a non-zero exit status".to_string())
        } else {
            match expect {
                Expect::Clean => None,
                Expect::Hello if !sample.stdout.contains(HELLO_MARKER) => {
                    Some(format!("no {HELLO_MARKER}"))
                }
                Expect::Hello => None,
                Expect::Done(done) if parse_done(&sample.stdout) != Some(*done) => {
                    Some(format!("no done line with n={} m={}", done.n, done.m))
                }
                Expect::Done(_) => None,
            }
        };
        match problem {
            Some(problem) => Err(BenchError::new(format!(
                "{} running `{}` ({}) ended with {problem}: {}",
                vmm.name(),
                spec.guest,
                spec.cmdline,
                sample.describe()
            ))),
            None => Ok(sample),
        }
    }

    fn warm_up(&mut self, spec: &VmSpec, expect: &Expect) -> Result<(), BenchError> {
        if self.sizes.warmup {
            for vmm in self.order(0) {
                self.run(&vmm, spec, expect)?;
            }
        }
        Ok(())
    }

    /// (1) Process start to VMM exit for the `exit` guest: wall, CPU and peak RSS; also for
    /// the floor, whose rows go to [`Bench::floor_rows`].
    pub fn startup(&mut self) -> Result<Vec<Row>, BenchError> {
        let spec = self.spec(GuestKind::Exit, Params::default());
        self.warm_up(&spec, &Expect::Clean)?;
        if let (Some(floor), true) = (self.floor.clone(), self.sizes.warmup) {
            self.run(&floor, &spec, &Expect::Clean)?;
        }
        let (mut wall, mut cpu, mut rss) =
            (PerVmm::default(), PerVmm::default(), PerVmm::default());
        for rep in 0..self.sizes.reps {
            for vmm in self.order_with_floor(rep) {
                let sample = self.run(&vmm, &spec, &Expect::Clean)?;
                wall.push(&vmm, millis(sample.wall));
                cpu.push(&vmm, millis(sample.cpu));
                rss.push(&vmm, mib(sample.max_rss_kib));
            }
        }
        let memory = self.sizes.memory_mib;
        let wall_metric = format!("Start → exit, `exit` guest, {memory} MiB: wall (ms)");
        let cpu_metric = "Start → exit: CPU user+sys (ms)";
        let rss_metric = "Start → exit: peak RSS (MiB)";
        if self.floor.is_some() {
            self.floor_rows = vec![
                wall.floor_row(wall_metric.clone()),
                cpu.floor_row(cpu_metric),
                rss.floor_row(rss_metric),
            ];
        }
        Ok(vec![
            wall.row(wall_metric),
            cpu.row(cpu_metric),
            rss.row(rss_metric),
        ])
    }

    /// (2) Peak RSS minus the guest memory the `touch` guest wrote.
    pub fn memory(&mut self) -> Result<Vec<Row>, BenchError> {
        let touched = self.sizes.touch_mib;
        let spec = self.spec(GuestKind::Touch, Params::with_m(touched));
        let expect = Expect::Done(Done {
            n: kiln_test_guests::DEFAULT_N,
            m: touched,
        });
        self.warm_up(&spec, &expect)?;
        let (mut peak, mut overhead, mut wall) =
            (PerVmm::default(), PerVmm::default(), PerVmm::default());
        for rep in 0..self.sizes.reps {
            for vmm in self.order(rep) {
                let sample = self.run(&vmm, &spec, &expect)?;
                peak.push(&vmm, mib(sample.max_rss_kib));
                overhead.push(&vmm, mib(sample.max_rss_kib) - touched as f64);
                wall.push(&vmm, millis(sample.wall));
            }
        }
        let memory = self.sizes.memory_mib;
        Ok(vec![
            peak.row(format!(
                "`touch` {touched} MiB of a {memory} MiB guest: peak RSS (MiB)"
            )),
            overhead.row("VMM memory overhead = peak RSS − touched (MiB)"),
            wall.row("`touch` run: wall (ms)"),
        ])
    }

    /// (3) Cost per exit from the loop guests: (time(N large) − time(N small)) / ΔN.
    pub fn exits(&mut self) -> Result<Vec<Row>, BenchError> {
        let mut rows = Vec::new();
        for (kind, (small, large), label) in [
            (GuestKind::PioLoop, self.sizes.pio, "PIO write, port 0x80"),
            (
                GuestKind::MmioLoop,
                self.sizes.mmio,
                "MMIO read, 0xd0100000",
            ),
        ] {
            let (few_spec, many_spec) = (
                self.spec(kind, Params::with_n(small)),
                self.spec(kind, Params::with_n(large)),
            );
            let expect_of = |n| {
                Expect::Done(Done {
                    n,
                    m: kiln_test_guests::DEFAULT_M,
                })
            };
            self.warm_up(&few_spec, &expect_of(small))?;
            let (mut wall, mut cpu) = (PerVmm::default(), PerVmm::default());
            let extra = large.saturating_sub(small).max(1) as f64;
            for rep in 0..self.sizes.reps {
                for vmm in self.order(rep) {
                    let few = self.run(&vmm, &few_spec, &expect_of(small))?;
                    let many = self.run(&vmm, &many_spec, &expect_of(large))?;
                    wall.push(&vmm, micros_between(few.wall, many.wall) / extra);
                    cpu.push(&vmm, micros_between(few.cpu, many.cpu) / extra);
                }
            }
            rows.push(wall.row(format!("{label}: wall per exit (µs), N {small} vs {large}")));
            rows.push(cpu.row(format!("{label}: CPU per exit (µs)")));
        }
        Ok(rows)
    }

    /// (4a) Many VMs at once: time until all printed the marker, their memory, their stop.
    pub fn density(&mut self) -> Result<Vec<Row>, BenchError> {
        let mut up = PerVmm::default();
        let mut total_rss = PerVmm::default();
        let mut host_used = PerVmm::default();
        let mut fds = PerVmm::default();
        let mut stop = PerVmm::default();
        for rep in 0..self.sizes.density_reps {
            for vmm in self.order(rep) {
                let outcome = self.density_once(&vmm)?;
                up.push(&vmm, outcome.all_up.as_secs_f64());
                total_rss.push(&vmm, mib(outcome.total_rss_kib));
                host_used.push(&vmm, outcome.host_used_mib);
                fds.push(&vmm, outcome.fds_per_vm as f64);
                stop.push(&vmm, outcome.all_stopped.as_secs_f64());
                if outcome
                    .stop_codes
                    .iter()
                    .any(|code| *code != outcome.stop_codes[0])
                {
                    self.notes.push(format!(
                        "{}: SIGTERM exit codes differ across VMs: {:?}",
                        vmm.name(),
                        outcome.stop_codes
                    ));
                }
                let code = outcome.stop_codes.first().copied().unwrap_or(-1);
                let note = format!("{}: exit status after SIGTERM: {code}", vmm.name());
                if !self.notes.contains(&note) {
                    self.notes.push(note);
                }
            }
        }
        let vms = self.sizes.density_vms;
        let memory = self.sizes.memory_mib;
        Ok(vec![
            up.row(format!(
                "{vms} × {memory} MiB VMs started at once: all printed hello (s)"
            )),
            total_rss.row(format!("{vms} VMs running: total RSS (MiB)")),
            host_used.row(format!("{vms} VMs running: host MemAvailable drop (MiB)")),
            fds.row("Open fds per VMM process"),
            stop.row(format!("{vms} VMs: SIGTERM to all reaped (s)")),
        ])
    }

    fn density_once(&mut self, vmm: &Vmm) -> Result<DensityOutcome, BenchError> {
        let spec = self.spec(
            GuestKind::Hello,
            Params {
                hold: true,
                ..Params::default()
            },
        );
        let available_before = mem_available_kib();
        let started = Instant::now();
        let mut fleet = Fleet(Vec::new());
        for _ in 0..self.sizes.density_vms {
            fleet
                .0
                .push(Running::spawn(&mut vmm.command(&spec), &mut self.scratch)?);
        }
        let deadline = started + self.sizes.timeout;
        let mut pending: Vec<usize> = (0..fleet.0.len()).collect();
        while !pending.is_empty() {
            if Instant::now() >= deadline {
                return Err(BenchError::new(format!(
                    "{}: {} of {} VMs had not printed {HELLO_MARKER} after {} s",
                    vmm.name(),
                    pending.len(),
                    fleet.0.len(),
                    self.sizes.timeout.as_secs()
                )));
            }
            let mut still_pending = Vec::new();
            for index in pending {
                let vm = &fleet.0[index];
                if vm.stdout().contains(HELLO_MARKER) {
                    continue;
                }
                if vm.has_exited() {
                    let vm = fleet.0.swap_remove(index);
                    let sample = vm.wait(Duration::from_secs(1))?;
                    return Err(BenchError::new(format!(
                        "{}: a VM of the density test ended early: {}",
                        vmm.name(),
                        sample.describe()
                    )));
                }
                still_pending.push(index);
            }
            pending = still_pending;
            thread::sleep(Duration::from_millis(2));
        }
        let all_up = started.elapsed();
        let total_rss_kib = fleet
            .0
            .iter()
            .filter_map(|vm| current_rss_kib(vm.pid()))
            .sum();
        let fds_per_vm = fleet
            .0
            .first()
            .and_then(|vm| open_fds(vm.pid()))
            .unwrap_or(0);
        let host_used_mib = match (available_before, mem_available_kib()) {
            (Some(before), Some(during)) => (before as f64 - during as f64) / 1024.0,
            _ => f64::NAN,
        };
        let stopping = Instant::now();
        for vm in &fleet.0 {
            vm.signal(libc::SIGTERM);
        }
        let stop_deadline = stopping + Duration::from_secs(60);
        let mut stop_codes = Vec::new();
        for vm in fleet.0.drain(..) {
            stop_codes.push(vm.wait_until(stop_deadline)?.code);
        }
        Ok(DensityOutcome {
            all_up,
            total_rss_kib,
            host_used_mib,
            fds_per_vm,
            all_stopped: stopping.elapsed(),
            stop_codes,
        })
    }

    /// (4b) Sequential start/stop cycles: host file handles and memory must not grow.
    pub fn cycles(&mut self) -> Result<Vec<Row>, BenchError> {
        let spec = self.spec(GuestKind::Hello, Params::default());
        let mut cycle = PerVmm::default();
        let mut handles = PerVmm::default();
        let mut memory = PerVmm::default();
        let mut leftovers = PerVmm::default();
        become_subreaper()?;
        for vmm in self.order(0) {
            let handles_before = host_file_handles();
            let available_before = mem_available_kib();
            for _ in 0..self.sizes.cycles {
                let sample = self.run(&vmm, &spec, &Expect::Hello)?;
                cycle.push(&vmm, millis(sample.wall));
            }
            // Let the host finish tearing the last VM down before counting.
            thread::sleep(Duration::from_millis(500));
            if let (Some(before), Some(after)) = (handles_before, host_file_handles()) {
                handles.push(&vmm, after as f64 - before as f64);
            }
            if let (Some(before), Some(after)) = (available_before, mem_available_kib()) {
                memory.push(&vmm, (before as f64 - after as f64) / 1024.0);
            }
            leftovers.push(&vmm, children().len() as f64);
        }
        let cycles = self.sizes.cycles;
        let mut rows = vec![
            cycle.row(format!(
                "{cycles} start/stop cycles of `hello`: per cycle (ms)"
            )),
            handles.row(format!("Host file handles, after − before {cycles} cycles")),
            memory.row(format!(
                "Host MemAvailable drop after {cycles} cycles (MiB)"
            )),
            leftovers.row("Processes left behind (the bench is their subreaper)"),
        ];
        // These are single before/after differences, not medians of repetitions.
        for row in rows.iter_mut().skip(1) {
            row.samples = 1;
        }
        Ok(rows)
    }
}

struct DensityOutcome {
    all_up: Duration,
    total_rss_kib: u64,
    host_used_mib: f64,
    fds_per_vm: usize,
    all_stopped: Duration,
    stop_codes: Vec<i32>,
}

/// VMs of a density run; whatever is left when it is dropped (after an error) is killed.
struct Fleet(Vec<Running>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for vm in self.0.drain(..) {
            vm.kill_and_reap();
        }
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn micros_between(short: Duration, long: Duration) -> f64 {
    (long.as_secs_f64() - short.as_secs_f64()) * 1e6
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
