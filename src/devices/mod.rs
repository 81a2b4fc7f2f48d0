//! The device layer: every virtio function on every bus is identified and bound to its driver
//! through one table ([`DRIVERS`]: device type -> binding), in bus order. Each bound device
//! owns its interrupt record ([`irq::DeviceIrq`]: MSI-X vectors from one allocator, INTx with
//! its own ISR region, or polling), its configuration-change flag and its recovery recipe;
//! devices without a driver are logged and left alone (no decoding, no bus mastering).
//!
//! Adding a device type is one driver file in `drivers/virtio/src/`, one binding file here
//! (its bring-up on an interrupt path and what the kernel does with it) and one [`DRIVERS`]
//! entry; the README's "Adding a device driver" walks through it.

#![deny(unsafe_code)]

pub mod blk;
pub mod disk;
pub mod irq;
pub mod net;
pub mod rng;

use alloc::vec::Vec;
use core::fmt::Write;

use ::pci::{Function, PciAddress};
use virtio::pci::{Location, VirtioCapabilities, identify};
use virtio::transport::DeviceType;

use crate::acpi::AcpiInfo;
use crate::pci::PlatformConfig;

pub use blk::{BlkBringUpError, BlkDevice};
pub use irq::{InterruptPath, IrqSlot};
pub use net::{BringUpError, KernelNet, NetDevice, Reinit, net_feature_names, reinit_net};
pub use rng::{RngBringUpError, RngDevice};

/// Why a device of a known type could not be bound.
#[derive(Debug)]
pub enum BindError {
    /// The NIC.
    Net(BringUpError),
    /// A disk.
    Blk(BlkBringUpError),
    /// An entropy device.
    Rng(RngBringUpError),
}

impl core::fmt::Display for BindError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Net(error) => write!(f, "{error}"),
            Self::Blk(error) => write!(f, "{error}"),
            Self::Rng(error) => write!(f, "{error}"),
        }
    }
}

/// What the kernel asks of the drivers.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions {
    /// The NIC's options (MAC, fallback MAC, queue sizes; vectors are chosen per path).
    pub net: virtio::net::NetOptions,
    /// Run the disks' boot check (`blk-check` on the command line).
    pub blk_check: bool,
}

/// What the devices found were bound to.
#[derive(Default)]
pub struct Devices {
    /// The NICs brought up; the network loop serves the first.
    pub nets: Vec<NetDevice>,
    /// The disks brought up, in bus order.
    pub blks: Vec<BlkDevice>,
    /// The entropy devices brought up, in bus order.
    pub rngs: Vec<RngDevice>,
    /// Devices of a known type whose bring-up failed, with the reason (also logged).
    pub failed: Vec<(PciAddress, DeviceType, BindError)>,
    /// PCI functions scanned.
    pub scanned: usize,
}

