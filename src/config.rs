//! The kernel command line (`-append`): parsing and validation into a [`Config`].
//!
//! The guest contract (README): space-separated `key=value` words and flags.
//! `ip=A.B.C.D/N` or `ip=dhcp` (default 10.0.2.15/24), `gw=A.B.C.D` (default 10.0.2.2),
//! `mac=XX:XX:XX:XX:XX:XX` (a unicast, non-zero MAC; default the device's), `mode=irq|poll|adaptive`
//! (default adaptive), `poll-window=MICROSECONDS` (how long `adaptive` keeps polling after the
//! last packet, default 200), `log=error|warn|info|debug` (default info), the flag `selftest`, and the
//! fault-injection key `inject-reset=N` (tests only: treat the NIC as failed every N received
//! frames, to exercise the reset-and-reinitialise path under QEMU), its disk counterpart
//! `inject-blk-reset=N` (treat the first virtio-blk disk as failed every N completions of the
//! NBD export's requests, with others in flight), and `services=NAME,...`, the
//! network services to run (default `echo,stats`; see [`ServiceKind`]).
//! The command line is untrusted input: every problem is reported through a callback as one
//! [`CmdlineError`] (which names the key and value) and the default is kept. Parsing never
//! panics and never allocates.
//!
//! Addresses are `core::net::Ipv4Addr` (parsed by its `FromStr`) and an interface address is
//! smoltcp's [`Ipv4Cidr`], the type the network stack takes; Vireo's own rules on top are
//! which addresses a host may use (see `parse_host_address` and `parse_cidr`).

use core::fmt;
use core::net::Ipv4Addr;

pub use smoltcp::wire::Ipv4Cidr;

/// How the network loop waits for received packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Interrupt driven, NAPI style: poll to empty, re-arm, halt.
    Irq,
    /// Busy-poll the used ring with receive interrupts disarmed.
    Poll,
    /// Poll while traffic is recent, otherwise arm interrupts and halt.
    Adaptive,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Irq => "irq",
            Self::Poll => "poll",
            Self::Adaptive => "adaptive",
        })
    }
}

/// Console log verbosity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// The boot log (default).
    Info,
    /// Everything.
    Debug,
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
        })
    }
}

/// A network service the kernel can run, by its name in `services=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// UDP and TCP echo on port 7 (RFC 862).
    Echo,
    /// The stats line on UDP port 7007.
    Stats,
    /// UDP discard on port 9 (RFC 863).
    Discard,
    /// The NBD export of the first virtio-blk disk on TCP port 10809 (the kernel builds it
    /// with the disk; without one it is not started).
    Nbd,
}

impl ServiceKind {
    /// Every service, in the order they run (and report on the stats line).
    pub const ALL: [Self; 4] = [Self::Echo, Self::Stats, Self::Discard, Self::Nbd];

    /// Its name in `services=`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Stats => "stats",
            Self::Discard => "discard",
            Self::Nbd => "nbd",
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of services (`services=`). They always run in the order of [`ServiceKind::ALL`],
/// whatever the order on the command line, so the stats line's keys keep their order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServiceSet(u8);

impl ServiceSet {
    /// No service.
    pub const EMPTY: Self = Self(0);
    /// The default: echo and stats.
    pub const DEFAULT: Self = Self(ServiceKind::Echo.bit() | ServiceKind::Stats.bit());

    /// Whether `kind` is in the set.
    pub const fn contains(self, kind: ServiceKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// Adds `kind`; returns false if it was there already.
    pub fn insert(&mut self, kind: ServiceKind) -> bool {
        let new = !self.contains(kind);
        self.0 |= kind.bit();
        new
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The services in the set, in the order they run.
    pub fn iter(self) -> impl Iterator<Item = ServiceKind> {
        ServiceKind::ALL
            .into_iter()
            .filter(move |kind| self.contains(*kind))
    }
}

impl Default for ServiceSet {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// `echo,stats`.
impl fmt::Display for ServiceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, kind) in self.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            f.write_str(kind.name())?;
        }
        Ok(())
    }
}

impl fmt::Debug for ServiceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceSet({self})")
    }
}

/// The kernel's configuration after parsing the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Interface address (`ip=`).
    pub ip: Ipv4Cidr,
    /// Default gateway (`gw=`); `None` when it would not be on-link.
    pub gateway: Option<Ipv4Addr>,
    /// Receive mode (`mode=`).
    pub mode: Mode,
    /// Log level (`log=`).
    pub log_level: LogLevel,
    /// Run the in-kernel self test and exit (`selftest`).
    pub selftest: bool,
    /// Check every disk at boot: read, write, flush, read back (`blk-check`).
    pub blk_check: bool,
    /// Fault injection (`inject-reset=N`): declare the NIC failed every N received frames.
    pub inject_reset_every: Option<u32>,
    /// Fault injection (`inject-blk-reset=N`): declare the first disk failed after every N
    /// completions of the NBD export's requests, while others are in flight.
    pub inject_blk_reset_every: Option<u32>,
    /// How long `adaptive` keeps polling after the last packet (`poll-window=`), microseconds.
    pub poll_window_us: u32,
    /// `ip=dhcp`: address, prefix and gateway come from DHCPv4 (`ip` and `gateway` unused).
    pub dhcp: bool,
    /// The MAC to use instead of the device's (`mac=`).
    pub mac: Option<[u8; 6]>,
    /// Caps the DHCP lease at this many seconds (`dhcp-max-lease=`), so renewals can be
    /// watched in tests; `None` takes the server's lease.
    pub dhcp_max_lease_s: Option<u32>,
    /// The network services to run (`services=`).
    pub services: ServiceSet,
}

