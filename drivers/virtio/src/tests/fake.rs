//! Test doubles: a fake PCI configuration space carrying virtio vendor capabilities, and a fake
//! virtio device behind the HAL traits that behaves like QEMU's modern virtio-pci
//! (hw/virtio/virtio-pci.c): common-config registers with `queue_select` and feature-select
//! semantics, reset clearing state, MSI-X vector refusal, ISR read-to-clear, config generation,
//! and a record of every doorbell write. It also records every access of the wrong width or
//! alignment, so tests can assert the driver's register discipline.

use std::cell::RefCell;
use std::collections::HashMap;

use pci::{Bar, Bars, ConfigSpace, PciAddress};

use crate::hal::{DeviceMemory, DmaBuffer, Hal, HalError, PAGE_SIZE, Window};
use crate::spec::{self, Features, NetFeatures, cfg_type, common_cfg};

/// The function address every fake uses.
pub const ADDRESS: PciAddress = PciAddress::new(0, 1, 0);
/// Physical base of the modern memory BAR (BAR4) in the fakes.
pub const BAR4_BASE: u64 = 0xfe00_0000;
/// Port base of the legacy I/O BAR0 of a transitional device.
pub const LEGACY_IO_BASE: u32 = 0xc000;
/// Port base of the modern I/O BAR2 that `modern-pio-notify=on` adds.
pub const PIO_NOTIFY_BASE: u32 = 0xc040;

/// One vendor (or other) capability to place in config space.
#[derive(Clone, Debug)]
pub struct CapSpec {
    /// Capability id (0x09 vendor specific).
    pub id: u8,
    /// Raw bytes from byte 2 on (cap_len onwards).
    pub body: Vec<u8>,
}

/// A virtio structure capability, 16 bytes (20 with a multiplier for notify).
pub fn virtio_cap(cfg_type: u8, bar: u8, offset: u32, length: u32) -> CapSpec {
    let mut body = vec![16, cfg_type, bar, 0, 0, 0];
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    CapSpec {
        id: pci::cap_id::VENDOR_SPECIFIC,
        body,
    }
}

/// A notification capability with its multiplier, 20 bytes.
pub fn notify_cap(bar: u8, offset: u32, length: u32, multiplier: u32) -> CapSpec {
    let mut cap = virtio_cap(cfg_type::NOTIFY, bar, offset, length);
    cap.body[0] = 20;
    cap.body.extend_from_slice(&multiplier.to_le_bytes());
    cap
}

/// QEMU's PCI configuration access capability (cfg_type 5), 20 bytes, which the driver skips.
pub fn pci_cfg_cap() -> CapSpec {
    let mut cap = virtio_cap(cfg_type::PCI, 0, 0, 0);
    cap.body[0] = 20;
    cap.body.extend_from_slice(&[0; 4]);
    cap
}

/// An MSI-X capability (12 bytes), which the driver skips.
pub fn msix_cap() -> CapSpec {
    CapSpec {
        id: pci::cap_id::MSIX,
        body: vec![0x02, 0x00, 0x01, 0, 0, 0, 0x01, 0x08, 0, 0],
    }
}

/// A whole fake function: ids, BARs and capabilities (in QEMU's *add* order; like QEMU's
/// `pci_add_capability` each one is prepended to the list, so the walk sees them reversed).
#[derive(Clone, Debug)]
pub struct Layout {
    /// PCI device id.
    pub device_id: u16,
    /// PCI subsystem id.
    pub subsystem_id: u16,
    /// Decoded BARs.
    pub bars: Bars,
    /// Capabilities in add order.
    pub caps: Vec<CapSpec>,
}

fn modern_bar(size: u64) -> Option<Bar> {
    Some(Bar::Memory {
        address: BAR4_BASE,
        size,
        prefetchable: true,
        is_64bit: true,
    })
}

fn msix_bar() -> Option<Bar> {
    Some(Bar::Memory {
        address: 0xfeb0_0000,
        size: 0x1000,
        prefetchable: false,
        is_64bit: false,
    })
}

