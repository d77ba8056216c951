//! Runs inputs through the qcow2 image harness without libFuzzer (stable Rust); options in
//! [`kiln_fuzz::replay`].

use std::process::ExitCode;

use kiln_fuzz::qcow2::{mutate_image, qcow2_seeds, run_qcow2_image};
use kiln_fuzz::replay::ReplayTarget;

fn main() -> ExitCode {
    ReplayTarget {
        name: "qcow2",
        seeds: qcow2_seeds,
        mutate: mutate_image,
        run: |input| format!("opened: {}", run_qcow2_image(input)),
        slow_after: None,
    }
    .main()
}