/// The default address, 10.0.2.15/24 (QEMU user networking's guest address).
pub const DEFAULT_IP: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 0, 2, 15), 24);
/// The default adaptive polling window, 200 µs.
pub const DEFAULT_POLL_WINDOW_US: u32 = 200;
/// The default gateway, 10.0.2.2.
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

impl Default for Config {
    fn default() -> Self {
        Self {
            ip: DEFAULT_IP,
            gateway: Some(DEFAULT_GATEWAY),
            mode: Mode::Adaptive,
            log_level: LogLevel::Info,
            selftest: false,
            blk_check: false,
            inject_reset_every: None,
            inject_blk_reset_every: None,
            poll_window_us: DEFAULT_POLL_WINDOW_US,
            dhcp: false,
            mac: None,
            dhcp_max_lease_s: None,
            services: ServiceSet::DEFAULT,
        }
    }
}

/// Why a value was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueProblem {
    /// Not `A.B.C.D` with decimal octets 0..=255.
    NotAnAddress,
    /// `ip=` needs a `/N` prefix length.
    MissingPrefix,
    /// The prefix length is not 1..=32.
    PrefixOutOfRange,
    /// Unspecified, loopback, multicast, broadcast or reserved: not usable as a host address.
    NotAHostAddress,
    /// Not one of the listed words.
    NotOneOf(&'static [&'static str]),
    /// The flag takes no value.
    UnexpectedValue,
    /// The key needs a value (`key=value`).
    MissingValue,
    /// Not a whole number from 1 to 999999999.
    NotACount,
    /// Not six hexadecimal octets separated by `:` or `-`.
    NotAMac,
    /// A multicast (or broadcast) or all-zero MAC, which cannot be a station's address.
    NotAStationMac,
}

impl fmt::Display for ValueProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAnAddress => f.write_str("expected an IPv4 address A.B.C.D"),
            Self::MissingPrefix => f.write_str("expected A.B.C.D/N with a prefix length"),
            Self::PrefixOutOfRange => f.write_str("prefix length must be 1..=32"),
            Self::NotAHostAddress => {
                f.write_str("not a usable host address (0/8, loopback, multicast or broadcast)")
            }
            Self::NotOneOf(words) => {
                f.write_str("expected one of ")?;
                for (index, word) in words.iter().enumerate() {
                    if index > 0 {
                        f.write_str("|")?;
                    }
                    f.write_str(word)?;
                }
                Ok(())
            }
            Self::UnexpectedValue => f.write_str("this flag takes no value"),
            Self::MissingValue => f.write_str("expected key=value"),
            Self::NotACount => f.write_str("expected a whole number from 1 to 999999999"),
            Self::NotAMac => f.write_str("expected a MAC address XX:XX:XX:XX:XX:XX"),
            Self::NotAStationMac => {
                f.write_str("not a station address (multicast, broadcast or all-zero)")
            }
        }
    }
}

/// Bytes from the command line, shown escaped and truncated so that hostile input stays one
/// readable line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shown<'a>(pub &'a [u8]);

/// At most this many bytes of a key or value are echoed back in an error.
const MAX_SHOWN: usize = 48;

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(MAX_SHOWN)];
        write!(f, "{}", shown.escape_ascii())?;
        if self.0.len() > MAX_SHOWN {
            write!(f, "...({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

/// One problem found on the command line. Each is reported, and the default stays in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// A key Vireo does not know.
    UnknownKey {
        /// The key as written.
        key: Shown<'a>,
    },
    /// A known key with a bad value.
    InvalidValue {
        /// The key.
        key: &'static str,
        /// The value as written.
        value: Shown<'a>,
        /// What is wrong with it.
        problem: ValueProblem,
        /// The value kept instead, for the message.
        kept: Kept,
    },
    /// A key given twice; the later value wins.
    Duplicate {
        /// The key.
        key: &'static str,
    },
    /// `gw=` together with `ip=dhcp`: the DHCP server's router is used instead.
    GatewayWithDhcp,
    /// A name in `services=` that is no service; it is skipped.
    UnknownService {
        /// The name as written.
        name: Shown<'a>,
    },
    /// A service named twice in `services=`; it runs once.
    DuplicateService {
        /// The service.
        name: &'static str,
    },
    /// `services=` named no known service; the default runs.
    NoService {
        /// The services run instead.
        kept: ServiceSet,
    },
    /// The gateway is not inside the interface's subnet, so there is no default route.
    GatewayNotOnLink {
        /// The gateway.
        gateway: Ipv4Addr,
        /// The interface address.
        ip: Ipv4Cidr,
    },
}

/// The value kept after a rejected one, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// An address with prefix.
    Cidr(Ipv4Cidr),
    /// An address, or none.
    Address(Option<Ipv4Addr>),
    /// A mode.
    Mode(Mode),
    /// A log level.
    Level(LogLevel),
    /// A flag's state.
    Flag(bool),
    /// A duration in microseconds.
    Micros(u32),
    /// A MAC, or the device's.
    Mac(Option<[u8; 6]>),
    /// A set of services.
    Services(ServiceSet),
}

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cidr(cidr) => write!(f, "{cidr}"),
            Self::Address(Some(address)) => write!(f, "{address}"),
            Self::Address(None) => f.write_str("none"),
            Self::Mode(mode) => write!(f, "{mode}"),
            Self::Level(level) => write!(f, "{level}"),
            Self::Flag(on) => write!(f, "{}", if *on { "on" } else { "off" }),
            Self::Micros(micros) => write!(f, "{micros} us"),
            Self::Mac(Some(mac)) => write!(f, "{}", MacDisplay(*mac)),
            Self::Mac(None) => f.write_str("the device's MAC"),
            Self::Services(services) => write!(f, "{services}"),
        }
    }
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKey { key } => write!(f, "unknown key '{key}' ignored"),
            Self::InvalidValue {
                key,
                value,
                problem,
                kept,
            } => {
                write!(f, "invalid {key}= value '{value}': {problem}; using {kept}")
            }
            Self::Duplicate { key } => write!(f, "{key}= given more than once; the last one wins"),
            Self::GatewayWithDhcp => {
                f.write_str("gw= is ignored with ip=dhcp; the DHCP server's router is used")
            }
            Self::UnknownService { name } => {
                write!(f, "unknown service '{name}' in services= skipped")
            }
            Self::DuplicateService { name } => {
                write!(f, "service '{name}' named more than once in services=")
            }
            Self::NoService { kept } => {
                write!(f, "services= names no known service; using {kept}")
            }
            Self::GatewayNotOnLink { gateway, ip } => {
                write!(f, "gateway {gateway} is not inside {ip}; no default route")
            }
        }
    }
}

