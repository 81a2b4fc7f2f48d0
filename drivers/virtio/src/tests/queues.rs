//! Queue setup (§4.1.5.1.3), doorbells (§4.1.4.4, §4.1.5.2), MSI-X vectors (§4.1.5.1.2) and
//! the ISR (§4.1.4.5).

use super::fake::{Doorbell, FakeDevice, Layout, PIO_NOTIFY_BASE};
use super::open;
use crate::error::TransportError;
use crate::pci::PciTransport;
use crate::queue::fake::for_both_formats;
use crate::spec;
use crate::tests::fake::{FakeConfig, notify_cap};
use crate::transport::{QueueConfig, QueueFormat, Transport, VirtioDevice, choose_queue_size};

fn split_config(size: u16, base: u64, vector: Option<u16>) -> QueueConfig {
    QueueConfig {
        format: QueueFormat::Split,
        size,
        desc: base,
        driver: base + 0x1000,
        device: base + 0x2000,
        vector,
    }
}

/// Initializes a device up to FEATURES_OK.
fn ready<'d>(
    config: &FakeConfig,
    device: &'d FakeDevice,
    layout: &Layout,
) -> VirtioDevice<PciTransport<&'d FakeDevice>> {
    let mut virtio = VirtioDevice::new(open(config, device, layout).expect("opens"));
    virtio.begin(0).expect("init");
    virtio
}

#[test]
fn setup_programs_size_addresses_vector_then_enables_with_32_bit_halves_low_first() {
    for_both_formats(|format| {
        let layout = Layout::modern_net();
        let (config, device) = layout.build();
        let mut virtio = ready(&config, &device, &layout);
        let desc = 0x1_2345_6000u64;
        virtio
            .setup_queue(
                1,
                &QueueConfig {
                    format,
                    ..split_config(128, desc, Some(1))
                },
            )
            .expect("queue 1 set up");
        device.with(|state| {
            let queue = &state.queues[&1];
            assert_eq!(queue.size, 128);
            assert_eq!(queue.desc_addr(), desc);
            assert_eq!(queue.driver, [0x2345_7000, 1]);
            assert_eq!(queue.device, [0x2345_8000, 1]);
            assert_eq!(queue.vector, 1);
            assert!(queue.enabled);
            let address_writes: Vec<_> = state
                .common_writes
                .iter()
                .filter(|(register, _)| *register >= 0x20)
                .copied()
                .collect();
            assert_eq!(
                address_writes,
                [
                    (0x20, 0x2345_6000),
                    (0x24, 1),
                    (0x28, 0x2345_7000),
                    (0x2c, 1),
                    (0x30, 0x2345_8000),
                    (0x34, 1),
                ]
            );
        });
        virtio.driver_ok().expect("live");
        assert!(
            matches!(
                virtio.setup_queue(0, &split_config(64, 0x10_0000, None)),
                Err(TransportError::OutOfOrder { .. })
            ),
            "no queue setup after DRIVER_OK"
        );
        device.assert_clean();
    });
}

/// A 16-bit MMIO doorbell write of `value` (the queue index) at `offset` of the notify region.
fn mmio(offset: u64, value: u16) -> Doorbell {
    Doorbell::Mmio { offset, value }
}

/// Sets up each of `queues` with `size` entries, each at its own base address.
fn setup_queues(
    virtio: &mut VirtioDevice<PciTransport<&FakeDevice>>,
    queues: impl IntoIterator<Item = u16>,
    size: u16,
) {
    for queue in queues {
        let base = 0x10_0000 * u64::from(queue + 1);
        virtio
            .setup_queue(queue, &split_config(size, base, None))
            .expect("setup");
    }
}

/// Rings the doorbells of `queues` in that order, then checks the writes the device saw and
/// that it saw nothing else amiss.
fn ring_doorbells(
    virtio: &VirtioDevice<PciTransport<&FakeDevice>>,
    device: &FakeDevice,
    queues: &[u16],
    expected: &[Doorbell],
) {
    for &queue in queues {
        virtio.transport().notify(queue).expect("notify");
    }
    device.with(|state| assert_eq!(state.doorbells, expected));
    device.assert_clean();
}

#[test]
fn modern_doorbells_are_cached_at_notify_off_times_multiplier() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let mut virtio = ready(&config, &device, &layout);
    setup_queues(&mut virtio, 0..3, 64);
    // queue_notify_off is read once at setup: changing it afterwards changes nothing.
    device.with(|state| state.notify_off_override = Some(999));
    let expected = [mmio(8, 2), mmio(0, 0), mmio(4, 1)];
    ring_doorbells(&virtio, &device, &[2, 0, 1], &expected);
}