/// One row of the driver table.
struct DriverEntry {
    /// The virtio device type it drives (§5).
    device_type: DeviceType,
    /// Binds the device at `function`, adding it to the binder's devices.
    bind: fn(&mut Binder<'_>, &Function) -> Result<(), BindError>,
    /// How many of this type are bound so far.
    bound: fn(&Devices) -> usize,
    /// How many the kernel uses, and why no more, for the log line of the others.
    limit: Option<(usize, &'static str)>,
}

/// The driver table: a new device type is one more row.
const DRIVERS: &[DriverEntry] = &[
    DriverEntry {
        device_type: DeviceType::NET,
        bind: bind_net,
        bound: |devices| devices.nets.len(),
        limit: Some((1, "the network loop serves one NIC")),
    },
    DriverEntry {
        device_type: DeviceType::BLOCK,
        bind: bind_blk,
        bound: |devices| devices.blks.len(),
        limit: None,
    },
    DriverEntry {
        device_type: DeviceType::ENTROPY,
        bind: bind_rng,
        bound: |devices| devices.rngs.len(),
        limit: None,
    },
];

/// What a binding needs: configuration access, the platform's interrupt routing, options,
/// and the devices bound so far.
struct Binder<'a> {
    config: &'a PlatformConfig,
    platform: Option<&'a AcpiInfo>,
    options: DeviceOptions,
    devices: Devices,
}

fn bind_net(binder: &mut Binder<'_>, function: &Function) -> Result<(), BindError> {
    let device = net::bind(binder.config, function, binder.platform, binder.options.net)
        .map_err(BindError::Net)?;
    binder.devices.nets.push(device);
    Ok(())
}

fn bind_rng(binder: &mut Binder<'_>, function: &Function) -> Result<(), BindError> {
    let device = rng::bind(binder.config, function, binder.platform).map_err(BindError::Rng)?;
    binder.devices.rngs.push(device);
    Ok(())
}

fn bind_blk(binder: &mut Binder<'_>, function: &Function) -> Result<(), BindError> {
    let mut device = blk::bind(binder.config, function, binder.platform).map_err(BindError::Blk)?;
    if binder.options.blk_check {
        blk::boot_check(binder.config, &mut device);
    }
    binder.devices.blks.push(device);
    Ok(())
}

/// Identifies every virtio function and binds each one whose type is in [`DRIVERS`], in bus
/// order. A failed bring-up is logged and recorded; the others go on.
pub fn bring_up(
    config: &PlatformConfig,
    functions: &[Function],
    platform: Option<&AcpiInfo>,
    options: DeviceOptions,
) -> Devices {
    let mut binder = Binder {
        config,
        platform,
        options,
        devices: Devices {
            scanned: functions.len(),
            ..Devices::default()
        },
    };
    for function in functions
        .iter()
        .filter(|function| function.vendor_id == virtio::spec::VIRTIO_PCI_VENDOR_ID)
    {
        let id = match identify(config, function.address) {
            Ok(id) => id,
            Err(error) => {
                log::warn!("virtio: {}: {error}; left alone", function.address);
                continue;
            }
        };
        let Some(driver) = DRIVERS
            .iter()
            .find(|driver| driver.device_type == id.device_type)
        else {
            log::info!(
                "virtio: {} {id}: no driver for this type, left alone",
                function.address
            );
            continue;
        };
        if let Some((limit, why)) = driver.limit
            && (driver.bound)(&binder.devices) >= limit
        {
            log::info!(
                "virtio: {} {id}: another {} device, left alone ({why})",
                function.address,
                id.device_type
            );
            continue;
        }
        log::info!("virtio: {} {id}: driving it", function.address);
        if let Err(error) = (driver.bind)(&mut binder, function) {
            log::error!("{error}");
            binder
                .devices
                .failed
                .push((function.address, id.device_type, error));
        }
    }
    binder.devices
}

/// Why a device of a known type could not be brought up; `E` is its driver's error.
#[derive(Debug)]
pub struct BindFailure<E> {
    /// The driver's name, e.g. `virtio-net`.
    pub name: &'static str,
    /// The function.
    pub address: PciAddress,
    /// What went wrong.
    pub cause: BindCause<E>,
}

/// What went wrong in a bring-up.
#[derive(Debug)]
pub enum BindCause<E> {
    /// Locating the virtio capabilities failed.
    Discovery(virtio::error::DiscoveryError),
    /// The driver could not initialise the device.
    Driver(E),
    /// Every interrupt record is taken.
    NoInterruptSlot,
}

impl<E: core::fmt::Display> core::fmt::Display for BindFailure<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (name, address) = (self.name, self.address);
        match &self.cause {
            BindCause::Discovery(error) => write!(f, "{name} at {address}: {error}"),
            BindCause::Driver(error) => write!(f, "{name} at {address}: {error}"),
            BindCause::NoInterruptSlot => {
                write!(f, "{name} at {address}: no interrupt record left")
            }
        }
    }
}

/// The modern PCI transport of a bound function (for a bring-up, or a restart after a reset).
pub fn transport<E>(
    config: &PlatformConfig,
    function: &Function,
    name: &'static str,
    requirement: virtio::pci::DeviceConfigRequirement,
) -> Result<virtio::pci::PciTransport<crate::hal::KernelHal>, BindFailure<E>> {
    virtio::pci::PciTransport::new(
        crate::hal::KernelHal,
        config,
        function.address,
        &function.bars,
        requirement,
    )
    .map_err(|error| BindFailure {
        name,
        address: function.address,
        cause: BindCause::Discovery(error),
    })
}

/// What a binding tells the shared bring-up.
pub struct DeviceKind {
    /// The driver's name for the log, e.g. `virtio-blk`.
    pub name: &'static str,
    /// MSI-X queue entries the driver uses besides entry 0 (configuration changes).
    pub queue_entries: u16,
    /// Whether the device must have a device-specific configuration region.
    pub requirement: virtio::pci::DeviceConfigRequirement,
    /// Log the located capabilities (the NIC does, as part of the boot log's contract).
    pub log_capabilities: bool,
}

