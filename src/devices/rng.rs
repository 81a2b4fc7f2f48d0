//! The virtio-rng binding (§5.4): the entropy device brought up on the best interrupt path it
//! accepts, and its first answer taken at boot for the kernel CSPRNG's seed
//! (`arch::entropy::seed_kernel_csprng`, which names the source on the console). This file,
//! the driver `drivers/virtio/src/rng.rs` and one row of the driver table in `mod.rs` are all
//! a device type takes: the README's "Adding a device driver" walks through them.

#![deny(unsafe_code)]

use alloc::vec::Vec;

use ::pci::Function;
use virtio::pci::{DeviceConfigRequirement, PciTransport};
use virtio::rng::{RngError, RngOptions, VirtioRng};

use super::irq::{InterruptPath, IrqSlot};
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
        let started = super::transport(config, &self.function, KIND.name, KIND.requirement)
            .and_then(|transport| {
                let options = RngOptions {
                    vector: queue_vector(self.path),
                    ..RngOptions::default()
                };
                VirtioRng::new(KernelHal, transport, options).map_err(|error| super::BindFailure {
                    name: KIND.name,
                    address,
                    cause: super::BindCause::Driver(error),
                })
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
pub type RngBringUpError = super::BindFailure<RngError>;

/// What the shared bring-up needs to know about an entropy device.
const KIND: super::DeviceKind = super::DeviceKind {
    name: "virtio-rng",
    // Entry 1: the request queue (entry 0 stays for configuration changes it has none of).
    queue_entries: 1,
    // §5.4.4: an entropy device has no device-specific configuration.
    requirement: DeviceConfigRequirement::Optional,
    log_capabilities: false,
};

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
    let (rng, path, irq) = super::bring_up_device(
        config,
        function,
        platform,
        &KIND,
        |transport, path| {
            let options = RngOptions {
                vector: queue_vector(path),
                ..RngOptions::default()
            };
            VirtioRng::new(KernelHal, transport, options)
        },
        |error| {
            matches!(
                error,
                RngError::Transport(virtio::error::TransportError::VectorRefused { .. })
            )
        },
    )?;
    log::info!(
        "virtio-rng: {}: request queue ({:?}), interrupts: {path}",
        function.address,
        rng.format()
    );
    Ok(RngDevice {
        function: *function,
        rng: Some(rng),
        irq,
        path,
        retired_bytes: 0,
        resets: 0,
    })
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
