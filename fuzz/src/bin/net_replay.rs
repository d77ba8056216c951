//! Runs inputs through the virtio-net harness without libFuzzer (stable Rust); options in
//! [`kiln_fuzz::replay`].

use std::process::ExitCode;

use kiln_fuzz::replay::ReplayTarget;
use kiln_fuzz::{mutate, net_seeds, run_net_frames};

fn main() -> ExitCode {
    ReplayTarget {
        name: "net",
        seeds: net_seeds,
        mutate,
        run: |input| format!("{:?}", run_net_frames(input)),
        slow_after: None,
    }
    .main()
}
