//! Runs inputs through the virtio-blk harness without libFuzzer (stable Rust); options in
//! [`kiln_fuzz::replay`].

use std::process::ExitCode;

use kiln_fuzz::replay::ReplayTarget;
use kiln_fuzz::{mutate, run_blk_request, seeds};

fn main() -> ExitCode {
    ReplayTarget {
        name: "blk",
        seeds,
        mutate,
        run: |input| format!("{} chains returned to the driver", run_blk_request(input)),
        slow_after: None,
    }
    .main()
}
