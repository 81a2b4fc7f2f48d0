//! Frame and header parsing: the net header and checksum helpers, and the virtio-net driver's
//! receive and transmit paths on input-shaped buffers (`virtio::fuzzing::net_frame_parsing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzzing::net_frame_parsing(data);
});
