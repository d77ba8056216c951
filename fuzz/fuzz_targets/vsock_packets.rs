//! libFuzzer target: a script of guest packets, receive buffers and host socket actions against
//! Kiln's virtio-vsock device. See `kiln_fuzz::vsock` for the input layout.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::run_vsock_packets(data);
});
