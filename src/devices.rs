//! Finding and bringing up virtio devices: every virtio function is identified and logged;
//! the first virtio-net device is initialised through the modern PCI transport (§3.1.1 and
//! §4.1) with the best interrupt path it accepts; everything else is reported and left alone.
//! Also the NIC's interrupt handlers and the recipe that rebuilds the driver after a reset
//! ([`Reinit`]); the NIC's adapter to the network loop is `crate::net_loop::nic::KernelNic`.

#![deny(unsafe_code)]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ::pci::{Function, PciAddress};
use virtio::hal::{DeviceMemory, Hal, Window};
use virtio::net::{NetError, NetOptions, NetVectors, VirtioNet};
use virtio::pci::{DeviceConfigRequirement, PciTransport, identify};
use virtio::spec::{FeatureNames, NetFeatures};
use virtio::transport::DeviceType;

use crate::acpi::AcpiInfo;
use crate::arch::{self, interrupts};
use crate::hal::KernelHal;
use crate::net_loop;
use crate::pci::PlatformConfig;

/// Names of the set feature bits of a net device, from the flag definitions in
/// `virtio::spec` (unknown ones as `bitN`).
pub fn net_feature_names(bits: u64) -> FeatureNames<NetFeatures> {
    FeatureNames::new(bits)
}

/// The virtio-net driver on this machine.
pub type KernelNet = VirtioNet<KernelHal, PciTransport<KernelHal>>;

/// How the NIC interrupts the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptPath {
    /// MSI-X with separate config and receive vectors.
    MsixSeparate,
    /// MSI-X with one vector for everything.
    MsixShared,
    /// Legacy INTx through the I/O APIC; the GSIs routed, as a bit mask.
    Intx(u32),
    /// No interrupts: the loop must poll.
    Polling,
}

impl core::fmt::Display for InterruptPath {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::MsixSeparate => f.write_str("MSI-X (config, rx and tx vectors)"),
            Self::MsixShared => f.write_str("MSI-X (one shared vector)"),
            Self::Intx(gsis) => write!(f, "INTx through the I/O APIC (GSI mask {gsis:#x})"),
            Self::Polling => f.write_str("none (polling only)"),
        }
    }
}

/// The NIC, brought up.
pub struct NetDevice {
    /// Its PCI function.
    pub function: Function,
    /// The driver.
    pub net: KernelNet,
    /// The interrupt path taken.
    pub interrupts: InterruptPath,
}

/// Why the net device could not be brought up.
#[derive(Debug)]
pub enum BringUpError {
    /// No virtio-net function on any bus.
    NotFound {
        /// Functions scanned.
        scanned: usize,
    },
    /// Discovery (capabilities) failed.
    Discovery(PciAddress, virtio::error::DiscoveryError),
    /// The driver could not initialise the device.
    Driver(PciAddress, NetError),
}

impl core::fmt::Display for BringUpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotFound { scanned } => {
                write!(
                    f,
                    "no virtio-net device found ({scanned} PCI functions scanned)"
                )
            }
            Self::Discovery(address, error) => write!(f, "virtio-net at {address}: {error}"),
            Self::Driver(address, error) => write!(f, "virtio-net at {address}: {error}"),
        }
    }
}

/// CPU vectors of the NIC.
const CONFIG_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST;
const RX_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST + 1;
const SHARED_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST + 2;
const INTX_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST + 3;
const TX_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST + 4;
const _: () = assert!(INTX_VECTOR <= interrupts::DEVICE_VECTOR_LAST);

/// Set by the config-change interrupt (or INTx with ISR bit 1); taken by the loop.
pub static CONFIG_PENDING: AtomicBool = AtomicBool::new(false);
/// The NIC's ISR status window (§4.1.4.5) as the HAL mapped it, for the INTx handler: its
/// base (0 while there is none) and length. Two atomics rather than a lock, because the
/// handler must not wait; the length is stored first and the base published last.
static ISR_WINDOW_BASE: AtomicU64 = AtomicU64::new(0);
static ISR_WINDOW_LEN: AtomicU64 = AtomicU64::new(0);

fn config_interrupt(_vector: u8) {
    net_loop::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    CONFIG_PENDING.store(true, Ordering::Release);
}

fn rx_interrupt(_vector: u8) {
    net_loop::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
}

fn tx_interrupt(_vector: u8) {
    net_loop::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
}

fn shared_interrupt(_vector: u8) {
    net_loop::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    // One vector for queue and config events: the loop re-reads the link status too (cheap).
    CONFIG_PENDING.store(true, Ordering::Release);
}