/// A MAC address shown as `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacDisplay(pub [u8; 6]);

impl fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

const MODES: &[&str] = &["irq", "poll", "adaptive"];
const LEVELS: &[&str] = &["error", "warn", "info", "debug"];

/// Parses a command line. Every problem is passed to `report`; parsing goes on with the default.
pub fn parse<'a>(cmdline: &'a [u8], mut report: impl FnMut(CmdlineError<'a>)) -> Config {
    let mut config = Config::default();
    let mut seen_ip = false;
    let mut seen_gw = false;
    let mut seen_mode = false;
    let mut seen_log = false;
    let mut seen_selftest = false;
    let mut seen_blk_check = false;
    let mut seen_inject = false;
    let mut seen_inject_blk = false;
    let mut seen_window = false;
    let mut seen_mac = false;
    let mut seen_lease = false;
    let mut seen_services = false;
    let mut explicit_gateway = false;

    for word in cmdline.split(|byte| byte.is_ascii_whitespace() || *byte == 0) {
        if word.is_empty() {
            continue;
        }
        let (key, value) = match word.iter().position(|&byte| byte == b'=') {
            Some(at) => (&word[..at], Some(&word[at + 1..])),
            None => (word, None),
        };
        let mut check_duplicate = |seen: &mut bool, name: &'static str| {
            if core::mem::replace(seen, true) {
                report(CmdlineError::Duplicate { key: name });
            }
        };
        match key {
            b"ip" => {
                check_duplicate(&mut seen_ip, "ip");
                if value == Some(b"dhcp") {
                    config.dhcp = true;
                    continue;
                }
                match value.ok_or(ValueProblem::MissingValue).and_then(parse_cidr) {
                    Ok(cidr) => {
                        config.ip = cidr;
                        config.dhcp = false;
                    }
                    Err(problem) => report(invalid("ip", value, problem, Kept::Cidr(config.ip))),
                }
            }
            b"mac" => {
                check_duplicate(&mut seen_mac, "mac");
                match value.ok_or(ValueProblem::MissingValue).and_then(parse_mac) {
                    Ok(mac) => config.mac = Some(mac),
                    Err(problem) => report(invalid("mac", value, problem, Kept::Mac(config.mac))),
                }
            }
            b"gw" => {
                check_duplicate(&mut seen_gw, "gw");
                match value
                    .ok_or(ValueProblem::MissingValue)
                    .and_then(parse_host_address)
                {
                    Ok(gateway) => {
                        config.gateway = Some(gateway);
                        explicit_gateway = true;
                    }
                    Err(problem) => {
                        report(invalid("gw", value, problem, Kept::Address(config.gateway)))
                    }
                }
            }
            b"mode" => {
                check_duplicate(&mut seen_mode, "mode");
                match value.ok_or(ValueProblem::MissingValue).and_then(parse_mode) {
                    Ok(mode) => config.mode = mode,
                    Err(problem) => {
                        report(invalid("mode", value, problem, Kept::Mode(config.mode)))
                    }
                }
            }
            b"log" => {
                check_duplicate(&mut seen_log, "log");
                match value
                    .ok_or(ValueProblem::MissingValue)
                    .and_then(parse_level)
                {
                    Ok(level) => config.log_level = level,
                    Err(problem) => report(invalid(
                        "log",
                        value,
                        problem,
                        Kept::Level(config.log_level),
                    )),
                }
            }
            b"poll-window" => {
                check_duplicate(&mut seen_window, "poll-window");
                match value
                    .ok_or(ValueProblem::MissingValue)
                    .and_then(parse_count)
                {
                    Ok(micros) => config.poll_window_us = micros,
                    Err(problem) => report(invalid(
                        "poll-window",
                        value,
                        problem,
                        Kept::Micros(config.poll_window_us),
                    )),
                }
            }
            b"dhcp-max-lease" => {
                check_duplicate(&mut seen_lease, "dhcp-max-lease");
                match value
                    .ok_or(ValueProblem::MissingValue)
                    .and_then(parse_count)
                {
                    Ok(seconds) => config.dhcp_max_lease_s = Some(seconds),
                    Err(problem) => report(invalid(
                        "dhcp-max-lease",
                        value,
                        problem,
                        Kept::Flag(config.dhcp_max_lease_s.is_some()),
                    )),
                }
            }
            b"inject-reset" => {
                check_duplicate(&mut seen_inject, "inject-reset");
                match value
                    .ok_or(ValueProblem::MissingValue)
                    .and_then(parse_count)
                {
                    Ok(count) => config.inject_reset_every = Some(count),
                    Err(problem) => report(invalid(
                        "inject-reset",
                        value,
                        problem,
                        Kept::Flag(config.inject_reset_every.is_some()),
                    )),
                }
            }
            b"inject-blk-reset" => {
                check_duplicate(&mut seen_inject_blk, "inject-blk-reset");
                match value
                    .ok_or(ValueProblem::MissingValue)
                    .and_then(parse_count)
                {
                    Ok(count) => config.inject_blk_reset_every = Some(count),
                    Err(problem) => report(invalid(
                        "inject-blk-reset",
                        value,
                        problem,
                        Kept::Flag(config.inject_blk_reset_every.is_some()),
                    )),
                }
            }
            b"services" => {
                check_duplicate(&mut seen_services, "services");
                match value {
                    None => report(invalid(
                        "services",
                        value,
                        ValueProblem::MissingValue,
                        Kept::Services(config.services),
                    )),
                    Some(list) => config.services = parse_services(list, &mut report),
                }
            }
            b"selftest" => {
                check_duplicate(&mut seen_selftest, "selftest");
                match value {
                    None => config.selftest = true,
                    Some(_) => report(invalid(
                        "selftest",
                        value,
                        ValueProblem::UnexpectedValue,
                        Kept::Flag(config.selftest),
                    )),
                }
            }
            b"blk-check" => {
                check_duplicate(&mut seen_blk_check, "blk-check");
                match value {
                    None => config.blk_check = true,
                    Some(_) => report(invalid(
                        "blk-check",
                        value,
                        ValueProblem::UnexpectedValue,
                        Kept::Flag(config.blk_check),
                    )),
                }
            }
            _ => report(CmdlineError::UnknownKey { key: Shown(key) }),
        }
    }

    if config.dhcp {
        if explicit_gateway {
            report(CmdlineError::GatewayWithDhcp);
        }
        config.gateway = None;
    } else if let Some(gateway) = config.gateway
        && !config.ip.contains_addr(&gateway)
    {
        // The default gateway only makes sense with the default subnet; an explicit one that is
        // off-link is an error worth a line.
        if explicit_gateway || config.ip != DEFAULT_IP {
            report(CmdlineError::GatewayNotOnLink {
                gateway,
                ip: config.ip,
            });
        }
        config.gateway = None;
    }
    config
}

