//! A paused vCPU's complete architectural state, read from KVM and written back.
//!
//! Order matters on the way back in (as in every KVM VMM): CPUID before MSRs (KVM checks MSRs
//! against the CPUID), special registers before the LAPIC (the APIC base MSR lives in sregs),
//! and pending events last so that nothing set afterwards clears them.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Instant;

/// Why a vCPU's state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} the vCPU's {what}: {source}")]
pub struct StateError {
    /// "read" or "write".
    pub action: &'static str,
    /// Which part.
    pub what: &'static str,
    /// The ioctl error.
    pub source: kvm_ioctls::Error,
}

/// Everything KVM holds about one vCPU that the guest can observe. Serializable (kvm-bindings'
/// serde support, which checks each structure's size on the way back in).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment and control registers, EFER, APIC base, pending interrupt bitmap.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (also in `xsave`; kept for hosts without XSAVE).
    #[serde(serialize_with = "serialize_fpu", deserialize_with = "deserialize_fpu")]
    pub fpu: kvm_fpu,
    /// XSAVE area (first 4 KiB).
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers (XCR0).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lets a VMM save (`KVM_GET_MSR_INDEX_LIST`), incl. TSC and kvmclock.
    pub msrs: Vec<kvm_msr_entry>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

fn read_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError {
        action: "read",
        what,
        source,
    }
}

