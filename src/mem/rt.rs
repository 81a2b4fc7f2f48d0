//! The C runtime symbols that the prebuilt `core` calls: `memcpy`, `memmove`, `memset`,
//! `memcmp`, `bcmp` (PLATFORM.md). Copies use `rep movsb`/`rep stosb`, never Rust loops that the
//! compiler could turn back into calls to these very functions.

use core::arch::asm;

/// # Safety
/// The C contract: `dest` and `src` are valid for `count` bytes and do not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, count: usize) -> *mut u8 {
    // SAFETY: the caller upholds memcpy's contract; `rep movsb` copies exactly `count` bytes
    // forwards (DF is clear: the ABI requires it on entry to every function).
    unsafe {
        asm!("rep movsb", inout("rcx") count => _, inout("rdi") dest => _, inout("rsi") src => _, options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// The C contract: `dest` and `src` are valid for `count` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, count: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= count {
        // Destination below the source, or no overlap: a forward copy is safe.
        // SAFETY: as for memcpy; forward copying never reads a byte already overwritten.
        unsafe {
            asm!("rep movsb", inout("rcx") count => _, inout("rdi") dest => _, inout("rsi") src => _, options(nostack, preserves_flags))
        };
    } else {
        // Overlap with the destination above: copy backwards from the last byte.
        // SAFETY: as above with DF set for the copy and cleared again before returning, as
        // the ABI requires. The pointers address the last byte of each range.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") count => _,
                inout("rdi") dest.add(count - 1) => _,
                inout("rsi") src.add(count - 1) => _,
                options(nostack)
            )
        };
    }
    dest
}

/// # Safety
/// The C contract: `dest` is valid for `count` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, count: usize) -> *mut u8 {
    // SAFETY: the caller upholds memset's contract; `rep stosb` writes exactly `count` bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") count => _, inout("rdi") dest => _, in("al") value as u8, options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// The C contract: both pointers are valid for `count` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(left: *const u8, right: *const u8, count: usize) -> i32 {
    let mut index = 0;
    while index < count {
        // SAFETY: index < count and both ranges are valid for `count` bytes. Volatile reads
        // keep the compiler from recognising this loop as a memcmp call.
        let (a, b) = unsafe {
            (
                core::ptr::read_volatile(left.add(index)),
                core::ptr::read_volatile(right.add(index)),
            )
        };
        if a != b {
            return i32::from(a) - i32::from(b);
        }
        index += 1;
    }
    0
}

/// # Safety
/// The C contract: both pointers are valid for `count` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(left: *const u8, right: *const u8, count: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(left, right, count) }
}

/// Never called: the kernel is built with `panic = "abort"`, but the prebuilt `core` refers to
/// the symbol.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Never called: the prebuilt `alloc` has unwinding landing pads that refer to this symbol, but
/// with `panic = "abort"` no unwind ever starts.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::console::fatal(format_args!(
        "_Unwind_Resume called, but the kernel never unwinds"
    ))
}
