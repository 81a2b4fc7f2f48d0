//! Link arguments for the freestanding kernel binary only (see `docs/design.md`, platform facts): our linker script,
//! no C runtime, static, not position independent.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    for arg in [
        format!("-T{dir}/boot/linker.ld"),
        "-nostartfiles".into(),
        "-nostdlib".into(),
        "-static".into(),
        "-no-pie".into(),
        "-Wl,--build-id=none".into(),
        "-Wl,-z,noexecstack".into(),
    ] {
        println!("cargo:rustc-link-arg-bin=vireo={arg}");
    }
    println!("cargo:rerun-if-changed=boot/linker.ld");
    println!("cargo:rerun-if-changed=boot/entry.S");
}
