//! Root networking for tests and benchmarks: a private network namespace holding a tap device
//! that QEMU attaches to, torn down on drop.
//!
//! Safety rules (README.md, "Network safety"): tap devices exist only inside a
//! namespace this module creates and removes, and the clients send traffic only to addresses
//! inside it. Nothing here touches the host's own namespace besides creating and deleting the
//! namespace itself.
//!
//! Teardown is guaranteed in layers:
//! 1. [`NetNs`]'s `Drop` kills every process still inside the namespace (they can only be ones
//!    the harness started there, e.g. QEMU), deletes the tap devices, deletes the namespace and
//!    checks that it is gone. `Drop` runs on normal return, on `?` errors and on panics (test
//!    binaries always unwind). A half-built namespace is already owned by a `NetNs`, so a
//!    failure while adding the tap removes it too.
//! 2. Namespace names carry the creating process id (`vireo-<prefix>-<pid>-<n>`). Before the
//!    first namespace of a process is created, [`sweep_stale_namespaces`] removes every
//!    `vireo-*` namespace whose creator no longer runs (a crashed or killed earlier run). Those of
//!    live processes, such as parallel test processes, are left alone.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::Error;
use crate::host::{find_on_path, is_root, log};

/// Every namespace this harness creates has a name starting with this.
pub const NETNS_PREFIX: &str = "vireo-";
/// Where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// The default host-side address of the tap: QEMU user networking's gateway, which is the
/// guest's default `gw=`.
pub const DEFAULT_HOST_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 2, 2), 24);
/// The guest's default address (`ip=` default), inside the namespace's subnet.
pub const DEFAULT_GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// A tap device to create inside the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapConfig {
    /// The interface name (at most 15 bytes), `tap0` by default.
    pub name: String,
    /// The host-side address and prefix length on the tap, `10.0.2.2/24` by default.
    pub host_address: Option<(Ipv4Addr, u8)>,
    /// Create a multi-queue tap (`ip tuntap add ... multi_queue`), for QEMU's `queues=N`.
    pub multi_queue: bool,
    /// The tap's MTU, when not the kernel's default 1500.
    pub mtu: Option<u32>,
}

impl Default for TapConfig {
    fn default() -> TapConfig {
        TapConfig {
            name: "tap0".to_string(),
            host_address: Some(DEFAULT_HOST_CIDR),
            multi_queue: false,
            mtu: None,
        }
    }
}

/// Whether this machine can run the root-networking tests, and if not, why not.
pub fn root_networking_available() -> Result<(), String> {
    if !is_root() {
        return Err(
            "root networking (a network namespace with a tap device) needs root; \
                    run as root, as CI does"
                .to_string(),
        );
    }
    if find_on_path(Path::new("ip")).is_none() {
        return Err("the `ip` program (Debian package iproute2) is not on PATH".to_string());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun does not exist (no tun/tap support)".to_string());
    }
    Ok(())
}

/// A private network namespace, optionally with tap devices, removed on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    taps: Vec<TapConfig>,
    removed: bool,
}

impl NetNs {
    /// Creates a uniquely named namespace (`vireo-<prefix>-<pid>-<n>`) with loopback up and the
    /// default tap: `tap0` with host address 10.0.2.2/24, up.
    pub fn create(prefix: &str) -> Result<NetNs, Error> {
        NetNs::create_with(prefix, &[TapConfig::default()])
    }

