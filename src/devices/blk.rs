//! The virtio-blk binding: the disk brought up through the modern PCI transport on the best
//! interrupt path it accepts (its [`DeviceIrq`] record tries MSI-X with a config and a queue
//! vector, one shared vector, INTx, polling), its configuration logged, and the `blk-check`
//! boot check (kernel command line) that proves reads, writes and flushes reach the image.
//! The kernel holds the disk in the registry of `super` and reports its counters in the stats
//! line; the network block export (`services=nbd`) reaches the first disk through
//! `super::disk`, whose requests a recovery answers with an I/O error.

#![deny(unsafe_code)]

use alloc::vec;
use alloc::vec::Vec;

use ::pci::Function;
use virtio::blk::{BlkError, BlkOptions, BlkRequest, BlkVectors, VirtioBlk, id_string};
use virtio::dma::DmaBuf;
use virtio::pci::{DeviceConfigRequirement, PciTransport};
use virtio::spec::{BlkFeatures, FeatureNames};

use super::irq::{InterruptPath, IrqSlot};
use crate::acpi::AcpiInfo;
use crate::hal::KernelHal;
use crate::pci::PlatformConfig;

/// The virtio-blk driver on this machine.
pub type KernelBlk = VirtioBlk<KernelHal, PciTransport<KernelHal>>;

/// A disk, brought up, with what its recovery needs: the driver is dropped (which resets the
/// device) and brought up again on the same interrupt path when the device breaks its queue or
/// asks for a reset; the counters are totals across resets.
pub struct BlkDevice {
    /// Its PCI function.
    pub function: Function,
    /// The driver (`None` between a failed re-initialisation and the next attempt).
    pub blk: Option<KernelBlk>,
    /// What its interrupts leave.
    pub irq: &'static IrqSlot,
    /// The interrupt path, kept across resets.
    pub path: InterruptPath,
    /// Counters of the drivers retired by resets.
    pub retired: virtio::blk::BlkStats,
    /// Device resets done.
    pub resets: u64,
    /// The network block export's requests on this disk (`super::disk`).
    pub requests: super::disk::DiskRequests,
}

impl BlkDevice {
    /// The counters, totals across resets.
    pub fn stats(&self) -> virtio::blk::BlkStats {
        let mut total = self.retired;
        if let Some(blk) = &self.blk {
            add_stats(&mut total, blk.stats());
        }
        total
    }

    /// Housekeeping: a configuration change (on its interrupt, or every pass without one) is
    /// handled (a resized disk is logged); a device that broke its queue or asked for a reset
    /// is reset and brought up again.
    pub fn housekeeping(&mut self, config: &PlatformConfig) {
        let address = self.function.address;
        let failure = match self.blk.as_mut() {
            None => Some(BlkError::NeedsReset),
            Some(blk) => {
                let check = self.irq.take_config_pending() || !self.path.config_interrupts();
                let changed = if check {
                    blk.handle_config_change()
                } else {
                    Ok(false)
                };
                match changed {
                    Ok(true) => {
                        let info = blk.info();
                        log::info!(
                            "virtio-blk: {address}: capacity changed to {} sectors ({} MiB)",
                            info.capacity,
                            info.capacity_bytes() >> 20
                        );
                        blk.broken().map(BlkError::Device)
                    }
                    Ok(false) => blk.broken().map(BlkError::Device),
                    Err(error) => Some(error),
                }
            }
        };
        if let Some(error) = failure {
            self.recover(config, &error);
        } else if self.requests.stalled(crate::arch::clock::now_ns()) {
            let stalled = alloc::format!(
                "no completion in {} s with {} requests in flight",
                super::disk::STALL_NS / 1_000_000_000,
                self.requests.in_flight()
            );
            self.recover(config, &stalled);
        }
    }

    /// Retires the driver (its Drop resets the device before the queue memory is freed) and
    /// brings the device up again on its interrupt path; `reason` is logged.
    pub fn recover(&mut self, config: &PlatformConfig, reason: &dyn core::fmt::Display) {
        let address = self.function.address;
        if let Some(old) = self.blk.take() {
            log::warn!("virtio-blk: {address}: resetting the device after: {reason}");
            add_stats(&mut self.retired, old.stats());
            // Dropping the driver resets the device before its queue memory is freed.
            drop(old);
        }
        let lost = self.requests.in_flight();
        if lost > 0 {
            log::warn!(
                "virtio-blk: {address}: {lost} requests of the block export fail with an I/O error (the device was reset under them)"
            );
            self.requests.fail_all();
        }
        match start(config, &self.function, self.path) {
            Ok(blk) => {
                self.resets += 1;
                log::info!(
                    "virtio-blk: {address}: device re-initialised (reset {})",
                    self.resets
                );
                self.blk = Some(blk);
            }
            Err(error) => log::error!("{error}; will retry"),
        }
    }
}