/// The bring-up every binding shares: decoding and bus mastering on, the capabilities located
/// (and logged when asked), the device's interrupt record made, then `start` on each path the
/// record offers, best first, until the device accepts one. A refused MSI-X vector
/// (`vector_refused`) moves on to the next path; any other driver error ends the search.
pub fn bring_up_device<D, E: core::fmt::Display>(
    config: &PlatformConfig,
    function: &Function,
    platform: Option<&AcpiInfo>,
    kind: &DeviceKind,
    mut start: impl FnMut(
        virtio::pci::PciTransport<crate::hal::KernelHal>,
        InterruptPath,
    ) -> Result<D, E>,
    vector_refused: impl Fn(&E) -> bool,
) -> Result<(D, InterruptPath, &'static IrqSlot), BindFailure<E>> {
    let name = kind.name;
    let address = function.address;
    enable_function(config, function);
    let first = transport(config, function, name, kind.requirement)?;
    if kind.log_capabilities {
        for line in alloc::format!("{}", first.capabilities()).lines() {
            log::info!("{name}: {line}");
        }
    }
    let isr = isr_region(first.capabilities());
    drop(first);
    let Some(mut irq) = irq::DeviceIrq::new(config, function, name, kind.queue_entries, isr) else {
        return Err(BindFailure {
            name,
            address,
            cause: BindCause::NoInterruptSlot,
        });
    };
    let mut last_error = None;
    for candidate in irq.candidates() {
        let Some(path) = irq.apply(config, platform, candidate) else {
            continue;
        };
        match start(transport(config, function, name, kind.requirement)?, path) {
            Ok(device) => {
                log::info!("{name}: interrupts: {path}");
                return Ok((device, path, irq.slot()));
            }
            Err(error) if vector_refused(&error) => {
                log::warn!("{name}: {address}: {error}; trying fewer vectors");
                last_error = Some(error);
            }
            Err(error) => {
                return Err(BindFailure {
                    name,
                    address,
                    cause: BindCause::Driver(error),
                });
            }
        }
    }
    Err(BindFailure {
        name,
        address,
        cause: match last_error {
            Some(error) => BindCause::Driver(error),
            None => BindCause::NoInterruptSlot,
        },
    })
}

/// Turns on memory (and, when the device has an I/O BAR, I/O) decoding and bus mastering:
/// only on a device Vireo drives.
pub fn enable_function(config: &PlatformConfig, function: &Function) {
    let address = function.address;
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
}

/// The device's ISR status region (physical address and length) when it is in memory, for
/// its INTx handler.
pub fn isr_region(capabilities: &VirtioCapabilities) -> Option<(u64, u64)> {
    match capabilities.isr.location {
        Location::Memory { phys } => Some((phys, u64::from(capabilities.isr.length))),
        _ => None,
    }
}

/// The devices the kernel keeps besides the NIC (the network loop owns that one), for the
/// stats line.
struct Registry {
    config: Option<&'static PlatformConfig>,
    blks: Vec<BlkDevice>,
    rngs: Vec<RngDevice>,
    /// The kernel CSPRNG, reseeded from the first entropy device while the kernel runs.
    csprng: Option<vireo::entropy::Csprng>,
    /// Housekeeping passes since the last reseed.
    passes_since_reseed: u32,
}

static REGISTRY: spin::Mutex<Registry> = spin::Mutex::new(Registry {
    config: None,
    blks: Vec::new(),
    rngs: Vec::new(),
    csprng: None,
    passes_since_reseed: 0,
});

/// Housekeeping passes (10 ms each at most, more when the loop is busy) between reseeds of the
/// CSPRNG from the entropy device: about a minute.
const RESEED_PASSES: u32 = 6000;

/// Hands the disks, the entropy devices and the kernel CSPRNG to the registry, with the
/// configuration access their recovery needs.
pub fn register(
    config: &'static PlatformConfig,
    blks: Vec<BlkDevice>,
    rngs: Vec<RngDevice>,
    csprng: vireo::entropy::Csprng,
) {
    let mut registry = REGISTRY.lock();
    registry.config = Some(config);
    registry.blks.extend(blks);
    registry.rngs.extend(rngs);
    registry.csprng = Some(csprng);
    // The first reseed comes about a second after boot, then about every minute.
    registry.passes_since_reseed = RESEED_PASSES - 100;
}

/// Reseeds the CSPRNG from the first entropy device without waiting: a request is posted on
/// one pass and its answer mixed in on a later one (`Csprng::reseed`).
fn reseed(registry: &mut Registry) {
    registry.passes_since_reseed = registry.passes_since_reseed.saturating_add(1);
    let Registry {
        rngs,
        csprng,
        passes_since_reseed,
        ..
    } = registry;
    let (Some(device), Some(csprng)) = (rngs.first_mut(), csprng.as_mut()) else {
        return;
    };
    let Some(rng) = device.rng.as_mut() else {
        return;
    };
    let mut bytes = [0u8; rng::SEED_BYTES];
    match rng.poll(&mut bytes) {
        Ok(Some(count)) if count > 0 => {
            csprng.reseed(&bytes[..count], count >= rng::SEED_BYTES);
            *passes_since_reseed = 0;
            log::debug!("entropy: reseeded from virtio-rng ({count} bytes)");
        }
        Ok(_) => {}
        Err(error) => log::warn!("virtio-rng: {}: {error}", device.function.address),
    }
    if *passes_since_reseed >= RESEED_PASSES
        && !rng.request_in_flight()
        && let Err(error) = rng.request()
    {
        log::warn!("virtio-rng: {}: {error}", device.function.address);
    }
}