fn invalid<'a>(
    key: &'static str,
    value: Option<&'a [u8]>,
    problem: ValueProblem,
    kept: Kept,
) -> CmdlineError<'a> {
    CmdlineError::InvalidValue {
        key,
        value: Shown(value.unwrap_or(b"")),
        problem,
        kept,
    }
}

/// `A.B.C.D`, read by `core::net::Ipv4Addr`'s parser. That parser refuses leading zeros,
/// which Vireo has always accepted within an octet's three digits (`010` is ten, decimal, never
/// octal), so each octet is checked for one to three decimal digits and its leading zeros are
/// dropped first; the parser then checks the count of octets and their range.
fn parse_address(text: &[u8]) -> Result<Ipv4Addr, ValueProblem> {
    // Four octets of at most three digits and three dots.
    let mut canonical = [0u8; 15];
    let mut length = 0;
    for (index, octet) in text.split(|&byte| byte == b'.').enumerate() {
        if index == 4
            || octet.is_empty()
            || octet.len() > 3
            || !octet.iter().all(u8::is_ascii_digit)
        {
            return Err(ValueProblem::NotAnAddress);
        }
        if index > 0 {
            canonical[length] = b'.';
            length += 1;
        }
        let first_significant = octet
            .iter()
            .position(|&digit| digit != b'0')
            .unwrap_or(octet.len() - 1);
        let digits = &octet[first_significant..];
        canonical[length..length + digits.len()].copy_from_slice(digits);
        length += digits.len();
    }
    core::str::from_utf8(&canonical[..length])
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(ValueProblem::NotAnAddress)
}

/// An address a host may use as its own or as its gateway: not in 0.0.0.0/8 ("this network",
/// RFC 1122 §3.2.1.3), not loopback (127/8), not multicast (224/4), not reserved (240/4, RFC
/// 1112 §4) nor the limited broadcast address.
fn parse_host_address(text: &[u8]) -> Result<Ipv4Addr, ValueProblem> {
    let address = parse_address(text)?;
    if address.octets()[0] == 0
        || address.is_loopback()
        || address.is_multicast()
        || address.octets()[0] >= 240
    {
        return Err(ValueProblem::NotAHostAddress);
    }
    Ok(address)
}

