//! libFuzzer target: one qcow2 image file per input, opened and used as a detected disk. See
//! `kiln_fuzz::qcow2::run_qcow2_image`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::qcow2::run_qcow2_image(data);
});
