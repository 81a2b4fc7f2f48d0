//! The virtio entropy device driver (§5.4): bring-up, and requests for random bytes on its
//! one queue.
//!
//! The device has one queue, `requestq` (§5.4.2), no feature bits of its own (§5.4.3) and no
//! device configuration (§5.4.4). The driver makes a device-writable buffer available; the
//! device writes some bytes of entropy into it and reports how many in the used length
//! (§5.4.6). That is all of the protocol.
//!
//! Accepted features: VERSION_1, RING_PACKED, EVENT_IDX and ACCESS_PLATFORM, as the net driver
//! accepts them (every address the device sees comes from the HAL, [`crate::hal`]). One buffer
//! is in flight at most; it is allocated once at bring-up and reused.
//!
//! Two ways to ask:
//! * [`VirtioRng::fill`] blocks, bounded: it posts a request, waits for the answer with
//!   [`wait_for_used`] (a timeout per request, spent in [`crate::hal::Hal::spin_delay_us`]),
//!   and repeats until the output is full. A device that answers with 0 bytes
//!   [`MAX_EMPTY_ANSWERS`] times in a row gets [`RngError::NoEntropy`]; one that never answers
//!   gets [`RngError::Timeout`], and its buffer stays in flight (the next call picks its answer
//!   up, if it ever comes).
//! * [`VirtioRng::request`] and [`VirtioRng::poll`] do the same without waiting, for a caller
//!   that has other work (the request is answered by an interrupt on the optional MSI-X
//!   vector, or found on a later poll).
//!
//! Everything the device writes is untrusted (docs/design.md principle 5): the used length is
//! validated by the queue, and a device that claims more bytes than the buffer holds is a
//! [`RngError::Device`] error (the queue is then broken; reset and rebuild the driver). The
//! driver never judges the *quality* of the bytes: the kernel mixes them with its other
//! sources, so a hostile device can at worst add nothing (`src/entropy.rs`).

use core::fmt;

use crate::device::{QueueSetupError, ResetOnError, build_queue, wait_for_used};
use crate::dma::{DmaBuf, DmaError, DmaHal, Part};
use crate::error::TransportError;
use crate::queue::{DeviceError, QueueError, QueueFeatures, QueueFormat, VirtQueue};
use crate::spec::{Features, rng};
use crate::transport::{Transport, VirtioDevice};

/// The features this driver can honour (the entropy device has none of its own, §5.4.3).
pub const DRIVER_FEATURES: u64 = Features::VERSION_1.bits()
    | Features::RING_PACKED.bits()
    | Features::EVENT_IDX.bits()
    | Features::ACCESS_PLATFORM.bits();

/// Answers of 0 bytes in a row after which [`VirtioRng::fill`] gives up with
/// [`RngError::NoEntropy`] (§5.4.6 lets the device write fewer bytes than asked, so one empty
/// answer is allowed; a device that never gives anything is reported, not retried forever).
pub const MAX_EMPTY_ANSWERS: u32 = 4;

/// How to bring the device up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngOptions {
    /// Feature bits the caller allows (intersected with [`DRIVER_FEATURES`]).
    pub allowed_features: u64,
    /// Requested queue size (clamped to the device's maximum; one buffer is in flight at
    /// most, so a small ring is enough).
    pub queue_size: u16,
    /// Bytes asked for per request (the size of the one request buffer).
    pub request_len: usize,
    /// MSI-X table entry for the request queue's used-buffer notifications; `None` polls.
    pub vector: Option<u16>,
}

impl Default for RngOptions {
    fn default() -> Self {
        Self {
            allowed_features: DRIVER_FEATURES,
            queue_size: 8,
            request_len: 64,
            vector: None,
        }
    }
}

/// Errors of the entropy driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RngError {
    /// The transport refused a step (features, queue setup, vector).
    Transport(TransportError),
    /// The queue could not be built or fed.
    Queue(QueueError),
    /// DMA memory for the request buffer could not be had.
    Dma(DmaError),
    /// The device has no request queue.
    MissingQueue {
        /// The queue index that does not exist.
        queue: u16,
    },
    /// The device broke the queue's rules (e.g. a used length beyond the buffer): reset it.
    Device {
        /// Which queue.
        queue: u16,
        /// What it did.
        error: DeviceError,
    },
    /// The device did not answer a request within the timeout; the request stays in flight.
    Timeout {
        /// Microseconds waited.
        timeout_us: u32,
    },
    /// The device reported DEVICE_NEEDS_RESET (§2.1.2).
    NeedsReset,
    /// The device answered [`MAX_EMPTY_ANSWERS`] requests in a row with 0 bytes.
    NoEntropy {
        /// Empty answers in a row.
        empty_answers: u32,
    },
}

