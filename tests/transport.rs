//! Virtio PCI transport tests (issue 3, "Integration (QEMU)"): the kernel boots with a
//! virtio-net NIC in each layout QEMU produces (q35 modern-only and transitional, pc
//! transitional, `page-per-vq=on`, `modern-pio-notify=on`, 4 GiB RAM, a custom `mac=`, a
//! virtio-balloon beside the NIC) and must log the function it drives, the four regions its
//! capability walk located, the offered and negotiated features and the MAC from device config.
//!
//! The log is parsed, not grepped: every region must lie inside the BAR that the `pci:` line
//! lists for that function (BAR index, offset and length against the BAR's base and size), its
//! resolved address must be the BAR base plus the offset, the negotiated features must be a
//! subset of the offered ones, and so on. Each test waits for the MAC line, then kills QEMU
//! itself: what the kernel does after the MAC line (and its exit status) is not checked here.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use common::{LINE_WAIT, boot_command, kernel};
use xtask::{Machine, QemuCommand, RunError};

/// QEMU's default MAC for the first NIC (`qemu_macaddr_default_if_unset`).
const QEMU_DEFAULT_MAC: &str = "52:54:00:12:34:56";
/// The virtio PCI vendor id (4.1.2).
const VIRTIO_VENDOR: u16 = 0x1af4;
/// Feature bit numbers the checks use (6, 5.1.3).
const VIRTIO_F_VERSION_1: u32 = 32;
const VIRTIO_NET_F_MAC: u32 = 5;
/// Minimum structure lengths: `virtio_pci_common_cfg` up to `queue_device` (4.1.4.3), one ISR
/// byte (4.1.4.5), a 16-bit doorbell write (4.1.4.4) and the 6-byte `mac` (5.1.4).
const MIN_COMMON_LEN: u64 = 0x38;
const MIN_ISR_LEN: u64 = 1;
const MIN_NOTIFY_LEN: u64 = 2;
const MIN_NET_DEVICE_LEN: u64 = 6;

// ---------------------------------------------------------------------------------------------
// What a scenario expects.

/// Where the chosen notify structure lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Space {
    Memory,
    Io,
}

/// A virtio function that must be identified and left alone beside the NIC.
#[derive(Clone, Copy, Debug)]
struct Bystander {
    /// The `-device` spec.
    device: &'static str,
    /// The type name the kernel logs.
    type_name: &'static str,
    /// Its PCI device id.
    device_id: u16,
    /// `modern` or `transitional`.
    flavor: &'static str,
}

/// One QEMU layout and what the kernel must log for it.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    machine: Machine,
    memory_mib: u64,
    /// Appended to `virtio-net-pci,netdev=n0`.
    nic_options: &'static str,
    /// The NIC's PCI device id (0x1041 modern, 0x1000 transitional).
    device_id: u16,
    /// `modern` or `transitional`.
    flavor: &'static str,
    notify_space: Space,
    notify_off_multiplier: u32,
    mac: &'static str,
    bystanders: &'static [Bystander],
}

impl Scenario {
    const fn q35(nic_options: &'static str) -> Scenario {
        Scenario {
            machine: Machine::Q35,
            memory_mib: 128,
            nic_options,
            device_id: 0x1000,
            flavor: "transitional",
            notify_space: Space::Memory,
            notify_off_multiplier: 4,
            mac: QEMU_DEFAULT_MAC,
            bystanders: &[],
        }
    }

    fn command(&self) -> Result<QemuCommand, RunError> {
        let mut command = QemuCommand::for_kernel(kernel())
            .map_err(RunError::setup)?
            .machine(self.machine)
            .memory_mib(self.memory_mib)
            .smp(1)
            .netdev("user,id=n0")
            .device(format!("virtio-net-pci,netdev=n0{}", self.nic_options));
        for bystander in self.bystanders {
            command = command.device(bystander.device);
        }
        Ok(command)
    }
}

