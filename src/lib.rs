//! Vireo's hardware-independent kernel logic, compiled for the kernel and tested on the host.
//!
//! The kernel binary (`src/main.rs` and the platform modules under it) owns the hardware; this
//! library owns what can be reasoned about without it: the kernel command line, the adaptive
//! mode's polling window, the link-up announcement, the entropy pool and CSPRNG
//! ([`entropy`]), block devices as the services see them ([`block`]), and the network services
//! with their smoltcp device adapter ([`net`]).
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

pub mod adaptive;
pub mod announce;
pub mod block;
pub mod config;
pub mod entropy;
pub mod net;