impl Layout {
    /// `-device virtio-net-pci,disable-legacy=on` on QEMU 7.2: 1af4:1041, BAR1 MSI-X, BAR4
    /// 64-bit 16 KiB with common 0x0, ISR 0x1000, device 0x2000, notify 0x3000 (multiplier 4).
    pub fn modern_net() -> Self {
        Self::with_notify_multiplier(4)
    }

    /// `page-per-vq=on`: multiplier 4096, notify region 4096 * 1024, BAR4 rounded up to 8 MiB.
    pub fn page_per_vq() -> Self {
        Self::with_notify_multiplier(4096)
    }

    fn with_notify_multiplier(multiplier: u32) -> Self {
        let notify_len = multiplier * 1024;
        let bar_size = (0x3000 + u64::from(notify_len)).next_power_of_two();
        let mut bars: Bars = [None; 6];
        bars[1] = msix_bar();
        bars[4] = modern_bar(bar_size);
        Self {
            device_id: 0x1041,
            subsystem_id: 0x1100,
            bars,
            caps: vec![
                virtio_cap(cfg_type::COMMON, 4, 0x0, 0x1000),
                virtio_cap(cfg_type::ISR, 4, 0x1000, 0x1000),
                virtio_cap(cfg_type::DEVICE, 4, 0x2000, 0x1000),
                notify_cap(4, 0x3000, notify_len, multiplier),
                pci_cfg_cap(),
                msix_cap(),
            ],
        }
    }

    /// A plain `-device virtio-net-pci` on q35/pc: transitional 1af4:1000 with subsystem id 1,
    /// a legacy I/O BAR0 and the same modern capabilities.
    pub fn transitional_net() -> Self {
        let mut layout = Self::modern_net();
        layout.device_id = 0x1000;
        layout.subsystem_id = 1;
        layout.bars[0] = Some(Bar::Io {
            port: LEGACY_IO_BASE,
            size: 0x40,
        });
        layout
    }

    /// `modern-pio-notify=on`: an extra notify capability in I/O BAR2 (offset 0, length 4,
    /// multiplier 0), added after the memory one, so the walk meets it first.
    pub fn pio_notify() -> Self {
        let mut layout = Self::transitional_net();
        layout.bars[2] = Some(Bar::Io {
            port: PIO_NOTIFY_BASE,
            size: 4,
        });
        layout.caps.insert(4, notify_cap(2, 0, 4, 0));
        layout
    }

    /// Builds the config space and the device.
    pub fn build(&self) -> (FakeConfig, FakeDevice) {
        (FakeConfig::from_layout(self), FakeDevice::from_layout(self))
    }
}

/// A fake configuration space of one function.
pub struct FakeConfig {
    /// The 256 bytes.
    pub bytes: RefCell<[u8; 256]>,
}

impl FakeConfig {
    /// Lays out the header and prepends each capability like QEMU does.
    pub fn from_layout(layout: &Layout) -> Self {
        let mut bytes = [0u8; 256];
        bytes[0..2].copy_from_slice(&spec::VIRTIO_PCI_VENDOR_ID.to_le_bytes());
        bytes[2..4].copy_from_slice(&layout.device_id.to_le_bytes());
        bytes[0x2c..0x2e].copy_from_slice(&spec::VIRTIO_PCI_VENDOR_ID.to_le_bytes());
        bytes[0x2e..0x30].copy_from_slice(&layout.subsystem_id.to_le_bytes());
        let mut next_free = 0x40usize;
        for cap in &layout.caps {
            let at = next_free;
            bytes[at] = cap.id;
            bytes[at + 1] = bytes[0x34];
            bytes[at + 2..at + 2 + cap.body.len()].copy_from_slice(&cap.body);
            bytes[0x34] = at as u8;
            next_free = (at + 2 + cap.body.len()).next_multiple_of(4);
        }
        if bytes[0x34] != 0 {
            bytes[0x06] |= pci::regs::STATUS_CAPABILITIES_LIST as u8;
        }
        Self {
            bytes: RefCell::new(bytes),
        }
    }