    /// Creates a uniquely named namespace with loopback up and the given tap devices.
    pub fn create_with(prefix: &str, taps: &[TapConfig]) -> Result<NetNs, Error> {
        root_networking_available().map_err(Error::Check)?;
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            let removed = sweep_stale_namespaces();
            if !removed.is_empty() {
                log(&format!(
                    "removed stale namespaces of dead runs: {removed:?}"
                ));
            }
        });
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let clean: String = prefix
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(24)
            .collect();
        let name = format!(
            "{NETNS_PREFIX}{}{}-{}",
            if clean.is_empty() {
                String::new()
            } else {
                format!("{clean}-")
            },
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(["netns", "add", name.as_str()])?;
        // From here on, Drop removes whatever was made.
        let mut netns = NetNs {
            name,
            taps: Vec::new(),
            removed: false,
        };
        netns.ip(["link", "set", "lo", "up"])?;
        for tap in taps {
            netns.add_tap(tap)?;
        }
        log(&format!("network namespace {} ready", netns.name));
        Ok(netns)
    }

    /// Creates a tap device inside the namespace, puts the host address on it and brings it up.
    pub fn add_tap(&mut self, tap: &TapConfig) -> Result<(), Error> {
        if tap.name.is_empty() || tap.name.len() > 15 {
            return Err(Error::InvalidSetting {
                name: "tap name",
                value: tap.name.clone(),
                expected: "1 to 15 bytes",
            });
        }
        let mut add = vec!["tuntap", "add", "dev", tap.name.as_str(), "mode", "tap"];
        if tap.multi_queue {
            add.push("multi_queue");
        }
        self.ip(add)?;
        self.taps.push(tap.clone());
        if let Some(mtu) = tap.mtu {
            self.ip(["link", "set", "dev", &tap.name, "mtu", &mtu.to_string()])?;
        }
        if let Some((address, prefix)) = tap.host_address {
            self.ip([
                "addr",
                "add",
                &format!("{address}/{prefix}"),
                "dev",
                &tap.name,
            ])?;
        }
        self.ip(["link", "set", "dev", &tap.name, "up"])?;
        Ok(())
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The taps created in it.
    pub fn taps(&self) -> &[TapConfig] {
        &self.taps
    }

    /// The QEMU `-netdev` spec for the tap called `tap_name` (userspace virtio backend, no
    /// scripts): `tap,id=ID,ifname=TAP,script=no,downscript=no,vhost=off[,queues=N]`.
    pub fn tap_netdev(id: &str, tap_name: &str, queues: Option<u32>) -> String {
        let mut spec = format!("tap,id={id},ifname={tap_name},script=no,downscript=no,vhost=off");
        if let Some(queues) = queues {
            spec.push_str(&format!(",queues={queues}"));
        }
        spec
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.name.as_str()])
            .arg(program);
        command
    }

    /// Runs `ip -n NAME ARGS...` and returns its stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut all = vec!["-n".to_string(), self.name.clone()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_string()));
        ip(all)
    }

    /// Runs `work` on a new thread that has entered the namespace (`setns(2)`), and returns its
    /// result. Sockets created there belong to the namespace (and keep belonging to it when
    /// moved to other threads); threads it spawns start inside the namespace too. A panic in
    /// `work` is propagated.
    pub fn run<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        run_in_netns(&self.name, work)
    }

    /// The namespace's handle (`/run/netns/NAME`), for `setns(2)`.
    pub fn handle(&self) -> Result<File, Error> {
        netns_handle(&self.name)
    }

    /// The process ids inside the namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        namespace_pids(&self.name)
    }

    /// Removes the namespace now (what `Drop` does), reporting failures.
    pub fn remove(mut self) -> Result<(), Error> {
        self.removed = true;
        remove_namespace(&self.name, &self.taps)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        if let Err(error) = remove_namespace(&self.name, &self.taps) {
            log(&format!(
                "warning: removing namespace {}: {error}",
                self.name
            ));
        }
    }
}

/// Opens the handle of the named namespace (`/run/netns/NAME`).
pub fn netns_handle(name: &str) -> Result<File, Error> {
    let path = Path::new(NETNS_RUN_DIR).join(name);
    File::open(&path).map_err(|source| Error::Io {
        context: format!("opening network namespace {}", path.display()),
        source,
    })
}

