//! A fake virtio device for the queue tests: it consumes split and packed rings the way QEMU's
//! hw/virtio/virtio.c does, reading and writing them by bus address through
//! [`HostDma`]'s device-side accessors (so it sees exactly the bytes the driver wrote, never
//! the driver's shadow). It follows descriptor chains and indirect tables, checks the
//! driver's side of the protocol (flags, chain order, wrap counters, addresses inside live DMA
//! memory), writes used entries, decides used-buffer notifications from the driver's
//! suppression state (flags, `used_event`, driver event suppression), publishes its own
//! suppression requests, and can misbehave on demand.
//!
//! It keeps *linear* (never wrapping) positions next to the ring's wrapping ones, so the tests
//! can state expectations without the modular arithmetic the driver uses.

use std::collections::HashSet;

use super::layout::{
    AvailFlags, DescFlags, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE, UsedFlags,
};
use super::{QueueAddresses, QueueFeatures, QueueFormat};
use crate::dma::host::HostDma;

/// Runs `body` once for each ring format, split then packed, for tests whose body is the same
/// for both; a failure names the format it failed in.
pub(crate) fn for_both_formats(mut body: impl FnMut(QueueFormat)) {
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(format)));
        if let Err(cause) = outcome {
            let message = cause
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| cause.downcast_ref::<&str>().copied())
                .unwrap_or("(a panic without a message)");
            panic!("{format:?} ring: {message}");
        }
    }
}

/// One buffer the device took off the available side.
#[derive(Clone, Debug)]
pub(crate) struct Chain {
    /// Split: head descriptor index; packed: buffer id.
    pub id: u16,
    /// Ring descriptors the chain occupied (1 for an indirect buffer).
    pub slots: u16,
    /// Device-readable elements.
    pub readable: Vec<(u64, u32)>,
    /// Device-writable elements.
    pub writable: Vec<(u64, u32)>,
    /// Whether it came through an indirect table.
    pub indirect: bool,
}

impl Chain {
    /// Total device-writable bytes.
    pub fn capacity(&self) -> u32 {
        self.writable.iter().map(|&(_, len)| len).sum()
    }

    /// Bus address of the first element (the tests' key for a buffer).
    pub fn first_phys(&self) -> u64 {
        self.readable
            .first()
            .or(self.writable.first())
            .map_or(0, |&(phys, _)| phys)
    }
}

/// What the device did with one buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    /// Bus address of the buffer's first element.
    pub first_phys: u64,
    /// Bytes written (the used `len`).
    pub len: u32,
    /// FNV-1a hash of the device-readable bytes, as the device read them.
    pub readable_hash: u64,
    /// Ring slots the chain occupied.
    pub slots: u16,
    /// Whether it came through an indirect table.
    pub indirect: bool,
}

/// The byte the device writes at bus address `phys` of a writable element.
pub(crate) fn pattern(phys: u64) -> u8 {
    ((phys >> 3) ^ (phys >> 11) ^ 0x5a) as u8
}

/// FNV-1a, continued from `hash`.
pub(crate) fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// FNV-1a offset basis.
pub(crate) const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The device's request about available-buffer notifications (kicks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KickRequest {
    /// Notify after every add (flags 0 / RING_EVENT_FLAGS_ENABLE; no EVENT_IDX only for
    /// split).
    Always,
    /// Do not notify (VIRTQ_USED_F_NO_NOTIFY / RING_EVENT_FLAGS_DISABLE).
    Never,
    /// Notify when the driver makes available the entry (split) or slot (packed) at this
    /// linear position (`avail_event` / RING_EVENT_FLAGS_DESC; EVENT_IDX only).
    At(u64),
}

pub(crate) type FakeResult<T> = Result<T, String>;

/// The fake device of one queue.
pub(crate) struct FakeDevice<'a> {
    dma: &'a HostDma,
    features: QueueFeatures,
    size: u16,
    addrs: QueueAddresses,
    // Split positions (free-running u16) and packed positions (slot + wrap counter).
    next_avail: u16,
    used_idx: u16,
    avail_slot: u16,
    avail_wrap: bool,
    used_slot: u16,
    used_wrap: bool,
    /// Consumed from the available side: heads (split) or slots (packed).
    pub avail_linear: u64,
    /// Written to the used side: entries (split) or slots (packed).
    pub used_linear: u64,
    /// Used-buffer notifications sent.
    pub interrupts: u64,
    /// Buffers taken and not yet completed.
    pub popped: Vec<Chain>,
    kick_request: KickRequest,
    /// Driver-published linear position at the last `kick_checked`.
    kick_base: u64,
    /// Heads/ids currently held, to catch a driver reusing one in flight.
    held: HashSet<u16>,
}