/// Housekeeping of the devices besides the NIC, on the network loop's pass (at least every
/// 10 ms): configuration changes and recovery (see `BlkDevice::housekeeping`,
/// `RngDevice::housekeeping`).
pub fn housekeeping() {
    let mut registry = REGISTRY.lock();
    let Some(config) = registry.config else {
        return;
    };
    for device in registry.blks.iter_mut() {
        device.housekeeping(config);
    }
    for device in registry.rngs.iter_mut() {
        device.housekeeping(config);
    }
    reseed(&mut registry);
}

/// Runs `f` on the first disk with the configuration access its recovery needs; `None`
/// without a disk.
pub fn with_first_blk<R>(
    f: impl FnOnce(&mut BlkDevice, &'static PlatformConfig) -> R,
) -> Option<R> {
    let mut registry = REGISTRY.lock();
    let config = registry.config?;
    registry.blks.first_mut().map(|device| f(device, config))
}

/// Before the loop halts: arms the request-queue interrupt of every disk the block export has
/// requests on. Returns true when the loop must not halt: completions are already waiting
/// (found by the driver's re-check after arming: split §2.7.7 and the §2.7.14 note, packed
/// §2.8.10), or requests are in flight
/// on a disk that cannot interrupt.
pub fn arm_blk_interrupts() -> bool {
    if !disk::any_in_flight() {
        return false;
    }
    let mut registry = REGISTRY.lock();
    let mut busy = false;
    for device in registry.blks.iter_mut() {
        if device.requests.has_ready() {
            busy = true;
            continue;
        }
        if device.requests.in_flight() == 0 {
            continue;
        }
        let Some(blk) = device.blk.as_mut() else {
            continue;
        };
        if device.path == InterruptPath::Polling {
            busy = true;
            continue;
        }
        BLK_ARMED.store(true, core::sync::atomic::Ordering::Relaxed);
        if blk.arm_interrupt() {
            busy = true;
        }
    }
    busy
}

/// Set while a disk's request-queue interrupt may be armed.
static BLK_ARMED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// After the halt: the disks' request-queue interrupts go off again (completions are polled
/// while the loop runs).
pub fn disarm_blk_interrupts() {
    if !BLK_ARMED.swap(false, core::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let mut registry = REGISTRY.lock();
    for device in registry.blks.iter_mut() {
        if let Some(blk) = device.blk.as_mut() {
            blk.disarm_interrupt();
        }
    }
}

/// Whether a disk has completions of the block export waiting (cheap: the polling loop
/// watches it beside the NIC's ring).
pub fn blk_completions_waiting() -> bool {
    if !disk::any_in_flight() {
        return false;
    }
    let registry = REGISTRY.lock();
    registry.blks.iter().any(|device| {
        device.requests.in_flight() > 0 && device.blk.as_ref().is_some_and(|blk| blk.pending())
    })
}

/// Appends the other devices' counters to a stats line (` key=value` pairs; totals over the
/// devices of a type, 0 without one).
pub fn write_stats(out: &mut dyn Write) {
    let registry = REGISTRY.lock();
    let mut total = virtio::blk::BlkStats::default();
    let mut interrupts = 0;
    for device in registry.blks.iter() {
        interrupts += device.irq.interrupts();
        let stats = device.stats();
        total.reads += stats.reads;
        total.writes += stats.writes;
        total.read_bytes += stats.read_bytes;
        total.written_bytes += stats.written_bytes;
        total.flushes += stats.flushes;
        total.errors += stats.errors;
    }
    let _ = write!(
        out,
        " blk_devices={} blk_reads={} blk_writes={} blk_read_bytes={} blk_written_bytes={} blk_flushes={} blk_errors={} blk_interrupts={}",
        registry.blks.len(),
        total.reads,
        total.writes,
        total.read_bytes,
        total.written_bytes,
        total.flushes,
        total.errors,
        interrupts
    );
    let rng_bytes: u64 = registry.rngs.iter().map(RngDevice::bytes).sum();
    let rng_interrupts: u64 = registry
        .rngs
        .iter()
        .map(|device| device.irq.interrupts())
        .sum();
    let reseeds = registry
        .csprng
        .as_ref()
        .map_or(0, vireo::entropy::Csprng::reseeds);
    let _ = write!(
        out,
        " rng_devices={} rng_bytes={rng_bytes} rng_interrupts={rng_interrupts} entropy_reseeds={reseeds}",
        registry.rngs.len()
    );
}
