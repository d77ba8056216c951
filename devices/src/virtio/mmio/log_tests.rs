//! Log lines the driver can trigger on every register access are rate limited.

use vm_memory::GuestAddress;

use super::*;
use crate::log_limit::BURST;
use crate::test_logger::capture_logs;
use crate::virtio::{ActivateError, SharedSubscriber};

/// A device that never starts: only the transport's own log lines are under test.
struct Inert;

impl VirtioDevice for Inert {
    fn device_type(&self) -> u32 {
        42
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _activation: Activation,
    ) -> Result<Option<SharedSubscriber>, ActivateError> {
        Err(ActivateError::QueueNotReady(0))
    }
    fn reset(&mut self) {}
}

fn transport() -> MmioTransport<Inert> {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    MmioTransport::new(Inert, memory, EventFd::new(EFD_NONBLOCK).unwrap(), None).unwrap()
}

fn write(t: &mut MmioTransport<Inert>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Runs `access` 1000 times on a fresh transport; returns what was logged.
fn flood(
    prepare: impl FnOnce(&mut MmioTransport<Inert>),
    access: impl Fn(&mut MmioTransport<Inert>),
) -> Vec<(log::Level, String)> {
    let mut t = transport();
    prepare(&mut t);
    let ((), lines) = capture_logs(|| (0..1000).for_each(|_| access(&mut t)));
    lines
}

fn assert_limited(lines: &[(log::Level, String)], level: log::Level, text: &str) {
    assert_eq!(lines.len(), BURST as usize, "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|(l, line)| *l == level && line.contains(text)),
        "{lines:?}"
    );
}

#[test]
fn reads_of_unknown_registers() {
    let lines = flood(
        |_| {},
        |t| {
            t.read(0x0f0, &mut [0u8; 4]);
        },
    );
    assert_limited(&lines, log::Level::Debug, "unknown register");
}

#[test]
fn notifications_the_eventfd_cannot_take() {
    // An eventfd counter one below its maximum refuses every further write.
    let lines = flood(
        |t| t.queue_events()[0].write(u64::MAX - 1).unwrap(),
        |t| write(t, regs::QUEUE_NOTIFY, 0),
    );
    assert_limited(&lines, log::Level::Error, "cannot signal queue 0");
}

#[test]
fn driver_giving_up_after_every_reset() {
    let lines = flood(
        |_| {},
        |t| {
            write(t, regs::STATUS, 0);
            write(t, regs::STATUS, status::FAILED);
        },
    );
    assert_limited(&lines, log::Level::Info, "gave up");
}

#[test]
fn interrupts_the_irqfd_cannot_take() {
    let lines = flood(
        |t| t.interrupt().eventfd().write(u64::MAX - 1).unwrap(),
        |t| t.interrupt().signal_used_queue(),
    );
    assert_limited(
        &lines,
        log::Level::Error,
        "cannot signal a virtio interrupt",
    );
}
