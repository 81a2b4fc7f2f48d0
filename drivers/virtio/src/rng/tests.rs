//! Host tests of the entropy driver against a fake `virtio-rng-pci`, assembled like the net
//! driver's (`net/tests/device.rs`): the register side is the PCI fake of
//! [`crate::tests::fake`] reached through the real [`PciTransport`], the ring side one
//! [`QueueDevice`] (the split/packed consumer of [`crate::queue::fake`]) over host DMA. On a
//! doorbell the model answers the request as its [`Answer`] says: honestly, with nothing, with
//! a length beyond the buffer, or never.

use std::cell::RefCell;

use super::{MAX_EMPTY_ANSWERS, RngError, RngOptions, VirtioRng};
use crate::dma::host::HostDma;
use crate::error::TransportError;
use crate::pci::{DeviceConfigRequirement, PciTransport};
use crate::queue::fake::{FakeDevice as QueueDevice, for_both_formats};
use crate::queue::{DeviceError, QueueAddresses, QueueFeatures, QueueFormat};
use crate::spec::{Features, rng};
use crate::tests::fake::{ADDRESS, FakeConfig, FakeDevice as PciDevice, Layout};
use crate::tests::fake::{ObservedTransport, TransportObserver};
use crate::transport::{DeviceStatus, DeviceType, Transport};

/// How the fake device answers a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Writes this many bytes (clamped to the buffer), from its byte stream.
    Bytes(u32),
    /// Uses the buffer with length 0.
    Empty,
    /// Reports this many bytes more than the buffer holds.
    Overclaim(u32),
    /// Never uses the buffer.
    Silent,
}

/// The device's state and records.
struct RngModel<'w> {
    dma: &'w HostDma,
    pci: &'w PciDevice,
    features: u64,
    queue: Option<QueueDevice<'w>>,
    answer: Answer,
    /// The next byte of the device's stream (so consecutive answers differ).
    next_byte: u8,
    /// Every byte written, in order.
    written: Vec<u8>,
    /// Writable capacity of every request seen.
    capacities: Vec<u32>,
    doorbells: u64,
    resets: u32,
}

impl RngModel<'_> {
    fn answer_requests(&mut self) {
        let answer = self.answer;
        let Some(queue) = self.queue.as_mut() else {
            panic!("doorbell on a queue that is not enabled");
        };
        let before = queue.popped.len();
        queue
            .pop_available(usize::MAX)
            .unwrap_or_else(|fault| panic!("the driver broke the ring protocol: {fault}"));
        for chain in &queue.popped[before..] {
            assert!(chain.readable.is_empty(), "a request offers readable bytes");
            self.capacities.push(chain.capacity());
        }
        let count = queue.popped.len();
        match answer {
            Answer::Silent => {}
            Answer::Bytes(len) => {
                let mut data = Vec::new();
                for chain in &queue.popped {
                    let len = len.min(chain.capacity()) as usize;
                    let bytes: Vec<u8> = (0..len)
                        .map(|_| {
                            let byte = self.next_byte;
                            self.next_byte = self.next_byte.wrapping_mul(13).wrapping_add(7);
                            byte
                        })
                        .collect();
                    self.written.extend_from_slice(&bytes);
                    data.push(bytes);
                }
                let picks: Vec<(usize, &[u8])> = data
                    .iter()
                    .enumerate()
                    .map(|(index, bytes)| (index, bytes.as_slice()))
                    .collect();
                queue.complete_with(&picks).expect("complete");
            }
            Answer::Empty => {
                let picks: Vec<(usize, u32)> = (0..count).map(|index| (index, 0)).collect();
                queue.complete(&picks).expect("complete");
            }
            Answer::Overclaim(extra) => {
                let chains: Vec<_> = queue.popped.drain(..).collect();
                for chain in chains {
                    queue
                        .inject_used(chain.id, chain.capacity() + extra)
                        .expect("inject");
                }
            }
        }
    }
}

/// The PCI transport, reporting to the model.
type RngTransport<'m, 'w> = ObservedTransport<'m, 'w, RngModel<'w>>;

