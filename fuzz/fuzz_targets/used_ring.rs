//! Used-ring consumption: a split or packed virtqueue against a hostile device scripted by
//! the input (`virtio::fuzzing::used_ring_consumption`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzzing::used_ring_consumption(data);
});