impl<'a> FakeDevice<'a> {
    /// A device on the rings at `addrs`, as the transport would program them.
    pub fn new(
        dma: &'a HostDma,
        features: QueueFeatures,
        size: u16,
        addrs: QueueAddresses,
    ) -> Self {
        Self {
            dma,
            features,
            size,
            addrs,
            next_avail: 0,
            used_idx: 0,
            avail_slot: 0,
            avail_wrap: true,
            used_slot: 0,
            used_wrap: true,
            avail_linear: 0,
            used_linear: 0,
            interrupts: 0,
            popped: Vec::new(),
            // What zeroed rings say: split `used.flags` 0 (or, with EVENT_IDX, `avail_event`
            // 0); packed RING_EVENT_FLAGS_ENABLE.
            kick_request: if features.format == QueueFormat::Split && features.event_idx {
                KickRequest::At(0)
            } else {
                KickRequest::Always
            },
            kick_base: 0,
            held: HashSet::new(),
        }
    }

    fn split(&self) -> bool {
        self.features.format == QueueFormat::Split
    }

    fn fault<T>(&self, what: impl std::fmt::Display) -> FakeResult<T> {
        Err(format!("fake device: {what}"))
    }

    fn r16(&self, phys: u64) -> FakeResult<u16> {
        self.dma
            .read_u16(phys)
            .map_err(|fault| format!("fake device: DMA read fault {fault:?}"))
    }
    fn r32(&self, phys: u64) -> FakeResult<u32> {
        self.dma
            .read_u32(phys)
            .map_err(|fault| format!("fake device: DMA read fault {fault:?}"))
    }
    fn r64(&self, phys: u64) -> FakeResult<u64> {
        self.dma
            .read_u64(phys)
            .map_err(|fault| format!("fake device: DMA read fault {fault:?}"))
    }
    fn w16(&self, phys: u64, value: u16) -> FakeResult<()> {
        self.dma
            .write_u16(phys, value)
            .map_err(|fault| format!("fake device: DMA write fault {fault:?}"))
    }
    fn w32(&self, phys: u64, value: u32) -> FakeResult<()> {
        self.dma
            .write_u32(phys, value)
            .map_err(|fault| format!("fake device: DMA write fault {fault:?}"))
    }

    // ---- split layout (§2.7) ----
    fn avail_idx_addr(&self) -> u64 {
        self.addrs.driver + 2
    }
    fn avail_entry_addr(&self, index: u16) -> u64 {
        self.addrs.driver + 4 + 2 * u64::from(index % self.size)
    }
    fn used_event_addr(&self) -> u64 {
        self.addrs.driver + 4 + 2 * u64::from(self.size)
    }
    fn used_idx_addr(&self) -> u64 {
        self.addrs.device + 2
    }
    fn used_entry_addr(&self, index: u16) -> u64 {
        self.addrs.device + 4 + 8 * u64::from(index % self.size)
    }
    fn avail_event_addr(&self) -> u64 {
        self.addrs.device + 4 + 8 * u64::from(self.size)
    }
    fn desc_addr(&self, index: u16) -> u64 {
        self.addrs.desc + 16 * u64::from(index)
    }