fn intx_interrupt(_vector: u8) {
    let base = ISR_WINDOW_BASE.load(Ordering::Acquire);
    if base == 0 {
        return;
    }
    let window = Window {
        base,
        len: ISR_WINDOW_LEN.load(Ordering::Relaxed),
    };
    // Reading the ISR byte acknowledges the interrupt and deasserts INTx (§4.1.4.5). The HAL
    // finds the window in its lock-free MMIO table, so this takes no lock.
    let isr = KernelHal.read8(window, 0);
    if isr != 0 {
        net_loop::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    }
    if virtio::spec::IsrStatus::from_bits_retain(isr).config_changed() {
        CONFIG_PENDING.store(true, Ordering::Release);
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

/// Identifies every virtio function, then brings up the first virtio-net one: MSI-X when the
/// device takes the vectors (two, else one shared), else INTx through the I/O APIC, else
/// polling; each fallback is logged. Other devices are logged and left alone.
pub fn bring_up_net(
    config: &PlatformConfig,
    functions: &[Function],
    platform: Option<&AcpiInfo>,
    options: NetOptions,
) -> Result<NetDevice, BringUpError> {
    let mut chosen: Option<&Function> = None;
    for function in functions
        .iter()
        .filter(|function| function.vendor_id == virtio::spec::VIRTIO_PCI_VENDOR_ID)
    {
        match identify(config, function.address) {
            Ok(id) if id.device_type == DeviceType::NET && chosen.is_none() => {
                log::info!("virtio: {} {id}: driving it", function.address);
                chosen = Some(function);
            }
            Ok(id) if id.device_type == DeviceType::NET => {
                log::info!(
                    "virtio: {} {id}: another virtio-net device, left alone",
                    function.address
                );
            }
            Ok(id) => log::info!(
                "virtio: {} {id}: no driver for this type, left alone",
                function.address
            ),
            Err(error) => log::warn!("virtio: {}: {error}; left alone", function.address),
        }
    }
    let function = *chosen.ok_or(BringUpError::NotFound {
        scanned: functions.len(),
    })?;
    let address = function.address;

    // Decoding and bus mastering only on the device Vireo drives.
    ::pci::enable_memory_space(config, address);
    if function
        .bars
        .iter()
        .flatten()
        .any(|bar| matches!(bar, ::pci::Bar::Io { .. }))
    {
        ::pci::enable_io_space(config, address);
    }
    ::pci::enable_bus_mastering(config, address);

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
    // The INTx handler reads the ISR byte through the HAL, in the window the transport mapped
    // (mapping the same region again returns the same window).
    let isr = first.capabilities().isr;
    if let virtio::pci::Location::Memory { phys } = isr.location {
        match KernelHal.map_mmio(phys, u64::from(isr.length)) {
            Ok(window) => {
                ISR_WINDOW_LEN.store(window.len, Ordering::Relaxed);
                ISR_WINDOW_BASE.store(window.base, Ordering::Release);
            }
            Err(error) => log::warn!("virtio-net: ISR window for INTx: {error}"),
        }
    }
    drop(first);

    // MSI-X first.
    let msix = match ::pci::MsixCapability::find(config, address, &function.bars) {
        Ok(Some(capability)) => {
            match crate::pci::MsixTable::enable(config, capability, &function.bars) {
                Ok(table) => Some(table),
                Err(error) => {
                    log::warn!("virtio-net: MSI-X unusable ({error})");
                    None
                }
            }
        }
        Ok(None) => {
            log::info!("virtio-net: no MSI-X capability");
            None
        }
        Err(error) => {
            log::warn!("virtio-net: MSI-X capability malformed ({error})");
            None
        }
    };
    let apic_id = arch::apic::id() as u8;
    let mut attempts: alloc::vec::Vec<InterruptPath> = alloc::vec::Vec::new();
    if let Some(table) = &msix {
        let registered = interrupts::register_irq(CONFIG_VECTOR, config_interrupt).is_ok()
            && interrupts::register_irq(RX_VECTOR, rx_interrupt).is_ok()
            && interrupts::register_irq(SHARED_VECTOR, shared_interrupt).is_ok()
            && interrupts::register_irq(TX_VECTOR, tx_interrupt).is_ok();
        if registered && table.size() >= 3 {
            attempts.push(InterruptPath::MsixSeparate);
        }
        if registered {
            attempts.push(InterruptPath::MsixShared);
        }
    }
    attempts.push(InterruptPath::Intx(0));
    attempts.push(InterruptPath::Polling);

    let mut last_error = None;
    for path in attempts {
        let mut path = path;
        match path {
            InterruptPath::MsixSeparate => {
                if let Some(table) = &msix {
                    let _ = table.route(0, apic_id, CONFIG_VECTOR);
                    let _ = table.route(1, apic_id, RX_VECTOR);
                    let _ = table.route(2, apic_id, TX_VECTOR);
                    table.unmask_function(config);
                }
            }
            InterruptPath::MsixShared => {
                if let Some(table) = &msix {
                    let _ = table.route(0, apic_id, SHARED_VECTOR);
                    table.unmask_function(config);
                }
            }
            InterruptPath::Intx(_) => {
                if let Some(table) = &msix {
                    table.disable(config);
                }
                let routed = match platform {
                    Some(info) if arch::ioapic::init(info).is_some() => {
                        arch::ioapic::route_pci_intx(
                            info,
                            function.interrupt_line,
                            INTX_VECTOR,
                            u32::from(apic_id),
                        )
                    }
                    _ => 0,
                };
                if routed == 0 || interrupts::register_irq(INTX_VECTOR, intx_interrupt).is_err() {
                    log::warn!(
                        "virtio-net: no I/O APIC route for INTx (line {})",
                        function.interrupt_line
                    );
                    continue;
                }
                ::pci::update_command(config, address, 0, ::pci::regs::COMMAND_INTX_DISABLE);
                path = InterruptPath::Intx(routed);
            }
            InterruptPath::Polling => {}
        }
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
