//! Host tests of the transport against the fakes in [`fake`]: capability discovery on QEMU's
//! layouts and on malformed ones, the §3.1.1 status state machine, queue setup and
//! notification, ISR, and generation-checked configuration reads.

mod config;
mod discovery;
pub(crate) mod fake;
mod init;
mod queues;

use fake::{ADDRESS, FakeConfig, FakeDevice, Layout};

use crate::error::DiscoveryError;
use crate::pci::{DeviceConfigRequirement, PciTransport};

/// Opens the transport of a built layout, requiring device config.
fn open<'d>(
    config: &FakeConfig,
    device: &'d FakeDevice,
    layout: &Layout,
) -> Result<PciTransport<&'d FakeDevice>, DiscoveryError> {
    PciTransport::new(
        device,
        config,
        ADDRESS,
        &layout.bars,
        DeviceConfigRequirement::Required,
    )
}
