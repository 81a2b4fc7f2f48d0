//! What `cargo xtask bench` measures: [`BenchOptions`], and [`BenchArgs`], its command line
//! (clap), which starts from the full run or the `--quick` smoke run and applies the flags, and
//! [`Section`], the parts of a run that `--sections` selects.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use serde::{Deserialize, Serialize};

use super::measure::ClientForm;
use crate::command::GuestMode;

/// A part of the benchmark that can run on its own (`--sections`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Section {
    /// UDP/ICMP echo latency and throughput, boot to first echo (issue 6).
    Echo,
    /// NBD block export throughput and latency (issue 14).
    Nbd,
    /// TCP echo throughput: each connection count in turn, every connection streaming its
    /// bytes each way, every byte checked (issue 15).
    Tcp,
}

impl Section {
    /// The name on the command line and in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Section::Echo => "echo",
            Section::Nbd => "nbd",
            Section::Tcp => "tcp",
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The sections to run.
    pub sections: Vec<Section>,
    /// Length of each NBD figure.
    pub nbd_time: Duration,
    /// The NBD client counts (each a connection with one request in flight).
    pub nbd_clients: Vec<usize>,
    /// The NBD disk image's size, MiB.
    pub nbd_image_mib: u64,
    /// Vireo's mode for the NBD section.
    pub nbd_mode: String,
    /// Unrecorded (but checked) reads on every target before its first figure.
    pub nbd_warmup: Duration,
    /// TCP throughput: bytes each connection streams each way.
    pub tcp_bytes: usize,
    /// TCP throughput: the connection counts measured.
    pub tcp_connections: Vec<usize>,
    /// TCP throughput: runs per connection count (the median is reported).
    pub tcp_repeats: usize,
    /// The short smoke run (Vireo in one mode and the floors, a few thousand samples).
    pub quick: bool,
    /// Where the results go.
    pub out_dir: PathBuf,
    /// A prebuilt kernel; else `cargo build --release -p vireo`.
    pub kernel: Option<PathBuf>,
    /// A second kernel measured in the same run, mode by mode just before the first, for the
    /// before/after table (`--baseline-kernel`).
    pub baseline_kernel: Option<PathBuf>,
    /// Measured UDP round trips per (system, size, form).
    pub samples: u64,
    /// Discarded round trips before each measurement.
    pub warmup: u64,
    /// UDP payload sizes.
    pub sizes: Vec<usize>,
    /// Client forms.
    pub forms: Vec<ClientForm>,
    /// Vireo's modes.
    pub modes: Vec<String>,
    /// Measured ICMP round trips.
    pub icmp_samples: u64,
    /// Datagrams in flight for throughput.
    pub window: u32,
    /// Length of a throughput run.
    pub throughput: Duration,
    /// Boots per guest configuration for boot-to-first-echo (the measuring boot included).
    pub boots: u32,
    /// Measure the Linux guest.
    pub linux: bool,
    /// Measure the floors.
    pub floors: bool,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Hold `/dev/cpu_dma_latency` at 0 for the run (idle host CPUs poll instead of halting).
    pub host_idle_poll: bool,
    /// Give the host a permanent neighbour entry for the guest (no ARP at all), as runs before
    /// the link-up announcement did; by default the host resolves the guest by ARP.
    pub static_neigh: bool,
}

impl BenchOptions {
    /// The full benchmark.
    pub fn full() -> BenchOptions {
        BenchOptions {
            sections: vec![Section::Echo, Section::Nbd, Section::Tcp],
            nbd_time: Duration::from_secs(4),
            nbd_clients: vec![1, 4],
            nbd_image_mib: 64,
            nbd_mode: "adaptive".to_string(),
            nbd_warmup: Duration::from_secs(1),
            tcp_bytes: 64 << 20,
            tcp_connections: vec![1, 8],
            tcp_repeats: 3,
            quick: false,
            out_dir: crate::workspace_root().join("bench-results"),
            kernel: None,
            baseline_kernel: None,
            samples: 100_000,
            warmup: 5_000,
            sizes: vec![64, 1400],
            forms: ClientForm::ALL.to_vec(),
            modes: vec!["irq".into(), "poll".into(), "adaptive".into()],
            icmp_samples: 10_000,
            window: 64,
            throughput: Duration::from_secs(5),
            boots: 5,
            linux: true,
            floors: true,
            memory_mib: 256,
            host_idle_poll: false,
            static_neigh: false,
        }
    }