    /// Offsets of the capabilities in walk order.
    pub fn cap_offsets(&self) -> Vec<u8> {
        let bytes = self.bytes.borrow();
        let mut offsets = Vec::new();
        let mut at = bytes[0x34];
        while at != 0 && offsets.len() < 48 {
            offsets.push(at);
            at = bytes[usize::from(at) + 1];
        }
        offsets
    }

    /// Overwrites one byte.
    pub fn poke(&self, offset: u8, value: u8) {
        self.bytes.borrow_mut()[usize::from(offset)] = value;
    }
}

impl ConfigSpace for FakeConfig {
    fn read32(&self, address: PciAddress, offset: u16) -> u32 {
        assert_eq!(address, ADDRESS);
        assert_eq!(offset % 4, 0, "unaligned config read at {offset:#x}");
        let bytes = self.bytes.borrow();
        match bytes.get(usize::from(offset)..usize::from(offset) + 4) {
            Some(dword) => u32::from_le_bytes(dword.try_into().expect("four bytes")),
            None => panic!("config read beyond 256 bytes at {offset:#x}"),
        }
    }

    fn write32(&self, address: PciAddress, offset: u16, value: u32) {
        assert_eq!(address, ADDRESS);
        let at = usize::from(offset);
        self.bytes.borrow_mut()[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
}

/// One doorbell write the device saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doorbell {
    /// A 16-bit MMIO write at this offset of the notify region.
    Mmio {
        /// Offset within the notify region.
        offset: u64,
        /// Value written (the queue index).
        value: u16,
    },
    /// A 16-bit port write.
    Port {
        /// Port.
        port: u16,
        /// Value written.
        value: u16,
    },
}

/// State of one queue, as QEMU keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeQueue {
    /// Maximum size (what `queue_size` reads after reset).
    pub max_size: u16,
    /// Current size.
    pub size: u16,
    /// Descriptor area halves.
    pub desc: [u32; 2],
    /// Driver area halves.
    pub driver: [u32; 2],
    /// Device area halves.
    pub device: [u32; 2],
    /// MSI-X vector.
    pub vector: u16,
    /// Enabled.
    pub enabled: bool,
}

impl FakeQueue {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            desc: [0; 2],
            driver: [0; 2],
            device: [0; 2],
            vector: spec::NO_VECTOR,
            enabled: false,
        }
    }

    /// The descriptor area address.
    pub fn desc_addr(&self) -> u64 {
        u64::from(self.desc[0]) | (u64::from(self.desc[1]) << 32)
    }
}

/// A scheduled device-config change, applied after the `after_reads`-th device-config read.
#[derive(Clone, Debug)]
pub struct ConfigChange {
    /// Global device-config read count after which the change lands.
    pub after_reads: u32,
    /// Byte offset.
    pub offset: usize,
    /// New bytes.
    pub bytes: Vec<u8>,
}

/// The device's registers, behaviours and the records tests inspect.
#[derive(Debug)]
pub struct DeviceState {
    /// (kind, physical start, length) of each memory structure, from the layout.
    pub regions: Vec<(u8, u64, u64)>,
    /// (first port, length) of an I/O notify region, with its multiplier.
    pub port_notify: Option<(u16, u16)>,
    /// Windows handed out by `map_mmio`.
    pub mappings: Vec<Window>,
    /// Make `map_mmio` fail.
    pub fail_map: bool,

    /// All 64 device feature bits.
    pub device_features: u64,
    /// device_feature_select.
    pub dfselect: u32,
    /// driver_feature_select.
    pub gfselect: u32,
    /// The driver features as written, low and high.
    pub driver_features: [u32; 2],
    /// Device status.
    pub status: u8,
    /// Every value written to device_status.
    pub status_writes: Vec<u8>,
    /// config_generation.
    pub generation: u8,
    /// config_msix_vector.
    pub config_vector: u16,
    /// Number of MSI-X vectors; writes of vectors at or above it read back NO_VECTOR.
    pub nvectors: u16,
    /// queue_select.
    pub queue_select: u16,
    /// Maximum sizes of the queues; `num_queues` is its length.
    pub queue_max_sizes: Vec<u16>,
    /// Queue state, created on first selection.
    pub queues: HashMap<u16, FakeQueue>,
    /// Override for queue_notify_off (QEMU: the queue index).
    pub notify_off_override: Option<u16>,
    /// ISR status.
    pub isr: u8,
    /// Device-specific configuration bytes.
    pub device_config: Vec<u8>,
    /// Device-config reads so far.
    pub config_reads: u32,
    /// Scheduled config changes.
    pub config_changes: Vec<ConfigChange>,
    /// Bump the generation on every device-config read (never stable).
    pub generation_churn: bool,

