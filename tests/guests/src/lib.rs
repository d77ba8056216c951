//! Tiny x86-64 test guests for Kiln, assembled from `asm/guest.S` at build time.
//!
//! Each [`GuestKind`] is its own ELF64 image loaded at 1 MiB that starts both through Kiln's
//! Linux-style 64-bit entry (`e_entry`, RSI = boot_params) and through QEMU's PVH entry
//! (ELF note 18, 32-bit protected mode). After a short ring-0 setup, memory-bound loops run
//! in ring 3 (ring-0 code is emulated, slowly, on PVM hosts) and port I/O in ring 0 (PVM does
//! not honour IOPL for guest ring 3). `asm/guest.S` explains the details.
//!
//! Parameters come from the kernel command line, see [`Params`]. The VM ends with an i8042
//! reset (0xfe to port 0x64: Kiln, QEMU q35), then an ACPI GED poweroff (QEMU microvm, which
//! has no i8042), then a triple fault; Kiln reports a reset as exit status 0. Because a crash
//! also ends in a reset, success is judged by the markers the guests print on COM1.

#![deny(missing_docs)]

#[allow(dead_code)] // Shared with build.rs, which uses the rest of it.
mod assemble;
pub mod process;
pub mod qemu;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Printed (with a newline) by [`GuestKind::Hello`].
pub const HELLO_MARKER: &str = "KILN-GUEST-HELLO";
/// Starts each line of [`GuestKind::Flood`]: `KILN-GUEST-FLOOD <i>` for i = 1..=n.
pub const FLOOD_MARKER: &str = "KILN-GUEST-FLOOD";
/// Printed by the loop kinds once their work is done: `KILN-GUEST-DONE n=<n> m=<m>`.
pub const DONE_MARKER: &str = "KILN-GUEST-DONE";
/// Printed on an unexpected exception, with vector, error code and RIP.
pub const FAULT_MARKER: &str = "KILN-GUEST-FAULT";

/// Default loop count when the command line has no `n=`.
pub const DEFAULT_N: u64 = 1000;
/// Default MiB touched when the command line has no `m=`.
pub const DEFAULT_M: u64 = 16;
/// Default port of the `pio-loop` guest.
pub const DEFAULT_PORT: u16 = 0x80;
/// Default address of the `mmio-loop` guest: in Kiln's MMIO gap, decoded by no device.
pub const DEFAULT_MMIO_ADDR: u64 = 0xd010_0000;
/// First byte the `touch` guest writes; it writes one byte per 4 KiB page from here.
pub const TOUCH_START: u64 = 2 << 20;
/// Guest-physical address of the `count` guest's 64-bit counter.
pub const COUNT_ADDR: u64 = 3 << 20;
/// Printed by the `count` guest with `report=K` every 2^K steps: `KILN-GUEST-COUNT <count>`.
pub const COUNT_MARKER: &str = "KILN-GUEST-COUNT";
/// Printed by the `rep-io` guest through one `rep outsb`.
pub const REP_OUTS_MARKER: &str = "KILN-GUEST-REP-OUTS";
/// Printed by the `rep-io` guest when each byte of its `rep insb` read the line status register.
pub const REP_INS_OK_MARKER: &str = "KILN-GUEST-REP-INS-OK";

/// One test guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestKind {
    /// Ends the VM with its first instructions.
    Exit,
    /// Prints [`HELLO_MARKER`] on COM1, then ends the VM.
    Hello,
    /// `n` single-byte writes to port `port` (from ring 0, unrolled 16 times).
    PioLoop,
    /// `n` 32-bit reads of `addr` (user-mapped MMIO) from ring 3.
    MmioLoop,
    /// Writes one byte per 4 KiB page over `m` MiB from 2 MiB up, from ring 3.
    Touch,
    /// Counts to `n` in the u64 at [`COUNT_ADDR`] from ring 3, checking after every step that
    /// memory and register agree (a mismatch faults).
    Count,
    /// String port I/O: one `rep outsb` of [`REP_OUTS_MARKER`] to COM1, then a `rep insb` of
    /// four LSR reads, reported as [`REP_INS_OK_MARKER`] (or `...-BAD`).
    RepIo,
    /// Prints `n` numbered lines on COM1 from ring 0 ([`flood_line`]), as fast as the UART
    /// takes them; `n = u64::MAX` floods for good.
    Flood,
}

