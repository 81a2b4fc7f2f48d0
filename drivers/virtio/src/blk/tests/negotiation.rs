//! Bring-up (§3.1.1, §5.2.5): which features are negotiated, the configuration read in one
//! generation window (§2.4.1, §5.2.4) with its defaults for absent or nonsense values, the
//! request queue and the vectors, and the refusals.

use super::device::{DiskConfig, QUEUE, World};
use super::{bits, qemu_features, small, up};
use crate::blk::{BlkError, BlkOptions, BlkVectors, DRIVER_FEATURES, RangeLimits};
use crate::error::TransportError;
use crate::queue::QueueFormat;
use crate::spec::{BlkFeatures, DeviceStatus, Features, blk_config};
use crate::tests::fake::ConfigChange;

const VERSION_1: u64 = Features::VERSION_1.bits();

#[test]
fn negotiates_every_offered_feature_the_driver_honours_and_nothing_else() {
    let offered = qemu_features()
        | bits(&[
            Features::RING_PACKED.bits(),
            Features::ACCESS_PLATFORM.bits(),
            Features::IN_ORDER.bits(),
            Features::NOTIFICATION_DATA.bits(),
            BlkFeatures::SIZE_MAX.bits(),
            BlkFeatures::RO.bits(),
            BlkFeatures::MQ.bits(),
            BlkFeatures::LIFETIME.bits(),
            BlkFeatures::SECURE_ERASE.bits(),
            BlkFeatures::ZONED.bits(),
        ]);
    let world = World::new(offered, DiskConfig::default(), 256);
    let model = world.model();
    let blk = up(&world, &model, small()).expect("up");
    assert_eq!(blk.offered_features(), offered);
    assert_eq!(
        blk.features(),
        DRIVER_FEATURES,
        "every bit the driver honours and no other (no GEOMETRY, TOPOLOGY, CONFIG_WCE, MQ, …)"
    );
    assert_eq!(model.borrow().features(), DRIVER_FEATURES);
    let status = world.device(|state| state.status);
    assert_eq!(
        status,
        (DeviceStatus::ACKNOWLEDGE
            | DeviceStatus::DRIVER
            | DeviceStatus::FEATURES_OK
            | DeviceStatus::DRIVER_OK)
            .bits()
    );
    assert_eq!(blk.queue_format(), QueueFormat::Packed);
    assert_eq!(blk.queue_size(), 64);
    assert!(blk.read_only());
}

#[test]
fn the_configuration_is_read_into_info_with_the_limits_of_the_negotiated_features() {
    let disk = DiskConfig {
        capacity: 4096,
        size_max: 65536,
        seg_max: 8,
        blk_size: 4096,
        max_discard_sectors: 1024,
        max_discard_seg: 4,
        discard_sector_alignment: 8,
        max_write_zeroes_sectors: 0,
        max_write_zeroes_seg: 0,
        write_zeroes_may_unmap: 1,
    };
    let world = World::new(qemu_features() | BlkFeatures::SIZE_MAX.bits(), disk, 128);
    let model = world.model();
    let blk = up(&world, &model, small()).expect("up");
    let info = blk.info();
    assert_eq!(info.capacity, 4096);
    assert_eq!(info.capacity_bytes(), 4096 * 512);
    assert_eq!(info.block_size, 4096);
    assert_eq!(info.sectors_per_block(), 8);
    assert_eq!(info.ignored_block_size, None);
    assert_eq!(info.size_max, Some(65536));
    assert_eq!(info.seg_max, Some(8));
    assert_eq!(blk.max_data_segments(), 8, "seg_max is below the ring's 62");
    assert!(info.flush);
    assert!(!info.read_only);
    assert_eq!(
        info.discard,
        Some(RangeLimits {
            max_sectors: 1024,
            max_ranges: 4,
            hint: 8
        })
    );
    assert_eq!(
        info.write_zeroes,
        Some(RangeLimits {
            max_sectors: u32::MAX,
            max_ranges: 1,
            hint: 1
        }),
        "0 sectors means no limit and 0 segments means one"
    );

    // Without the features, their fields are neither read nor used.
    let world = World::new(bits(&[VERSION_1]), disk, 128);
    let model = world.model();
    let blk = up(&world, &model, small()).expect("up");
    let info = blk.info();
    assert_eq!(info.capacity, 4096);
    assert_eq!(info.block_size, 512);
    assert_eq!((info.size_max, info.seg_max), (None, None));
    assert_eq!((info.discard, info.write_zeroes), (None, None));
    assert!(!info.flush);
    assert_eq!(
        blk.max_data_segments(),
        62,
        "the ring's size minus header and status"
    );
    world.pci.assert_clean();
}

