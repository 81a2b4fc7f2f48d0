//! The kernel's entropy: where the boot seed comes from, how it is condensed, and the CSPRNG
//! everything random is drawn from (smoltcp's seed, the TCP ISN key of [`crate::net::isn`]).
//!
//! * **Sources, best first**: bytes from a virtio entropy device (§5.4 of the virtio
//!   specification; the driver is `virtio::rng`), else RDSEED, else RDRAND (each offered
//!   only when CPUID says so; Intel SDM vol. 1 §7.3.17 and vol. 2 "RDRAND"/"RDSEED"), else
//!   the jitter of the time-stamp counter, which is *weak*: under an emulator with a
//!   deterministic clock (QEMU `-icount`) it is predictable, and the boot log says so loudly
//!   (`entropy: weak (TSC jitter only)`).
//! * **Retries** follow the SDM's advice: RDRAND is retried up to [`RDRAND_RETRIES`] times
//!   (a failure after ten means the generator is broken), RDSEED, which fails while its
//!   conditioner refills, up to [`RDSEED_ATTEMPTS`] times with a pause between attempts.
//! * **Condensing**: every source that answers is hashed into one SHA-256 pool (the best one
//!   names the seed; the others are mixed in too, so a hostile virtio device that returns
//!   constant bytes cannot make the seed worse than RDRAND or the TSC alone would). The
//!   256-bit digest keys [`Csprng`], ChaCha20 from the `rand_chacha` crate: no cipher is
//!   written here.
//! * **Reseeding** ([`Csprng::reseed`]) hashes 32 bytes of the current generator with the new
//!   input into a fresh key, so later virtio-rng bytes can only add to what is there.
//!
//! The instructions themselves live in the kernel binary (`src/arch/entropy.rs`) behind the
//! [`CpuEntropy`] trait (docs/design.md principle 3), so the policy here is host-tested
//! against fakes.

use core::fmt;

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};

/// RDRAND attempts per 64-bit value before the source counts as failed (Intel SDM vol. 1
/// §7.3.17.1 and Intel's DRNG software implementation guide: ten retries).
pub const RDRAND_RETRIES: u32 = 10;

/// RDSEED attempts per 64-bit value, with [`CpuEntropy::backoff`] between them (RDSEED may
/// fail while its entropy conditioner refills; the SDM advises retrying after a pause).
pub const RDSEED_ATTEMPTS: u32 = 100;

/// Bytes from a virtio entropy device needed to call it the seed's source (256 bits).
pub const MIN_VIRTIO_BYTES: usize = 32;

/// TSC samples taken for the jitter fallback (and mixed in with every other source).
pub const TSC_SAMPLES: usize = 256;

/// 64-bit words drawn from RDSEED or RDRAND (256 bits).
const HARDWARE_WORDS: usize = 4;

/// The CPU's entropy instructions and clock, as the kernel provides them.
pub trait CpuEntropy {
    /// Whether RDSEED exists (CPUID.(EAX=7,ECX=0):EBX bit 18).
    fn has_rdseed(&self) -> bool;
    /// One RDSEED: the value when the carry flag said it is valid.
    fn rdseed_step(&mut self) -> Option<u64>;
    /// Whether RDRAND exists (CPUID.1:ECX bit 30).
    fn has_rdrand(&self) -> bool;
    /// One RDRAND: the value when the carry flag said it is valid.
    fn rdrand_step(&mut self) -> Option<u64>;
    /// The time-stamp counter.
    fn tsc(&mut self) -> u64;
    /// A short pause between RDSEED attempts.
    fn backoff(&mut self);
}

/// Where the seed came from: the best source that answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntropySource {
    /// A virtio entropy device gave this many bytes (at least [`MIN_VIRTIO_BYTES`]).
    VirtioRng {
        /// Bytes it gave.
        bytes: usize,
    },
    /// The CPU's RDSEED instruction.
    Rdseed,
    /// The CPU's RDRAND instruction.
    Rdrand,
    /// Only the jitter of the TSC: weak.
    TscJitter,
}

impl EntropySource {
    /// Whether the seed is weak (an observer who knows the boot could predict it).
    pub fn is_weak(self) -> bool {
        self == Self::TscJitter
    }
}

impl fmt::Display for EntropySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VirtioRng { bytes } => write!(f, "virtio-rng ({bytes} bytes)"),
            Self::Rdseed => f.write_str("RDSEED"),
            Self::Rdrand => f.write_str("RDRAND"),
            Self::TscJitter => f.write_str("TSC jitter only"),
        }
    }
}

/// One 64-bit value from RDSEED, retried with a pause as the SDM advises; `None` when the CPU
/// lacks it or it failed [`RDSEED_ATTEMPTS`] times.
pub fn rdseed_u64(cpu: &mut impl CpuEntropy) -> Option<u64> {
    if !cpu.has_rdseed() {
        return None;
    }
    for attempt in 0..RDSEED_ATTEMPTS {
        if let Some(value) = cpu.rdseed_step() {
            return Some(value);
        }
        if attempt + 1 < RDSEED_ATTEMPTS {
            cpu.backoff();
        }
    }
    None
}

/// One 64-bit value from RDRAND, retried up to [`RDRAND_RETRIES`] times; `None` when the CPU
/// lacks it or it kept failing.
pub fn rdrand_u64(cpu: &mut impl CpuEntropy) -> Option<u64> {
    if !cpu.has_rdrand() {
        return None;
    }
    (0..RDRAND_RETRIES).find_map(|_| cpu.rdrand_step())
}