impl fmt::Display for RngError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(error) => write!(f, "{error}"),
            Self::Queue(error) => write!(f, "{error}"),
            Self::Dma(error) => write!(f, "{error}"),
            Self::MissingQueue { queue } => write!(f, "the device has no queue {queue}"),
            Self::Device { queue, error } => write!(f, "queue {queue}: {error}"),
            Self::Timeout { timeout_us } => {
                write!(
                    f,
                    "the entropy device did not answer within {timeout_us} us"
                )
            }
            Self::NeedsReset => f.write_str("the device set DEVICE_NEEDS_RESET"),
            Self::NoEntropy { empty_answers } => write!(
                f,
                "the entropy device answered {empty_answers} requests in a row with 0 bytes"
            ),
        }
    }
}

impl From<TransportError> for RngError {
    fn from(error: TransportError) -> Self {
        Self::Transport(error)
    }
}

impl From<QueueError> for RngError {
    fn from(error: QueueError) -> Self {
        Self::Queue(error)
    }
}

impl From<DmaError> for RngError {
    fn from(error: DmaError) -> Self {
        Self::Dma(error)
    }
}

impl From<QueueSetupError> for RngError {
    fn from(error: QueueSetupError) -> Self {
        match error {
            QueueSetupError::MissingQueue { queue } => Self::MissingQueue { queue },
            QueueSetupError::Transport(error) => Self::Transport(error),
            QueueSetupError::Queue(error) => Self::Queue(error),
        }
    }
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngStats {
    /// Bytes of entropy the device returned (the stats key `rng_bytes`).
    pub bytes: u64,
    /// Requests made available to the device.
    pub requests: u64,
    /// Answers with 0 bytes.
    pub empty_answers: u64,
    /// Waits that timed out.
    pub timeouts: u64,
    /// Doorbell writes.
    pub kicks: u64,
}

/// The driver.
pub struct VirtioRng<H: DmaHal + Clone, T: Transport> {
    hal: H,
    device: VirtioDevice<T>,
    queue: VirtQueue<H, Part<H>>,
    /// The request buffer while the driver holds it; `None` while it is in flight.
    buffer: Option<DmaBuf<H>>,
    vector: Option<u16>,
    stats: RngStats,
}

impl<H: DmaHal + Clone, T: Transport> VirtioRng<H, T> {
    /// Runs the initialization sequence (§3.1.1, §5.4.5): reset, features, the request queue
    /// (with `options.vector`), DRIVER_OK. A failure resets the device.
    pub fn new(hal: H, transport: T, options: RngOptions) -> Result<Self, RngError> {
        let mut device = VirtioDevice::new(transport);
        device.reset()?;
        let features = device.begin(DRIVER_FEATURES & options.allowed_features)?;
        let queue_features = QueueFeatures::from_negotiated(features);
        let buffer = DmaBuf::new(hal.clone(), options.request_len.max(1))?;
        // The queue lives in a slot declared before the guard, so that on an early return the
        // guard resets the device before the queue memory is freed (see `ResetOnError`).
        let queue: VirtQueue<H, Part<H>>;
        let mut guard = ResetOnError::new(device);
        {
            let Some(device) = guard.device() else {
                return Err(RngError::NeedsReset);
            };
            queue = build_queue(
                &hal,
                device,
                rng::REQUEST_QUEUE,
                options.queue_size,
                queue_features,
                options.vector,
            )?;
            device.driver_ok()?;
        }
        let Some(device) = guard.take() else {
            return Err(RngError::NeedsReset);
        };
        let mut driver = Self {
            hal,
            device,
            queue,
            buffer: Some(buffer),
            vector: options.vector,
            stats: RngStats::default(),
        };
        if driver.vector.is_none() {
            // Polled: ask the device not to interrupt.
            driver.queue.disable_cb();
        }
        Ok(driver)
    }

    /// Makes the request buffer available to the device, unless a request is already in
    /// flight (then it does nothing). Does not wait.
    pub fn request(&mut self) -> Result<(), RngError> {
        let Some(buffer) = self.buffer.take() else {
            return Ok(());
        };
        let part = match Part::writable(buffer) {
            Ok(part) => part,
            Err((buffer, error)) => {
                self.buffer = Some(buffer);
                return Err(RngError::Dma(error));
            }
        };
        if let Err(error) = self.queue.add(part) {
            self.buffer = Some(error.buffer.into_buf());
            return Err(RngError::Queue(error.error));
        }
        self.stats.requests += 1;
        if self.queue.should_notify() {
            self.device.transport().notify(self.queue.index())?;
            self.stats.kicks += 1;
        }
        Ok(())
    }