    /// After a reset, status reads this instead of 0 (a reset that never completes).
    pub stuck_reset_status: Option<u8>,
    /// Clear FEATURES_OK when the driver sets it.
    pub refuse_features_ok: bool,
    /// Total busy-wait requested, in microseconds.
    pub delayed_us: u64,
    /// Doorbell writes.
    pub doorbells: Vec<Doorbell>,
    /// Every 32-bit write to common config: (offset, value), in order.
    pub common_writes: Vec<(u64, u32)>,
    /// Accesses of the wrong width or alignment, or outside any region/window.
    pub bad_accesses: Vec<String>,
    /// DMA allocations: base → bytes.
    pub dma: HashMap<u64, Vec<u8>>,
    /// Next DMA physical address.
    pub next_dma: u64,
}

/// A fake virtio device implementing [`Hal`]; "virtual" addresses equal physical ones.
pub struct FakeDevice {
    /// Everything, behind a `RefCell` because the HAL takes `&self`.
    pub state: RefCell<DeviceState>,
}

/// The width each common-config register must be accessed with (§4.1.3.1).
fn common_register_width(offset: u64) -> Option<u8> {
    match offset {
        0x00 | 0x04 | 0x08 | 0x0c => Some(4),
        0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => Some(4),
        0x10 | 0x12 | 0x16 | 0x18 | 0x1a | 0x1c | 0x1e | 0x38 | 0x3a => Some(2),
        0x14 | 0x15 => Some(1),
        _ => None,
    }
}

/// A virtio-net config: MAC 52:54:00:12:34:56, status LINK_UP, 1 pair, MTU 1500.
pub fn net_config_bytes() -> Vec<u8> {
    let mut bytes = vec![0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&1500u16.to_le_bytes());
    bytes.extend_from_slice(&[0; 14]);
    bytes
}

/// The features QEMU 7.2's virtio-net-pci offers by default (a representative subset).
pub fn qemu_net_features() -> u64 {
    [
        Features::VERSION_1.bits(),
        Features::INDIRECT_DESC.bits(),
        Features::EVENT_IDX.bits(),
        NetFeatures::CSUM.bits(),
        NetFeatures::GUEST_CSUM.bits(),
        NetFeatures::MAC.bits(),
        NetFeatures::MRG_RXBUF.bits(),
        NetFeatures::STATUS.bits(),
        NetFeatures::CTRL_VQ.bits(),
        NetFeatures::MTU.bits(),
    ]
    .into_iter()
    .fold(0, |bits, mask| bits | mask)
}

impl FakeDevice {
    /// A device whose regions follow the layout's capabilities.
    pub fn from_layout(layout: &Layout) -> Self {
        let mut regions = Vec::new();
        let mut port_notify = None;
        for cap in &layout.caps {
            if cap.id != pci::cap_id::VENDOR_SPECIFIC || cap.body.len() < 14 {
                continue;
            }
            let kind = cap.body[1];
            let bar = usize::from(cap.body[2]);
            let offset = u32::from_le_bytes(cap.body[6..10].try_into().expect("4"));
            let length = u32::from_le_bytes(cap.body[10..14].try_into().expect("4"));
            match layout.bars.get(bar).copied().flatten() {
                Some(Bar::Memory { address, .. }) if (1..=4).contains(&kind) => {
                    regions.push((kind, address + u64::from(offset), u64::from(length)));
                }
                Some(Bar::Io { port, .. }) if kind == cfg_type::NOTIFY => {
                    port_notify = Some(((port + offset) as u16, length as u16));
                }
                _ => {}
            }
        }
        Self {
            state: RefCell::new(DeviceState {
                regions,
                port_notify,
                mappings: Vec::new(),
                fail_map: false,
                device_features: qemu_net_features(),
                dfselect: 0,
                gfselect: 0,
                driver_features: [0; 2],
                status: 0,
                status_writes: Vec::new(),
                generation: 0,
                config_vector: spec::NO_VECTOR,
                nvectors: 3,
                queue_select: 0,
                queue_max_sizes: vec![256, 256, 64],
                queues: HashMap::new(),
                notify_off_override: None,
                isr: 0,
                device_config: net_config_bytes(),
                config_reads: 0,
                config_changes: Vec::new(),
                generation_churn: false,
                stuck_reset_status: None,
                refuse_features_ok: false,
                delayed_us: 0,
                doorbells: Vec::new(),
                common_writes: Vec::new(),
                bad_accesses: Vec::new(),
                dma: HashMap::new(),
                next_dma: 0x4000_0000,
            }),
        }
    }