    /// The smoke run: Vireo in poll mode and the floors, 64-byte payloads, a few thousand
    /// samples, 4 MiB per TCP connection; no Linux guest.
    pub fn quick() -> BenchOptions {
        BenchOptions {
            quick: true,
            samples: 2_000,
            warmup: 200,
            sizes: vec![64],
            modes: vec!["poll".into()],
            icmp_samples: 300,
            window: 32,
            throughput: Duration::from_secs(1),
            boots: 1,
            linux: false,
            tcp_bytes: 4 << 20,
            tcp_repeats: 1,
            nbd_time: Duration::from_millis(500),
            nbd_warmup: Duration::from_millis(200),
            nbd_image_mib: 16,
            ..BenchOptions::full()
        }
    }

    /// Parses `cargo xtask bench` arguments (everything after `bench`); the error is clap's
    /// message, usage included.
    pub fn parse<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<BenchOptions, String> {
        let words =
            std::iter::once(std::ffi::OsStr::new("bench")).chain(args.iter().map(AsRef::as_ref));
        let args = BenchArgs::try_parse_from(words).map_err(|error| error.render().to_string())?;
        args.options()
    }
}

/// `cargo xtask bench`'s flags. Every figure left out takes the full run's value, or the smoke
/// run's with `--quick`.
#[derive(Args, Clone, Debug, Default)]
pub struct BenchArgs {
    /// The smoke run (< 60 s): Vireo poll mode and the floors, 64 B, 2000 samples, NBD 0.5 s per
    /// figure on a 16 MiB image, 4 MiB per TCP connection, no Linux guest.
    #[arg(long)]
    pub quick: bool,
    /// MiB each TCP connection streams each way [default: 64; --quick 4].
    #[arg(long, value_name = "MIB")]
    pub tcp_mib: Option<usize>,
    /// TCP connection counts, one throughput run each [default: 1,8].
    #[arg(long, value_name = "N", value_delimiter = ',')]
    pub tcp_connections: Option<Vec<usize>>,
    /// TCP runs per connection count; the table gives the median [default: 3; --quick 1].
    #[arg(long, value_name = "N")]
    pub tcp_repeats: Option<usize>,
    /// Where the results go [default: bench-results/ in the workspace].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Boot this kernel image instead of building `cargo build --release -p vireo`.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Also measure this kernel image, mode by mode right before the kernel under test, and
    /// report after/before ratios (a policy or data-path change measured in one run).
    #[arg(long, value_name = "PATH")]
    pub baseline_kernel: Option<PathBuf>,
    /// Measured UDP round trips per system, size and client form [default: 100000; --quick 2000].
    #[arg(long, value_name = "N")]
    pub samples: Option<u64>,
    /// Round trips discarded before each measurement [default: 5000; --quick 200].
    #[arg(long, value_name = "N")]
    pub warmup: Option<u64>,
    /// UDP payload sizes [default: 64,1400; --quick 64].
    #[arg(long, value_name = "BYTES", value_delimiter = ',')]
    pub sizes: Option<Vec<usize>>,
    /// Client forms [default: blocking,spin].
    #[arg(long, value_enum, value_name = "FORM", value_delimiter = ',')]
    pub forms: Option<Vec<ClientForm>>,
    /// Vireo's modes [default: irq,poll,adaptive; --quick poll].
    #[arg(long, value_enum, value_name = "MODE", value_delimiter = ',')]
    pub modes: Option<Vec<GuestMode>>,
    /// Measured ICMP round trips [default: 10000; --quick 300].
    #[arg(long, value_name = "N")]
    pub icmp_samples: Option<u64>,
    /// Datagrams kept in flight in the throughput run [default: 64; --quick 32].
    #[arg(long, value_name = "N")]
    pub window: Option<u32>,
    /// Length of each throughput run in seconds [default: 5; --quick 1].
    #[arg(long, value_name = "S")]
    pub throughput_secs: Option<f64>,
    /// Boots per guest for boot-to-first-echo (and repeated throughput) [default: 5; --quick 1].
    #[arg(long, value_name = "N")]
    pub boots: Option<u32>,
    /// Guest RAM (`256`, `512M`, `1G`) [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = crate::command::parse_memory_mib)]
    pub memory: Option<u64>,
    /// Leave out the Linux guest peer.
    #[arg(long, overrides_with = "linux")]
    pub no_linux: bool,
    /// Measure the Linux guest peer (the default of the full run; with --quick, adds it).
    #[arg(long, overrides_with = "no_linux")]
    pub linux: bool,
    /// Leave out the floors (loopback, tap reflector).
    #[arg(long)]
    pub no_floors: bool,
    /// Hold /dev/cpu_dma_latency at 0 for the run, so that idle host CPUs poll instead of
    /// halting (as tuned's latency-performance profile does); the JSON and the table header
    /// record it.
    #[arg(long)]
    pub host_idle_poll: bool,
    /// Give the host a permanent neighbour entry for the guest, so no system pays for ARP in
    /// its boot-to-first-echo (the setup of earlier runs). By default the host has none and
    /// resolves the guest by ARP, as a real host would: the figure then includes how fast a
    /// guest makes itself known (Vireo announces itself at link-up; the Linux peer runs with
    /// arp_notify=1).
    #[arg(long)]
    pub static_neigh: bool,
    /// The sections to run: echo (UDP/ICMP latency, echo rate, boot time), nbd, tcp (TCP echo
    /// throughput) [default: echo,nbd,tcp].
    #[arg(long, value_enum, value_name = "SECTION", value_delimiter = ',')]
    pub sections: Option<Vec<Section>>,
    /// Only the NBD section (the same as --sections nbd).
    #[arg(long, conflicts_with = "sections")]
    pub nbd_only: bool,
    /// Length of each NBD figure in seconds [default: 4; --quick 0.5].
    #[arg(long, value_name = "S")]
    pub nbd_secs: Option<f64>,
    /// NBD client counts, each client one connection with one request in flight [default: 1,4].
    #[arg(long, value_name = "N", value_delimiter = ',')]
    pub nbd_clients: Option<Vec<usize>>,
    /// Size of the NBD disk image in MiB [default: 64; --quick 16].
    #[arg(long, value_name = "MIB")]
    pub nbd_image_mib: Option<u64>,
    /// Seconds of unrecorded (still checked) reads on each NBD target before its first figure
    /// [default: 1; --quick 0.2; 0 for none].
    #[arg(long, value_name = "S")]
    pub nbd_warmup_secs: Option<f64>,
    /// Vireo's mode in the NBD section [default: adaptive, the kernel's default].
    #[arg(long, value_enum, value_name = "MODE")]
    pub nbd_mode: Option<GuestMode>,
    /// Re-render bench.md and bench-cdf.svg from a run's JSON, without measuring.
    #[arg(long, value_name = "DIR/bench.json", conflicts_with_all = ["quick", "kernel", "samples"])]
    pub render: Option<PathBuf>,
}

