//! Vireo's hardware-independent kernel logic, compiled for the kernel and tested on the host.
//!
//! The kernel binary (`src/main.rs` and the platform modules under it) owns the hardware; this
//! library owns what can be reasoned about without it: today the kernel command line.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod config;