#[test]
fn page_per_vq_doorbells_are_a_page_apart() {
    let layout = Layout::page_per_vq();
    let (config, device) = layout.build();
    let mut virtio = ready(&config, &device, &layout);
    setup_queues(&mut virtio, 0..2, 256);
    ring_doorbells(&virtio, &device, &[1, 0], &[mmio(4096, 1), mmio(0, 0)]);
}

#[test]
fn pio_notify_writes_the_queue_index_to_the_io_port() {
    let layout = Layout::pio_notify();
    let (config, device) = layout.build();
    let mut virtio = ready(&config, &device, &layout);
    assert!(virtio.transport().notifies_by_port());
    setup_queues(&mut virtio, 0..2, 256);
    let port = PIO_NOTIFY_BASE as u16;
    let expected = [
        Doorbell::Port { port, value: 1 },
        Doorbell::Port { port, value: 0 },
    ];
    ring_doorbells(&virtio, &device, &[1, 0], &expected);
}

#[test]
fn zero_multiplier_is_legal_and_all_queues_share_one_doorbell() {
    let mut layout = Layout::modern_net();
    let notify = layout
        .caps
        .iter_mut()
        .find(|cap| cap.body[1] == spec::cfg_type::NOTIFY)
        .expect("notify");
    *notify = notify_cap(4, 0x3000, 2, 0);
    let (config, device) = layout.build();
    let mut virtio = ready(&config, &device, &layout);
    assert_eq!(virtio.transport().capabilities().notify_off_multiplier, 0);
    setup_queues(&mut virtio, 0..3, 32);
    let expected = [mmio(0, 0), mmio(0, 1), mmio(0, 2)];
    ring_doorbells(&virtio, &device, &[0, 1, 2], &expected);
}

#[test]
fn notify_off_beyond_the_notify_region_is_refused_and_the_queue_stays_disabled() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let mut virtio = ready(&config, &device, &layout);
    device.with(|state| state.notify_off_override = Some(1024));
    assert_eq!(
        virtio.setup_queue(0, &split_config(64, 0x10_0000, None)),
        Err(TransportError::NotifyOutOfRange {
            queue: 0,
            notify_off: 1024,
            offset: 4096,
            region_len: 0x1000
        })
    );
    device.with(|state| assert!(!state.queues[&0].enabled));
    assert_eq!(
        virtio.transport().notify(0),
        Err(TransportError::QueueNotSetUp { queue: 0 })
    );
    // The last doorbell that fits: 1023 * 4 + 2 <= 0x1000.
    device.with(|state| state.notify_off_override = Some(1023));
    virtio
        .setup_queue(0, &split_config(64, 0x10_0000, None))
        .expect("fits");
    ring_doorbells(&virtio, &device, &[0], &[mmio(4092, 0)]);
}

#[test]
fn queue_with_max_size_zero_is_unavailable_and_bad_indices_are_refused() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    device.with(|state| state.queue_max_sizes = vec![256, 0, 256]);
    let mut virtio = ready(&config, &device, &layout);
    assert_eq!(
        virtio.transport_mut().max_queue_size(1),
        Err(TransportError::QueueUnavailable { queue: 1 })
    );
    assert_eq!(
        virtio.setup_queue(1, &split_config(64, 0x10_0000, None)),
        Err(TransportError::QueueUnavailable { queue: 1 })
    );
    // num_queues (3) bounds the index before the device is touched.
    assert_eq!(
        virtio.setup_queue(3, &split_config(64, 0x10_0000, None)),
        Err(TransportError::QueueIndexOutOfRange {
            queue: 3,
            num_queues: 3
        })
    );
    assert_eq!(virtio.transport_mut().max_queue_size(0), Ok(256));
}