/// `bench` alone, for [`BenchOptions::parse`].
#[derive(Parser)]
#[command(name = "bench")]
struct BenchCommand {
    #[command(flatten)]
    args: BenchArgs,
}

impl BenchArgs {
    fn try_parse_from<I, T>(words: I) -> Result<BenchArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        BenchCommand::try_parse_from(words).map(|command| command.args)
    }

    /// The options these flags ask for.
    pub fn options(&self) -> Result<BenchOptions, String> {
        let mut options = if self.quick {
            BenchOptions::quick()
        } else {
            BenchOptions::full()
        };
        if let Some(out) = &self.out {
            options.out_dir = out.clone();
        }
        options.kernel = self.kernel.clone().or(options.kernel);
        options.baseline_kernel = self.baseline_kernel.clone();
        options.samples = self.samples.unwrap_or(options.samples);
        options.warmup = self.warmup.unwrap_or(options.warmup);
        options.icmp_samples = self.icmp_samples.unwrap_or(options.icmp_samples);
        options.window = self.window.unwrap_or(options.window);
        options.boots = self.boots.map_or(options.boots, |boots| boots.max(1));
        options.memory_mib = self.memory.unwrap_or(options.memory_mib);
        if let Some(seconds) = self.throughput_secs {
            options.throughput = Duration::try_from_secs_f64(seconds).map_err(|_| {
                format!("bench: --throughput-secs: {seconds} is not a valid number of seconds")
            })?;
        }
        if let Some(sizes) = &self.sizes {
            options.sizes = sizes.clone();
        }
        if let Some(forms) = &self.forms {
            options.forms = forms.clone();
        }
        if let Some(modes) = &self.modes {
            options.modes = modes.iter().map(|mode| mode.as_str().to_string()).collect();
        }
        if let Some(mib) = self.tcp_mib {
            options.tcp_bytes = mib
                .checked_mul(1 << 20)
                .filter(|&bytes| bytes > 0)
                .ok_or_else(|| format!("bench: --tcp-mib {mib}: need 1 MiB or more"))?;
        }
        if let Some(connections) = &self.tcp_connections {
            if connections.iter().any(|&n| n == 0 || n > 64) {
                return Err("bench: --tcp-connections: each count must be 1 to 64".into());
            }
            options.tcp_connections = connections.clone();
        }
        options.tcp_repeats = self.tcp_repeats.unwrap_or(options.tcp_repeats).max(1);
        if options.tcp_connections.is_empty() {
            return Err("bench: need at least one TCP connection count".into());
        }
        if self.no_linux {
            options.linux = false;
        }
        if self.linux {
            options.linux = true;
        }
        if self.no_floors {
            options.floors = false;
        }
        if let Some(sections) = &self.sections {
            options.sections = sections.clone();
            options.sections.sort();
            options.sections.dedup();
        }
        if self.nbd_only {
            options.sections = vec![Section::Nbd];
        }
        if let Some(seconds) = self.nbd_secs {
            options.nbd_time = Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|time| !time.is_zero())
                .ok_or_else(|| format!("bench: --nbd-secs: {seconds} is not a positive number"))?;
        }
        if let Some(clients) = &self.nbd_clients {
            options.nbd_clients = clients.clone();
        }
        if let Some(seconds) = self.nbd_warmup_secs {
            options.nbd_warmup = Duration::try_from_secs_f64(seconds).map_err(|_| {
                format!("bench: --nbd-warmup-secs: {seconds} is not a valid number of seconds")
            })?;
        }
        if let Some(mode) = self.nbd_mode {
            options.nbd_mode = mode.as_str().to_string();
        }
        if let Some(mib) = self.nbd_image_mib {
            options.nbd_image_mib = mib;
        }
        if options.sections.is_empty() {
            return Err("bench: --sections needs at least one section".into());
        }
        if options.nbd_clients.is_empty() || options.nbd_clients.iter().any(|&c| c == 0 || c > 16) {
            return Err("bench: --nbd-clients: each count must be 1 to 16".into());
        }
        if options.nbd_image_mib < 1 || options.nbd_image_mib > 4096 {
            return Err("bench: --nbd-image-mib must be 1 to 4096".into());
        }
        options.host_idle_poll |= self.host_idle_poll;
        options.static_neigh |= self.static_neigh;
        if options.sizes.is_empty() || options.forms.is_empty() || options.samples == 0 {
            return Err("bench: need at least one size, one client form and one sample".into());
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_and_full_defaults_and_overrides() {
        let quick = BenchOptions::parse(&[
            "--quick",
            "--kernel",
            "/k",
            "--out",
            "/tmp/o",
            "--baseline-kernel",
            "/old",
        ])
        .expect("valid");
        assert_eq!(quick.baseline_kernel, Some(PathBuf::from("/old")));
        assert!(quick.quick && !quick.linux && quick.modes == ["poll"]);
        assert_eq!(quick.samples, 2_000);
        assert_eq!(quick.kernel, Some(PathBuf::from("/k")));
        assert_eq!(quick.out_dir, PathBuf::from("/tmp/o"));
        let full = BenchOptions::parse::<&str>(&[]).expect("valid");
        assert_eq!(full.out_dir, crate::workspace_root().join("bench-results"));
        assert_eq!(full.modes, ["irq", "poll", "adaptive"]);
        assert!(full.linux && full.floors);
        assert_eq!(full.sections, [Section::Echo, Section::Nbd, Section::Tcp]);
        assert_eq!(
            (full.tcp_bytes, &full.tcp_connections[..]),
            (64 << 20, &[1, 8][..])
        );
        assert_eq!(quick.tcp_bytes, 4 << 20);
        assert_eq!((full.tcp_repeats, quick.tcp_repeats), (3, 1));
        let tcp = BenchOptions::parse(&[
            "--sections",
            "tcp",
            "--tcp-mib",
            "2",
            "--tcp-connections",
            "2,4",
        ])
        .expect("valid");
        assert_eq!(tcp.sections, [Section::Tcp]);
        assert_eq!(
            (tcp.tcp_bytes, &tcp.tcp_connections[..]),
            (2 << 20, &[2, 4][..])
        );
        let both = BenchOptions::parse(&["--sections", "tcp,echo,tcp"]).expect("valid");
        assert_eq!(both.sections, [Section::Echo, Section::Tcp]);
        let custom = BenchOptions::parse(&[
            "--sizes",
            "64,512",
            "--forms",
            "spin",
            "--modes",
            "irq,adaptive",
            "--no-linux",
            "--boots",
            "0",
            "--memory",
            "1G",
            "--throughput-secs",
            "2.5",
        ])
        .expect("valid");
        assert_eq!(custom.sizes, [64, 512]);
        assert_eq!(custom.forms, [ClientForm::Spin]);
        assert_eq!(custom.modes, ["irq", "adaptive"]);
        assert!(!custom.linux);
        assert_eq!(custom.boots, 1);
        assert_eq!(custom.memory_mib, 1024);
        assert_eq!(custom.throughput, Duration::from_millis(2500));
        assert_eq!(full.sections, [Section::Echo, Section::Nbd, Section::Tcp]);
        assert_eq!(full.nbd_clients, [1, 4]);
        let nbd =
            BenchOptions::parse(&["--quick", "--nbd-only", "--nbd-clients", "2"]).expect("valid");
        assert_eq!(nbd.sections, [Section::Nbd]);
        assert_eq!(nbd.nbd_clients, [2]);
        assert_eq!(nbd.nbd_time, Duration::from_millis(500));
        let both =
            BenchOptions::parse(&["--sections", "nbd,echo", "--nbd-secs", "1.5"]).expect("valid");
        assert_eq!(both.sections, [Section::Echo, Section::Nbd]);
        assert_eq!(both.nbd_time, Duration::from_millis(1500));
        assert_eq!(both.nbd_mode, "adaptive");
        let irq = BenchOptions::parse(&["--nbd-mode", "irq"]).expect("valid");
        assert_eq!(irq.nbd_mode, "irq");
        for bad in [
            &["--sections", "disk"][..],
            &["--nbd-only", "--sections", "echo"],
            &["--nbd-clients", "0"],
            &["--nbd-secs", "0"],
            &["--nbd-warmup-secs", "-1"],
            &["--nbd-image-mib", "0"],
            &["--modes", "turbo"],
            &["--forms", "lazy"],
            &["--samples", "x"],
            &["--bogus"],
            &["--samples", "0"],
            &["--throughput-secs", "-1"],
            &["--sections", "disk"],
            &["--tcp-mib", "0"],
            &["--tcp-connections", "0"],
            &["--tcp-connections", "65"],
        ] {
            assert!(BenchOptions::parse(bad).is_err(), "{bad:?}");
        }
    }
}
