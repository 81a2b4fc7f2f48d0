//! Vireo's hardware-independent kernel logic (host-testable): the command line.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