/// [`HARDWARE_WORDS`] values from `draw`, or `None` if any of them failed.
fn hardware_words(mut draw: impl FnMut() -> Option<u64>) -> Option<[u64; HARDWARE_WORDS]> {
    let mut words = [0u64; HARDWARE_WORDS];
    for word in &mut words {
        *word = draw()?;
    }
    Some(words)
}

/// Hashes [`TSC_SAMPLES`] TSC readings, each after hashing the previous one (the work
/// between readings varies with caches, interrupts and the host's scheduling: that variation
/// is the only entropy, and under a deterministic emulated clock there is none).
fn mix_tsc_jitter(pool: &mut Sha256, cpu: &mut impl CpuEntropy) {
    let mut last = cpu.tsc();
    for _ in 0..TSC_SAMPLES {
        let now = cpu.tsc();
        pool.update(now.to_le_bytes());
        pool.update(now.wrapping_sub(last).to_le_bytes());
        last = now;
    }
}

/// Collects the boot seed: `virtio_rng` (bytes a virtio entropy device gave, if any), RDSEED
/// or RDRAND when the CPU has them, and the TSC, all hashed together; returns the CSPRNG and
/// the best source, and logs it (`entropy: seeded from ...`, or a warning for the weak
/// fallback).
pub fn seed_csprng(
    virtio_rng: Option<&[u8]>,
    cpu: &mut impl CpuEntropy,
) -> (Csprng, EntropySource) {
    let mut pool = Sha256::new();
    pool.update(b"vireo entropy v1: boot seed");
    let virtio = virtio_rng.unwrap_or(&[]);
    pool.update((virtio.len() as u64).to_le_bytes());
    pool.update(virtio);
    let rdseed = hardware_words(|| rdseed_u64(cpu));
    // RDRAND is drawn even when RDSEED answered: it costs nothing and adds a second source.
    let rdrand = hardware_words(|| rdrand_u64(cpu));
    for (tag, words) in [(b"rdseed", rdseed), (b"rdrand", rdrand)] {
        if let Some(words) = words {
            pool.update(tag);
            for word in words {
                pool.update(word.to_le_bytes());
            }
        }
    }
    mix_tsc_jitter(&mut pool, cpu);
    let source = if virtio.len() >= MIN_VIRTIO_BYTES {
        EntropySource::VirtioRng {
            bytes: virtio.len(),
        }
    } else if rdseed.is_some() {
        EntropySource::Rdseed
    } else if rdrand.is_some() {
        EntropySource::Rdrand
    } else {
        EntropySource::TscJitter
    };
    log_source(source, virtio.len());
    (Csprng::new(pool.finalize().into(), source), source)
}

/// The boot log line naming the source.
fn log_source(source: EntropySource, virtio_bytes: usize) {
    if source.is_weak() {
        log::warn!(
            "entropy: weak (TSC jitter only): no virtio-rng, RDSEED or RDRAND; TCP sequence numbers and ports are predictable to anyone who can replay this boot"
        );
    } else {
        log::info!("entropy: seeded from {source}");
    }
    if virtio_bytes > 0 && virtio_bytes < MIN_VIRTIO_BYTES {
        log::warn!("entropy: virtio-rng gave only {virtio_bytes} bytes (mixed in, not relied on)");
    }
}

/// A cryptographically secure generator: ChaCha20 (RFC 8439's cipher as a stream of
/// pseudorandom bytes, `rand_chacha`), keyed from the entropy pool.
#[derive(Clone)]
pub struct Csprng {
    rng: ChaCha20Rng,
    source: EntropySource,
    reseeds: u64,
}

impl Csprng {
    /// A generator keyed with `seed` (256 bits from a pool), recording its `source`.
    pub fn new(seed: [u8; 32], source: EntropySource) -> Self {
        Self {
            rng: ChaCha20Rng::from_seed(seed),
            source,
            reseeds: 0,
        }
    }

    /// Fills `out` with random bytes.
    pub fn fill_bytes(&mut self, out: &mut [u8]) {
        self.rng.fill_bytes(out);
    }

    /// A random 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// A random 32-bit value.
    pub fn next_u32(&mut self) -> u32 {
        self.rng.next_u32()
    }

    /// Mixes `input` (e.g. later bytes from a virtio entropy device) into the generator: the
    /// new key is SHA-256 of 32 bytes of the current output and `input`, so whatever `input`
    /// is, the generator is no weaker than before. With at least [`MIN_VIRTIO_BYTES`] of
    /// `input` from virtio-rng (`from_virtio`), a weaker recorded source is upgraded.
    pub fn reseed(&mut self, input: &[u8], from_virtio: bool) {
        let mut current = [0u8; 32];
        self.rng.fill_bytes(&mut current);
        let mut pool = Sha256::new();
        pool.update(b"vireo entropy v1: reseed");
        pool.update(current);
        pool.update((input.len() as u64).to_le_bytes());
        pool.update(input);
        self.rng = ChaCha20Rng::from_seed(pool.finalize().into());
        self.reseeds += 1;
        if from_virtio
            && input.len() >= MIN_VIRTIO_BYTES
            && !matches!(self.source, EntropySource::VirtioRng { .. })
        {
            self.source = EntropySource::VirtioRng { bytes: input.len() };
        }
    }

    /// The best source mixed in so far.
    pub fn source(&self) -> EntropySource {
        self.source
    }

    /// Reseeds so far.
    pub fn reseeds(&self) -> u64 {
        self.reseeds
    }
}

impl fmt::Debug for Csprng {
    /// Never prints the state.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Csprng")
            .field("source", &self.source)
            .field("reseeds", &self.reseeds)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
