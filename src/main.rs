//! Vireo's kernel binary: the bring-up order, then the device search.
//!
//! Boot (`boot/entry.S`) enters `kernel_entry` in long mode on the kernel stack with the PVH
//! start info address. From there: console, start info and command line, GDT/TSS/IDT, page
//! tables and heap, clock, ACPI, local APIC and timer; then either the self test or PCI
//! enumeration and the virtio-net device.
#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch;
mod console;
mod devices;
mod hal;
mod mem;
mod net_loop;
mod pci;
mod selftest;

use core::arch::global_asm;

use vireo::config::{self, Config, LogLevel};

global_asm!(include_str!("../boot/entry.S"), options(att_syntax));

#[deny(unsafe_code)]
fn level_filter(level: LogLevel) -> log::LevelFilter {
    match level {
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
    }
}

/// Called by the boot code with the physical address of `hvm_start_info`. The exported symbol
/// is the only `unsafe` attribute here; the bring-up itself is in [`boot`].
#[unsafe(no_mangle)]
extern "C" fn kernel_entry(start_info_address: u32) -> ! {
    boot(start_info_address)
}

/// The bring-up order, then the network loop (see the module header). Safe code only: every
/// hardware access goes through the platform modules.
#[deny(unsafe_code)]
fn boot(start_info_address: u32) -> ! {
    console::init(log::LevelFilter::Info);
    println!("Vireo {} booting", env!("CARGO_PKG_VERSION"));

    let boot = match mem::read_boot_info(start_info_address) {
        Ok(boot) => boot,
        Err(error) => console::fatal(format_args!("boot info: {error}")),
    };
    let config: Config = config::parse(boot.cmdline(), |error| println!("cmdline: {error}"));
    if boot.cmdline_truncated {
        println!(
            "cmdline: longer than {} bytes; the rest is ignored",
            boot.cmdline().len()
        );
    }
    console::set_level(level_filter(config.log_level));

    arch::gdt::init();
    arch::interrupts::init();

    let memory = match mem::init(&boot) {
        Ok(summary) => summary,
        Err(error) => console::fatal(format_args!("memory: {error}")),
    };
    // ACPI first (quietly): the FADT names the PM timer that calibrates the clock.
    let acpi_tables = acpi::init(boot.rsdp_address);
    let pm_timer = acpi_tables
        .as_ref()
        .ok()
        .and_then(|info| info.pm_timer_port);
    let (tsc_hz, reference) = match arch::clock::init(pm_timer) {
        Ok(calibration) => calibration,
        Err(error) => console::fatal(format_args!("clock: {error}")),
    };
    log::info!(
        "memory: {} MiB RAM in {} regions; heap {} MiB at {:#x}; {} of {} page-table pages",
        boot.total_ram() >> 20,
        boot.regions().len(),
        memory.heap_size >> 20,
        memory.heap_start,
        memory.table_pages.0,
        memory.table_pages.1
    );
    log::info!(
        "clock: TSC {}.{:03} MHz (calibrated against {reference})",
        tsc_hz / 1_000_000,
        (tsc_hz / 1000) % 1000
    );
    log::info!(
        "cmdline: ip={} gw={} mode={} poll-window={}us log={}",
        DisplayIp(&config),
        DisplayGateway(config.gateway),
        config.mode,
        config.poll_window_us,
        config.log_level
    );

    let platform = match acpi_tables {
        Ok(info) => {
            log::info!(
                "acpi: MADT {} CPUs (APIC ids {:?}), {} IOAPICs, {} source overrides",
                info.cpu_count,
                &info.cpu_apic_ids[..info.cpu_count],
                info.ioapic_count,
                info.override_count
            );
            for ioapic in &info.ioapics[..info.ioapic_count] {
                log::info!(
                    "acpi: IOAPIC id {} at {:#x}, GSI base {}",
                    ioapic.id,
                    ioapic.address,
                    ioapic.gsi_base
                );
            }
            match info.ecam {
                Some(ecam) => log::info!(
                    "acpi: MCFG ECAM at {:#x} segment {} buses {}..={}",
                    ecam.base,
                    ecam.segment,
                    ecam.bus_start,
                    ecam.bus_end
                ),
                None => log::info!("acpi: no MCFG; PCI through ports 0xCF8/0xCFC"),
            }
            Some(info)
        }
        Err(error) => {
            log::warn!("acpi: {error}; continuing without MADT and MCFG");
            None
        }
    };

    let apic = match arch::apic::init() {
        Ok(apic) => apic,
        Err(error) => console::fatal(format_args!("local APIC: {error}")),
    };
    let timer_hz = match arch::apic::calibrate_timer() {
        Ok(hz) => hz,
        Err(error) => console::fatal(format_args!("APIC timer: {error}")),
    };
    log::info!(
        "apic: {} id {} version {:#x}; timer {} kHz input, one-shot (tickless); legacy PIC masked",
        if apic.x2apic { "x2APIC" } else { "xAPIC" },
        apic.id,
        apic.version,
        timer_hz / 1000
    );

    let hypervisor = arch::Hypervisor::detect();
    let pause = arch::init_spin_hint(hypervisor);
    log::info!(
        "cpu: hypervisor {hypervisor}; busy-wait hint {}",
        if pause {
            "PAUSE"
        } else {
            "none (PAUSE would take QEMU's global lock under TCG)"
        }
    );

    if config.selftest {
        selftest::run();
    }

    // Leaked: the NIC's recovery path needs configuration access for the rest of the run.
    let config_space: &'static pci::PlatformConfig =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(pci::PlatformConfig::new(
            platform.and_then(|info| info.ecam),
        )));
    let enumeration = ::pci::enumerate_with_errors(config_space);
    log::info!(
        "pci: {} functions through {}",
        enumeration.functions.len(),
        config_space.describe()
    );
    for function in &enumeration.functions {
        log::info!("pci: {function}");
    }
    for error in &enumeration.errors {
        log::warn!("pci: {error}");
    }
    let random = arch::entropy::boot_unique_u64().to_le_bytes();
    let mut options = virtio::net::NetOptions {
        mac: config.mac,
        fallback_mac: virtio::net::locally_administered_mac([
            random[0], random[1], random[2], random[3], random[4], random[5],
        ]),
        // The driver verifies what the device does not vouch for, so the stack skips the
        // TCP/UDP checksum (see `vireo::net::device::Nic::rx_checksums_verified`).
        rx_checksums: virtio::net::RxChecksums::VerifyUnvouched,
        ..virtio::net::NetOptions::default()
    };
    let mut devices = devices::bring_up(
        config_space,
        &enumeration.functions,
        platform.as_ref(),
        devices::DeviceOptions {
            net: options,
            blk_check: config.blk_check,
        },
    );
    // The CSPRNG's seed: the first entropy device's answer, if there is one (the others still
    // count in the stats); then RDSEED, RDRAND, TSC jitter (`arch::entropy`).
    let virtio_seed = devices.rngs.first_mut().map(devices::rng::seed_bytes);
    let (mut csprng, _) = arch::entropy::seed_kernel_csprng(virtio_seed.as_deref());
    // The CSPRNG stays with the devices: the entropy device reseeds it while the kernel runs.
    let secrets = vireo::net::isn::NetSecrets::draw(&mut csprng);
    devices::register(
        config_space,
        core::mem::take(&mut devices.blks),
        core::mem::take(&mut devices.rngs),
        csprng,
    );
    if devices.nets.is_empty() {
        let net_failure = devices
            .failed
            .iter()
            .find(|(_, device_type, _)| *device_type == virtio::transport::DeviceType::NET);
        match net_failure {
            Some((_, _, error)) => console::fatal(format_args!("{error}")),
            None => console::fatal(format_args!(
                "no virtio-net device found ({} PCI functions scanned)",
                devices.scanned
            )),
        }
    }
    let nic = devices.nets.remove(0);
    let net = &nic.net;
    log::info!(
        "virtio-net: offered features {:#018x}: {}",
        net.offered_features(),
        devices::net_feature_names(net.offered_features())
    );
    log::info!(
        "virtio-net: negotiated features {:#018x}: {}",
        net.features(),
        devices::net_feature_names(net.features())
    );
    if net.features() & virtio::spec::Features::ACCESS_PLATFORM.bits() != 0 {
        log::info!(
            "virtio-net: ACCESS_PLATFORM negotiated: the device uses platform DMA addresses, which here are guest-physical (no IOMMU is programmed; identity mapping)"
        );
    }
    let mac = net.mac();
    if let Some(rejected) = net.rejected_device_mac() {
        log::warn!(
            "virtio-net: the device's MAC {} is not a station address (zero or multicast); not used",
            config::MacDisplay(rejected)
        );
    }
    log::info!(
        "virtio-net: {} MAC {}",
        nic.function.address,
        config::MacDisplay(mac)
    );
    log::info!(
        "virtio-net: MAC origin: {}; {}",
        match net.mac_origin() {
            virtio::net::MacOrigin::Device => "the device's",
            virtio::net::MacOrigin::Requested => "from mac=",
            virtio::net::MacOrigin::Generated => "generated, locally administered",
        },
        match net.mac_programming() {
            virtio::net::MacProgramming::DeviceDefault => "the device filters on it",
            virtio::net::MacProgramming::AddressSet => "set with VIRTIO_NET_CTRL_MAC_ADDR_SET",
            virtio::net::MacProgramming::FilterTable =>
                "added to the device's filter with VIRTIO_NET_CTRL_MAC_TABLE_SET",
            virtio::net::MacProgramming::NotTold => "the device could not be told",
        }
    );
    log::info!("virtio-net: receive filter: {}", net.rx_filter());
    log::info!(
        "virtio-net: MTU {}, queues rx {} tx {}, {} receive buffers of {} B, link {}",
        net.mtu(),
        net.queue_sizes().0,
        net.queue_sizes().1,
        net.rx_buffers().0,
        net.rx_buffers().1,
        if net.link_up() { "up" } else { "down" }
    );
    let mut config = config;
    if nic.interrupts == devices::InterruptPath::Polling && config.mode != vireo::config::Mode::Poll
    {
        log::warn!(
            "net: no interrupt path to the NIC; mode={} becomes mode=poll",
            config.mode
        );
        config.mode = vireo::config::Mode::Poll;
    }
    let (function, path) = (nic.function, nic.interrupts);
    // A device reset must bring back the same address (a generated one included).
    options.mac = Some(mac);
    let reinit: devices::Reinit =
        alloc::boxed::Box::new(move || devices::reinit_net(config_space, &function, path, options));
    net_loop::run(
        net_loop::nic::KernelNic::new(
            nic.net,
            reinit,
            config.inject_reset_every,
            nic.irq,
            path.config_interrupts(),
        ),
        mac,
        &config,
        nic.irq,
        secrets,
    )
}

struct DisplayIp<'a>(&'a Config);

#[deny(unsafe_code)]
impl core::fmt::Display for DisplayIp<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0.dhcp {
            f.write_str("dhcp")
        } else {
            write!(f, "{}", self.0.ip)
        }
    }
}

struct DisplayGateway(Option<core::net::Ipv4Addr>);

#[deny(unsafe_code)]
impl core::fmt::Display for DisplayGateway {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(gateway) => write!(f, "{gateway}"),
            None => f.write_str("none"),
        }
    }
}