impl TransportObserver for RngModel<'_> {
    fn driver_features(&mut self, features: u64) {
        self.features = features;
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.queue = None;
        self.features = 0;
    }
    fn queue_enabled(&mut self, queue: u16) {
        let (size, addresses) = self.pci.with(|state| {
            let queue = state.queues.get(&queue).expect("queue state");
            let join = |halves: [u32; 2]| u64::from(halves[0]) | (u64::from(halves[1]) << 32);
            let addresses = QueueAddresses {
                desc: join(queue.desc),
                driver: join(queue.driver),
                device: join(queue.device),
            };
            (queue.size, addresses)
        });
        let features = QueueFeatures::from_negotiated(self.features);
        self.queue = Some(QueueDevice::new(self.dma, features, size, addresses));
    }
    fn doorbell(&mut self, _queue: u16) {
        self.doorbells += 1;
        self.answer_requests();
    }
}

/// Everything the device side owns.
struct World {
    dma: HostDma,
    config: FakeConfig,
    pci: PciDevice,
    layout: Layout,
}

impl World {
    /// A `virtio-rng-pci,disable-legacy=on` offering `features`: device id 0x1044, one queue
    /// of at most 64, no device configuration.
    fn new(features: u64) -> Self {
        let mut layout = Layout::modern_net();
        layout.device_id = rng::PCI_DEVICE_ID;
        let (config, pci) = layout.build();
        pci.with(|state| {
            state.device_features = features;
            state.queue_max_sizes = vec![64];
            state.device_config = Vec::new();
        });
        Self {
            dma: HostDma::new(),
            config,
            pci,
            layout,
        }
    }

    fn model(&self, answer: Answer) -> RefCell<RngModel<'_>> {
        RefCell::new(RngModel {
            dma: &self.dma,
            pci: &self.pci,
            features: 0,
            queue: None,
            answer,
            next_byte: 1,
            written: Vec::new(),
            capacities: Vec::new(),
            doorbells: 0,
            resets: 0,
        })
    }

    fn transport<'m, 'w>(&'w self, model: &'m RefCell<RngModel<'w>>) -> RngTransport<'m, 'w> {
        let pci = PciTransport::new(
            &self.pci,
            &self.config,
            ADDRESS,
            &self.layout.bars,
            DeviceConfigRequirement::Optional,
        )
        .expect("the fake is discoverable");
        ObservedTransport { pci, model }
    }
}

type Rng<'m, 'w> = VirtioRng<&'w HostDma, RngTransport<'m, 'w>>;

fn offered(format: QueueFormat) -> u64 {
    let packed = match format {
        QueueFormat::Split => 0,
        QueueFormat::Packed => Features::RING_PACKED.bits(),
    };
    Features::VERSION_1.bits()
        | Features::EVENT_IDX.bits()
        | Features::INDIRECT_DESC.bits()
        | packed
}

fn up<'m, 'w>(
    world: &'w World,
    model: &'m RefCell<RngModel<'w>>,
    options: RngOptions,
) -> Result<Rng<'m, 'w>, RngError> {
    VirtioRng::new(&world.dma, world.transport(model), options)
}

#[test]
fn bring_up_negotiates_the_ring_features_and_one_queue() {
    for_both_formats(|format| {
        let world = World::new(offered(format) | Features::ACCESS_PLATFORM.bits());
        let model = world.model(Answer::Bytes(64));
        let rng = up(&world, &model, RngOptions::default()).expect("up");
        assert_eq!(rng.format(), format);
        let expected =
            offered(format) & !Features::INDIRECT_DESC.bits() | Features::ACCESS_PLATFORM.bits();
        assert_eq!(rng.features(), expected, "INDIRECT_DESC is not asked for");
        assert!(world.pci.with(|state| state.status) & DeviceStatus::DRIVER_OK.bits() != 0);
        assert_eq!(rng.transport().device_type(), DeviceType::ENTROPY);
        assert!(!rng.request_in_flight());
        world.pci.assert_clean();
    });
}

