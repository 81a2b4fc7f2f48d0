//! Memory ordering between the driver and the device, in one place (docs/design.md principle 6).
//!
//! Virtio shares ring memory between the CPU and the device (§2.7.13, §2.8.21). Vireo runs on
//! x86_64, where DMA is cache-coherent and the CPU is TSO: stores are not reordered with older
//! stores, loads are not reordered with older loads, but a *load may pass an older store* to a
//! different address (the store sits in the store buffer). So:
//!
//! * [`publish`] (store-release) and [`observe`] (load-acquire) only have to stop the
//!   *compiler* from reordering the volatile ring accesses around them; on x86 they emit no
//!   instruction. They are still real `fence`s, which is what the code means on any CPU.
//! * [`store_load`] is the one place a CPU fence (`mfence`) is needed: between a store the
//!   other side must see and a load of what the other side wrote, the Dekker pattern of both
//!   notification-suppression handshakes (publish avail idx → read `avail_event`/flags;
//!   write `used_event`/flags → re-read used idx).
//!
//! Every call site carries a comment naming the pair of accesses it orders. Volatile accesses
//! are not reordered with each other by the compiler, but ordinary memory accesses may be
//! moved across them; a `fence` is also a compiler barrier for both.

use core::sync::atomic::{Ordering, fence};

/// Store-release: every ring store before this (descriptors, available-ring entries, packed
/// descriptor bodies) becomes visible to the device no later than the next store (the
/// available `idx` of §2.7.13.3, or the first descriptor's `flags` of §2.8.21.1.1).
#[inline(always)]
pub fn publish() {
    fence(Ordering::Release);
}

/// Load-acquire: after a load that tells the driver the device has produced something (used
/// `idx`, §2.7.14; a packed descriptor's USED flag, §2.8.22), the loads of what it produced
/// (the used element, the packed descriptor's `id`/`len`) are not satisfied earlier.
#[inline(always)]
pub fn observe() {
    fence(Ordering::Acquire);
}

/// Full fence (store-load): the preceding stores are globally visible before the following
/// loads execute. Needed before reading the device's suppression state after publishing
/// buffers (§2.7.13.4 "MUST perform a suitable memory barrier before reading flags or
/// avail_event"; §2.8.21.2), and after re-arming used-buffer notifications before the final
/// re-check of the used ring (§2.7.14 note; the lost-interrupt race of `enable_cb`). On x86
/// this is `mfence` (a `SeqCst` fence).
#[inline(always)]
pub fn store_load() {
    fence(Ordering::SeqCst);
}