    /// Runs `f` on the state.
    pub fn with<R>(&self, f: impl FnOnce(&mut DeviceState) -> R) -> R {
        f(&mut self.state.borrow_mut())
    }

    /// Asserts the driver never used a wrong width, a misaligned address or a stray address.
    pub fn assert_clean(&self) {
        let state = self.state.borrow();
        assert!(
            state.bad_accesses.is_empty(),
            "bad accesses: {:#?}",
            state.bad_accesses
        );
    }
}

impl DeviceState {
    fn queue(&mut self, index: u16) -> &mut FakeQueue {
        let max = self
            .queue_max_sizes
            .get(usize::from(index))
            .copied()
            .unwrap_or(0);
        self.queues
            .entry(index)
            .or_insert_with(|| FakeQueue::new(max))
    }

    fn reset(&mut self) {
        self.status = self.stuck_reset_status.unwrap_or(0);
        self.dfselect = 0;
        self.gfselect = 0;
        self.driver_features = [0; 2];
        self.config_vector = spec::NO_VECTOR;
        self.queue_select = 0;
        self.queues.clear();
        self.isr = 0;
    }

    /// Resolves an absolute address to (structure kind, offset within it).
    fn route(&self, address: u64) -> Option<(u8, u64)> {
        self.regions
            .iter()
            .find(|(_, start, len)| address >= *start && address < start + len)
            .map(|(kind, start, _)| (*kind, address - start))
    }

    fn check_window(&mut self, window: Window, offset: u64, width: u64, what: &str) -> Option<u64> {
        let mapped = self.mappings.contains(&window) || self.dma.contains_key(&window.base);
        if !mapped || !window.contains(offset, width) {
            self.bad_accesses.push(format!(
                "{what}: {width}-byte access outside {window} at +{offset:#x}"
            ));
            return None;
        }
        let address = window.base + offset;
        if !address.is_multiple_of(width) {
            self.bad_accesses.push(format!(
                "{what}: misaligned {width}-byte access at {address:#x}"
            ));
        }
        Some(address)
    }

    fn read(&mut self, window: Window, offset: u64, width: u64) -> u32 {
        let Some(address) = self.check_window(window, offset, width, "read") else {
            return u32::MAX;
        };
        if let Some(value) = self.dma_access(address, width, None) {
            return value;
        }
        match self.route(address) {
            Some((cfg_type::COMMON, register)) => self.common_read(register, width),
            Some((cfg_type::ISR, _)) => {
                let isr = self.isr;
                self.isr = 0;
                u32::from(isr)
            }
            Some((cfg_type::DEVICE, at)) => self.device_config_read(at, width),
            Some((cfg_type::NOTIFY, _)) => 0,
            _ => {
                self.bad_accesses
                    .push(format!("read of unrouted address {address:#x}"));
                u32::MAX
            }
        }
    }