impl GuestKind {
    /// Every kind.
    pub const ALL: [GuestKind; 8] = [
        GuestKind::Exit,
        GuestKind::Hello,
        GuestKind::PioLoop,
        GuestKind::MmioLoop,
        GuestKind::Touch,
        GuestKind::Count,
        GuestKind::RepIo,
        GuestKind::Flood,
    ];

    /// Short name, also the ELF's file stem.
    pub fn name(self) -> &'static str {
        match self {
            GuestKind::Exit => "exit",
            GuestKind::Hello => "hello",
            GuestKind::PioLoop => "pio-loop",
            GuestKind::MmioLoop => "mmio-loop",
            GuestKind::Touch => "touch",
            GuestKind::Count => "count",
            GuestKind::RepIo => "rep-io",
            GuestKind::Flood => "flood",
        }
    }

    /// Path of the ELF built for this kind.
    pub fn path(self) -> &'static Path {
        Path::new(match self {
            GuestKind::Exit => env!("KILN_GUEST_ELF_EXIT"),
            GuestKind::Hello => env!("KILN_GUEST_ELF_HELLO"),
            GuestKind::PioLoop => env!("KILN_GUEST_ELF_PIO_LOOP"),
            GuestKind::MmioLoop => env!("KILN_GUEST_ELF_MMIO_LOOP"),
            GuestKind::Touch => env!("KILN_GUEST_ELF_TOUCH"),
            GuestKind::Count => env!("KILN_GUEST_ELF_COUNT"),
            GuestKind::RepIo => env!("KILN_GUEST_ELF_REP_IO"),
            GuestKind::Flood => env!("KILN_GUEST_ELF_FLOOD"),
        })
    }

    /// Whether this kind prints the done line ([`parse_done`]) when it finished.
    pub fn reports_done(self) -> bool {
        !matches!(self, GuestKind::Exit | GuestKind::Hello | GuestKind::RepIo)
    }
}