fn add_stats(total: &mut virtio::blk::BlkStats, more: virtio::blk::BlkStats) {
    total.reads += more.reads;
    total.writes += more.writes;
    total.read_bytes += more.read_bytes;
    total.written_bytes += more.written_bytes;
    total.flushes += more.flushes;
    total.discards += more.discards;
    total.write_zeroes += more.write_zeroes;
    total.errors += more.errors;
    total.rejected += more.rejected;
    total.kicks += more.kicks;
}

/// Brings the driver up on a device already bound, on the interrupt path it had.
fn start(
    config: &PlatformConfig,
    function: &Function,
    path: InterruptPath,
) -> Result<KernelBlk, BlkBringUpError> {
    let transport = super::transport(config, function, KIND.name, KIND.requirement)?;
    let options = BlkOptions {
        vectors: vector_plan(path),
        ..BlkOptions::default()
    };
    VirtioBlk::new(KernelHal, transport, options).map_err(|error| super::BindFailure {
        name: KIND.name,
        address: function.address,
        cause: super::BindCause::Driver(error),
    })
}

/// Why a disk could not be brought up.
pub type BlkBringUpError = super::BindFailure<BlkError>;

/// What the shared bring-up needs to know about a disk.
const KIND: super::DeviceKind = super::DeviceKind {
    name: "virtio-blk",
    // Entry 1: the request queue (entry 0: configuration changes).
    queue_entries: 1,
    requirement: DeviceConfigRequirement::Required,
    log_capabilities: false,
};

fn vector_plan(path: InterruptPath) -> BlkVectors {
    match path {
        InterruptPath::MsixSeparate => BlkVectors {
            config: Some(0),
            queue: Some(1),
        },
        InterruptPath::MsixShared => BlkVectors {
            config: Some(0),
            queue: Some(0),
        },
        InterruptPath::Intx(_) | InterruptPath::Polling => BlkVectors::default(),
    }
}

/// Brings up the virtio-blk device at `function` and logs what it is.
pub fn bind(
    config: &PlatformConfig,
    function: &Function,
    platform: Option<&AcpiInfo>,
) -> Result<BlkDevice, BlkBringUpError> {
    let address = function.address;
    let (blk, path, irq) = super::bring_up_device(
        config,
        function,
        platform,
        &KIND,
        |transport, path| {
            let options = BlkOptions {
                vectors: vector_plan(path),
                ..BlkOptions::default()
            };
            VirtioBlk::new(KernelHal, transport, options)
        },
        |error| {
            matches!(
                error,
                BlkError::Transport(virtio::error::TransportError::VectorRefused { .. })
            )
        },
    )?;
    let info = blk.info();
    log::info!(
        "virtio-blk: {address}: {} sectors ({} MiB), block size {}, {}, flush {}, queue {} ({:?}), interrupts: {path}",
        info.capacity,
        info.capacity_bytes() >> 20,
        info.block_size,
        if info.read_only {
            "read-only"
        } else {
            "read-write"
        },
        if info.flush { "yes" } else { "no" },
        blk.queue_size(),
        blk.queue_format(),
    );
    log::info!(
        "virtio-blk: {address}: negotiated features {:#018x}: {}",
        blk.features(),
        FeatureNames::<BlkFeatures>::new(blk.features())
    );
    Ok(BlkDevice {
        function: *function,
        blk: Some(blk),
        irq,
        path,
        retired: virtio::blk::BlkStats::default(),
        resets: 0,
        requests: super::disk::DiskRequests::default(),
    })
}

/// How long one request of the boot check may take.
const CHECK_TIMEOUT_US: u32 = 2_000_000;
/// Blocks the boot check reads from the start of the disk.
const CHECK_READ_BLOCKS: u64 = 8;

/// FNV-1a, 64-bit: a fingerprint of the bytes read, for the host to compare (not security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The pattern the boot check writes into the disk's last block: `vireo blk-check ` repeated,
/// so the host can find it in the image.
pub const CHECK_PATTERN: &[u8] = b"vireo blk-check ";

