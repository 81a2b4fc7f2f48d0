//! The virtio-rng binding (§5.4): the entropy device brought up on the best interrupt path it
//! accepts, and its first answer taken at boot for the kernel CSPRNG's seed
//! (`arch::entropy::seed_kernel_csprng`, which names the source on the console). This file,
//! the driver `drivers/virtio/src/rng.rs` and one row of the driver table in `mod.rs` are all
//! a device type takes: the README's "Adding a device driver" walks through them.

#![deny(unsafe_code)]

use alloc::vec::Vec;

use ::pci::{Function, PciAddress};
use virtio::pci::{DeviceConfigRequirement, PciTransport};
use virtio::rng::{RngError, RngOptions, VirtioRng};

use super::irq::{DeviceIrq, InterruptPath, IrqSlot};
use crate::acpi::AcpiInfo;
use crate::hal::KernelHal;
use crate::pci::PlatformConfig;

/// The virtio-rng driver on this machine.
pub type KernelRng = VirtioRng<KernelHal, PciTransport<KernelHal>>;

/// An entropy device, brought up, with what its recovery needs (as for a disk: the driver is
/// dropped, which resets the device, and brought up again on the same path).
pub struct RngDevice {
    /// Its PCI function.
    pub function: Function,
    /// The driver (`None` between a failed re-initialisation and the next attempt).
    pub rng: Option<KernelRng>,
    /// What its interrupts leave.
    pub irq: &'static IrqSlot,
    /// The interrupt path, kept across resets.
    pub path: InterruptPath,
    /// Entropy bytes returned by drivers retired by resets.
    pub retired_bytes: u64,
    /// Device resets done.
    pub resets: u64,
}

impl RngDevice {
    /// Entropy bytes the device returned, across resets.
    pub fn bytes(&self) -> u64 {
        self.retired_bytes + self.rng.as_ref().map_or(0, |rng| rng.stats().bytes)
    }

    /// Housekeeping: a device that asked for a reset (DEVICE_NEEDS_RESET) is reset and
    /// brought up again (an entropy device has no configuration to re-read, §5.4.4).
    pub fn housekeeping(&mut self, config: &PlatformConfig) {
        let address = self.function.address;
        let failure = match self.rng.as_ref() {
            None => Some(RngError::NeedsReset),
            Some(rng) => rng.check_status().err(),
        };
        let Some(error) = failure else { return };
        if let Some(old) = self.rng.take() {
            log::warn!("virtio-rng: {address}: resetting the device after: {error}");
            self.retired_bytes += old.stats().bytes;
            drop(old);
        }
        let started = PciTransport::new(
            KernelHal,
            config,
            address,
            &self.function.bars,
            DeviceConfigRequirement::Optional,
        )
        .map_err(|error| RngBringUpError::Discovery(address, error))
        .and_then(|transport| {
            VirtioRng::new(
                KernelHal,
                transport,
                RngOptions {
                    vector: queue_vector(self.path),
                    ..RngOptions::default()
                },
            )
            .map_err(|error| RngBringUpError::Driver(address, error))
        });
        match started {
            Ok(rng) => {
                self.resets += 1;
                log::info!(
                    "virtio-rng: {address}: device re-initialised (reset {})",
                    self.resets
                );
                self.rng = Some(rng);
            }
            Err(error) => log::error!("{error}; will retry"),
        }
    }
}

/// Why an entropy device could not be brought up.
#[derive(Debug)]
pub enum RngBringUpError {
    /// Discovery (capabilities) failed.
    Discovery(PciAddress, virtio::error::DiscoveryError),
    /// The driver could not initialise the device.
    Driver(PciAddress, RngError),
    /// Every interrupt record is taken.
    NoInterruptSlot(PciAddress),
}

impl core::fmt::Display for RngBringUpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Discovery(address, error) => write!(f, "virtio-rng at {address}: {error}"),
            Self::Driver(address, error) => write!(f, "virtio-rng at {address}: {error}"),
            Self::NoInterruptSlot(address) => {
                write!(f, "virtio-rng at {address}: no interrupt record left")
            }
        }
    }
}

/// The MSI-X entry of the request queue on each path (entry 0 stays for configuration
/// changes, which an entropy device has none of).
fn queue_vector(path: InterruptPath) -> Option<u16> {
    match path {
        InterruptPath::MsixSeparate => Some(1),
        InterruptPath::MsixShared => Some(0),
        InterruptPath::Intx(_) | InterruptPath::Polling => None,
    }
}

/// Brings up the virtio-rng device at `function`.
pub fn bind(
    config: &PlatformConfig,
    function: &Function,
    platform: Option<&AcpiInfo>,
) -> Result<RngDevice, RngBringUpError> {
    let function = *function;
    let address = function.address;
    super::enable_function(config, &function);
    let transport = || {
        PciTransport::new(
            KernelHal,
            config,
            address,
            &function.bars,
            DeviceConfigRequirement::Optional,
        )
        .map_err(|error| RngBringUpError::Discovery(address, error))
    };
    let first = transport()?;
    let isr = super::isr_region(first.capabilities());
    drop(first);
    let Some(mut irq) = DeviceIrq::new(config, &function, "virtio-rng", 1, isr) else {
        return Err(RngBringUpError::NoInterruptSlot(address));
    };
    let mut last_error = None;
    for candidate in irq.candidates() {
        let Some(path) = irq.apply(config, platform, candidate) else {
            continue;
        };
        let options = RngOptions {
            vector: queue_vector(path),
            ..RngOptions::default()
        };
        match VirtioRng::new(KernelHal, transport()?, options) {
            Ok(rng) => {
                log::info!(
                    "virtio-rng: {address}: request queue ({:?}), interrupts: {path}",
                    rng.format()
                );
                return Ok(RngDevice {
                    function,
                    rng: Some(rng),
                    irq: irq.slot(),
                    path,
                    retired_bytes: 0,
                    resets: 0,
                });
            }
            Err(
                error @ RngError::Transport(virtio::error::TransportError::VectorRefused { .. }),
            ) => {
                log::warn!("virtio-rng: {address}: {error}; trying fewer vectors");
                last_error = Some(error);
            }
            Err(error) => return Err(RngBringUpError::Driver(address, error)),
        }
    }
    Err(RngBringUpError::Driver(
        address,
        last_error.unwrap_or(RngError::NeedsReset),
    ))
}

/// Bytes asked of the device for the CSPRNG's seed.
pub const SEED_BYTES: usize = 32;
/// How long one answer may take at boot.
const SEED_TIMEOUT_US: u32 = 200_000;

/// Up to [`SEED_BYTES`] bytes from the device (bounded waits; a device that answers short,
/// empty or never gives what it gave, and a logged line says so).
pub fn seed_bytes(device: &mut RngDevice) -> Vec<u8> {
    let mut seed = alloc::vec![0u8; SEED_BYTES];
    let mut have = 0;
    let Some(rng) = device.rng.as_mut() else {
        return Vec::new();
    };
    while have < SEED_BYTES {
        match rng.fill(&mut seed[have..], SEED_TIMEOUT_US) {
            Ok(0) => break,
            Ok(count) => have += count,
            Err(error) => {
                log::warn!(
                    "virtio-rng: {}: {error} after {have} bytes",
                    device.function.address
                );
                break;
            }
        }
    }
    seed.truncate(have);
    seed
}
