//! Host-side library shared by `cargo xtask` and the integration tests: finding QEMU, choosing
//! the accelerator, and running the kernel with a timeout.