/// Boots `scenario`, waits for the MAC line (and each bystander's identification line), kills
/// QEMU and checks the log up to the MAC line.
fn run(scenario: Scenario) -> Result<(), RunError> {
    let mut guest = boot_command(&scenario.command()?)?;
    let mac_line = guest.wait_for_line_matching(
        "the virtio-net MAC line `virtio-net: <pci address> MAC <mac>`",
        LINE_WAIT,
        |line| parse_mac_line(line).is_some(),
    )?;
    for bystander in scenario.bystanders {
        guest.wait_for_line_matching(
            &format!("the identification line of {}", bystander.type_name),
            LINE_WAIT,
            |line| parse_identification(line).is_some_and(|id| id.type_name == bystander.type_name),
        )?;
    }
    guest.kill();
    let lines: Vec<String> = guest.lines().into_iter().map(|line| line.text).collect();
    let summary = check_log(&scenario, &lines).map_err(|problem| guest.check_failed(problem))?;
    println!(
        "MAC line after {:.3} s\n{summary}",
        mac_line.at.as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The tests: one QEMU each.

/// q35, `disable-legacy=on`: a modern-only device (1af4:1041) without an I/O BAR.
#[test]
fn q35_modern_only_regions_inside_bars_features_and_mac() -> Result<(), RunError> {
    run(Scenario {
        device_id: 0x1041,
        flavor: "modern",
        ..Scenario::q35(",disable-legacy=on")
    })
}

/// q35, plain `virtio-net-pci`: a transitional device (1af4:1000) driven through its modern
/// capabilities.
#[test]
fn q35_transitional_driven_through_modern_capabilities() -> Result<(), RunError> {
    run(Scenario::q35(""))
}

/// pc (i440FX, config through ports 0xCF8/0xCFC), plain `virtio-net-pci`.
#[test]
fn pc_transitional_driven_through_modern_capabilities() -> Result<(), RunError> {
    run(Scenario {
        machine: Machine::Pc,
        ..Scenario::q35("")
    })
}

/// `page-per-vq=on`: one page per queue doorbell, so `notify_off_multiplier` is 4096.
#[test]
fn page_per_vq_gives_notify_multiplier_4096() -> Result<(), RunError> {
    run(Scenario {
        notify_off_multiplier: 4096,
        ..Scenario::q35(",page-per-vq=on")
    })
}

/// `modern-pio-notify=on`: the chosen notify structure is the I/O-port one, multiplier 0.
#[test]
fn modern_pio_notify_uses_io_port_doorbell() -> Result<(), RunError> {
    run(Scenario {
        notify_space: Space::Io,
        notify_off_multiplier: 0,
        ..Scenario::q35(",modern-pio-notify=on")
    })
}

/// 4 GiB of RAM (memory above 4 GiB, a smaller PCI hole below it).
#[test]
fn q35_4gib_ram_regions_inside_bars_features_and_mac() -> Result<(), RunError> {
    run(Scenario {
        memory_mib: 4096,
        ..Scenario::q35("")
    })
}

/// A custom `mac=` is what the kernel reads from device config.
#[test]
fn custom_mac_is_read_from_device_config() -> Result<(), RunError> {
    run(Scenario {
        mac: "52:54:00:ab:cd:ef",
        ..Scenario::q35(",mac=52:54:00:ab:cd:ef")
    })
}

/// A virtio device Vireo has no driver for (a memory balloon) beside the NIC is enumerated,
/// identified as virtio-balloon and left alone. (virtio-rng, the bystander of earlier issues,
/// is now driven: `tests/devices.rs`.)
#[test]
fn virtio_balloon_beside_nic_is_identified_and_left_alone() -> Result<(), RunError> {
    run(Scenario {
        bystanders: &[Bystander {
            device: "virtio-balloon-pci",
            type_name: "virtio-balloon",
            device_id: 0x1002,
            flavor: "transitional",
        }],
        ..Scenario::q35("")
    })
}

// ---------------------------------------------------------------------------------------------
// Checking a log.

/// Checks the log of `scenario` up to its first MAC line. Returns a summary of what was
/// verified, or what is wrong.
fn check_log(scenario: &Scenario, all_lines: &[String]) -> Result<String, String> {
    let mac_index = all_lines
        .iter()
        .position(|line| parse_mac_line(line).is_some())
        .ok_or("no `virtio-net: <pci address> MAC <mac>` line")?;
    // Only what precedes the MAC line is part of the contract checked here.
    let lines = &all_lines[..=mac_index];
    let mut summary = String::new();

    // The lspci-like table.
    let mut functions: BTreeMap<String, PciFunction> = BTreeMap::new();
    for line in lines {
        if let Some(function) = parse_pci_function(line)? {
            if functions.contains_key(&function.address) {
                return Err(format!("function {} listed twice", function.address));
            }
            functions.insert(function.address.clone(), function);
        }
    }
    if functions.is_empty() {
        return Err("no `pci: <address> <vendor>:<device> ...` lines".to_string());
    }

    // Identification: exactly one driven function, the expected NIC; every virtio function
    // of the table identified exactly once.
    let identifications: Vec<Identification> = all_lines
        .iter()
        .filter_map(|line| parse_identification(line))
        .collect();
    let driven: Vec<&Identification> = identifications
        .iter()
        .filter(|id| id.verdict == "driving it")
        .collect();
    let [nic] = driven.as_slice() else {
        return Err(format!(
            "expected exactly one `virtio: ... : driving it` line, found {}",
            driven.len()
        ));
    };
    check_identity(
        nic,
        "virtio-net",
        scenario.device_id,
        scenario.flavor,
        &functions,
    )?;
    let nic_function = &functions[&nic.address];
    if nic_function.class != "02.00.00" {
        return Err(format!(
            "the driven function {} has class {}, not 02.00.00 (ethernet)",
            nic.address, nic_function.class
        ));
    }
    for function in functions.values().filter(|f| f.vendor == VIRTIO_VENDOR) {
        let count = identifications
            .iter()
            .filter(|id| id.address == function.address)
            .count();
        if count != 1 {
            return Err(format!(
                "virtio function {} is identified by {count} `virtio:` lines, expected 1",
                function.address
            ));
        }
    }
    let _ = writeln!(
        summary,
        "driving {} {} ({:04x}:{:04x}, {}), BARs: {}",
        nic.address, nic.type_name, nic.vendor, nic.device_id, nic.flavor, nic_function.bars_text
    );

    // Bystanders: identified, and left alone.
    for bystander in scenario.bystanders {
        let id = identifications
            .iter()
            .find(|id| id.type_name == bystander.type_name)
            .ok_or_else(|| format!("no `virtio: ` line identifies {}", bystander.type_name))?;
        check_identity(
            id,
            bystander.type_name,
            bystander.device_id,
            bystander.flavor,
            &functions,
        )?;
        if id.address == nic.address {
            return Err(format!(
                "{} has the driven NIC's address",
                bystander.type_name
            ));
        }
        if !id.verdict.ends_with("left alone") {
            return Err(format!(
                "{} at {}: verdict {:?}, expected it to be left alone",
                id.type_name, id.address, id.verdict
            ));
        }
        let _ = writeln!(
            summary,
            "{} {} ({:04x}:{:04x}, {}): {}",
            id.address, id.type_name, id.vendor, id.device_id, id.flavor, id.verdict
        );
    }

    // The located regions: one per cfg_type, each inside its BAR.
    let regions: Vec<Region> = lines
        .iter()
        .filter_map(|line| parse_region(line).transpose())
        .collect::<Result<_, _>>()?;
    let mut cap_offsets = Vec::new();
    for cfg_type in 1..=4u8 {
        let of_type: Vec<&Region> = regions.iter().filter(|r| r.cfg_type == cfg_type).collect();
        let [region] = of_type.as_slice() else {
            return Err(format!(
                "expected exactly one region line with cfg_type {cfg_type}, found {}",
                of_type.len()
            ));
        };
        check_region(region, nic_function, scenario)?;
        if cap_offsets.contains(&region.cap) {
            return Err(format!(
                "two regions come from the same capability at {:#x}",
                region.cap
            ));
        }
        cap_offsets.push(region.cap);
        let _ = writeln!(
            summary,
            "cfg_type {} {}: cap {:#04x}, BAR{} +{:#x} len {:#x} at {} {:#x}{} (BAR{} {})",
            region.cfg_type,
            region.name,
            region.cap,
            region.bar,
            region.offset,
            region.length,
            if region.space == Space::Io {
                "port"
            } else {
                "mem"
            },
            region.address,
            region
                .notify_off_multiplier
                .map(|m| format!(", notify_off_multiplier {m}"))
                .unwrap_or_default(),
            region.bar,
            nic_function
                .bar(region.bar)
                .map(Bar::describe)
                .unwrap_or_default(),
        );
    }
    if regions.len() != 4 {
        return Err(format!(
            "expected 4 region lines, found {}: {regions:?}",
            regions.len()
        ));
    }

    // Features.
    let offered = single_feature_line(lines, "offered")?;
    let negotiated = single_feature_line(lines, "negotiated")?;
    if negotiated.bits & !offered.bits != 0 {
        return Err(format!(
            "negotiated {:#018x} has bits {:#018x} the device did not offer ({:#018x})",
            negotiated.bits,
            negotiated.bits & !offered.bits,
            offered.bits
        ));
    }
    for name in &negotiated.names {
        if !offered.names.contains(name) {
            return Err(format!("negotiated {name} is not among the offered names"));
        }
    }
    for (bit, name) in [(VIRTIO_F_VERSION_1, "VERSION_1"), (VIRTIO_NET_F_MAC, "MAC")] {
        if negotiated.bits & (1 << bit) == 0 || !negotiated.names.iter().any(|n| n == name) {
            return Err(format!(
                "{name} (bit {bit}) is not negotiated: {:#018x} {:?}",
                negotiated.bits, negotiated.names
            ));
        }
    }
    let _ = writeln!(
        summary,
        "offered {:#018x} ({}), negotiated {:#018x} ({})",
        offered.bits,
        offered.names.join(" "),
        negotiated.bits,
        negotiated.names.join(" ")
    );

    // The MAC from device config.
    let (address, mac) = parse_mac_line(&lines[mac_index]).ok_or("unparsable MAC line")?;
    if address != nic.address {
        return Err(format!(
            "the MAC line names {address}, but the driven function is {}",
            nic.address
        ));
    }
    if mac != scenario.mac {
        return Err(format!("MAC {mac}, expected {}", scenario.mac));
    }
    let _ = write!(summary, "MAC {mac}");
    Ok(summary)
}

/// Checks an identification line against the expected type and ids and against the `pci:`
/// line of its function.
fn check_identity(
    id: &Identification,
    type_name: &str,
    device_id: u16,
    flavor: &str,
    functions: &BTreeMap<String, PciFunction>,
) -> Result<(), String> {
    if id.type_name != type_name
        || id.vendor != VIRTIO_VENDOR
        || id.device_id != device_id
        || id.flavor != flavor
    {
        return Err(format!(
            "{} identified as {} ({:04x}:{:04x}, {}), expected {type_name} \
             ({VIRTIO_VENDOR:04x}:{device_id:04x}, {flavor})",
            id.address, id.type_name, id.vendor, id.device_id, id.flavor
        ));
    }
    let function = functions
        .get(&id.address)
        .ok_or_else(|| format!("{} ({type_name}) is not in the `pci:` table", id.address))?;
    if (function.vendor, function.device) != (id.vendor, id.device_id) {
        return Err(format!(
            "{}: the `pci:` line says {:04x}:{:04x}, the `virtio:` line {:04x}:{:04x}",
            id.address, function.vendor, function.device, id.vendor, id.device_id
        ));
    }
    Ok(())
}

/// Checks one located region against the BAR of the driven function it claims to be in.
fn check_region(
    region: &Region,
    function: &PciFunction,
    scenario: &Scenario,
) -> Result<(), String> {
    let expected_name = match region.cfg_type {
        1 => "common config",
        2 => "notify",
        3 => "ISR",
        _ => "device config",
    };
    let context = format!(
        "cfg_type {} region `{}` (cap {:#x}, BAR{} +{:#x} len {:#x})",
        region.cfg_type, region.name, region.cap, region.bar, region.offset, region.length
    );
    if region.name != expected_name {
        return Err(format!("{context}: expected the name {expected_name:?}"));
    }
    // Vendor capabilities sit after the 64-byte header, dword-aligned (PCI 6.7).
    if region.cap < 0x40 || region.cap > 0xfc || !region.cap.is_multiple_of(4) {
        return Err(format!("{context}: not a valid capability offset"));
    }
    let bar = function.bar(region.bar).ok_or_else(|| {
        format!(
            "{context}: {} has no BAR{} (its BARs: {})",
            function.address, region.bar, function.bars_text
        )
    })?;
    let bar_space = if bar.io { Space::Io } else { Space::Memory };
    if bar_space != region.space {
        return Err(format!(
            "{context}: resolved to {:?} space, but BAR{} is {}",
            region.space,
            region.bar,
            bar.describe()
        ));
    }
    let end = region.offset.checked_add(region.length);
    if region.length == 0 || end.is_none_or(|end| end > bar.size) {
        return Err(format!(
            "{context}: not inside BAR{} ({}): offset + len = {:#x} > size {:#x}",
            region.bar,
            bar.describe(),
            region.offset.saturating_add(region.length),
            bar.size
        ));
    }
    if region.address != bar.base + region.offset {
        return Err(format!(
            "{context}: resolved to {:#x}, but BAR{} base {:#x} + {:#x} = {:#x}",
            region.address,
            region.bar,
            bar.base,
            region.offset,
            bar.base + region.offset
        ));
    }
    let (min_len, alignment) = match region.cfg_type {
        1 => (MIN_COMMON_LEN, 4),
        2 => (MIN_NOTIFY_LEN, 2),
        3 => (MIN_ISR_LEN, 1),
        _ => (MIN_NET_DEVICE_LEN, 4),
    };
    if region.length < min_len {
        return Err(format!("{context}: shorter than {min_len:#x} bytes"));
    }
    if !region.offset.is_multiple_of(alignment) {
        return Err(format!("{context}: offset not {alignment}-byte aligned"));
    }
    match (region.cfg_type, region.notify_off_multiplier) {
        (2, Some(multiplier)) => {
            if multiplier != 0 && !multiplier.is_power_of_two() {
                return Err(format!(
                    "{context}: notify_off_multiplier {multiplier} is neither 0 nor a power of 2"
                ));
            }
            if multiplier != scenario.notify_off_multiplier {
                return Err(format!(
                    "{context}: notify_off_multiplier {multiplier}, expected {}",
                    scenario.notify_off_multiplier
                ));
            }
            if region.space != scenario.notify_space {
                return Err(format!(
                    "{context}: the notify structure is in {:?} space, expected {:?}",
                    region.space, scenario.notify_space
                ));
            }
        }
        (2, None) => return Err(format!("{context}: no notify_off_multiplier")),
        (_, Some(_)) => {
            return Err(format!(
                "{context}: a notify_off_multiplier on a non-notify region"
            ));
        }
        (_, None) => {
            if region.space != Space::Memory {
                return Err(format!("{context}: only notify may be in I/O space"));
            }
        }
    }
    Ok(())
}

fn single_feature_line(lines: &[String], which: &str) -> Result<Features, String> {
    let parsed: Vec<Features> = lines
        .iter()
        .filter_map(|line| parse_features(line, which).transpose())
        .collect::<Result<_, _>>()?;
    match <[Features; 1]>::try_from(parsed) {
        Ok([features]) => Ok(features),
        Err(parsed) => Err(format!(
            "expected exactly one `virtio-net: {which} features` line, found {}",
            parsed.len()
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing the serial lines.

/// The message of a log line: the text after the `[ seconds ] ` timestamp, if any.
fn message(line: &str) -> &str {
    let line = line.trim();
    match line
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
    {
        Some((_, message)) => message.trim_start(),
        None => line,
    }
}

fn hex_u64(text: &str) -> Option<u64> {
    u64::from_str_radix(text.strip_prefix("0x")?, 16).ok()
}

fn hex_u16(text: &str) -> Option<u16> {
    u16::from_str_radix(text, 16).ok()
}

/// `0000:00:01.0`: segment, bus, device and function.
fn is_pci_address(text: &str) -> bool {
    let parts: Vec<&str> = text.split([':', '.']).collect();
    matches!(parts.as_slice(), [segment, bus, device, function]
        if segment.len() == 4 && bus.len() == 2 && device.len() == 2 && function.len() == 1
            && text.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'))
}

/// `vvvv:dddd`.
fn parse_ids(text: &str) -> Option<(u16, u16)> {
    let (vendor, device) = text.split_once(':')?;
    (vendor.len() == 4 && device.len() == 4).then_some(())?;
    Some((hex_u16(vendor)?, hex_u16(device)?))
}

/// A BAR from the `pci:` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bar {
    io: bool,
    base: u64,
    size: u64,
}

impl Bar {
    fn describe(self) -> String {
        format!(
            "{} {:#x}+{:#x}",
            if self.io { "io" } else { "mem" },
            self.base,
            self.size
        )
    }
}

/// One row of the `pci:` table.
#[derive(Clone, Debug)]
struct PciFunction {
    address: String,
    vendor: u16,
    device: u16,
    class: String,
    bars: [Option<Bar>; 6],
    /// The BAR part of the line, for messages.
    bars_text: String,
}

impl PciFunction {
    fn bar(&self, index: u8) -> Option<Bar> {
        self.bars.get(usize::from(index)).copied().flatten()
    }
}

/// Parses `pci: <address> <vendor>:<device> class cc.ss.pp ... BARn <kind> <base>+<size> ...`.
/// Other `pci:` lines (the summary) give `Ok(None)`; a function row with a malformed BAR is an
/// error.
fn parse_pci_function(line: &str) -> Result<Option<PciFunction>, String> {
    let Some(rest) = message(line).strip_prefix("pci: ") else {
        return Ok(None);
    };
    let tokens: Vec<&str> = rest.split_whitespace().collect();
    let (Some(&address), Some(ids)) = (tokens.first(), tokens.get(1).and_then(|t| parse_ids(t)))
    else {
        return Ok(None);
    };
    if !is_pci_address(address) {
        return Ok(None);
    }
    let class = match tokens.get(2..4) {
        Some(["class", class]) => class.to_string(),
        _ => return Err(format!("no class in {line:?}")),
    };
    let mut bars = [None; 6];
    let mut bars_text = Vec::new();
    let mut index = 0;
    while index < tokens.len() {
        let token = tokens[index];
        let slot = token
            .strip_prefix("BAR")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n < 6);
        let Some(slot) = slot else {
            index += 1;
            continue;
        };
        let (Some(kind), Some(range)) = (tokens.get(index + 1), tokens.get(index + 2)) else {
            return Err(format!("truncated BAR{slot} in {line:?}"));
        };
        let (base, size) = range
            .split_once('+')
            .and_then(|(base, size)| Some((hex_u64(base)?, hex_u64(size)?)))
            .ok_or_else(|| format!("bad BAR{slot} range {range:?} in {line:?}"))?;
        let io = match *kind {
            "io" => true,
            "mem32" | "mem64" => false,
            _ => return Err(format!("bad BAR{slot} kind {kind:?} in {line:?}")),
        };
        if bars[slot].is_some() {
            return Err(format!("BAR{slot} listed twice in {line:?}"));
        }
        bars[slot] = Some(Bar { io, base, size });
        bars_text.push(format!("BAR{slot} {kind} {range}"));
        index += 3;
    }
    Ok(Some(PciFunction {
        address: address.to_string(),
        vendor: ids.0,
        device: ids.1,
        class,
        bars,
        bars_text: if bars_text.is_empty() {
            "none".to_string()
        } else {
            bars_text.join(", ")
        },
    }))
}

/// `virtio: <address> <type> (<vendor>:<device>, <flavor>): <verdict>`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Identification {
    address: String,
    type_name: String,
    vendor: u16,
    device_id: u16,
    flavor: String,
    verdict: String,
}

fn parse_identification(line: &str) -> Option<Identification> {
    let rest = message(line).strip_prefix("virtio: ")?;
    let (address, rest) = rest.split_once(' ')?;
    if !is_pci_address(address) {
        return None;
    }
    let (type_name, rest) = rest.split_once(" (")?;
    let (inside, verdict) = rest.split_once("): ")?;
    let (ids, flavor) = inside.split_once(", ")?;
    let (vendor, device_id) = parse_ids(ids)?;
    Some(Identification {
        address: address.to_string(),
        type_name: type_name.to_string(),
        vendor,
        device_id,
        flavor: flavor.to_string(),
        verdict: verdict.trim().to_string(),
    })
}

/// A located structure: `virtio-net: <name> (cap 0x40, cfg_type 1): BAR4 +0x0 len 0x1000 at
/// mem 0xfebf8000[, notify_off_multiplier 4]`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Region {
    name: String,
    cap: u64,
    cfg_type: u8,
    bar: u8,
    offset: u64,
    length: u64,
    space: Space,
    address: u64,
    notify_off_multiplier: Option<u32>,
}

/// `Ok(None)` for lines that are not region lines; an error for a region line that does not
/// parse.
fn parse_region(line: &str) -> Result<Option<Region>, String> {
    let Some(rest) = message(line).strip_prefix("virtio-net: ") else {
        return Ok(None);
    };
    let Some((name, rest)) = rest.split_once(" (cap ") else {
        return Ok(None);
    };
    let bad = || format!("malformed region line {line:?}");
    let (cap, rest) = rest.split_once(", cfg_type ").ok_or_else(bad)?;
    let (cfg_type, rest) = rest.split_once("): ").ok_or_else(bad)?;
    let (location, multiplier) = match rest.split_once(", notify_off_multiplier ") {
        Some((location, multiplier)) => (
            location,
            Some(multiplier.trim().parse::<u32>().map_err(|_| bad())?),
        ),
        None => (rest, None),
    };
    let tokens: Vec<&str> = location.split_whitespace().collect();
    let [bar, offset, "len", length, "at", space, address] = tokens.as_slice() else {
        return Err(bad());
    };
    Ok(Some(Region {
        name: name.to_string(),
        cap: hex_u64(cap).ok_or_else(bad)?,
        cfg_type: cfg_type.parse().map_err(|_| bad())?,
        bar: bar
            .strip_prefix("BAR")
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?,
        offset: offset.strip_prefix('+').and_then(hex_u64).ok_or_else(bad)?,
        length: hex_u64(length).ok_or_else(bad)?,
        space: match *space {
            "mem" => Space::Memory,
            "port" => Space::Io,
            _ => return Err(bad()),
        },
        address: hex_u64(address).ok_or_else(bad)?,
        notify_off_multiplier: multiplier,
    }))
}

/// `virtio-net: <which> features 0x...: NAME NAME bitN ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Features {
    bits: u64,
    names: Vec<String>,
}

/// `Ok(None)` for other lines. The names must be one per set bit.
fn parse_features(line: &str, which: &str) -> Result<Option<Features>, String> {
    let Some(rest) = message(line)
        .strip_prefix("virtio-net: ")
        .and_then(|rest| rest.strip_prefix(which))
        .and_then(|rest| rest.strip_prefix(" features "))
    else {
        return Ok(None);
    };
    let (bits, names) = rest.split_once(':').unwrap_or((rest, ""));
    let bits = hex_u64(bits.trim()).ok_or_else(|| format!("bad feature bits in {line:?}"))?;
    let names: Vec<String> = names.split_whitespace().map(str::to_string).collect();
    if names.len() != bits.count_ones() as usize {
        return Err(format!(
            "{line:?}: {} names for {} set bits",
            names.len(),
            bits.count_ones()
        ));
    }
    Ok(Some(Features { bits, names }))
}

/// `virtio-net: <address> MAC xx:xx:xx:xx:xx:xx` → (address, MAC).
fn parse_mac_line(line: &str) -> Option<(String, String)> {
    let rest = message(line).strip_prefix("virtio-net: ")?;
    let [address, "MAC", mac] = rest.split_whitespace().collect::<Vec<_>>()[..] else {
        return None;
    };
    let octets: Vec<&str> = mac.split(':').collect();
    let valid = is_pci_address(address)
        && octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    valid.then(|| (address.to_string(), mac.to_ascii_lowercase()))
}

// ---------------------------------------------------------------------------------------------
// The checker itself, on a known-good log (no QEMU).

const SAMPLE_LOG: &str = "\
[   0.049000] pci: 6 functions through ECAM
[   0.049890] pci: 0000:00:01.0 1af4:1041 class 02.00.00 rev 01 (ethernet) BAR1 mem32 0x00000000febc0000+0x1000 BAR4 mem64 0x00000000febf8000+0x4000 pref INTA line 10
[   0.049900] pci: 0000:00:02.0 1af4:1005 class 00.ff.00 rev 00 (other) BAR0 io 0xc060+0x20 BAR1 mem32 0x00000000febc1000+0x1000 BAR4 mem64 0x00000000febfc000+0x4000 pref INTA line 11
[   0.051070] virtio: 0000:00:01.0 virtio-net (1af4:1041, modern): driving it
[   0.051335] virtio: 0000:00:02.0 virtio-entropy (1af4:1005, transitional): no driver for this type, left alone
[   0.059942] virtio-net: common config (cap 0x40, cfg_type 1): BAR4 +0x0 len 0x1000 at mem 0xfebf8000
[   0.060102] virtio-net: notify (cap 0x70, cfg_type 2): BAR4 +0x3000 len 0x1000 at mem 0xfebfb000, notify_off_multiplier 4
[   0.060212] virtio-net: ISR (cap 0x50, cfg_type 3): BAR4 +0x1000 len 0x1000 at mem 0xfebf9000
[   0.060330] virtio-net: device config (cap 0x60, cfg_type 4): BAR4 +0x2000 len 0x1000 at mem 0xfebfa000
[   0.061275] virtio-net: offered features 0x0000010130bf8024: CTRL_GUEST_OFFLOADS MAC MRG_RXBUF STATUS CTRL_VQ CTRL_RX CTRL_VLAN CTRL_RX_EXTRA GUEST_ANNOUNCE CTRL_MAC_ADDR INDIRECT_DESC EVENT_IDX VERSION_1 RING_RESET
[   0.061578] virtio-net: negotiated features 0x0000000100010020: MAC STATUS VERSION_1
[   0.062038] virtio-net: 0000:00:01.0 MAC 52:54:00:ab:cd:ef
PANIC: anything after the MAC line is not checked";

const SAMPLE_SCENARIO: Scenario = Scenario {
    device_id: 0x1041,
    flavor: "modern",
    mac: "52:54:00:ab:cd:ef",
    bystanders: &[Bystander {
        device: "virtio-rng-pci",
        type_name: "virtio-entropy",
        device_id: 0x1005,
        flavor: "transitional",
    }],
    ..Scenario::q35("")
};

fn sample_with(from: &str, to: &str) -> Vec<String> {
    assert!(SAMPLE_LOG.contains(from), "{from:?} is not in the sample");
    SAMPLE_LOG
        .replacen(from, to, 1)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn checker_accepts_a_good_log() {
    let lines = sample_with("", "");
    let summary = check_log(&SAMPLE_SCENARIO, &lines);
    assert!(summary.is_ok(), "{summary:?}");
}

#[test]
fn checker_rejects_bad_logs() {
    let cases = [
        // A region past the end of its BAR (0x3000 + 0x1001 > 0x4000).
        (
            "+0x3000 len 0x1000 at mem 0xfebfb000",
            "+0x3000 len 0x1001 at mem 0xfebfb000",
        ),
        // A region in a BAR the function does not have.
        ("cfg_type 3): BAR4", "cfg_type 3): BAR2"),
        // A resolved address that is not base + offset.
        (
            "+0x1000 len 0x1000 at mem 0xfebf9000",
            "+0x1000 len 0x1000 at mem 0xfebf0000",
        ),
        // A memory structure claimed to be at a port.
        ("at mem 0xfebf9000", "at port 0xfebf9000"),
        // A missing cfg_type.
        ("cfg_type 4", "cfg_type 5"),
        // The wrong multiplier.
        ("notify_off_multiplier 4", "notify_off_multiplier 8"),
        // Negotiated bits the device did not offer.
        (
            "0x0000000100010020: MAC STATUS",
            "0x0000000100010030: MAC STATUS bit4",
        ),
        // VERSION_1 not negotiated.
        (
            "0x0000000100010020: MAC STATUS VERSION_1",
            "0x0000000000010020: MAC STATUS",
        ),
        // Names that do not match the bits.
        ("STATUS VERSION_1", "VERSION_1"),
        // The wrong MAC.
        ("MAC 52:54:00:ab:cd:ef", "MAC 52:54:00:12:34:56"),
        // The wrong flavor.
        ("(1af4:1041, modern)", "(1af4:1041, transitional)"),
        // The bystander driven instead of left alone.
        ("no driver for this type, left alone", "driving it"),
        // The driven function's ids disagree with the pci: table.
        ("pci: 0000:00:01.0 1af4:1041", "pci: 0000:00:01.0 1af4:1000"),
    ];
    for (from, to) in cases {
        let lines = sample_with(from, to);
        assert!(
            check_log(&SAMPLE_SCENARIO, &lines).is_err(),
            "accepted a log with {from:?} replaced by {to:?}"
        );
    }
}

#[test]
fn parses_io_notify_region_and_bars() {
    let region = parse_region(
        "[   0.050681] virtio-net: notify (cap 0x84, cfg_type 2): BAR2 +0x0 len 0x4 at port \
         0xc080, notify_off_multiplier 0",
    );
    assert_eq!(
        region,
        Ok(Some(Region {
            name: "notify".to_string(),
            cap: 0x84,
            cfg_type: 2,
            bar: 2,
            offset: 0,
            length: 4,
            space: Space::Io,
            address: 0xc080,
            notify_off_multiplier: Some(0),
        }))
    );
    let function = parse_pci_function(
        "[   0.046401] pci: 0000:00:01.0 1af4:1000 class 02.00.00 rev 00 (ethernet) BAR0 io \
         0xc040+0x20 BAR2 io 0xc080+0x4 BAR4 mem64 0x00000000febfc000+0x4000 pref INTA line 10",
    );
    let Ok(Some(function)) = function else {
        panic!("not parsed: {function:?}");
    };
    assert_eq!(
        function.bar(2),
        Some(Bar {
            io: true,
            base: 0xc080,
            size: 4
        })
    );
    assert_eq!(
        function.bar(4),
        Some(Bar {
            io: false,
            base: 0xfebfc000,
            size: 0x4000
        })
    );
    assert_eq!(function.bar(1), None);
    assert!(parse_mac_line("[ 0.1] virtio-net: offered features 0x20: MAC").is_none());
}