impl fmt::Display for GuestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`GuestKind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKind(pub String);

impl fmt::Display for UnknownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown test guest '{}'", self.0)
    }
}

impl std::error::Error for UnknownKind {}

impl FromStr for GuestKind {
    type Err = UnknownKind;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        GuestKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| UnknownKind(name.to_string()))
    }
}

/// Line `i` (from 1) of [`GuestKind::Flood`]'s output, newline included.
pub fn flood_line(i: u64) -> String {
    format!("{FLOOD_MARKER} {i}\n")
}

/// Path of the ELF built for `kind`.
pub fn path(kind: GuestKind) -> &'static Path {
    kind.path()
}

/// Path of the QEMU-only shim that enters a guest the way Kiln does (see [`qemu::Entry`]).
pub fn direct_entry_shim_path() -> &'static Path {
    Path::new(env!("KILN_GUEST_ELF_DIRECT_ENTRY_SHIM"))
}

/// Guest parameters, passed on the kernel command line; `None` keeps the guest's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// Loop count of `pio-loop` and `mmio-loop`; line count of `flood`.
    pub n: Option<u64>,
    /// MiB written by `touch` (capped by the guest below the MMIO gap, 3326 MiB).
    pub m: Option<u64>,
    /// Port written by `pio-loop`.
    pub port: Option<u16>,
    /// Address read by `mmio-loop` (must lie below 4 GiB, where the guest maps it).
    pub mmio_addr: Option<u64>,
    /// Halt for good (interrupts off) when done instead of ending the VM: keeps it running.
    pub hold: bool,
    /// `count` prints its count every 2^report steps.
    pub report: Option<u64>,
}

impl Params {
    /// Parameters with only `n` set.
    pub fn with_n(n: u64) -> Self {
        Params {
            n: Some(n),
            ..Params::default()
        }
    }

    /// Parameters with only `m` set.
    pub fn with_m(m: u64) -> Self {
        Params {
            m: Some(m),
            ..Params::default()
        }
    }

    /// The kernel command line that carries these parameters.
    pub fn cmdline(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.n {
            parts.push(format!("n={n}"));
        }
        if let Some(m) = self.m {
            parts.push(format!("m={m}"));
        }
        if let Some(port) = self.port {
            parts.push(format!("port={port:#x}"));
        }
        if let Some(addr) = self.mmio_addr {
            parts.push(format!("addr={addr:#x}"));
        }
        if self.hold {
            parts.push("hold=1".to_string());
        }
        if let Some(report) = self.report {
            parts.push(format!("report={report}"));
        }
        parts.join(" ")
    }
}

/// What a loop guest reported in its done line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The loop count it used.
    pub n: u64,
    /// The MiB count it used (after capping).
    pub m: u64,
}

/// The counts a `count` guest reported (`KILN-GUEST-COUNT <count>` lines), in order.
pub fn parse_counts(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter_map(|line| line.trim_end().strip_prefix(COUNT_MARKER))
        .filter_map(|count| count.trim().parse().ok())
        .collect()
}

/// Finds `KILN-GUEST-DONE n=<n> m=<m>` in a guest's console output.
pub fn parse_done(output: &str) -> Option<Done> {
    let line = output
        .lines()
        .find_map(|line| line.trim_end().strip_prefix(DONE_MARKER))?;
    let mut n = None;
    let mut m = None;
    for field in line.split_whitespace() {
        if let Some(value) = field.strip_prefix("n=") {
            n = value.parse().ok();
        } else if let Some(value) = field.strip_prefix("m=") {
            m = value.parse().ok();
        }
    }
    Some(Done { n: n?, m: m? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_match_the_built_guests() {
        let names: Vec<&str> = assemble::GUESTS.iter().map(|(name, _)| *name).collect();
        let kinds: Vec<&str> = GuestKind::ALL.iter().map(|kind| kind.name()).collect();
        assert_eq!(names, kinds);
        for kind in GuestKind::ALL {
            let image = std::fs::read(kind.path()).expect("the build script wrote every guest");
            assert!(
                image.starts_with(b"\x7fELF\x02\x01"),
                "{kind} is not an ELF64 LE image"
            );
            assert_eq!(kind.name().parse::<GuestKind>(), Ok(kind));
        }
        assert!(direct_entry_shim_path().is_file());
        assert_eq!("nope".parse::<GuestKind>(), Err(UnknownKind("nope".into())));
    }

    #[test]
    fn guests_load_at_one_mib_with_a_pvh_note() {
        for kind in GuestKind::ALL {
            let image = std::fs::read(kind.path()).expect("guest image");
            let entry = u64::from_le_bytes(image[24..32].try_into().expect("8 bytes"));
            assert!(
                (0x10_0000..0x20_0000).contains(&entry),
                "{kind}: e_entry {entry:#x}"
            );
            let phoff = u64::from_le_bytes(image[32..40].try_into().expect("8 bytes")) as usize;
            let phnum = u16::from_le_bytes([image[56], image[57]]) as usize;
            let mut loads = 0;
            let mut pvh_note = false;
            for index in 0..phnum {
                let header = &image[phoff + index * 56..phoff + (index + 1) * 56];
                let kind_of_segment = u32::from_le_bytes(header[0..4].try_into().expect("4"));
                let paddr = u64::from_le_bytes(header[24..32].try_into().expect("8"));
                let offset = u64::from_le_bytes(header[8..16].try_into().expect("8")) as usize;
                match kind_of_segment {
                    1 => {
                        loads += 1;
                        assert!(paddr >= 0x10_0000, "{kind}: PT_LOAD at {paddr:#x}");
                    }
                    4 => {
                        let note = &image[offset..offset + 24];
                        assert_eq!(&note[0..12], &[4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0]);
                        assert_eq!(&note[12..16], b"Xen\0");
                        let target = u64::from_le_bytes(note[16..24].try_into().expect("8"));
                        assert!((0x10_0000..0x20_0000).contains(&target));
                        pvh_note = true;
                    }
                    _ => {}
                }
            }
            assert_eq!(loads, 1, "{kind}: one PT_LOAD expected");
            assert!(pvh_note, "{kind}: no PVH entry note");
        }
    }

    #[test]
    fn params_become_a_cmdline() {
        assert_eq!(Params::default().cmdline(), "");
        assert_eq!(Params::with_n(5).cmdline(), "n=5");
        let all = Params {
            n: Some(1),
            m: Some(2),
            port: Some(0x80),
            mmio_addr: Some(0xd010_0000),
            hold: true,
            report: Some(20),
        };
        assert_eq!(
            all.cmdline(),
            "n=1 m=2 port=0x80 addr=0xd0100000 hold=1 report=20"
        );
    }

    #[test]
    fn done_line_is_parsed() {
        let output = "noise\nKILN-GUEST-DONE n=1000 m=16\r\nmore";
        assert_eq!(parse_done(output), Some(Done { n: 1000, m: 16 }));
        assert_eq!(parse_done("KILN-GUEST-DONE n=1000"), None);
        assert_eq!(parse_done("KILN-GUEST-HELLO"), None);
    }
}
