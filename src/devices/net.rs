//! The virtio-net binding: bringing the NIC up through the modern PCI transport (§3.1.1 and
//! §4.1) on the best interrupt path it accepts (its [`DeviceIrq`] record tries MSI-X with
//! separate vectors, one shared vector, INTx, polling, in that order, each fallback logged),
//! and the recipe that rebuilds the driver after a reset ([`Reinit`]). The NIC's adapter to
//! the network loop is `crate::net_loop::nic::KernelNic`.

#![deny(unsafe_code)]

use ::pci::{Function, PciAddress};
use virtio::net::{NetError, NetOptions, NetVectors, VirtioNet};
use virtio::pci::{DeviceConfigRequirement, PciTransport};
use virtio::spec::{FeatureNames, NetFeatures};

use super::irq::{DeviceIrq, InterruptPath, IrqSlot};
use crate::acpi::AcpiInfo;
use crate::hal::KernelHal;
use crate::pci::PlatformConfig;

/// Names of the set feature bits of a net device, from the flag definitions in
/// `virtio::spec` (unknown ones as `bitN`).
pub fn net_feature_names(bits: u64) -> FeatureNames<NetFeatures> {
    FeatureNames::new(bits)
}

/// The virtio-net driver on this machine.
pub type KernelNet = VirtioNet<KernelHal, PciTransport<KernelHal>>;

/// The NIC, brought up.
pub struct NetDevice {
    /// Its PCI function.
    pub function: Function,
    /// The driver.
    pub net: KernelNet,
    /// The interrupt path taken.
    pub interrupts: InterruptPath,
    /// What its interrupts leave for the loop.
    pub irq: &'static IrqSlot,
}

/// Why the net device could not be brought up.
#[derive(Debug)]
pub enum BringUpError {
    /// Discovery (capabilities) failed.
    Discovery(PciAddress, virtio::error::DiscoveryError),
    /// The driver could not initialise the device.
    Driver(PciAddress, NetError),
    /// Every interrupt record is taken (more devices than the kernel keeps records for).
    NoInterruptSlot(PciAddress),
}

impl core::fmt::Display for BringUpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Discovery(address, error) => write!(f, "virtio-net at {address}: {error}"),
            Self::Driver(address, error) => write!(f, "virtio-net at {address}: {error}"),
            Self::NoInterruptSlot(address) => {
                write!(f, "virtio-net at {address}: no interrupt record left")
            }
        }
    }
}

fn vector_plan(path: InterruptPath) -> NetVectors {
    match path {
        InterruptPath::MsixSeparate => NetVectors {
            config: Some(0),
            rx: Some(1),
            tx: Some(2),
        },
        InterruptPath::MsixShared => NetVectors {
            config: Some(0),
            rx: Some(0),
            tx: None,
        },
        InterruptPath::Intx(_) | InterruptPath::Polling => NetVectors::default(),
    }
}

/// Brings up the virtio-net device at `function` (identified by the caller): decoding and bus
/// mastering on, the capabilities located and logged, then the driver on each interrupt path
/// its record offers, best first, until the device accepts one.
pub fn bind(
    config: &PlatformConfig,
    function: &Function,
    platform: Option<&AcpiInfo>,
    options: NetOptions,
) -> Result<NetDevice, BringUpError> {
    let function = *function;
    let address = function.address;
    super::enable_function(config, &function);

    let transport = || {
        PciTransport::new(
            KernelHal,
            config,
            address,
            &function.bars,
            DeviceConfigRequirement::Required,
        )
        .map_err(|error| BringUpError::Discovery(address, error))
    };
    let first = transport()?;
    for line in alloc::format!("{}", first.capabilities()).lines() {
        log::info!("virtio-net: {line}");
    }
    let isr = super::isr_region(first.capabilities());
    drop(first);

    // Entries 1 and 2: receive and transmit (entry 0: configuration changes).
    let Some(mut irq) = DeviceIrq::new(config, &function, "virtio-net", 2, isr) else {
        return Err(BringUpError::NoInterruptSlot(address));
    };
    let mut last_error = None;
    for candidate in irq.candidates() {
        let Some(path) = irq.apply(config, platform, candidate) else {
            continue;
        };
        let options = NetOptions {
            vectors: vector_plan(path),
            ..options
        };
        match VirtioNet::new(KernelHal, transport()?, options) {
            Ok(net) => {
                log::info!("virtio-net: interrupts: {path}");
                return Ok(NetDevice {
                    function,
                    net,
                    interrupts: path,
                    irq: irq.slot(),
                });
            }
            Err(NetError::Transport(virtio::error::TransportError::VectorRefused {
                queue,
                vector,
            })) => {
                log::warn!(
                    "virtio-net: the device refused MSI-X entry {vector} for {}; trying fewer vectors",
                    match queue {
                        Some(queue) => alloc::format!("queue {queue}"),
                        None => "config changes".into(),
                    }
                );
                last_error = Some(NetError::Transport(
                    virtio::error::TransportError::VectorRefused { queue, vector },
                ));
            }
            Err(error) => return Err(BringUpError::Driver(address, error)),
        }
    }
    Err(BringUpError::Driver(
        address,
        last_error.unwrap_or(NetError::NeedsReset),
    ))
}

/// Rebuilds the driver from scratch (reset, renegotiate, new queues and buffers).
pub type Reinit = alloc::boxed::Box<dyn FnMut() -> Result<KernelNet, BringUpError>>;

/// Brings the driver up again on a device that was already probed, with the same interrupt
/// path (the MSI-X table or I/O APIC routes stay programmed).
pub fn reinit_net(
    config: &PlatformConfig,
    function: &Function,
    path: InterruptPath,
    options: NetOptions,
) -> Result<KernelNet, BringUpError> {
    let address = function.address;
    let transport = PciTransport::new(
        KernelHal,
        config,
        address,
        &function.bars,
        DeviceConfigRequirement::Required,
    )
    .map_err(|error| BringUpError::Discovery(address, error))?;
    VirtioNet::new(
        KernelHal,
        transport,
        NetOptions {
            vectors: vector_plan(path),
            ..options
        },
    )
    .map_err(|error| BringUpError::Driver(address, error))
}
