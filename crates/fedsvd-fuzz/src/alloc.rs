//! A counting global allocator that refuses any single allocation above a
//! cap while a fuzz input runs.
//!
//! Why refuse rather than count: a size field read from a hostile file (a
//! safetensors header claiming 2^60 bytes, a layer index of 10^12) must be
//! rejected by the parser *before* it allocates. The allocator returns null
//! for such a request: fallible code (`try_reserve`) sees an error and the
//! harness reports the refused size after the input; infallible code aborts
//! the process through `handle_alloc_error`, which the supervisor sees as a
//! crash of the worker and reports with the input that caused it.
//!
//! The binary installs it with `#[global_allocator]`; so does this crate's
//! unit-test build.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The default cap on one allocation: 256 MiB, far above anything the seed
/// inputs need and far below what a machine running CI has.
pub const DEFAULT_CAP: usize = 256 << 20;

static ARMED: AtomicBool = AtomicBool::new(false);
static CAP: AtomicUsize = AtomicUsize::new(DEFAULT_CAP);
static LARGEST_REFUSED: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// [`System`] with accounting: live bytes, the peak while armed, and
/// refusal of single requests above the cap while armed.
#[derive(Debug, Default, Clone, Copy)]
pub struct CapAlloc;

impl CapAlloc {
    /// The allocator (a unit struct; the state is global).
    pub const fn new() -> Self {
        CapAlloc
    }
}

fn refuse(size: usize) -> bool {
    if ARMED.load(Ordering::Relaxed) && size > CAP.load(Ordering::Relaxed) {
        LARGEST_REFUSED.fetch_max(size, Ordering::Relaxed);
        true
    } else {
        false
    }
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrank(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's layout, or
// returns null (which `GlobalAlloc` allows for any failure); the counters
// are plain atomics and never allocate.
unsafe impl GlobalAlloc for CapAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if refuse(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if refuse(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if refuse(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        p
    }
}

/// What the allocator saw while one input ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocReport {
    /// The largest single request refused for exceeding the cap (0: none).
    pub largest_refused: usize,
    /// The peak of live bytes above what was live when the input started.
    pub peak_growth: usize,
}

/// Arms the cap for one input (and resets the counters of the last one).
/// Only the fuzz loop calls it; inputs run one at a time.
pub fn arm(cap: usize) {
    CAP.store(cap, Ordering::Relaxed);
    LARGEST_REFUSED.store(0, Ordering::Relaxed);
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
}

/// Disarms the cap and reports what happened since [`arm`]. `live_before`
/// is [`live_bytes`] read just before arming.
pub fn disarm(live_before: usize) -> AllocReport {
    ARMED.store(false, Ordering::Relaxed);
    AllocReport {
        largest_refused: LARGEST_REFUSED.load(Ordering::Relaxed),
        peak_growth: PEAK.load(Ordering::Relaxed).saturating_sub(live_before),
    }
}

/// Bytes allocated through [`CapAlloc`] and not yet freed (0 when another
/// allocator is installed).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}
