//! Getting a vCPU thread out of `KVM_RUN` with one signal.
//!
//! Each vCPU thread records its `kvm_run` mapping in a thread-local. The kick signal's handler
//! sets `immediate_exit` there: if the thread is inside `KVM_RUN`, the signal itself makes the
//! ioctl return `EINTR`; if it is anywhere else (handling an exit, about to enter), the flag
//! makes its next `KVM_RUN` return `EINTR` at once. Either way the thread looks at its command
//! channel before it runs the guest again, so a command is never missed and one kick is enough.
//!
//! The handler is process-wide but keeps no VM state: it only touches the thread-local of the
//! thread it interrupts, so any number of VMs can share it.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Once;
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// This thread's `kvm_run` (null on threads that are not vCPU threads).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run mapping: it is set by
        // `KickTarget::register` on this thread and cleared (by the guard's drop, on this
        // thread) before the vCPU fd that owns the mapping can be dropped. A volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (once per process; later calls do nothing).
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|err| std::io::Error::from_raw_os_error(err.errno()));
    });
    result
}

/// Marks the current thread as the vCPU thread of `run` until dropped.
pub struct KickTarget(());

impl KickTarget {
    /// Registers `run` (the vCPU's `kvm_run` mapping) for the current thread.
    ///
    /// The caller must drop the returned guard before the vCPU fd that owns the mapping.
    pub fn register(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|cell| cell.set(run));
        Self(())
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// Sends the kick signal to `thread`. A thread that already ended is not an error.
pub fn kick<T>(thread: &JoinHandle<T>) {
    if thread.is_finished() {
        return;
    }
    // SAFETY: the pthread_t comes from a JoinHandle we hold, so the thread has not been
    // joined or detached and its id is valid; pthread_kill only queues a signal.
    let result =
        unsafe { libc::pthread_kill(thread.as_pthread_t() as libc::pthread_t, kick_signal()) };
    if result != 0 && result != libc::ESRCH {
        log::error!(
            "cannot kick a vCPU thread: {}",
            std::io::Error::from_raw_os_error(result)
        );
    }
}