/// `blk-check`: reads the first blocks and logs their fingerprint; unless the disk is
/// read-only, writes [`CHECK_PATTERN`] over its last block, flushes (when offered), reads it
/// back and compares; on a read-only disk, shows that the write is refused. Then the recovery
/// drill: the device is reset and brought up again exactly as housekeeping does after a
/// failure, and the first blocks are read again and must give the same fingerprint. Logs one
/// `blk-check: <address> ... ok` line, or `FAILED` with the error.
pub fn boot_check(config: &PlatformConfig, device: &mut BlkDevice) {
    let address = device.function.address;
    let Some(blk) = device.blk.as_mut() else {
        return;
    };
    let mut summary = match check(blk) {
        Ok(summary) => summary,
        Err(error) => {
            log::error!("blk-check: {address}: FAILED: {error}");
            return;
        }
    };
    let before = fingerprint(blk);
    device.recover(config, &"the blk-check recovery drill");
    let after = device.blk.as_mut().map(fingerprint);
    match (before, after) {
        (Ok(before), Some(Ok(after))) if before == after => {
            summary.push_str(" reset, re-initialised, read again exact;");
            log::info!("blk-check: {address}: {summary} ok");
        }
        (before, after) => log::error!(
            "blk-check: {address}: FAILED: after the reset the first blocks read {after:?}, before {before:?}"
        ),
    }
}

/// The fingerprint of the first [`CHECK_READ_BLOCKS`] blocks.
fn fingerprint(blk: &mut KernelBlk) -> Result<u64, BlkError> {
    let info = blk.info();
    let block = u64::from(info.block_size);
    let blocks = CHECK_READ_BLOCKS.min(info.capacity / (block / 512));
    let data = run(
        blk,
        BlkRequest::Read {
            sector: 0,
            buffers: vec![buffer((blocks.max(1) * block) as usize)?],
        },
    )?;
    let bytes: Vec<u8> = data
        .iter()
        .flat_map(|b| b.as_bytes().iter().copied())
        .collect();
    Ok(fnv1a(&bytes))
}

fn buffer(len: usize) -> Result<DmaBuf<KernelHal>, BlkError> {
    DmaBuf::new(KernelHal, len).map_err(BlkError::Dma)
}

fn run(
    blk: &mut KernelBlk,
    request: BlkRequest<KernelHal>,
) -> Result<Vec<DmaBuf<KernelHal>>, BlkError> {
    match blk.execute(request, CHECK_TIMEOUT_US) {
        Ok(done) => done.result.map(|()| done.buffers),
        Err(rejected) => Err(rejected.error),
    }
}

fn check(blk: &mut KernelBlk) -> Result<alloc::string::String, BlkError> {
    let info = blk.info();
    let block = u64::from(info.block_size);
    let sectors_per_block = block / 512;
    let blocks = info.capacity / sectors_per_block;
    let mut summary = alloc::string::String::new();
    let read_blocks = CHECK_READ_BLOCKS.min(blocks);
    if read_blocks > 0 {
        let data = run(
            blk,
            BlkRequest::Read {
                sector: 0,
                buffers: vec![buffer((read_blocks * block) as usize)?],
            },
        )?;
        let bytes: Vec<u8> = data
            .iter()
            .flat_map(|b| b.as_bytes().iter().copied())
            .collect();
        summary.push_str(&alloc::format!(
            "read {} bytes at 0 fnv1a {:016x};",
            bytes.len(),
            fnv1a(&bytes)
        ));
    }
    let mut id = buffer(20)?;
    id.as_bytes_mut().fill(0);
    match run(blk, BlkRequest::GetId { buffer: id }) {
        Ok(buffers) => {
            let text = buffers
                .first()
                .map(|b| {
                    alloc::string::String::from_utf8_lossy(id_string(b.as_bytes())).into_owned()
                })
                .unwrap_or_default();
            summary.push_str(&alloc::format!(" id '{text}';"));
        }
        Err(BlkError::Unsupported) => summary.push_str(" id unsupported;"),
        Err(error) => return Err(error),
    }
    if blocks == 0 {
        return Ok(summary);
    }
    let last = (blocks - 1) * sectors_per_block;
    let mut pattern = buffer(block as usize)?;
    for (index, byte) in pattern.as_bytes_mut().iter_mut().enumerate() {
        *byte = CHECK_PATTERN[index % CHECK_PATTERN.len()];
    }
    match run(
        blk,
        BlkRequest::Write {
            sector: last,
            buffers: vec![pattern],
        },
    ) {
        Err(BlkError::ReadOnly) if info.read_only => {
            summary.push_str(" write refused: read-only;");
            return Ok(summary);
        }
        Err(error) => return Err(error),
        Ok(_) => {}
    }
    if info.flush {
        run(blk, BlkRequest::Flush)?;
    }
    let back = run(
        blk,
        BlkRequest::Read {
            sector: last,
            buffers: vec![buffer(block as usize)?],
        },
    )?;
    let matches = back.first().is_some_and(|b| {
        b.as_bytes()
            .iter()
            .enumerate()
            .all(|(index, &byte)| byte == CHECK_PATTERN[index % CHECK_PATTERN.len()])
    });
    if !matches {
        return Err(BlkError::IoError);
    }
    summary.push_str(&alloc::format!(
        " wrote, {}read back block at sector {last} exact;",
        if info.flush { "flushed, " } else { "" }
    ));
    Ok(summary)
}