    fn write(&mut self, window: Window, offset: u64, width: u64, value: u32) {
        let Some(address) = self.check_window(window, offset, width, "write") else {
            return;
        };
        if self.dma_access(address, width, Some(value)).is_some() {
            return;
        }
        match self.route(address) {
            Some((cfg_type::COMMON, register)) => self.common_write(register, width, value),
            Some((cfg_type::NOTIFY, at)) => {
                if width != 2 {
                    self.bad_accesses
                        .push(format!("{width}-byte doorbell write"));
                }
                self.doorbells.push(Doorbell::Mmio {
                    offset: at,
                    value: value as u16,
                });
            }
            Some((cfg_type::DEVICE, at)) => {
                let at = at as usize;
                for (i, byte) in value.to_le_bytes().iter().take(width as usize).enumerate() {
                    if let Some(slot) = self.device_config.get_mut(at + i) {
                        *slot = *byte;
                    }
                }
            }
            _ => self
                .bad_accesses
                .push(format!("write to unrouted address {address:#x}")),
        }
    }

    fn dma_access(&mut self, address: u64, width: u64, write: Option<u32>) -> Option<u32> {
        let (base, bytes) = self
            .dma
            .iter_mut()
            .find(|(base, bytes)| address >= **base && address < **base + bytes.len() as u64)?;
        let at = (address - base) as usize;
        let slot = bytes.get_mut(at..at + width as usize)?;
        match write {
            Some(value) => {
                slot.copy_from_slice(&value.to_le_bytes()[..width as usize]);
                Some(0)
            }
            None => {
                let mut le = [0u8; 4];
                le[..width as usize].copy_from_slice(slot);
                Some(u32::from_le_bytes(le))
            }
        }
    }

    fn check_common_width(&mut self, register: u64, width: u64) {
        if common_register_width(register) != Some(width as u8) {
            self.bad_accesses.push(format!(
                "{width}-byte access to common register {register:#x}"
            ));
        }
    }