/// The prefix length of `ip=`: one to three decimal digits, 1..=32.
fn parse_prefix_len(text: &[u8]) -> Result<u8, ValueProblem> {
    if text.is_empty() || text.len() > 3 || !text.iter().all(u8::is_ascii_digit) {
        return Err(ValueProblem::PrefixOutOfRange);
    }
    core::str::from_utf8(text)
        .ok()
        .and_then(|text| text.parse::<u8>().ok())
        .filter(|prefix_len| (1..=32).contains(prefix_len))
        .ok_or(ValueProblem::PrefixOutOfRange)
}

/// `A.B.C.D/N`: a host address (see [`parse_host_address`]) that is not its subnet's network
/// or broadcast address (prefixes of 31 and 32 have neither, RFC 3021).
fn parse_cidr(text: &[u8]) -> Result<Ipv4Cidr, ValueProblem> {
    let slash = text
        .iter()
        .position(|&byte| byte == b'/')
        .ok_or(ValueProblem::MissingPrefix)?;
    let address = parse_host_address(&text[..slash])?;
    let prefix_len = parse_prefix_len(&text[slash + 1..])?;
    let cidr = Ipv4Cidr::new(address, prefix_len);
    if prefix_len < 31 && (cidr.network().address() == address || cidr.broadcast() == Some(address))
    {
        return Err(ValueProblem::NotAHostAddress);
    }
    Ok(cidr)
}

/// `XX:XX:XX:XX:XX:XX` (or with `-`), hexadecimal in either case; a station address only: the
/// I/G bit clear (not multicast or broadcast) and not all-zero.
fn parse_mac(text: &[u8]) -> Result<[u8; 6], ValueProblem> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(|&byte| byte == b':' || byte == b'-');
    for octet in &mut mac {
        let part = parts.next().ok_or(ValueProblem::NotAMac)?;
        let [high, low] = part else {
            return Err(ValueProblem::NotAMac);
        };
        let digit = |byte: u8| (byte as char).to_digit(16).ok_or(ValueProblem::NotAMac);
        *octet = (digit(*high)? * 16 + digit(*low)?) as u8;
    }
    if parts.next().is_some() {
        return Err(ValueProblem::NotAMac);
    }
    if !virtio::net::is_valid_station_mac(mac) {
        return Err(ValueProblem::NotAStationMac);
    }
    Ok(mac)
}

fn parse_count(text: &[u8]) -> Result<u32, ValueProblem> {
    if text.is_empty() || text.len() > 9 || !text.iter().all(u8::is_ascii_digit) {
        return Err(ValueProblem::NotACount);
    }
    let count = text
        .iter()
        .fold(0u32, |acc, digit| acc * 10 + u32::from(digit - b'0'));
    if count == 0 {
        Err(ValueProblem::NotACount)
    } else {
        Ok(count)
    }
}

/// `NAME,NAME,...`: every known name is added once; an unknown one is reported and skipped, a
/// repeated one reported. A list with no known name gives the default (reported).
fn parse_services<'a>(list: &'a [u8], report: &mut impl FnMut(CmdlineError<'a>)) -> ServiceSet {
    let mut services = ServiceSet::EMPTY;
    for name in list.split(|&byte| byte == b',') {
        if name.is_empty() {
            continue;
        }
        match ServiceKind::ALL
            .into_iter()
            .find(|kind| kind.name().as_bytes() == name)
        {
            Some(kind) => {
                if !services.insert(kind) {
                    report(CmdlineError::DuplicateService { name: kind.name() });
                }
            }
            None => report(CmdlineError::UnknownService { name: Shown(name) }),
        }
    }
    if services.is_empty() {
        report(CmdlineError::NoService {
            kept: ServiceSet::DEFAULT,
        });
        return ServiceSet::DEFAULT;
    }
    services
}

fn parse_mode(text: &[u8]) -> Result<Mode, ValueProblem> {
    match text {
        b"irq" => Ok(Mode::Irq),
        b"poll" => Ok(Mode::Poll),
        b"adaptive" => Ok(Mode::Adaptive),
        _ => Err(ValueProblem::NotOneOf(MODES)),
    }
}