fn write_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError {
        action: "write",
        what,
        source,
    }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running. `msr_indices` is the host's list of
    /// saveable MSRs; `cpuid` is what the vCPU was given (KVM_GET_CPUID2 is not trusted for it:
    /// some hosts, PVM among them, report the host's own CPUID there).
    pub fn save(
        fd: &VcpuFd,
        msr_indices: &[u32],
        cpuid: &[kvm_cpuid_entry2],
    ) -> Result<Self, StateError> {
        // MP state first: KVM_GET_MP_STATE also settles pending INIT/SIPI and APIC events.
        let mp_state = fd.get_mp_state().map_err(read_error("MP state"))?;
        let regs = fd.get_regs().map_err(read_error("registers"))?;
        let sregs = fd.get_sregs().map_err(read_error("special registers"))?;
        let fpu = fd.get_fpu().map_err(read_error("FPU"))?;
        // Hosts without XSAVE refuse these two; the FPU state above then covers it.
        let xsave = fd.get_xsave().ok();
        let xcrs = fd.get_xcrs().ok();
        let debug_regs = fd.get_debug_regs().map_err(read_error("debug registers"))?;
        let lapic = fd.get_lapic().map_err(read_error("local APIC"))?;
        let cpuid = cpuid.to_vec();
        let msrs = read_msrs(fd, msr_indices)?;
        let events = fd.get_vcpu_events().map_err(read_error("pending events"))?;
        Ok(Self {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            mp_state,
            events,
            cpuid,
            msrs,
        })
    }

    /// Writes this state into a vCPU that is not running. `current_cpuid` is what the vCPU
    /// has now: KVM refuses a CPUID change once a vCPU has run, so an unchanged one is not
    /// written again.
    pub fn restore(
        &self,
        fd: &VcpuFd,
        current_cpuid: &[kvm_cpuid_entry2],
    ) -> Result<(), StateError> {
        self.restore_timed(fd, current_cpuid).map(|_| ())
    }

    /// [`restore`](Self::restore), returning when the MSRs (with the TSC) were written: the
    /// guest TSC runs on from there, and kvmclock must be set to match.
    pub fn restore_timed(
        &self,
        fd: &VcpuFd,
        current_cpuid: &[kvm_cpuid_entry2],
    ) -> Result<Instant, StateError> {
        if self.cpuid != current_cpuid {
            let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError {
                action: "write",
                what: "CPUID",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            fd.set_cpuid2(&cpuid).map_err(write_error("CPUID"))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(write_error("MP state"))?;
        fd.set_regs(&self.regs).map_err(write_error("registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(write_error("special registers"))?;
        fd.set_fpu(&self.fpu).map_err(write_error("FPU"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: the buffer is a whole kvm_xsave read from KVM by KVM_GET_XSAVE, which
            // is what KVM_SET_XSAVE expects (no XSAVE2 extension beyond its 4 KiB).
            unsafe { fd.set_xsave(xsave) }.map_err(write_error("XSAVE area"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(write_error("XCRs"))?;
        }
        fd.set_debug_regs(&self.debug_regs)
            .map_err(write_error("debug registers"))?;
        fd.set_lapic(&self.lapic)
            .map_err(write_error("local APIC"))?;
        let before_msrs = Instant::now();
        for chunk in self.msrs.chunks(MSRS_PER_CALL) {
            let msrs = msr_list(chunk, "write")?;
            let written = fd.set_msrs(&msrs).map_err(write_error("MSRs"))?;
            if let Some(refused) = chunk.get(written) {
                log::error!("KVM refused MSR {:#x} of a saved vCPU", refused.index);
                return Err(StateError {
                    action: "write",
                    what: "MSRs",
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
        }
        let msrs_written = midpoint(before_msrs, Instant::now());
        fd.set_vcpu_events(&self.events)
            .map_err(write_error("pending events"))?;
        Ok(msrs_written)
    }
}

/// `IA32_TIME_STAMP_COUNTER`: the guest's TSC.
pub const MSR_IA32_TSC: u32 = 0x10;

impl VcpuState {
    /// Replaces the saved guest TSC (the value kvmclock was frozen with at the pause, so that
    /// the two clocks restore consistent with each other).
    pub fn set_tsc(&mut self, tsc: u64) {
        match self.msrs.iter_mut().find(|msr| msr.index == MSR_IA32_TSC) {
            Some(msr) => msr.data = tsc,
            None => self.msrs.push(kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: tsc,
                ..Default::default()
            }),
        }
    }

    /// The saved guest TSC, if the MSRs hold it.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|msr| msr.index == MSR_IA32_TSC)
            .map(|msr| msr.data)
    }
}

/// A vCPU's guest TSC and, read with it, where its pvclock structure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscReading {
    /// `IA32_TSC`.
    pub tsc: u64,
    /// `MSR_KVM_SYSTEM_TIME_NEW` (0 when the vCPU has none).
    pub system_time_msr: u64,
}

/// Reads the guest TSC of a vCPU that is not running, with its kvmclock MSR.
pub fn read_tsc(fd: &VcpuFd) -> Result<TscReading, StateError> {
    let entry = |index| kvm_msr_entry {
        index,
        ..Default::default()
    };
    let mut msrs = msr_list(
        &[
            entry(MSR_IA32_TSC),
            entry(crate::pvclock::MSR_KVM_SYSTEM_TIME_NEW),
        ],
        "read",
    )?;
    let read = fd.get_msrs(&mut msrs).map_err(read_error("TSC"))?;
    let values = msrs.as_slice();
    if read == 0 {
        return Err(StateError {
            action: "read",
            what: "TSC",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    Ok(TscReading {
        tsc: values[0].data,
        system_time_msr: if read > 1 { values[1].data } else { 0 },
    })
}

/// The instant halfway between `from` and `to`: the best guess of when an ioctl between the
/// two took effect.
fn midpoint(from: Instant, to: Instant) -> Instant {
    from + to.saturating_duration_since(from) / 2
}

/// Sets the guest TSC of a vCPU that is not running (KVM_SET_MSRS, as a restore does);
/// returns when it took effect.
pub fn write_tsc(fd: &VcpuFd, tsc: u64) -> Result<Instant, StateError> {
    let entry = kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: tsc,
        ..Default::default()
    };
    let msrs = msr_list(&[entry], "write")?;
    let before = Instant::now();
    match fd.set_msrs(&msrs).map_err(write_error("TSC"))? {
        1 => Ok(midpoint(before, Instant::now())),
        _ => Err(StateError {
            action: "write",
            what: "TSC",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        }),
    }
}

/// The most MSRs one `Msrs` (and so one KVM_GET_MSRS) holds.
const MSRS_PER_CALL: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

/// Reads every MSR of `indices` that this vCPU has (KVM stops at the first it refuses; the
/// refused one is skipped and reading goes on).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .take(MSRS_PER_CALL)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_list(&entries, "read")?;
        let read = fd.get_msrs(&mut msrs).map_err(read_error("MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // A short read stopped at an MSR this vCPU lacks (not every listed MSR exists on
        // every vCPU model): skip it and go on.
        let skip = if read < entries.len() { read + 1 } else { read };
        rest = &rest[skip.min(rest.len())..];
    }
    Ok(saved)
}

fn msr_list(entries: &[kvm_msr_entry], action: &'static str) -> Result<Msrs, StateError> {
    // Callers pass at most MSRS_PER_CALL entries, which is what Msrs holds.
    Msrs::from_entries(entries).map_err(|_| StateError {
        action,
        what: "MSRs",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

/// kvm-bindings has no serde for `kvm_fpu`: it travels as its bytes.
fn serialize_fpu<S: Serializer>(fpu: &kvm_fpu, serializer: S) -> Result<S::Ok, S::Error> {
    // SAFETY: kvm_fpu is a plain repr(C) structure of integers and byte arrays whose padding
    // is spelled out as fields, so every byte of it is initialised and may be read.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (fpu as *const kvm_fpu).cast::<u8>(),
            std::mem::size_of::<kvm_fpu>(),
        )
    };
    serializer.serialize_bytes(bytes)
}

fn deserialize_fpu<'de, D: Deserializer<'de>>(deserializer: D) -> Result<kvm_fpu, D::Error> {
    let bytes: Vec<u8> = Deserialize::deserialize(deserializer)?;
    if bytes.len() != std::mem::size_of::<kvm_fpu>() {
        return Err(serde::de::Error::invalid_length(
            bytes.len(),
            &"the size of kvm_fpu",
        ));
    }
    let mut fpu = kvm_fpu::default();
    // SAFETY: the length was checked above; every bit pattern is a valid kvm_fpu (integers and
    // byte arrays only), and the copy stays within both buffers.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut fpu as *mut kvm_fpu).cast::<u8>(),
            bytes.len(),
        );
    }
    Ok(fpu)
}
