//! `cargo xtask`: Vireo's host command line.
fn main() {}
