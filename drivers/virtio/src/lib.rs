//! Hardware-independent virtio 1.x for Vireo (host-testable; `no_std` outside tests).
//!
//! * [`spec`]: constants and wire layouts from the virtio 1.2 specification.
//! * [`hal`]: the traits the kernel implements ([`hal::DeviceMemory`], [`hal::Hal`]).
//! * [`transport`]: the device-agnostic [`transport::Transport`] trait and the §3.1.1
//!   initialization state machine [`transport::VirtioDevice`].
//! * [`pci`]: the modern virtio PCI transport (§4.1), [`pci::PciTransport`].
//! * [`error`]: the typed errors of discovery and of transport operations.
//!
//! The crate contains no `unsafe`: all hardware access goes through the HAL traits.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod error;
pub mod hal;
pub mod pci;
pub mod spec;
pub mod transport;

pub use error::{DiscoveryError, StructureKind, TransportError};
pub use hal::{DeviceMemory, DmaBuffer, Hal, HalError, Window};
pub use pci::{DeviceConfigRequirement, PciTransport};
pub use transport::{Transport, VirtioDevice};

#[cfg(test)]
mod tests;