#[test]
fn queue_sizes_are_clamped_and_split_sizes_are_powers_of_two() {
    assert_eq!(choose_queue_size(0, 256, 1024, QueueFormat::Split), Ok(256));
    assert_eq!(choose_queue_size(0, 256, 100, QueueFormat::Split), Ok(64));
    assert_eq!(choose_queue_size(0, 200, 1000, QueueFormat::Split), Ok(128));
    assert_eq!(
        choose_queue_size(0, 200, 1000, QueueFormat::Packed),
        Ok(200)
    );
    assert_eq!(choose_queue_size(0, 256, 100, QueueFormat::Packed), Ok(100));
    assert_eq!(
        choose_queue_size(0, u16::MAX, u16::MAX, QueueFormat::Packed),
        Ok(32768)
    );
    assert_eq!(
        choose_queue_size(0, u16::MAX, u16::MAX, QueueFormat::Split),
        Ok(32768)
    );
    assert_eq!(
        choose_queue_size(4, 0, 64, QueueFormat::Split),
        Err(TransportError::QueueUnavailable { queue: 4 })
    );
    assert_eq!(
        choose_queue_size(4, 64, 0, QueueFormat::Split),
        Err(TransportError::InvalidQueueSize {
            queue: 4,
            size: 0,
            max: 64
        })
    );

    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let mut virtio = ready(&config, &device, &layout);
    assert_eq!(
        virtio.setup_queue(0, &split_config(100, 0x10_0000, None)),
        Err(TransportError::InvalidQueueSize {
            queue: 0,
            size: 100,
            max: 256
        })
    );
    assert_eq!(
        virtio.setup_queue(0, &split_config(512, 0x10_0000, None)),
        Err(TransportError::InvalidQueueSize {
            queue: 0,
            size: 512,
            max: 256
        })
    );
    let packed = QueueConfig {
        format: QueueFormat::Packed,
        ..split_config(100, 0x10_0000, None)
    };
    virtio
        .setup_queue(0, &packed)
        .expect("packed queues take any size up to the maximum");
    device.with(|state| assert_eq!(state.queues[&0].size, 100));
    assert_eq!(
        virtio.setup_queue(0, &packed),
        Err(TransportError::QueueAlreadyEnabled { queue: 0 })
    );
}

#[test]
fn refused_vectors_are_reported_and_the_queue_is_not_enabled() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let mut virtio = ready(&config, &device, &layout);
    // The fake has 3 vectors: 5 reads back NO_VECTOR.
    assert_eq!(
        virtio.setup_queue(0, &split_config(64, 0x10_0000, Some(5))),
        Err(TransportError::VectorRefused {
            queue: Some(0),
            vector: 5
        })
    );
    device.with(|state| {
        let queue = &state.queues[&0];
        assert_eq!(queue.vector, spec::NO_VECTOR);
        assert!(!queue.enabled);
        assert_eq!(
            (queue.size, queue.desc_addr()),
            (256, 0),
            "nothing else was programmed"
        );
    });
    assert_eq!(
        virtio.set_config_vector(Some(7)),
        Err(TransportError::VectorRefused {
            queue: None,
            vector: 7
        })
    );
    // Accepted vectors read back and stick; the caller can retry with another.
    virtio
        .set_config_vector(Some(2))
        .expect("config vector accepted");
    virtio
        .setup_queue(0, &split_config(64, 0x10_0000, Some(0)))
        .expect("vector 0 accepted");
    device.with(|state| {
        assert_eq!(state.config_vector, 2);
        assert_eq!(state.queues[&0].vector, 0);
    });
    // No vector writes NO_VECTOR explicitly.
    virtio.set_config_vector(None).expect("none");
    device.with(|state| assert_eq!(state.config_vector, spec::NO_VECTOR));
}

#[test]
fn notify_requires_setup_and_reset_forgets_doorbells() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let mut virtio = ready(&config, &device, &layout);
    assert_eq!(
        virtio.transport().notify(0),
        Err(TransportError::QueueNotSetUp { queue: 0 })
    );
    assert_eq!(
        virtio.transport().notify(u16::MAX),
        Err(TransportError::QueueNotSetUp { queue: u16::MAX })
    );
    virtio
        .setup_queue(0, &split_config(64, 0x10_0000, None))
        .expect("setup");
    virtio.transport().notify(0).expect("notify");
    virtio.reset().expect("reset");
    assert_eq!(
        virtio.transport().notify(0),
        Err(TransportError::QueueNotSetUp { queue: 0 })
    );
    device.with(|state| {
        assert_eq!(state.doorbells.len(), 1);
        assert!(
            state.queues.get(&0).is_none_or(|queue| !queue.enabled),
            "the reset disabled it"
        );
    });
}

#[test]
fn isr_read_reports_queue_and_config_bits_and_clears_them() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let transport = open(&config, &device, &layout).expect("opens");
    device.with(|state| {
        state.isr =
            crate::spec::IsrStatus::QUEUE.bits() | crate::spec::IsrStatus::DEVICE_CONFIG.bits()
    });
    let isr = transport.read_isr();
    assert!(isr.queue_interrupt());
    assert!(isr.config_changed());
    let again = transport.read_isr();
    assert!(
        !again.queue_interrupt() && !again.config_changed(),
        "reading cleared it"
    );
    device.with(|state| state.isr = crate::spec::IsrStatus::QUEUE.bits());
    let isr = transport.read_isr();
    assert!(isr.queue_interrupt() && !isr.config_changed());
    device.assert_clean();
}