#[test]
fn fills_of_several_sizes_return_exactly_the_device_bytes_in_order() {
    for_both_formats(|format| {
        let world = World::new(offered(format));
        let model = world.model(Answer::Bytes(64));
        let mut rng = up(&world, &model, RngOptions::default()).expect("up");
        let mut total = Vec::new();
        for len in [1usize, 16, 32, 64, 65, 200, 1000] {
            let mut out = vec![0u8; len];
            assert_eq!(rng.fill(&mut out, 1_000), Ok(len), "{len} bytes");
            total.extend_from_slice(&out);
        }
        // Each request gets 64 bytes; a fill uses what it needs and drops the rest.
        let stats = rng.stats();
        let requests: u64 = [1u64, 16, 32, 64, 65, 200, 1000]
            .iter()
            .map(|len| len.div_ceil(64))
            .sum();
        assert_eq!(stats.requests, requests);
        assert_eq!(stats.bytes, requests * 64, "rng_bytes counts device bytes");
        assert_eq!(stats.empty_answers, 0);
        let model = model.borrow();
        assert!(model.capacities.iter().all(|&capacity| capacity == 64));
        // The bytes handed out are the device's, in its order, less the dropped tails.
        let mut expected = Vec::new();
        let mut stream = model.written.chunks(64);
        for len in [1usize, 16, 32, 64, 65, 200, 1000] {
            let mut need = len;
            while need > 0 {
                let chunk = stream.next().expect("enough answers");
                let take = need.min(chunk.len());
                expected.extend_from_slice(&chunk[..take]);
                need -= take;
            }
        }
        assert_eq!(total, expected);
        assert_eq!(
            world.dma.delayed_us(),
            0,
            "immediate answers need no waiting"
        );
    });
}

#[test]
fn short_answers_are_used_and_asked_again() {
    for_both_formats(|format| {
        let world = World::new(offered(format));
        let model = world.model(Answer::Bytes(5));
        let mut rng = up(&world, &model, RngOptions::default()).expect("up");
        let mut out = [0u8; 32];
        assert_eq!(rng.fill(&mut out, 1_000), Ok(32));
        assert_eq!(rng.stats().requests, 7, "32 bytes in answers of 5");
        assert_eq!(&out[..], &model.borrow().written[..32]);
    });
}

#[test]
fn an_empty_fill_asks_nothing() {
    let world = World::new(offered(QueueFormat::Split));
    let model = world.model(Answer::Bytes(64));
    let mut rng = up(&world, &model, RngOptions::default()).expect("up");
    assert_eq!(rng.fill(&mut [], 1_000), Ok(0));
    assert_eq!(rng.stats().requests, 0);
}

#[test]
fn a_device_that_answers_with_nothing_gets_a_bounded_number_of_retries() {
    for_both_formats(|format| {
        let world = World::new(offered(format));
        let model = world.model(Answer::Empty);
        let mut rng = up(&world, &model, RngOptions::default()).expect("up");
        let mut out = [0u8; 32];
        let error = rng.fill(&mut out, 1_000).expect_err("no entropy");
        assert_eq!(
            error,
            RngError::NoEntropy {
                empty_answers: MAX_EMPTY_ANSWERS
            }
        );
        assert_eq!(
            error.to_string(),
            "the entropy device answered 4 requests in a row with 0 bytes"
        );
        assert_eq!(rng.stats().requests, u64::from(MAX_EMPTY_ANSWERS));
        assert_eq!(rng.stats().empty_answers, u64::from(MAX_EMPTY_ANSWERS));
        assert_eq!(rng.stats().bytes, 0);
        // The device recovers: the driver is still usable.
        model.borrow_mut().answer = Answer::Bytes(64);
        assert_eq!(rng.fill(&mut out, 1_000), Ok(32));
    });
}