fn parse_level(text: &[u8]) -> Result<LogLevel, ValueProblem> {
    match text {
        b"error" => Ok(LogLevel::Error),
        b"warn" => Ok(LogLevel::Warn),
        b"info" => Ok(LogLevel::Info),
        b"debug" => Ok(LogLevel::Debug),
        _ => Err(ValueProblem::NotOneOf(LEVELS)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::{String, ToString};
    use std::vec::Vec;

    fn parse_collect(line: &str) -> (Config, Vec<String>) {
        let mut errors = Vec::new();
        let config = parse(line.as_bytes(), |error| errors.push(error.to_string()));
        (config, errors)
    }

    #[test]
    fn services_selects_known_names_in_their_fixed_order() {
        let (config, errors) = parse_collect("");
        assert_eq!(config.services, ServiceSet::DEFAULT);
        assert_eq!(config.services.to_string(), "echo,stats");
        assert!(errors.is_empty());

        let (config, errors) = parse_collect("services=echo,stats,discard");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.services.to_string(), "echo,stats,discard");
        // Whatever the order written, they run in one order (the stats line's keys keep theirs).
        let (config, errors) = parse_collect("services=discard,stats");
        assert!(errors.is_empty(), "{errors:?}");
        let kinds: Vec<_> = config.services.iter().collect();
        assert_eq!(kinds, [ServiceKind::Stats, ServiceKind::Discard]);
        assert_eq!(
            parse_collect("services=stats").0.services.to_string(),
            "stats"
        );
        // Empty items are ignored.
        let (config, errors) = parse_collect("services=,echo,,stats,");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.services, ServiceSet::DEFAULT);
    }

    #[test]
    fn services_nbd_is_selectable_and_runs_after_the_others() {
        let (config, errors) = parse_collect("services=nbd,echo,stats");
        assert!(errors.is_empty(), "{errors:?}");
        let kinds: Vec<_> = config.services.iter().collect();
        assert_eq!(
            kinds,
            [ServiceKind::Echo, ServiceKind::Stats, ServiceKind::Nbd]
        );
        assert_eq!(config.services.to_string(), "echo,stats,nbd");
        let (config, errors) = parse_collect("services=nbd");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.services.to_string(), "nbd");
        assert!(!config.services.contains(ServiceKind::Echo));
        let (config, errors) = parse_collect("services=echo,stats,discard,nbd,nbd");
        assert_eq!(config.services.to_string(), "echo,stats,discard,nbd");
        assert_eq!(errors, ["service 'nbd' named more than once in services="]);
        // Not a default service: the demo and the guest contract keep echo,stats.
        assert!(!ServiceSet::DEFAULT.contains(ServiceKind::Nbd));
        let (config, errors) = parse_collect("services=NBD");
        assert_eq!(config.services, ServiceSet::DEFAULT);
        assert_eq!(errors[0], "unknown service 'NBD' in services= skipped");
    }

    #[test]
    fn services_names_unknown_and_repeated_services_and_never_runs_none() {
        let (config, errors) = parse_collect("services=echo,nfs,stats,echo");
        assert_eq!(config.services, ServiceSet::DEFAULT);
        assert_eq!(
            errors,
            [
                "unknown service 'nfs' in services= skipped",
                "service 'echo' named more than once in services=",
            ]
        );
        for line in ["services=", "services=bogus", "services=,"] {
            let (config, errors) = parse_collect(line);
            assert_eq!(config.services, ServiceSet::DEFAULT, "{line}");
            let last = errors.last().map(String::as_str);
            assert_eq!(
                last,
                Some("services= names no known service; using echo,stats"),
                "{line}"
            );
        }
        let (config, errors) = parse_collect("services");
        assert_eq!(config.services, ServiceSet::DEFAULT);
        assert_eq!(
            errors,
            ["invalid services= value '': expected key=value; using echo,stats"]
        );
        let (config, errors) = parse_collect("services=echo services=stats,discard");
        assert_eq!(config.services.to_string(), "stats,discard");
        assert_eq!(
            errors,
            ["services= given more than once; the last one wins"]
        );
        // Hostile names are escaped and truncated like every other value.
        let (_, errors) = parse_collect("services=\x1b[2J");
        assert_eq!(errors[0], "unknown service '\\x1b[2J' in services= skipped");
    }

    #[test]
    fn empty_command_line_gives_the_documented_defaults() {
        let (config, errors) = parse_collect("");
        assert!(errors.is_empty());
        assert_eq!(config.ip.to_string(), "10.0.2.15/24");
        assert_eq!(config.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(config.mode, Mode::Adaptive);
        assert_eq!(config.log_level, LogLevel::Info);
        assert!(!config.selftest);
    }

    #[test]
    fn every_key_is_parsed() {
        let (config, errors) =
            parse_collect("  ip=192.168.7.2/28\tgw=192.168.7.1 mode=poll log=debug selftest ");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.ip, Ipv4Cidr::new(Ipv4Addr::new(192, 168, 7, 2), 28));
        assert_eq!(config.gateway, Some(Ipv4Addr::new(192, 168, 7, 1)));
        assert_eq!(config.mode, Mode::Poll);
        assert_eq!(config.log_level, LogLevel::Debug);
        assert!(config.selftest);
        assert_eq!(parse_collect("mode=irq").0.mode, Mode::Irq);
        assert_eq!(parse_collect("mode=adaptive").0.mode, Mode::Adaptive);
        assert_eq!(parse_collect("log=warn").0.log_level, LogLevel::Warn);
        assert_eq!(parse_collect("log=error").0.log_level, LogLevel::Error);
    }

    #[test]
    fn bad_values_are_named_and_the_default_is_kept() {
        let (config, errors) = parse_collect("ip=300.1.1.1/24 mode=turbo log=loud bogus=1");
        assert_eq!(config, Config::default());
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert_eq!(
            errors[0],
            "invalid ip= value '300.1.1.1/24': expected an IPv4 address A.B.C.D; using 10.0.2.15/24"
        );
        assert_eq!(
            errors[1],
            "invalid mode= value 'turbo': expected one of irq|poll|adaptive; using adaptive"
        );
        assert_eq!(
            errors[2],
            "invalid log= value 'loud': expected one of error|warn|info|debug; using info"
        );
        assert_eq!(errors[3], "unknown key 'bogus' ignored");
    }

    #[test]
    fn malformed_addresses_are_rejected() {
        for bad in [
            "ip=10.0.2.15",
            "ip=10.0.2/24",
            "ip=10.0.2.15.1/24",
            "ip=10.0.2.15/33",
            "ip=10.0.2.15/0",
            "ip=10.0.2.15/",
            "ip=10.0.2.15/-1",
            "ip=+10.0.2.15/24",
            "ip=10.0.2.0015/24",
            "ip=10..2.15/24",
            "ip=0.0.0.0/8",
            "ip=127.0.0.1/8",
            "ip=224.0.0.1/4",
            "ip=255.255.255.255/32",
            "ip=10.0.2.255/24",
            "ip=10.0.2.0/24",
            "ip=",
            "ip",
            "gw=1.2.3",
            "gw=",
        ] {
            let (config, errors) = parse_collect(bad);
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            assert_eq!(config.ip, DEFAULT_IP, "{bad}");
            assert!(errors[0].starts_with("invalid "), "{bad}: {errors:?}");
        }
    }

    #[test]
    fn point_to_point_prefixes_are_allowed() {
        assert_eq!(parse_collect("ip=10.9.9.9/32").0.ip.prefix_len(), 32);
        assert_eq!(parse_collect("ip=10.9.9.8/31").0.ip.prefix_len(), 31);
    }

    #[test]
    fn an_off_link_gateway_is_reported_and_dropped() {
        let (config, errors) = parse_collect("ip=192.168.1.5/24 gw=10.0.2.2");
        assert_eq!(config.gateway, None);
        assert_eq!(
            errors,
            ["gateway 10.0.2.2 is not inside 192.168.1.5/24; no default route"]
        );
        // Changing the subnet without a gw= drops the default gateway too, and says so.
        let (config, errors) = parse_collect("ip=192.168.1.5/24");
        assert_eq!(config.gateway, None);
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn duplicates_are_reported_and_the_last_wins() {
        let (config, errors) = parse_collect("mode=irq mode=poll");
        assert_eq!(config.mode, Mode::Poll);
        assert_eq!(errors, ["mode= given more than once; the last one wins"]);
    }

    #[test]
    fn poll_window_is_tunable() {
        assert_eq!(parse_collect("").0.poll_window_us, DEFAULT_POLL_WINDOW_US);
        assert_eq!(parse_collect("poll-window=1000").0.poll_window_us, 1000);
        let (config, errors) = parse_collect("poll-window=0");
        assert_eq!(config.poll_window_us, DEFAULT_POLL_WINDOW_US);
        assert_eq!(
            errors,
            [
                "invalid poll-window= value '0': expected a whole number from 1 to 999999999; using 200 us"
            ]
        );
    }

    #[test]
    fn inject_reset_takes_a_positive_count() {
        assert_eq!(
            parse_collect("inject-reset=50").0.inject_reset_every,
            Some(50)
        );
        for bad in [
            "inject-reset=0",
            "inject-reset=-1",
            "inject-reset=x",
            "inject-reset=1234567890",
            "inject-reset",
        ] {
            let (config, errors) = parse_collect(bad);
            assert_eq!(config.inject_reset_every, None, "{bad}");
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            assert!(
                errors[0].starts_with("invalid inject-reset= value"),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn inject_blk_reset_takes_a_positive_count_apart_from_the_nics() {
        let (config, errors) = parse_collect("inject-blk-reset=40 inject-reset=7");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.inject_blk_reset_every, Some(40));
        assert_eq!(config.inject_reset_every, Some(7));
        for bad in [
            "inject-blk-reset=0",
            "inject-blk-reset=x",
            "inject-blk-reset",
        ] {
            let (config, errors) = parse_collect(bad);
            assert_eq!(config.inject_blk_reset_every, None, "{bad}");
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            assert!(
                errors[0].starts_with("invalid inject-blk-reset= value"),
                "{bad}: {errors:?}"
            );
        }
        let (_, errors) = parse_collect("inject-blk-reset=1 inject-blk-reset=2");
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    #[test]
    fn selftest_is_a_flag_without_value() {
        let (config, errors) = parse_collect("selftest=yes");
        assert!(!config.selftest);
        assert_eq!(
            errors,
            ["invalid selftest= value 'yes': this flag takes no value; using off"]
        );
    }

    #[test]
    fn hostile_bytes_are_escaped_and_truncated() {
        let mut line = b"\xff\xfe\x1b[2J=1 ip=\x00\x01 ".to_vec();
        line.extend(std::iter::repeat_n(b'A', 5000));
        let mut errors = Vec::new();
        let config = parse(&line, |error| errors.push(error.to_string()));
        assert_eq!(config, Config::default());
        assert!(
            errors
                .iter()
                .all(|e| e.len() < 200 && e.is_ascii() && !e.contains('\x1b'))
        );
        assert!(errors[0].contains("\\xff\\xfe\\x1b[2J"), "{errors:?}");
        assert!(
            errors.last().is_some_and(|e| e.contains("(5000 bytes)")),
            "{errors:?}"
        );
    }

    #[test]
    fn random_input_never_panics() {
        // A small xorshift generator: deterministic, no dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let alphabet = b"ipgwmodelstf=./0123456789 \t\x00\xffaq";
        for _ in 0..20_000 {
            let mut line = Vec::new();
            for _ in 0..(state % 40) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                line.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            state = state.wrapping_add(1);
            let mut count = 0;
            let config = parse(&line, |_| count += 1);
            assert!((1..=32).contains(&config.ip.prefix_len()));
            assert!(count <= line.len());
        }
    }

    #[test]
    fn mac_takes_a_unicast_non_zero_address_and_names_every_bad_one() {
        let (config, errors) = parse_collect("mac=02:AB:cd:00:11:ff");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.mac, Some([0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]));
        let (config, _) = parse_collect("mac=52-54-00-12-34-57");
        assert_eq!(config.mac, Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x57]));
        for (line, problem) in [
            ("mac=01:00:5e:00:00:01", "not a station address"),
            ("mac=ff:ff:ff:ff:ff:ff", "not a station address"),
            ("mac=00:00:00:00:00:00", "not a station address"),
            ("mac=52:54:00:12:34", "expected a MAC address"),
            ("mac=52:54:00:12:34:56:78", "expected a MAC address"),
            ("mac=52:54:00:12:34:5", "expected a MAC address"),
            ("mac=52:54:00:12:34:5g", "expected a MAC address"),
            ("mac=", "expected a MAC address"),
            ("mac", "expected key=value"),
        ] {
            let (config, errors) = parse_collect(line);
            assert_eq!(config.mac, None, "{line}");
            assert_eq!(errors.len(), 1, "{line}: {errors:?}");
            assert!(errors[0].contains("invalid mac="), "{line}: {}", errors[0]);
            assert!(errors[0].contains(problem), "{line}: {}", errors[0]);
            assert!(
                errors[0].ends_with("using the device's MAC"),
                "{}",
                errors[0]
            );
        }
    }

    #[test]
    fn ip_dhcp_turns_dhcp_on_and_drops_the_static_gateway() {
        let (config, errors) = parse_collect("ip=dhcp");
        assert!(errors.is_empty(), "{errors:?}");
        assert!(config.dhcp);
        assert_eq!(config.gateway, None);
        let (config, errors) = parse_collect("ip=dhcp gw=10.0.2.2");
        assert!(config.dhcp);
        assert_eq!(config.gateway, None);
        assert_eq!(
            errors,
            ["gw= is ignored with ip=dhcp; the DHCP server's router is used"]
        );
        // The last ip= wins, static or dhcp.
        let (config, _) = parse_collect("ip=dhcp ip=10.1.2.3/16");
        assert!(!config.dhcp);
        assert_eq!(config.ip.to_string(), "10.1.2.3/16");
        let (config, _) = parse_collect("ip=10.1.2.3/16 ip=dhcp");
        assert!(config.dhcp);
        let (config, errors) = parse_collect("ip=DHCP");
        assert!(!config.dhcp, "the word is lower case");
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn subnet_membership() {
        let cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 1, 2, 3), 16);
        assert!(cidr.contains_addr(&Ipv4Addr::new(10, 1, 255, 1)));
        assert!(!cidr.contains_addr(&Ipv4Addr::new(10, 2, 0, 1)));
        let host = Ipv4Cidr::new(Ipv4Addr::new(10, 1, 2, 3), 32);
        assert!(host.contains_addr(&Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!host.contains_addr(&Ipv4Addr::new(10, 1, 2, 4)));
    }

    #[test]
    fn octets_and_prefixes_take_up_to_three_decimal_digits_with_leading_zeros() {
        let (config, errors) = parse_collect("ip=010.000.002.015/024 gw=10.0.2.02");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.ip, DEFAULT_IP);
        assert_eq!(config.gateway, Some(DEFAULT_GATEWAY));
        for bad in [
            "ip=10.0.2.0015/24",
            "ip=10.0.2.15/0024",
            "ip=10.0.2.15/+24",
            "ip=10.0.2.256/24",
            "ip=10.0.2.1x/24",
            "ip=10.0.2.15.0/24",
            "ip=10.0.2/24",
            "ip=.10.0.2/24",
            "ip=10.0.2.15./24",
        ] {
            let (config, errors) = parse_collect(bad);
            assert_eq!(config.ip, DEFAULT_IP, "{bad}");
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
        }
    }

    #[test]
    fn host_address_rules_name_the_problem() {
        for (line, problem) in [
            ("ip=0.1.2.3/8", "not a usable host address"),
            ("ip=127.0.0.1/8", "not a usable host address"),
            ("ip=239.1.1.1/8", "not a usable host address"),
            ("ip=240.1.1.1/8", "not a usable host address"),
            ("ip=10.0.0.0/8", "not a usable host address"),
            ("ip=10.255.255.255/8", "not a usable host address"),
            ("ip=10.0.2.15/33", "prefix length must be 1..=32"),
            ("ip=10.0.2.15", "expected A.B.C.D/N with a prefix length"),
            ("gw=255.255.255.255", "not a usable host address"),
        ] {
            let (_, errors) = parse_collect(line);
            assert_eq!(errors.len(), 1, "{line}: {errors:?}");
            assert!(errors[0].contains(problem), "{line}: {}", errors[0]);
        }
        // A /31 or /32 has no network or broadcast address to avoid.
        assert!(parse_collect("ip=10.0.0.0/31 gw=10.0.0.1").1.is_empty());
        assert!(
            parse_collect("ip=10.0.0.255/32").1.len() == 1,
            "only the off-link gateway"
        );
    }
}
