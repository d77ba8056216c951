//! libFuzzer target: one guest memory image and queue set-up per input, served by Kiln's
//! virtio-blk queue worker. See `kiln_fuzz::run_blk_request` for the input layout.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::run_blk_request(data);
});
