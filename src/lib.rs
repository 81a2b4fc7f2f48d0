//! Vireo's hardware-independent kernel logic, compiled for the kernel and tested on the host.
//!
//! The kernel binary (`src/main.rs` and the platform modules under it) owns the hardware; this
//! library owns what can be reasoned about without it: the kernel command line, the adaptive
//! mode's polling window and the link-up announcement.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod adaptive;
pub mod announce;
pub mod config;
