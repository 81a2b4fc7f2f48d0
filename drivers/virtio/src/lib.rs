//! Hardware-independent virtio 1.x for Vireo (host-testable; `no_std` outside tests).
//!
//! * [`spec`]: constants and wire layouts from the virtio 1.2 specification.
//! * [`hal`]: the traits the kernel implements ([`hal::DeviceMemory`], [`hal::Hal`]).
//! * [`transport`]: the device-agnostic [`transport::Transport`] trait and the §3.1.1
//!   initialization state machine [`transport::VirtioDevice`].
//! * [`pci`]: the modern virtio PCI transport (§4.1), [`pci::PciTransport`].
//! * [`error`]: the typed errors of discovery and of transport operations.
//! * [`dma`]: DMA memory handles ([`dma::DmaBuf`], ring memory) and the [`dma::DmaHal`]
//!   contract; the crate's only `unsafe` code.
//! * [`barrier`]: the named memory fences of §2.7.13 and §2.8.21.
//! * [`queue`]: split (§2.7) and packed (§2.8) virtqueues behind [`queue::VirtQueue`].
//! * [`device`]: what every device driver shares: queue building, reset on a failed
//!   bring-up, bounded waits for a request's answer.
//! * [`net`]: the virtio-net driver (§5.1).
//! * [`blk`]: the virtio-blk driver (§5.2).
//! * [`rng`]: the virtio entropy device driver (§5.4).
//!
//! `unsafe` is denied everywhere except in [`dma`]; all register access goes through the HAL
//! traits.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;
// The `fuzzing` feature builds the host DMA of `dma::host` (std's allocator) outside tests.
#[cfg(all(feature = "fuzzing", not(test)))]
extern crate std;

pub mod barrier;
pub mod blk;
pub mod device;
#[allow(unsafe_code)]
pub mod dma;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hal;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod spec;
pub mod transport;

pub use error::{DiscoveryError, StructureKind, TransportError};
pub use hal::{DeviceMemory, DmaBuffer, Hal, HalError, Window};
pub use pci::{DeviceConfigRequirement, PciTransport};
pub use transport::{Transport, VirtioDevice};

#[cfg(test)]
mod tests;