    fn common_read(&mut self, register: u64, width: u64) -> u32 {
        self.check_common_width(register, width);
        let selected = self.queue_select;
        match register {
            common_cfg::DEVICE_FEATURE_SELECT => self.dfselect,
            common_cfg::DEVICE_FEATURE => match self.dfselect {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            common_cfg::DRIVER_FEATURE_SELECT => self.gfselect,
            common_cfg::DRIVER_FEATURE => self
                .driver_features
                .get(self.gfselect as usize)
                .copied()
                .unwrap_or(0),
            common_cfg::CONFIG_MSIX_VECTOR => u32::from(self.config_vector),
            common_cfg::NUM_QUEUES => self.queue_max_sizes.len() as u32,
            common_cfg::DEVICE_STATUS => u32::from(self.status),
            common_cfg::CONFIG_GENERATION => u32::from(self.generation),
            common_cfg::QUEUE_SELECT => u32::from(selected),
            common_cfg::QUEUE_SIZE => u32::from(self.queue(selected).size),
            common_cfg::QUEUE_MSIX_VECTOR => u32::from(self.queue(selected).vector),
            common_cfg::QUEUE_ENABLE => u32::from(self.queue(selected).enabled),
            common_cfg::QUEUE_NOTIFY_OFF => u32::from(self.notify_off_override.unwrap_or(selected)),
            _ => 0,
        }
    }

    fn common_write(&mut self, register: u64, width: u64, value: u32) {
        self.check_common_width(register, width);
        if width == 4 {
            self.common_writes.push((register, value));
        }
        let selected = self.queue_select;
        let nvectors = self.nvectors;
        let vector = |value: u32| {
            if value < u32::from(nvectors) {
                value as u16
            } else {
                spec::NO_VECTOR
            }
        };
        match register {
            common_cfg::DEVICE_FEATURE_SELECT => self.dfselect = value,
            common_cfg::DRIVER_FEATURE_SELECT => self.gfselect = value,
            common_cfg::DRIVER_FEATURE => {
                if let Some(slot) = self.driver_features.get_mut(self.gfselect as usize) {
                    *slot = value;
                }
            }
            common_cfg::CONFIG_MSIX_VECTOR => self.config_vector = vector(value),
            common_cfg::DEVICE_STATUS => {
                let mut status = value as u8;
                self.status_writes.push(status);
                if status == 0 {
                    self.reset();
                    return;
                }
                if status & crate::spec::DeviceStatus::FEATURES_OK.bits() != 0 {
                    let driver = u64::from(self.driver_features[0])
                        | (u64::from(self.driver_features[1]) << 32);
                    // Like QEMU (virtio_validate_features): a device that offers
                    // ACCESS_PLATFORM refuses a driver that does not accept it (§6.1).
                    let access_platform = spec::Features::ACCESS_PLATFORM.bits();
                    let platform_refused = self.device_features & access_platform != 0
                        && driver & access_platform == 0;
                    if self.refuse_features_ok
                        || driver & !self.device_features != 0
                        || platform_refused
                    {
                        status &= !crate::spec::DeviceStatus::FEATURES_OK.bits();
                    }
                }
                self.status =
                    status | (self.status & crate::spec::DeviceStatus::DEVICE_NEEDS_RESET.bits());
            }
            common_cfg::QUEUE_SELECT => {
                if value < 1024 {
                    self.queue_select = value as u16;
                }
            }
            common_cfg::QUEUE_SIZE => self.queue(selected).size = value as u16,
            common_cfg::QUEUE_MSIX_VECTOR => self.queue(selected).vector = vector(value),
            common_cfg::QUEUE_ENABLE => {
                if value == 1 {
                    self.queue(selected).enabled = true;
                } else {
                    self.bad_accesses
                        .push(format!("queue_enable written with {value}"));
                }
            }
            common_cfg::QUEUE_DESC => self.queue(selected).desc[0] = value,
            0x24 => self.queue(selected).desc[1] = value,
            common_cfg::QUEUE_DRIVER => self.queue(selected).driver[0] = value,
            0x2c => self.queue(selected).driver[1] = value,
            common_cfg::QUEUE_DEVICE => self.queue(selected).device[0] = value,
            0x34 => self.queue(selected).device[1] = value,
            _ => self
                .bad_accesses
                .push(format!("write to read-only common register {register:#x}")),
        }
    }

    fn device_config_read(&mut self, at: u64, width: u64) -> u32 {
        self.config_reads += 1;
        let mut le = [0u8; 4];
        for (i, byte) in le.iter_mut().take(width as usize).enumerate() {
            *byte = self
                .device_config
                .get(at as usize + i)
                .copied()
                .unwrap_or(0);
        }
        let reads = self.config_reads;
        let mut changed = false;
        for change in self
            .config_changes
            .iter()
            .filter(|change| change.after_reads == reads)
        {
            self.device_config[change.offset..change.offset + change.bytes.len()]
                .copy_from_slice(&change.bytes);
            changed = true;
        }
        if changed || self.generation_churn {
            self.generation = self.generation.wrapping_add(1);
        }
        u32::from_le_bytes(le)
    }
}

impl DeviceMemory for FakeDevice {
    fn read8(&self, window: Window, offset: u64) -> u8 {
        self.state.borrow_mut().read(window, offset, 1) as u8
    }
    fn read16(&self, window: Window, offset: u64) -> u16 {
        self.state.borrow_mut().read(window, offset, 2) as u16
    }
    fn read32(&self, window: Window, offset: u64) -> u32 {
        self.state.borrow_mut().read(window, offset, 4)
    }
    fn write8(&self, window: Window, offset: u64, value: u8) {
        self.state
            .borrow_mut()
            .write(window, offset, 1, u32::from(value))
    }
    fn write16(&self, window: Window, offset: u64, value: u16) {
        self.state
            .borrow_mut()
            .write(window, offset, 2, u32::from(value))
    }
    fn write32(&self, window: Window, offset: u64, value: u32) {
        self.state.borrow_mut().write(window, offset, 4, value)
    }
    fn port_write16(&self, port: u16, value: u16) {
        let mut state = self.state.borrow_mut();
        match state.port_notify {
            Some((base, len))
                if port >= base && u32::from(port) + 2 <= u32::from(base) + u32::from(len) =>
            {
                state.doorbells.push(Doorbell::Port { port, value });
            }
            _ => state
                .bad_accesses
                .push(format!("write to stray port {port:#x}")),
        }
    }
}

impl Hal for FakeDevice {
    fn dma_alloc(&self, pages: usize) -> Result<DmaBuffer, HalError> {
        let mut state = self.state.borrow_mut();
        let phys = state.next_dma;
        let len = pages * PAGE_SIZE;
        state.next_dma += len as u64;
        state.dma.insert(phys, vec![0; len]);
        Ok(DmaBuffer {
            window: Window {
                base: phys,
                len: len as u64,
            },
            phys,
            pages,
        })
    }

