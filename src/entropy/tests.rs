//! Host tests of the seeding policy against a fake CPU whose RDSEED, RDRAND and TSC answer
//! as each test says.

use std::vec::Vec;

use super::{
    CpuEntropy, Csprng, EntropySource, MIN_VIRTIO_BYTES, RDRAND_RETRIES, RDSEED_ATTEMPTS,
    rdrand_u64, rdseed_u64, seed_csprng,
};

/// A CPU whose instructions fail a set number of times before each success (or always).
#[derive(Default)]
struct FakeCpu {
    rdseed: Option<Instruction>,
    rdrand: Option<Instruction>,
    /// The TSC: starts here, advances by `tsc_step` per read (deterministic, like `-icount`).
    tsc: u64,
    tsc_step: u64,
    backoffs: u32,
}

/// One instruction's behaviour: `failures` failed steps before each success (`None`: never
/// succeeds); values count up from `next`.
struct Instruction {
    failures: Option<u32>,
    failed: u32,
    next: u64,
    steps: u32,
}

impl Instruction {
    fn new(failures: Option<u32>, first: u64) -> Self {
        Self {
            failures,
            failed: 0,
            next: first,
            steps: 0,
        }
    }

    fn step(&mut self) -> Option<u64> {
        self.steps += 1;
        let failures = self.failures?;
        if self.failed < failures {
            self.failed += 1;
            return None;
        }
        self.failed = 0;
        self.next = self.next.wrapping_mul(6364136223846793005).wrapping_add(1);
        Some(self.next)
    }
}

impl CpuEntropy for FakeCpu {
    fn has_rdseed(&self) -> bool {
        self.rdseed.is_some()
    }
    fn rdseed_step(&mut self) -> Option<u64> {
        self.rdseed.as_mut()?.step()
    }
    fn has_rdrand(&self) -> bool {
        self.rdrand.is_some()
    }
    fn rdrand_step(&mut self) -> Option<u64> {
        self.rdrand.as_mut()?.step()
    }
    fn tsc(&mut self) -> u64 {
        self.tsc = self.tsc.wrapping_add(self.tsc_step);
        self.tsc
    }
    fn backoff(&mut self) {
        self.backoffs += 1;
    }
}

fn cpu(rdseed: Option<Option<u32>>, rdrand: Option<Option<u32>>) -> FakeCpu {
    FakeCpu {
        rdseed: rdseed.map(|failures| Instruction::new(failures, 11)),
        rdrand: rdrand.map(|failures| Instruction::new(failures, 22)),
        tsc: 1_000_000,
        tsc_step: 97,
        backoffs: 0,
    }
}

fn output(rng: &mut Csprng) -> Vec<u8> {
    let mut bytes = vec![0u8; 64];
    rng.fill_bytes(&mut bytes);
    bytes
}

#[test]
fn virtio_rng_bytes_are_the_named_source_when_there_are_enough() {
    let bytes = [0x5a; 32];
    let (mut rng, source) = seed_csprng(Some(&bytes), &mut cpu(Some(Some(0)), Some(Some(0))));
    assert_eq!(source, EntropySource::VirtioRng { bytes: 32 });
    assert_eq!(rng.source(), source);
    assert_eq!(source.to_string(), "virtio-rng (32 bytes)");
    assert_ne!(output(&mut rng), vec![0u8; 64]);
}

#[test]
fn without_virtio_rng_the_order_is_rdseed_rdrand_then_tsc() {
    assert_eq!(
        seed_csprng(None, &mut cpu(Some(Some(0)), Some(Some(0)))).1,
        EntropySource::Rdseed
    );
    assert_eq!(
        seed_csprng(None, &mut cpu(None, Some(Some(0)))).1,
        EntropySource::Rdrand
    );
    let (_, weak) = seed_csprng(None, &mut cpu(None, None));
    assert_eq!(weak, EntropySource::TscJitter);
    assert!(weak.is_weak());
    assert_eq!(weak.to_string(), "TSC jitter only");
    // Too few virtio bytes: mixed in, but not the named source.
    let short = [1u8; MIN_VIRTIO_BYTES - 1];
    assert_eq!(
        seed_csprng(Some(&short), &mut cpu(None, Some(Some(0)))).1,
        EntropySource::Rdrand
    );
}

#[test]
fn rdseed_is_retried_with_a_pause_and_bounded() {
    // Fails 5 times, then succeeds: one value after 6 steps and 5 pauses.
    let mut flaky = cpu(Some(Some(5)), None);
    assert!(rdseed_u64(&mut flaky).is_some());
    assert_eq!(flaky.rdseed.as_ref().map(|i| i.steps), Some(6));
    assert_eq!(flaky.backoffs, 5);
    // Never succeeds: exactly RDSEED_ATTEMPTS steps, a pause between each two.
    let mut broken = cpu(Some(None), None);
    assert_eq!(rdseed_u64(&mut broken), None);
    assert_eq!(
        broken.rdseed.as_ref().map(|i| i.steps),
        Some(RDSEED_ATTEMPTS)
    );
    assert_eq!(broken.backoffs, RDSEED_ATTEMPTS - 1);
    // A broken RDSEED falls back to RDRAND.
    assert_eq!(
        seed_csprng(None, &mut cpu(Some(None), Some(Some(0)))).1,
        EntropySource::Rdrand
    );
}

