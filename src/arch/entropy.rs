//! The CPU's entropy instructions for [`vireo::entropy`]: RDSEED and RDRAND (each only when
//! CPUID offers it: RDSEED is CPUID.(EAX=7,ECX=0):EBX bit 18, RDRAND CPUID.1:ECX bit 30;
//! Intel SDM vol. 2, "RDSEED" and "RDRAND"), the TSC, and the pause between RDSEED retries.
//! One attempt per call; the retry policy lives in the library, where it is host-tested.

use vireo::entropy::CpuEntropy;

/// The boot CPU's entropy instructions, as CPUID reports them.
pub struct HardwareEntropy {
    rdseed: bool,
    rdrand: bool,
}

impl HardwareEntropy {
    /// Reads CPUID.
    pub fn detect() -> Self {
        let (max_leaf, _, _, _) = super::cpuid(0);
        let (_, _, features_ecx, _) = super::cpuid(1);
        let rdseed = max_leaf >= 7 && super::cpuid(7).1 & (1 << 18) != 0;
        Self {
            rdseed,
            rdrand: features_ecx & (1 << 30) != 0,
        }
    }
}

impl CpuEntropy for HardwareEntropy {
    fn has_rdseed(&self) -> bool {
        self.rdseed
    }

    fn rdseed_step(&mut self) -> Option<u64> {
        if !self.rdseed {
            return None;
        }
        let value: u64;
        let ok: u8;
        // SAFETY: CPUID.(EAX=7,ECX=0):EBX bit 18 says RDSEED exists (checked in `detect`, and
        // `self.rdseed` is set only there). It writes only the named output register and the
        // flags, and touches no memory or stack.
        unsafe {
            core::arch::asm!(
                "rdseed {value}",
                "setc {ok}",
                value = out(reg) value,
                ok = out(reg_byte) ok,
                options(nomem, nostack),
            );
        }
        (ok != 0).then_some(value)
    }

    fn has_rdrand(&self) -> bool {
        self.rdrand
    }

    fn rdrand_step(&mut self) -> Option<u64> {
        if !self.rdrand {
            return None;
        }
        let value: u64;
        let ok: u8;
        // SAFETY: CPUID.1:ECX bit 30 says RDRAND exists (checked in `detect`). It writes only
        // the named output register and the flags, and touches no memory or stack.
        unsafe {
            core::arch::asm!(
                "rdrand {value}",
                "setc {ok}",
                value = out(reg) value,
                ok = out(reg_byte) ok,
                options(nomem, nostack),
            );
        }
        (ok != 0).then_some(value)
    }

    fn tsc(&mut self) -> u64 {
        super::rdtsc()
    }

    fn backoff(&mut self) {
        // The SDM's advice for RDSEED is a short PAUSE loop between attempts. Under TCG PAUSE
        // is costly (see `super::init_spin_hint`), and `spin_hint` then skips it; a few loop
        // iterations still let the conditioner refill on hardware.
        for _ in 0..64 {
            super::spin_hint();
        }
    }
}

/// Seeds the kernel's CSPRNG from `virtio_rng` (bytes a virtio entropy device gave, if any),
/// else RDSEED, else RDRAND, else TSC jitter, and logs the source (`entropy: seeded from
/// ...` or `entropy: weak (TSC jitter only)`). The caller keeps the generator and draws
/// from it (smoltcp's seed and the TCP ISN key: [`vireo::net::isn::NetSecrets::draw`]).
pub fn seed_kernel_csprng(
    virtio_rng: Option<&[u8]>,
) -> (vireo::entropy::Csprng, vireo::entropy::EntropySource) {
    vireo::entropy::seed_csprng(virtio_rng, &mut HardwareEntropy::detect())
}

/// 64 bits that differ from boot to boot, for identifiers that must not collide (the generated
/// MAC, drawn before any entropy device is up), not for secrets: RDSEED, else RDRAND (the
/// library's retry policy), else the TSC stirred by splitmix64's finalizer. Logs nothing: the
/// `entropy:` line belongs to the CSPRNG's seeding.
pub fn boot_unique_u64() -> u64 {
    let mut cpu = HardwareEntropy::detect();
    if let Some(value) =
        vireo::entropy::rdseed_u64(&mut cpu).or_else(|| vireo::entropy::rdrand_u64(&mut cpu))
    {
        return value;
    }
    let mut mixed = cpu.tsc().wrapping_add(0x9e37_79b9_7f4a_7c15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}