    /// Takes the answer to the request in flight, if the device has given it: copies up to
    /// `out.len()` of the bytes the device wrote into `out` and returns how many it copied
    /// (0 for an empty answer). `Ok(None)` when no answer is there (or nothing was asked).
    pub fn poll(&mut self, out: &mut [u8]) -> Result<Option<usize>, RngError> {
        if self.buffer.is_some() {
            return Ok(None);
        }
        match self.queue.pop_used() {
            Ok(Some(used)) => Ok(Some(self.take_answer(used.buffer, used.len, out))),
            Ok(None) => Ok(None),
            Err(error) => Err(self.device_error(error)),
        }
    }

    /// Fills `out` with bytes from the device, requesting as often as needed and waiting at
    /// most `timeout_us` microseconds for each answer. Returns `out.len()`, or an error: a
    /// timeout, [`MAX_EMPTY_ANSWERS`] empty answers in a row, or a device error. On error
    /// the bytes already copied stay in `out` but are not counted as filled.
    pub fn fill(&mut self, out: &mut [u8], timeout_us: u32) -> Result<usize, RngError> {
        let mut filled = 0;
        let mut empty_in_a_row = 0;
        while filled < out.len() {
            self.request()?;
            let used = match wait_for_used(&mut self.queue, &self.hal, timeout_us) {
                Ok(Some(used)) => used,
                Ok(None) => {
                    self.stats.timeouts += 1;
                    return Err(RngError::Timeout { timeout_us });
                }
                Err(error) => return Err(self.device_error(error)),
            };
            let copied = self.take_answer(used.buffer, used.len, &mut out[filled..]);
            if copied == 0 {
                empty_in_a_row += 1;
                if empty_in_a_row >= MAX_EMPTY_ANSWERS {
                    return Err(RngError::NoEntropy {
                        empty_answers: empty_in_a_row,
                    });
                }
            } else {
                empty_in_a_row = 0;
                filled += copied;
            }
        }
        Ok(filled)
    }

    /// Ends the transfer of a used request buffer, copies what the device wrote (at most
    /// `len`, already bounded by the queue to the buffer's size) and keeps the buffer.
    fn take_answer(&mut self, part: Part<H>, len: u32, out: &mut [u8]) -> usize {
        // End the transfer before reading (a bounce-buffer HAL copies the data back here).
        let buffer = part.into_buf();
        let written = (len as usize).min(buffer.len());
        let copied = written.min(out.len());
        out[..copied].copy_from_slice(&buffer.as_bytes()[..copied]);
        self.stats.bytes += written as u64;
        if written == 0 {
            self.stats.empty_answers += 1;
        }
        self.buffer = Some(buffer);
        copied
    }

    fn device_error(&self, error: DeviceError) -> RngError {
        RngError::Device {
            queue: self.queue.index(),
            error,
        }
    }

    /// Reports a device that asked to be reset (DEVICE_NEEDS_RESET, §2.1.2).
    pub fn check_status(&self) -> Result<(), RngError> {
        if self.device.needs_reset() {
            return Err(RngError::NeedsReset);
        }
        Ok(())
    }

    /// Whether a request is in flight (made available and not yet answered).
    pub fn request_in_flight(&self) -> bool {
        self.buffer.is_none()
    }

    /// Whether the device has answered (cheap: for an interrupt handler or a poll loop).
    pub fn answer_pending(&self) -> bool {
        self.queue.has_used()
    }

    /// Features negotiated.
    pub fn features(&self) -> u64 {
        self.device.features()
    }

    /// The ring format in use.
    pub fn format(&self) -> QueueFormat {
        self.queue.format()
    }

    /// The MSI-X vector of the request queue, if any.
    pub fn vector(&self) -> Option<u16> {
        self.vector
    }

    /// Counters.
    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// The transport (ISR reads, diagnostics).
    pub fn transport(&self) -> &T {
        self.device.transport()
    }
}

impl<H: DmaHal + Clone, T: Transport> Drop for VirtioRng<H, T> {
    /// Resets the device before the queue and the buffer are freed.
    fn drop(&mut self) {
        let _ = self.device.reset();
    }
}

impl<H: DmaHal + Clone, T: Transport> fmt::Debug for VirtioRng<H, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioRng")
            .field("format", &self.queue.format())
            .field("queue_size", &self.queue.size())
            .field("stats", &self.stats)
            .finish()
    }
}

#[cfg(test)]
mod tests;
