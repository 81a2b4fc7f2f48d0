//! The virtio-net binding: bringing the NIC up through the modern PCI transport (§3.1.1 and
//! §4.1) on the best interrupt path it accepts (its [`DeviceIrq`] record tries MSI-X with
//! separate vectors, one shared vector, INTx, polling, in that order, each fallback logged),
//! and the recipe that rebuilds the driver after a reset ([`Reinit`]). The NIC's adapter to
//! the network loop is `crate::net_loop::nic::KernelNic`.

#![deny(unsafe_code)]

use ::pci::Function;
use virtio::net::{NetError, NetOptions, NetVectors, VirtioNet};
use virtio::pci::{DeviceConfigRequirement, PciTransport};
use virtio::spec::{FeatureNames, NetFeatures};

use super::irq::{InterruptPath, IrqSlot};
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
pub type BringUpError = super::BindFailure<NetError>;

/// What the shared bring-up needs to know about the NIC.
const KIND: super::DeviceKind = super::DeviceKind {
    name: "virtio-net",
    // Entries 1 and 2: receive and transmit (entry 0: configuration changes).
    queue_entries: 2,
    requirement: DeviceConfigRequirement::Required,
    log_capabilities: true,
};

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

/// Brings up the virtio-net device at `function` (identified by the caller) on the best
/// interrupt path it accepts (`super::bring_up_device`).
pub fn bind(
    config: &PlatformConfig,
    function: &Function,
    platform: Option<&AcpiInfo>,
    options: NetOptions,
) -> Result<NetDevice, BringUpError> {
    let (net, interrupts, irq) = super::bring_up_device(
        config,
        function,
        platform,
        &KIND,
        |transport, path| {
            let options = NetOptions {
                vectors: vector_plan(path),
                ..options
            };
            VirtioNet::new(KernelHal, transport, options)
        },
        |error| {
            matches!(
                error,
                NetError::Transport(virtio::error::TransportError::VectorRefused { .. })
            )
        },
    )?;
    Ok(NetDevice {
        function: *function,
        net,
        interrupts,
        irq,
    })
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
    let transport = super::transport(config, function, KIND.name, KIND.requirement)?;
    VirtioNet::new(
        KernelHal,
        transport,
        NetOptions {
            vectors: vector_plan(path),
            ..options
        },
    )
    .map_err(|error| super::BindFailure {
        name: KIND.name,
        address: function.address,
        cause: super::BindCause::Driver(error),
    })
}
