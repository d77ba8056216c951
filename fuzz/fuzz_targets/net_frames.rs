//! libFuzzer target: a script of guest TX/RX chains and host frames against Kiln's virtio-net
//! device. See `kiln_fuzz::net` for the input layout.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::run_net_frames(data);
});