#[test]
fn a_device_that_claims_more_bytes_than_the_buffer_is_a_device_error() {
    for_both_formats(|format| {
        let world = World::new(offered(format));
        let model = world.model(Answer::Overclaim(1));
        let mut rng = up(&world, &model, RngOptions::default()).expect("up");
        let mut out = [0u8; 16];
        let error = rng.fill(&mut out, 1_000).expect_err("device error");
        let RngError::Device { queue, error } = error else {
            panic!("expected a device error, got {error:?}");
        };
        assert_eq!(queue, rng::REQUEST_QUEUE);
        assert!(
            matches!(
                error,
                DeviceError::LengthTooLarge {
                    len: 65,
                    capacity: 64,
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(rng.stats().bytes, 0, "nothing from a lying device is used");
        // The queue stays broken: the caller must reset and rebuild.
        assert!(matches!(
            rng.fill(&mut out, 1_000),
            Err(RngError::Queue(_)) | Err(RngError::Device { .. })
        ));
        drop(rng);
        assert!(
            model.borrow().resets >= 2,
            "dropping the driver resets the device"
        );
        assert_eq!(world.dma.live_allocations(), 0, "nothing leaked");
    });
}

#[test]
fn a_device_that_never_answers_times_out_after_exactly_the_timeout() {
    for_both_formats(|format| {
        let world = World::new(offered(format));
        let model = world.model(Answer::Silent);
        let mut rng = up(&world, &model, RngOptions::default()).expect("up");
        let mut out = [0u8; 32];
        let error = rng.fill(&mut out, 5_000).expect_err("timeout");
        assert_eq!(error, RngError::Timeout { timeout_us: 5_000 });
        assert_eq!(
            error.to_string(),
            "the entropy device did not answer within 5000 us"
        );
        assert_eq!(world.dma.delayed_us(), 5_000, "waited exactly the timeout");
        assert_eq!(rng.stats().timeouts, 1);
        assert!(rng.request_in_flight(), "the buffer stays with the device");
        // A second fill does not post the buffer twice; it waits for the same request.
        assert!(rng.fill(&mut out, 100).is_err());
        assert_eq!(rng.stats().requests, 1);
        // The answer comes late: the next fill takes it.
        model.borrow_mut().answer = Answer::Bytes(64);
        model.borrow_mut().answer_requests();
        assert_eq!(rng.fill(&mut out, 1_000), Ok(32));
        assert_eq!(&out[..], &model.borrow().written[..32]);
    });
}

#[test]
fn request_and_poll_do_not_wait() {
    for_both_formats(|format| {
        let world = World::new(offered(format));
        let model = world.model(Answer::Silent);
        let mut rng = up(&world, &model, RngOptions::default()).expect("up");
        let mut out = [0u8; 48];
        assert_eq!(rng.poll(&mut out), Ok(None), "nothing asked");
        rng.request().expect("request");
        assert!(rng.request_in_flight());
        rng.request()
            .expect("a second request while one is in flight is a no-op");
        assert_eq!(rng.stats().requests, 1);
        assert_eq!(rng.poll(&mut out), Ok(None), "not answered yet");
        assert!(!rng.answer_pending());
        model.borrow_mut().answer = Answer::Bytes(64);
        model.borrow_mut().answer_requests();
        assert!(rng.answer_pending());
        assert_eq!(rng.poll(&mut out), Ok(Some(48)), "48 of the 64 bytes fit");
        assert_eq!(&out[..], &model.borrow().written[..48]);
        assert!(!rng.request_in_flight());
        assert_eq!(rng.stats().bytes, 64);
        assert_eq!(world.dma.delayed_us(), 0);
    });
}

#[test]
fn a_vector_is_programmed_and_polling_suppresses_interrupts() {
    let world = World::new(offered(QueueFormat::Split));
    let model = world.model(Answer::Bytes(64));
    let options = RngOptions {
        vector: Some(1),
        ..RngOptions::default()
    };
    let rng = up(&world, &model, options).expect("up");
    assert_eq!(rng.vector(), Some(1));
    let vector = world
        .pci
        .with(|state| state.queues.get(&0).map(|queue| queue.vector));
    assert_eq!(vector, Some(1));
}

#[test]
fn a_device_without_version_1_is_refused_and_reset() {
    let world = World::new(0);
    let model = world.model(Answer::Bytes(64));
    let error = up(&world, &model, RngOptions::default()).expect_err("refused");
    assert!(
        matches!(
            error,
            RngError::Transport(TransportError::Version1NotOffered { .. })
        ),
        "{error:?}"
    );
    assert_eq!(world.dma.live_allocations(), 0, "nothing leaked");
}