#[test]
fn rdrand_is_retried_ten_times() {
    let mut flaky = cpu(None, Some(Some(RDRAND_RETRIES - 1)));
    assert!(rdrand_u64(&mut flaky).is_some(), "success on the tenth try");
    let mut broken = cpu(None, Some(Some(RDRAND_RETRIES)));
    assert_eq!(
        rdrand_u64(&mut broken),
        None,
        "ten failures: the source failed"
    );
    assert_eq!(
        broken.rdrand.as_ref().map(|i| i.steps),
        Some(RDRAND_RETRIES)
    );
    let (_, source) = seed_csprng(None, &mut cpu(None, Some(None)));
    assert_eq!(source, EntropySource::TscJitter);
    // No instruction is executed when CPUID does not offer it.
    let mut absent = cpu(None, None);
    assert_eq!(rdrand_u64(&mut absent), None);
    assert_eq!(rdseed_u64(&mut absent), None);
}

#[test]
fn the_seed_depends_on_every_source() {
    let run = |virtio: Option<&[u8]>, rdrand_first: u64, tsc_step: u64| {
        let mut fake = cpu(None, Some(Some(0)));
        if let Some(rdrand) = fake.rdrand.as_mut() {
            rdrand.next = rdrand_first;
        }
        fake.tsc_step = tsc_step;
        output(&mut seed_csprng(virtio, &mut fake).0)
    };
    let base = run(Some(&[7u8; 32]), 1, 97);
    assert_eq!(
        base,
        run(Some(&[7u8; 32]), 1, 97),
        "the same inputs, the same seed"
    );
    assert_ne!(base, run(Some(&[8u8; 32]), 1, 97), "virtio bytes count");
    assert_ne!(
        base,
        run(Some(&[7u8; 32]), 2, 97),
        "RDRAND counts beside virtio"
    );
    assert_ne!(base, run(Some(&[7u8; 32]), 1, 98), "the TSC counts");
    assert_ne!(base, run(None, 1, 97), "no virtio bytes differ from some");
    assert_ne!(base, run(Some(&[7u8; 31]), 1, 97), "the length counts");
}

#[test]
fn two_boots_with_a_deterministic_clock_differ_only_with_a_real_source() {
    // `-icount`: the TSC repeats exactly; without RDRAND or virtio-rng the seed repeats too
    // (hence the loud warning), with either it does not.
    let weak = || output(&mut seed_csprng(None, &mut cpu(None, None)).0);
    assert_eq!(weak(), weak());
    let boot = |first: u64| {
        let mut fake = cpu(None, Some(Some(0)));
        if let Some(rdrand) = fake.rdrand.as_mut() {
            rdrand.next = first;
        }
        output(&mut seed_csprng(None, &mut fake).0)
    };
    assert_ne!(boot(1), boot(2));
}

#[test]
fn reseed_changes_the_stream_and_upgrades_the_source() {
    let (mut rng, source) = seed_csprng(None, &mut cpu(None, None));
    assert_eq!(source, EntropySource::TscJitter);
    let mut twin = rng.clone();
    rng.reseed(&[3u8; 16], true);
    assert_eq!(
        rng.source(),
        EntropySource::TscJitter,
        "16 bytes are not enough"
    );
    assert_ne!(output(&mut rng), output(&mut twin));
    rng.reseed(&[3u8; 32], true);
    assert_eq!(rng.source(), EntropySource::VirtioRng { bytes: 32 });
    assert_eq!(rng.reseeds(), 2);
    // The same reseed input on two generators in different states gives different streams
    // (the new key depends on the old state, not only on the input).
    let (mut a, _) = seed_csprng(Some(&[1u8; 32]), &mut cpu(None, None));
    let (mut b, _) = seed_csprng(Some(&[2u8; 32]), &mut cpu(None, None));
    a.reseed(&[9u8; 32], true);
    b.reseed(&[9u8; 32], true);
    assert_ne!(output(&mut a), output(&mut b));
}

#[test]
fn the_generator_looks_random_and_its_debug_hides_the_state() {
    let (mut rng, _) = seed_csprng(Some(&[0u8; 32]), &mut cpu(None, None));
    let mut bytes = vec![0u8; 4096];
    rng.fill_bytes(&mut bytes);
    let ones: u32 = bytes.iter().map(|byte| byte.count_ones()).sum();
    // 32768 bits: the mean is 16384, a standard deviation 90.5; 8 sigma is generous.
    assert!(
        (16384 - 724..16384 + 724).contains(&ones),
        "{ones} one bits"
    );
    assert_ne!(rng.next_u64(), rng.next_u64());
    let debug = format!("{rng:?}");
    assert!(debug.starts_with("Csprng { source: VirtioRng"), "{debug}");
    assert!(!debug.contains("rng:"), "{debug}");
}