/// Runs `work` on a new thread inside the named namespace (any `ip netns` name); see
/// [`NetNs::run`].
pub fn run_in_netns<T, F>(name: &str, work: F) -> Result<T, Error>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let handle = netns_handle(name)?;
    thread::scope(|scope| {
        let worker = scope.spawn(move || -> Result<T, Error> {
            enter_netns(&handle, name)?;
            Ok(work())
        });
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Enters the network namespace behind `handle` on the calling thread.
pub fn enter_netns(handle: &File, name: &str) -> Result<(), Error> {
    setns(handle, CloneFlags::CLONE_NEWNET).map_err(|errno| Error::Io {
        context: format!("setns into network namespace {name}"),
        source: errno.into(),
    })
}

fn remove_namespace(name: &str, taps: &[TapConfig]) -> Result<(), Error> {
    // Processes inside keep the namespace (and its taps) alive after `ip netns del`; only the
    // harness starts processes in its namespaces (QEMU), so end them first.
    kill_namespace_processes(name);
    for tap in taps {
        let mut del = vec![
            "-n",
            name,
            "tuntap",
            "del",
            "dev",
            tap.name.as_str(),
            "mode",
            "tap",
        ];
        if tap.multi_queue {
            del.push("multi_queue");
        }
        let _ = ip(del);
    }
    ip(["netns", "del", name])?;
    if Path::new(NETNS_RUN_DIR).join(name).exists() {
        return Err(Error::Check(format!(
            "namespace {name} still exists after `ip netns del`"
        )));
    }
    log(&format!("network namespace {name} removed"));
    Ok(())
}

fn kill_namespace_processes(name: &str) {
    let pids = namespace_pids(name);
    if pids.is_empty() {
        return;
    }
    log(&format!(
        "ending processes left in namespace {name}: {pids:?}"
    ));
    for &pid in &pids {
        // A specific pid listed by `ip netns pids` for our own namespace.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !namespace_pids(name).is_empty() {
        thread::sleep(Duration::from_millis(20));
    }
}

fn namespace_pids(name: &str) -> Vec<i32> {
    ip(["netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .filter(|&pid: &i32| pid > 0 && pid != std::process::id() as i32)
                .collect()
        })
        .unwrap_or_default()
}

/// The `vireo-*` namespaces that exist now.
pub fn list_namespaces() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.starts_with(NETNS_PREFIX))
        .collect();
    names.sort();
    names
}

/// The pid encoded in a harness namespace name (`vireo-<prefix>-<pid>-<n>`).
pub fn namespace_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let mut parts = rest.rsplit('-');
    parts.next()?.parse::<u32>().ok()?;
    parts.next()?.parse().ok()
}

