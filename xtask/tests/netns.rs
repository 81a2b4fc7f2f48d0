//! Tests of the network-namespace fixture that need root but no kernel: the full self-test (tap
//! up with the host address, ping from inside, UDP and ICMP echo over the tap against a
//! userspace reflector), and teardown on panic, of processes left inside, and of stale
//! namespaces. Without root they skip locally and fail under CI=true.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xtask::{
    NetNs, list_namespaces, netns_self_test, root_networking_available, skip_or_fail_in_ci,
    sweep_stale_namespaces,
};

fn root_or_skip() -> bool {
    match root_networking_available() {
        Ok(()) => true,
        Err(reason) => {
            skip_or_fail_in_ci(&reason);
            false
        }
    }
}

fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn self_test_creates_pings_echoes_over_the_tap_and_removes() {
    if !root_or_skip() {
        return;
    }
    let report = netns_self_test().unwrap_or_else(|error| panic!("netns self-test: {error}"));
    assert!(!exists(&report.namespace));
    for check in &report.checks {
        println!("ok: {check}");
    }
}

#[test]
fn namespace_is_removed_when_the_owner_panics() {
    if !root_or_skip() {
        return;
    }
    let mut created = String::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let netns = NetNs::create("panic").expect("create");
        created = netns.name().to_string();
        assert!(exists(&created));
        panic!("deliberate panic with the namespace alive");
    }));
    assert!(outcome.is_err());
    assert!(!created.is_empty());
    assert!(!exists(&created), "{created} survived the panic");
}

#[test]
fn processes_left_inside_are_ended_on_drop() {
    if !root_or_skip() {
        return;
    }
    let netns = NetNs::create("procs").expect("create");
    let name = netns.name().to_string();
    let mut child = netns
        .command("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep inside the namespace");
    let deadline = Instant::now() + Duration::from_secs(5);
    while netns.pids().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(netns.pids(), vec![child.id() as i32]);
    drop(netns);
    let status = child.wait().expect("wait");
    assert!(!status.success(), "sleep should have been killed");
    assert!(!exists(&name));
}

#[test]
fn stale_namespaces_of_dead_owners_are_swept_and_live_ones_kept() {
    if !root_or_skip() {
        return;
    }
    // A pid that existed and is gone: a child that has exited and been reaped.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead_pid = child.id();
    child.wait().expect("wait");
    // The live namespace first: a process's first `NetNs::create` runs a sweep of its own,
    // which would remove the stale namespace before the explicit sweep below could see it.
    let live = NetNs::create("live").expect("create");
    let stale = format!("vireo-stale-{dead_pid}-0");
    let status = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .expect("ip netns add");
    assert!(status.success());
    let removed = sweep_stale_namespaces();
    let still_there = exists(&stale);
    if still_there {
        // Leave nothing behind even when the assertion below fails.
        let _ = Command::new("ip").args(["netns", "del", &stale]).status();
    }
    assert!(removed.contains(&stale), "swept {removed:?}");
    assert!(!still_there);
    assert!(list_namespaces().contains(&live.name().to_string()));
    assert!(!removed.contains(&live.name().to_string()));
}