#[test]
fn blk_size_defaults_to_512_when_not_offered_or_nonsense() {
    for (offered, blk_size, expected, ignored) in [
        (false, 4096, 512, None),
        (true, 4096, 4096, None),
        (true, 512, 512, None),
        (true, 0, 512, Some(0)),
        (true, 256, 512, Some(256)),
        (true, 1000, 512, Some(1000)),
        (true, 1 << 20, 512, Some(1 << 20)),
    ] {
        let features = if offered {
            bits(&[VERSION_1, BlkFeatures::BLK_SIZE.bits()])
        } else {
            VERSION_1
        };
        let disk = DiskConfig {
            blk_size,
            ..DiskConfig::default()
        };
        let world = World::new(features, disk, 64);
        let model = world.model();
        let blk = up(&world, &model, small()).expect("up");
        assert_eq!(
            blk.block_size(),
            expected,
            "blk_size {blk_size}, offered {offered}"
        );
        assert_eq!(blk.info().ignored_block_size, ignored);
    }
}

#[test]
fn a_config_change_during_the_read_is_retried_until_the_generation_is_stable() {
    let world = World::new(qemu_features(), DiskConfig::default(), 64);
    // The capacity changes right after the first read of the snapshot (its low half): the
    // first pass mixes old and new values and must be thrown away.
    world.device(|state| {
        state.config_changes.push(ConfigChange {
            after_reads: 1,
            offset: blk_config::CAPACITY as usize,
            bytes: 0x1_0000_0800u64.to_le_bytes().to_vec(),
        })
    });
    let model = world.model();
    let blk = up(&world, &model, small()).expect("up");
    assert_eq!(blk.capacity(), 0x1_0000_0800, "the new value, whole");
    let reads = world.device(|state| state.config_reads);
    assert!(reads > 8, "a second pass was made ({reads} reads)");

    // A generation that never settles is an error, and the device is failed and reset.
    let world = World::new(qemu_features(), DiskConfig::default(), 64);
    world.device(|state| state.generation_churn = true);
    let model = world.model();
    let error = up(&world, &model, small()).expect_err("unstable");
    assert!(matches!(
        error,
        BlkError::Transport(TransportError::ConfigGenerationUnstable { .. })
    ));
    let writes = world.device(|state| state.status_writes.clone());
    assert!(
        writes.iter().any(|&s| s & DeviceStatus::FAILED.bits() != 0),
        "FAILED was set: {writes:?}"
    );
    assert_eq!(writes.last(), Some(&0), "then reset");
}

#[test]
fn the_queue_and_config_vectors_are_programmed_and_a_refused_vector_fails_bring_up() {
    let world = World::new(qemu_features(), DiskConfig::default(), 64);
    let model = world.model();
    let vectors = BlkVectors {
        config: Some(0),
        queue: Some(1),
    };
    let blk = up(&world, &model, BlkOptions { vectors, ..small() }).expect("up");
    assert_eq!(blk.vectors(), vectors);
    let (config, queue) = world.device(|state| (state.config_vector, state.queues[&QUEUE].vector));
    assert_eq!((config, queue), (0, 1));
    drop(blk);

    // The fake has 3 vectors: vector 7 reads back NO_VECTOR.
    let world = World::new(qemu_features(), DiskConfig::default(), 64);
    let model = world.model();
    let options = BlkOptions {
        vectors: BlkVectors {
            config: None,
            queue: Some(7),
        },
        ..small()
    };
    let error = up(&world, &model, options).expect_err("refused");
    assert!(matches!(
        error,
        BlkError::Transport(TransportError::VectorRefused { .. })
    ));
    assert_eq!(world.device(|state| state.status), 0, "reset after FAILED");
}

#[test]
fn refuses_a_device_that_is_not_a_block_device_or_has_no_queue() {
    let world = World::net();
    let model = world.model();
    let error = up(&world, &model, small()).expect_err("net");
    assert_eq!(error, BlkError::NotBlockDevice { device_type: 1 });
    assert_eq!(error.to_string(), "virtio-net is not a block device");
    assert!(
        world.device(|state| state.status_writes.is_empty()),
        "the device was not touched"
    );

    let world = World::new(qemu_features(), DiskConfig::default(), 64);
    world.device(|state| state.queue_max_sizes.clear());
    let model = world.model();
    assert_eq!(
        up(&world, &model, small()).expect_err("no queue"),
        BlkError::MissingQueue { queue: 0 }
    );
}

#[test]
fn access_platform_is_accepted_and_the_caller_can_mask_features() {
    let world = World::new(
        qemu_features() | Features::ACCESS_PLATFORM.bits(),
        DiskConfig::default(),
        64,
    );
    let model = world.model();
    let blk = up(&world, &model, small()).expect("FEATURES_OK accepted");
    assert_ne!(blk.features() & Features::ACCESS_PLATFORM.bits(), 0);
    drop(blk);

    let world = World::new(qemu_features(), DiskConfig::default(), 64);
    let model = world.model();
    let options = BlkOptions {
        allowed_features: DRIVER_FEATURES
            & !(BlkFeatures::FLUSH.bits() | Features::INDIRECT_DESC.bits()),
        ..small()
    };
    let blk = up(&world, &model, options).expect("up");
    assert_eq!(blk.features() & BlkFeatures::FLUSH.bits(), 0);
    assert_eq!(blk.features() & Features::INDIRECT_DESC.bits(), 0);
    assert!(!blk.info().flush);
}