    /// Appends one element to `chain`, enforcing readable-before-writable (§2.7.4.2).
    fn push_element(
        &self,
        chain: &mut Chain,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> FakeResult<()> {
        // The element must lie in live DMA memory.
        let mut probe = vec![0; len as usize];
        self.dma
            .read(addr, &mut probe)
            .map_err(|fault| format!("fake device: element outside DMA memory {fault:?}"))?;
        if writable {
            chain.writable.push((addr, len));
        } else if !chain.writable.is_empty() {
            return self.fault("readable element after a writable one");
        } else {
            chain.readable.push((addr, len));
        }
        Ok(())
    }

    /// Reads a split indirect table (§2.7.5.3) into `chain`.
    fn read_split_indirect(&self, chain: &mut Chain, table: u64, len: u32) -> FakeResult<()> {
        if !self.features.indirect {
            return self.fault("INDIRECT without VIRTIO_F_INDIRECT_DESC");
        }
        if len == 0 || !len.is_multiple_of(16) {
            return self.fault(format!("indirect table length {len}"));
        }
        let count = (len / 16) as u16;
        let mut index = 0u16;
        for _ in 0..count {
            let at = table + 16 * u64::from(index);
            let (addr, elen, flags, next) = (
                self.r64(at)?,
                self.r32(at + 8)?,
                self.r16(at + 12)?,
                self.r16(at + 14)?,
            );
            if flags & DescFlags::INDIRECT.bits() != 0 {
                return self.fault("nested indirect table");
            }
            self.push_element(chain, addr, elen, flags & DescFlags::WRITE.bits() != 0)?;
            if flags & DescFlags::NEXT.bits() == 0 {
                return Ok(());
            }
            if next >= count {
                return self.fault(format!("indirect next {next} outside a table of {count}"));
            }
            index = next;
        }
        self.fault("indirect chain loops or overruns its table")
    }

    /// Takes up to `max` available buffers (§2.7.13 from the device side; §2.8.21).
    pub fn pop_available(&mut self, max: usize) -> FakeResult<usize> {
        let mut taken = 0;
        while taken < max {
            let chain = if self.split() {
                self.pop_split()?
            } else {
                self.pop_packed()?
            };
            let Some(chain) = chain else { break };
            if !self.held.insert(chain.id) {
                return self.fault(format!("id {} made available while in flight", chain.id));
            }
            self.popped.push(chain);
            taken += 1;
        }
        if let KickRequest::At(_) = self.kick_request {
            // Like QEMU with EVENT_IDX: ask to hear about the very next buffer.
            self.request_kicks(KickRequest::At(self.avail_linear))?;
        }
        Ok(taken)
    }

    fn pop_split(&mut self) -> FakeResult<Option<Chain>> {
        let avail_idx = self.r16(self.avail_idx_addr())?;
        let outstanding = avail_idx.wrapping_sub(self.next_avail);
        if outstanding == 0 {
            return Ok(None);
        }
        if outstanding > self.size {
            return self.fault(format!("avail idx {avail_idx} is {outstanding} ahead"));
        }
        let head = self.r16(self.avail_entry_addr(self.next_avail))?;
        if head >= self.size {
            return self.fault(format!("avail head {head} out of range"));
        }
        let mut chain = Chain {
            id: head,
            slots: 0,
            readable: Vec::new(),
            writable: Vec::new(),
            indirect: false,
        };
        let mut index = head;
        loop {
            if chain.slots >= self.size {
                return self.fault("descriptor chain loops");
            }
            chain.slots += 1;
            let at = self.desc_addr(index);
            let (addr, len, flags, next) = (
                self.r64(at)?,
                self.r32(at + 8)?,
                self.r16(at + 12)?,
                self.r16(at + 14)?,
            );
            if flags & DescFlags::INDIRECT.bits() != 0 {
                if flags & DescFlags::NEXT.bits() != 0 {
                    return self.fault("INDIRECT together with NEXT");
                }
                chain.indirect = true;
                self.read_split_indirect(&mut chain, addr, len)?;
                break;
            }
            self.push_element(&mut chain, addr, len, flags & DescFlags::WRITE.bits() != 0)?;
            if flags & DescFlags::NEXT.bits() == 0 {
                break;
            }
            if next >= self.size {
                return self.fault(format!("next {next} out of range"));
            }
            index = next;
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        self.avail_linear += 1;
        Ok(Some(chain))
    }

    fn packed_flags(&self, slot: u16) -> FakeResult<u16> {
        self.r16(self.addrs.desc + 16 * u64::from(slot) + 14)
    }

    fn is_avail(flags: u16, wrap: bool) -> bool {
        (flags & DescFlags::AVAIL.bits() != 0) == wrap
            && (flags & DescFlags::USED.bits() != 0) != wrap
    }

    fn step(&self, slot: u16, wrap: bool) -> (u16, bool) {
        if slot + 1 == self.size {
            (0, !wrap)
        } else {
            (slot + 1, wrap)
        }
    }

    fn pop_packed(&mut self) -> FakeResult<Option<Chain>> {
        let (mut slot, mut wrap) = (self.avail_slot, self.avail_wrap);
        if !Self::is_avail(self.packed_flags(slot)?, wrap) {
            return Ok(None);
        }
        let mut chain = Chain {
            id: 0,
            slots: 0,
            readable: Vec::new(),
            writable: Vec::new(),
            indirect: false,
        };
        let mut id = None;
        loop {
            if chain.slots >= self.size {
                return self.fault("packed chain longer than the ring");
            }
            let at = self.addrs.desc + 16 * u64::from(slot);
            let flags = self.packed_flags(slot)?;
            if !Self::is_avail(flags, wrap) {
                return self.fault(format!("chain continues into unavailable slot {slot}"));
            }
            let (addr, len, desc_id) = (self.r64(at)?, self.r32(at + 8)?, self.r16(at + 12)?);
            if *id.get_or_insert(desc_id) != desc_id {
                return self.fault("buffer id changes within a chain");
            }
            chain.slots += 1;
            (slot, wrap) = self.step(slot, wrap);
            if flags & DescFlags::INDIRECT.bits() != 0 {
                if !self.features.indirect {
                    return self.fault("INDIRECT without VIRTIO_F_INDIRECT_DESC");
                }
                if flags & DescFlags::NEXT.bits() != 0 || chain.slots > 1 {
                    return self.fault("indirect descriptor inside a chain");
                }
                if len == 0 || !len.is_multiple_of(16) {
                    return self.fault(format!("indirect table length {len}"));
                }
                chain.indirect = true;
                for entry in 0..u64::from(len / 16) {
                    let at = addr + 16 * entry;
                    let (eaddr, elen, eflags) =
                        (self.r64(at)?, self.r32(at + 8)?, self.r16(at + 14)?);
                    if eflags & !DescFlags::WRITE.bits() != 0 {
                        return self.fault(format!("indirect entry flags {eflags:#x}"));
                    }
                    self.push_element(
                        &mut chain,
                        eaddr,
                        elen,
                        eflags & DescFlags::WRITE.bits() != 0,
                    )?;
                }
                break;
            }
            self.push_element(&mut chain, addr, len, flags & DescFlags::WRITE.bits() != 0)?;
            if flags & DescFlags::NEXT.bits() == 0 {
                break;
            }
        }
        chain.id = id.unwrap_or(0);
        if chain.id >= self.size {
            return self.fault(format!("buffer id {} out of range", chain.id));
        }
        self.avail_slot = slot;
        self.avail_wrap = wrap;
        self.avail_linear += u64::from(chain.slots);
        Ok(Some(chain))
    }

    /// Completes the popped buffers at `picks` (indices into `popped`, in completion order)
    /// with the given lengths (clamped to each buffer's capacity), writes the used entries,
    /// publishes them, and sends a used-buffer notification if the driver asked for one.
    pub fn complete(&mut self, picks: &[(usize, u32)]) -> FakeResult<Vec<Completion>> {
        let picks: Vec<(usize, u32, Option<&[u8]>)> = picks
            .iter()
            .map(|&(index, len)| (index, len, None))
            .collect();
        self.complete_picks(&picks)
    }

    /// Like [`Self::complete`], but writes `data` (instead of the pattern) into each buffer's
    /// writable elements, in order, with the used `len` set to the bytes written (clamped to
    /// the capacity), as a device returning real payload (a received frame) does.
    pub fn complete_with(&mut self, picks: &[(usize, &[u8])]) -> FakeResult<Vec<Completion>> {
        let picks: Vec<(usize, u32, Option<&[u8]>)> = picks
            .iter()
            .map(|&(index, data)| {
                (
                    index,
                    u32::try_from(data.len()).unwrap_or(u32::MAX),
                    Some(data),
                )
            })
            .collect();
        self.complete_picks(&picks)
    }

    fn complete_picks(
        &mut self,
        picks: &[(usize, u32, Option<&[u8]>)],
    ) -> FakeResult<Vec<Completion>> {
        let mut indices: Vec<usize> = picks.iter().map(|&(index, _, _)| index).collect();
        indices.sort_unstable();
        indices.dedup();
        if indices.len() != picks.len() || indices.last().is_some_and(|&i| i >= self.popped.len()) {
            return self.fault("bad completion picks");
        }
        let chains: Vec<Chain> = picks
            .iter()
            .map(|&(index, _, _)| self.popped[index].clone())
            .collect();
        for &index in indices.iter().rev() {
            self.popped.remove(index);
        }
        let old_used = self.used_linear;
        let mut done = Vec::new();
        for (chain, &(_, wanted, data)) in chains.iter().zip(picks) {
            let len = wanted.min(chain.capacity());
            done.push(self.use_buffer(chain, len, data)?);
            self.held.remove(&chain.id);
        }
        if self.split() {
            self.w16(self.used_idx_addr(), self.used_idx)?;
        }
        if self.wants_interrupt(old_used)? {
            self.interrupts += 1;
        }
        Ok(done)
    }

    /// Writes `len` bytes of the pattern (or of `data`) into the writable elements, hashes the
    /// readable ones, and writes the used entry (split: not yet `used.idx`).
    fn use_buffer(
        &mut self,
        chain: &Chain,
        len: u32,
        data: Option<&[u8]>,
    ) -> FakeResult<Completion> {
        let mut hash = FNV_START;
        for &(phys, elen) in &chain.readable {
            let mut bytes = vec![0; elen as usize];
            self.dma
                .read(phys, &mut bytes)
                .map_err(|f| format!("fake device: {f:?}"))?;
            hash = fnv(hash, &bytes);
        }
        let mut left = len;
        let mut written = 0usize;
        for &(phys, elen) in &chain.writable {
            let count = left.min(elen);
            let bytes: Vec<u8> = match data {
                Some(data) => data[written..written + count as usize].to_vec(),
                None => (0..u64::from(count)).map(|k| pattern(phys + k)).collect(),
            };
            written += count as usize;
            self.dma
                .write(phys, &bytes)
                .map_err(|f| format!("fake device: {f:?}"))?;
            left -= count;
        }
        if self.split() {
            let at = self.used_entry_addr(self.used_idx);
            self.w32(at, u32::from(chain.id))?;
            self.w32(at + 4, len)?;
            self.used_idx = self.used_idx.wrapping_add(1);
            self.used_linear += 1;
        } else {
            let at = self.addrs.desc + 16 * u64::from(self.used_slot);
            self.w32(at + 8, len)?;
            self.w16(at + 12, chain.id)?;
            let flags = if self.used_wrap {
                DescFlags::AVAIL.bits() | DescFlags::USED.bits()
            } else {
                0
            };
            self.w16(at + 14, flags)?;
            for _ in 0..chain.slots {
                (self.used_slot, self.used_wrap) = self.step(self.used_slot, self.used_wrap);
            }
            self.used_linear += u64::from(chain.slots);
        }
        Ok(Completion {
            first_phys: chain.first_phys(),
            len,
            readable_hash: hash,
            slots: chain.slots,
            indirect: chain.indirect,
        })
    }

    /// The device's used-buffer notification rule after moving the used side from `old` to
    /// `self.used_linear` (§2.7.7.2, §2.8.10).
    fn wants_interrupt(&self, old: u64) -> FakeResult<bool> {
        let new = self.used_linear;
        if new == old {
            return Ok(false);
        }
        if self.split() {
            if !self.features.event_idx {
                let flags = self.r16(self.addrs.driver)?;
                return Ok(flags & AvailFlags::NO_INTERRUPT.bits() == 0);
            }
            // Notify if any entry written in this batch sat at index `used_event`.
            let used_event = self.r16(self.used_event_addr())?;
            return Ok((old..new).any(|index| index as u16 == used_event));
        }
        let off_wrap = self.r16(self.addrs.driver)?;
        let flags = self.r16(self.addrs.driver + 2)? & 3;
        match flags {
            RING_EVENT_FLAGS_ENABLE => Ok(true),
            RING_EVENT_FLAGS_DISABLE => Ok(false),
            RING_EVENT_FLAGS_DESC if self.features.event_idx => {
                // Decode the event relative to the lap the used side is now in; the other wrap
                // counter means the previous lap (as QEMU does).
                let size = u64::from(self.size);
                let lap = new / size;
                let offset = u64::from(off_wrap & 0x7fff);
                let wrap = off_wrap & 0x8000 != 0;
                let lap_wrap = lap.is_multiple_of(2);
                let event = if wrap == lap_wrap {
                    Some(lap * size + offset)
                } else {
                    (lap * size + offset).checked_sub(size)
                };
                Ok(event.is_some_and(|event| old <= event && event < new))
            }
            other => self.fault(format!("driver event flags {other}")),
        }
    }

    /// Publishes a kick request (§2.7.10 / §2.8.10).
    pub fn request_kicks(&mut self, request: KickRequest) -> FakeResult<()> {
        self.kick_request = request;
        if self.split() {
            match request {
                KickRequest::Always => self.w16(self.addrs.device, 0)?,
                KickRequest::Never => self.w16(self.addrs.device, UsedFlags::NO_NOTIFY.bits())?,
                KickRequest::At(event) => self.w16(self.avail_event_addr(), event as u16)?,
            }
        } else {
            let area = self.addrs.device;
            match request {
                KickRequest::Always => self.w16(area + 2, RING_EVENT_FLAGS_ENABLE)?,
                KickRequest::Never => self.w16(area + 2, RING_EVENT_FLAGS_DISABLE)?,
                KickRequest::At(event) => {
                    let size = u64::from(self.size);
                    let wrap = (event / size).is_multiple_of(2);
                    let off_wrap = (event % size) as u16 | if wrap { 0x8000 } else { 0 };
                    self.w16(area, off_wrap)?;
                    self.w16(area + 2, RING_EVENT_FLAGS_DESC)?;
                }
            }
        }
        Ok(())
    }

    /// The driver's published position, linear: heads (split) or slots (packed).
    pub fn published(&self) -> FakeResult<u64> {
        if self.split() {
            // Published but not yet consumed entries are at most the queue size.
            let idx = self.r16(self.avail_idx_addr())?;
            return Ok(self.avail_linear + u64::from(idx.wrapping_sub(self.next_avail)));
        }
        let (mut slot, mut wrap) = (self.avail_slot, self.avail_wrap);
        let mut ahead = 0u64;
        while ahead < u64::from(self.size) && Self::is_avail(self.packed_flags(slot)?, wrap) {
            ahead += 1;
            (slot, wrap) = self.step(slot, wrap);
        }
        Ok(self.avail_linear + ahead)
    }

    /// Whether a driver honouring this device's request must notify now.
    pub fn expects_kick(&self) -> FakeResult<bool> {
        let new = self.published()?;
        let old = self.kick_base;
        Ok(match self.kick_request {
            KickRequest::Always => new > old,
            KickRequest::Never => false,
            KickRequest::At(event) => old <= event && event < new,
        })
    }

    /// Records that the driver made its notification decision now.
    pub fn kick_checked(&mut self) -> FakeResult<()> {
        self.kick_base = self.published()?;
        Ok(())
    }

    /// Whether the device has written used entries the driver has not consumed, given how
    /// far the driver consumed (linear).
    pub fn used_ahead_of(&self, driver_used: u64) -> bool {
        self.used_linear > driver_used
    }

    // ---- misbehaviour ----

    /// Split: writes a used entry with any id and len and publishes it.
    pub fn inject_split_used(&mut self, id: u32, len: u32) -> FakeResult<()> {
        let at = self.used_entry_addr(self.used_idx);
        self.w32(at, id)?;
        self.w32(at + 4, len)?;
        self.used_idx = self.used_idx.wrapping_add(1);
        self.w16(self.used_idx_addr(), self.used_idx)
    }

    /// Either format: reports a used buffer `id` with `len` at the device's next used
    /// position, as an honest device would mark it (split: a published used entry; packed: a
    /// used descriptor with the current wrap counter), whatever `id` and `len` are.
    pub fn inject_used(&mut self, id: u16, len: u32) -> FakeResult<()> {
        if self.split() {
            self.inject_split_used(u32::from(id), len)
        } else {
            self.inject_packed_used(id, len, self.used_wrap)
        }
    }

    /// Split: publishes an arbitrary used index.
    pub fn set_used_idx(&mut self, idx: u16) -> FakeResult<()> {
        self.used_idx = idx;
        self.w16(self.used_idx_addr(), idx)
    }

    /// Packed: writes a used descriptor at the device's used position with any id, len and
    /// wrap counter (without advancing).
    pub fn inject_packed_used(&mut self, id: u16, len: u32, wrap: bool) -> FakeResult<()> {
        let at = self.addrs.desc + 16 * u64::from(self.used_slot);
        self.w32(at + 8, len)?;
        self.w16(at + 12, id)?;
        self.w16(
            at + 14,
            if wrap {
                DescFlags::AVAIL.bits() | DescFlags::USED.bits()
            } else {
                0
            },
        )
    }

    /// Packed: overwrites the flags at the device's used position.
    pub fn write_packed_flags(&mut self, flags: u16) -> FakeResult<()> {
        self.w16(self.addrs.desc + 16 * u64::from(self.used_slot) + 14, flags)
    }
}