    fn dma_free(&self, buffer: DmaBuffer) {
        self.state.borrow_mut().dma.remove(&buffer.phys);
    }

    fn map_mmio(&self, phys: u64, len: u64) -> Result<Window, HalError> {
        let mut state = self.state.borrow_mut();
        if state.fail_map {
            return Err(HalError::MapFailed { phys, len });
        }
        let window = Window { base: phys, len };
        state.mappings.push(window);
        Ok(window)
    }

    fn spin_delay_us(&self, micros: u32) {
        self.state.borrow_mut().delayed_us += u64::from(micros);
    }
}

/// What a device model of the driver tests wants to hear from the transport: the feature bits
/// the driver wrote, resets, each queue once enabled, and doorbells.
pub(crate) trait TransportObserver {
    /// The driver wrote its feature bits.
    fn driver_features(&mut self, features: u64);
    /// The driver reset the device (before the registers are reset).
    fn reset(&mut self);
    /// Queue `queue` was set up and enabled (its registers hold its addresses).
    fn queue_enabled(&mut self, queue: u16);
    /// The driver rang the doorbell of `queue`.
    fn doorbell(&mut self, queue: u16);
}

/// The real PCI transport over the fake registers, reporting to a device model `M`: every
/// operation goes through the production code, and the model learns what the device saw.
pub(crate) struct ObservedTransport<'m, 'w, M> {
    pub pci: crate::pci::PciTransport<&'w FakeDevice>,
    pub model: &'m RefCell<M>,
}

impl<M: TransportObserver> crate::transport::Transport for ObservedTransport<'_, '_, M> {
    fn device_type(&self) -> crate::transport::DeviceType {
        self.pci.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.pci.read_device_features()
    }
    fn write_driver_features(&mut self, features: u64) {
        self.model.borrow_mut().driver_features(features);
        self.pci.write_driver_features(features);
    }
    fn read_status(&self) -> crate::transport::DeviceStatus {
        self.pci.read_status()
    }
    fn write_status(&mut self, status: crate::transport::DeviceStatus) {
        self.pci.write_status(status);
    }
    fn reset(&mut self) -> Result<(), crate::error::TransportError> {
        self.model.borrow_mut().reset();
        self.pci.reset()
    }
    fn num_queues(&self) -> u16 {
        self.pci.num_queues()
    }
    fn max_queue_size(&mut self, queue: u16) -> Result<u16, crate::error::TransportError> {
        self.pci.max_queue_size(queue)
    }
    fn setup_queue(
        &mut self,
        queue: u16,
        config: &crate::transport::QueueConfig,
    ) -> Result<(), crate::error::TransportError> {
        self.pci.setup_queue(queue, config)?;
        self.model.borrow_mut().queue_enabled(queue);
        Ok(())
    }
    fn notify(&self, queue: u16) -> Result<(), crate::error::TransportError> {
        self.pci.notify(queue)?;
        self.model.borrow_mut().doorbell(queue);
        Ok(())
    }
    fn read_isr(&self) -> crate::transport::IsrStatus {
        self.pci.read_isr()
    }
    fn set_config_vector(
        &mut self,
        vector: Option<u16>,
    ) -> Result<(), crate::error::TransportError> {
        self.pci.set_config_vector(vector)
    }
    fn config_generation(&self) -> u8 {
        self.pci.config_generation()
    }
    fn device_config_len(&self) -> u64 {
        self.pci.device_config_len()
    }
    fn read_device_config_raw(
        &self,
        offset: u32,
        width: crate::transport::RegisterWidth,
    ) -> Result<u32, crate::error::TransportError> {
        self.pci.read_device_config_raw(offset, width)
    }
    fn write_device_config_raw(
        &mut self,
        offset: u32,
        width: crate::transport::RegisterWidth,
        value: u32,
    ) -> Result<(), crate::error::TransportError> {
        self.pci.write_device_config_raw(offset, width, value)
    }
}