/// Removes every `vireo-*` namespace whose creating process is gone (best effort), with the
/// processes left inside it. Returns the names removed.
pub fn sweep_stale_namespaces() -> Vec<String> {
    let mut removed = Vec::new();
    for name in list_namespaces() {
        let stale = match namespace_owner(&name) {
            Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            None => false, // not named by this harness: leave it alone
        };
        if stale && remove_namespace(&name, &[]).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// What [`netns_self_test`] saw.
#[derive(Clone, Debug)]
pub struct NetnsSelfTest {
    /// The namespace it made (and removed).
    pub namespace: String,
    /// One line per check that passed.
    pub checks: Vec<String>,
}

/// Checks the namespace fixture and the clients for real, without a kernel: creates a namespace
/// with the default tap, checks that the tap is up with 10.0.2.2/24 and that no tap appeared in
/// the host's namespace, pings 10.0.2.2 from inside, then attaches a [`TapReflector`](crate::tap::TapReflector) to the tap
/// as a stand-in guest at 10.0.2.15 and runs UDP echo (1, 64, 1400 and 1472 bytes) and ICMP echo
/// to it over the tap, then removes the namespace and checks that it is gone. Needs root.
pub fn netns_self_test() -> Result<NetnsSelfTest, Error> {
    use crate::client::{IcmpEchoOptions, UdpEchoClient, icmp_echo};
    use crate::tap::{TapDevice, TapReflector};
    use std::net::SocketAddr;

    let host_had_tap0 = Path::new("/sys/class/net/tap0").exists();
    let netns = NetNs::create("selftest")?;
    let namespace = netns.name().to_string();
    let mut checks = Vec::new();
    let check = |ok: bool, what: String| -> Result<String, Error> {
        if ok {
            log(&format!("ok: {what}"));
            Ok(what)
        } else {
            Err(Error::Check(what))
        }
    };

    checks.push(check(
        Path::new(NETNS_RUN_DIR).join(&namespace).exists(),
        format!("namespace {namespace} exists"),
    )?);
    let link = netns.ip(["-o", "link", "show", "dev", "tap0"])?;
    let flags = link
        .split('<')
        .nth(1)
        .and_then(|r| r.split('>').next())
        .unwrap_or("");
    checks.push(check(
        flags.split(',').any(|f| f == "UP"),
        format!(
            "tap0 is administratively up inside the namespace ({})",
            link.trim()
        ),
    )?);
    let address = netns.ip(["-o", "-4", "addr", "show", "dev", "tap0"])?;
    checks.push(check(
        address.contains("10.0.2.2/24"),
        format!("tap0 has 10.0.2.2/24 ({})", address.trim()),
    )?);
    checks.push(check(
        host_had_tap0 || !Path::new("/sys/class/net/tap0").exists(),
        "no tap0 appeared in the host's namespace".to_string(),
    )?);

    let host = DEFAULT_HOST_CIDR.0;
    let ping_host = netns.run(|| {
        icmp_echo(
            host,
            IcmpEchoOptions {
                count: 3,
                ..IcmpEchoOptions::default()
            },
        )
    })??;
    checks.push(check(
        ping_host.received == 3,
        format!(
            "ICMP echo to the host side {host} from inside: {}",
            ping_host
                .summary()
                .map(|s| s.to_string())
                .unwrap_or_default()
        ),
    )?);

    let tap = netns
        .run(|| TapDevice::attach("tap0", false))?
        .map_err(|source| Error::Io {
            context: "attaching to tap0 through /dev/net/tun inside the namespace".to_string(),
            source,
        })?;
    let reflector = TapReflector::start(tap, DEFAULT_GUEST_IP, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let target = SocketAddr::from((DEFAULT_GUEST_IP, 7));
    let udp = netns.run(
        || -> Result<crate::client::EchoReport, crate::client::ClientError> {
            let mut client = UdpEchoClient::connect(target, Duration::from_secs(2))?;
            client.warm_up(Duration::from_secs(10), Duration::from_millis(200))?;
            let mut report = crate::client::EchoReport::default();
            for size in [1, 64, 1400, 1472] {
                for _ in 0..5 {
                    client.exchange(size, 1, &mut report)?;
                }
            }
            Ok(report)
        },
    )??;
    checks.push(check(
        udp.received == 20,
        format!(
            "UDP echo over the tap to the reflector at {target}, 1/64/1400/1472 bytes: {}",
            udp.summary().map(|s| s.to_string()).unwrap_or_default()
        ),
    )?);
    let ping_guest = netns.run(|| icmp_echo(DEFAULT_GUEST_IP, IcmpEchoOptions::default()))??;
    checks.push(check(
        ping_guest.received == IcmpEchoOptions::default().count,
        format!(
            "ICMP echo over the tap to the reflector at {DEFAULT_GUEST_IP}: {}",
            ping_guest
                .summary()
                .map(|s| s.to_string())
                .unwrap_or_default()
        ),
    )?);
    let counters = std::sync::Arc::clone(&reflector.counters);
    reflector.stop().map_err(|source| Error::Io {
        context: "the tap reflector".to_string(),
        source,
    })?;
    checks.push(check(
        counters.arp_replies.load(Ordering::Relaxed) >= 1,
        format!(
            "the reflector saw {} frames and answered {} ARP, {} ICMP, {} UDP",
            counters.frames_in.load(Ordering::Relaxed),
            counters.arp_replies.load(Ordering::Relaxed),
            counters.icmp_replies.load(Ordering::Relaxed),
            counters.udp_echoes.load(Ordering::Relaxed)
        ),
    )?);

    netns.remove()?;
    checks.push(check(
        !Path::new(NETNS_RUN_DIR).join(&namespace).exists()
            && !list_namespaces().contains(&namespace),
        format!("namespace {namespace} removed"),
    )?);
    checks.push(check(
        host_had_tap0 || !Path::new("/sys/class/net/tap0").exists(),
        "no tap0 left in the host's namespace".to_string(),
    )?);
    Ok(NetnsSelfTest { namespace, checks })
}

fn ip<I, S>(args: I) -> Result<String, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_string()).collect();
    let shown = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: shown.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Check(format!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_comes_from_the_name() {
        assert_eq!(namespace_owner("vireo-echo-udp-1234-0"), Some(1234));
        assert_eq!(namespace_owner("vireo-77-3"), Some(77));
        assert_eq!(namespace_owner("vireo-x-3"), None);
        assert_eq!(namespace_owner("other-12-3"), None);
    }

    #[test]
    fn tap_netdev_spec() {
        assert_eq!(
            NetNs::tap_netdev("n0", "tap0", None),
            "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off"
        );
        assert_eq!(
            NetNs::tap_netdev("n0", "tap0", Some(2)),
            "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off,queues=2"
        );
    }
}
