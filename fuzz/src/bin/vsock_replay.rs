//! Runs inputs through the virtio-vsock harness without libFuzzer (stable Rust); options in
//! [`kiln_fuzz::replay`].
//! Inputs that take more than 100 ms are reported (the device must never wait on a socket).

use std::process::ExitCode;
use std::time::Duration;

use kiln_fuzz::replay::ReplayTarget;
use kiln_fuzz::{mutate, run_vsock_packets, vsock_seeds};

fn main() -> ExitCode {
    ReplayTarget {
        name: "vsock",
        seeds: vsock_seeds,
        mutate,
        run: |input| format!("{:?}", run_vsock_packets(input)),
        slow_after: Some(Duration::from_millis(100)),
    }
    .main()
}
