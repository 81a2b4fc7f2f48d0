//! Hardware-independent virtio 1.x for Vireo (host-testable; `no_std` outside tests).
#![cfg_attr(not(test), no_std)]
