//! What every device driver does the same way, beside the §3.1.1 state machine of
//! [`crate::transport`]: building and enabling a virtqueue ([`build_queue`]), giving up on a
//! device whose bring-up failed ([`ResetOnError`]), and waiting, bounded, for the answer to a
//! request on a queue ([`wait_for_used`], e.g. a control command). A device driver is its own
//! file (`net/`, and later others) and uses these.

use core::fmt;

use crate::dma::{DeviceBuffer, DmaHal};
use crate::error::TransportError;
use crate::queue::{DeviceError, QueueError, QueueFeatures, Used, VirtQueue};
use crate::transport::{Transport, VirtioDevice, choose_queue_size};

/// Why a queue could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueSetupError {
    /// The device has fewer queues than the driver needs.
    MissingQueue {
        /// The queue index that does not exist.
        queue: u16,
    },
    /// The transport refused a step (size, addresses, vector).
    Transport(TransportError),
    /// The queue's memory could not be had, or the size is invalid.
    Queue(QueueError),
}

impl fmt::Display for QueueSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingQueue { queue } => write!(f, "the device has no queue {queue}"),
            Self::Transport(error) => write!(f, "{error}"),
            Self::Queue(error) => write!(f, "{error}"),
        }
    }
}

impl From<TransportError> for QueueSetupError {
    fn from(error: TransportError) -> Self {
        Self::Transport(error)
    }
}

impl From<QueueError> for QueueSetupError {
    fn from(error: QueueError) -> Self {
        Self::Queue(error)
    }
}

/// Allocates queue `index` with the largest valid size up to `requested` that the device
/// allows (§2.6, §2.7), in the negotiated `features`' format, and programs and enables it with
/// MSI-X vector `vector` (§4.1.5.1.3). Call between FEATURES_OK and DRIVER_OK.
pub fn build_queue<H: DmaHal + Clone, T: Transport, B: DeviceBuffer>(
    hal: &H,
    device: &mut VirtioDevice<T>,
    index: u16,
    requested: u16,
    features: QueueFeatures,
    vector: Option<u16>,
) -> Result<VirtQueue<H, B>, QueueSetupError> {
    if index >= device.transport().num_queues() {
        return Err(QueueSetupError::MissingQueue { queue: index });
    }
    let max = device.transport_mut().max_queue_size(index)?;
    let size = choose_queue_size(index, max, requested, features.format)?;
    let queue = VirtQueue::new(hal.clone(), index, size, features)?;
    device.setup_queue(index, &queue.transport_config(vector))?;
    Ok(queue)
}

/// Holds a device during a driver's bring-up; if the bring-up fails before [`Self::take`], it
/// gives up on the device (FAILED, §3.1.1) and resets it so that it lets go of every queue.
/// Declare the queues before the guard, so that the guard drops (and resets) first and the
/// device never touches freed queue memory.
pub struct ResetOnError<T: Transport>(Option<VirtioDevice<T>>);

impl<T: Transport> ResetOnError<T> {
    /// Guards `device`.
    pub fn new(device: VirtioDevice<T>) -> Self {
        Self(Some(device))
    }

    /// The device, while guarded.
    pub fn device(&mut self) -> Option<&mut VirtioDevice<T>> {
        self.0.as_mut()
    }

    /// Bring-up succeeded: the device, no longer guarded.
    pub fn take(mut self) -> Option<VirtioDevice<T>> {
        self.0.take()
    }
}

impl<T: Transport> Drop for ResetOnError<T> {
    fn drop(&mut self) {
        if let Some(device) = self.0.as_mut() {
            device.fail();
            let _ = device.reset();
        }
    }
}

/// Polls `queue` for a used buffer every 10 µs for at most `timeout_us` microseconds:
/// `Ok(None)` on timeout, never an unbounded wait on a device that does not answer.
pub fn wait_for_used<H: DmaHal + Clone, B: DeviceBuffer>(
    queue: &mut VirtQueue<H, B>,
    hal: &H,
    timeout_us: u32,
) -> Result<Option<Used<B>>, DeviceError> {
    const STEP_US: u32 = 10;
    let mut waited = 0u32;
    loop {
        if let Some(used) = queue.pop_used()? {
            return Ok(Some(used));
        }
        if waited >= timeout_us {
            return Ok(None);
        }
        hal.spin_delay_us(STEP_US);
        waited = waited.saturating_add(STEP_US);
    }
}
