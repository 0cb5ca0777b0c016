//! A bump allocator whose instruction counts depend only on the sequence of
//! requests, for the gate's benchmark binary.
//!
//! Under glibc's malloc, the measured counts of the model workloads moved by
//! up to 0.06 % between two runs of one binary and by 0.02 % between two
//! fresh clones. Callgrind's per-function counts put the whole difference in
//! `_int_malloc`, `_int_free`, `unlink_chunk` (whose paths depend on the free
//! lists the process history left behind) and in `memcpy` (whose path depends
//! on the destination's alignment), plus a few dozen instructions in SIMD
//! loops whose head length follows the address. This allocator removes both
//! causes: every block starts on a 64-byte boundary and every size is rounded
//! up to 64 bytes, so alignments never depend on what was allocated before,
//! and an allocation costs the same few instructions whatever the history.
//!
//! Memory is reused only for the most recent block (stack-like), which the
//! workloads' temporaries mostly are; everything else is kept until the
//! process ends. The gate's processes run one workload twice, so this is
//! bounded (see the `deterministic_alloc` test for the measured reservation).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Every block's alignment and size granule (a cache line, and the widest
/// SIMD register the kernels use, so SIMD loops see the same head on every
/// run).
pub const GRANULE: usize = 64;

/// Bytes reserved from the system at a time.
const CHUNK: usize = 64 << 20;

/// A page: the unit the page fence aligns to.
const PAGE: usize = 4096;

/// Set by [`fence_to_page`]; the next allocation clears it.
static PAGE_FENCE: AtomicBool = AtomicBool::new(false);

/// Makes the next allocation of every [`DeterministicAlloc`] in the process
/// start on a fresh page, so the blocks that follow sit at the same offsets
/// within their pages whatever was allocated before.
///
/// Without it, how much the process had allocated before a measured call
/// (for example argv, which holds the build folder's path) decided the
/// blocks' offsets within a page, and glibc's `memcpy` takes another path
/// when source and destination alias modulo 4 KiB: `dp_prv_calibrate`
/// counted 5,874 instructions more in a clone whose folder name was longer.
pub fn fence_to_page() {
    PAGE_FENCE.store(true, Ordering::Relaxed);
}

/// The allocator; install it with `#[global_allocator]`.
///
/// ```
/// use fedsvd_bench_gate::DeterministicAlloc;
/// use std::alloc::{GlobalAlloc, Layout};
///
/// let alloc = DeterministicAlloc::new();
/// let layout = Layout::from_size_align(3, 1).unwrap();
/// // SAFETY: the layout has a non-zero size; the block is freed with it.
/// unsafe {
///     let p = alloc.alloc(layout);
///     assert_eq!(p as usize % 64, 0);
///     alloc.dealloc(p, layout);
/// }
/// ```
pub struct DeterministicAlloc {
    lock: AtomicBool,
    arena: UnsafeCell<Arena>,
    reserved: AtomicUsize,
}

struct Arena {
    top: usize,
    end: usize,
}

// SAFETY: `arena` is only touched while `lock` is held.
unsafe impl Sync for DeterministicAlloc {}

impl Default for DeterministicAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl DeterministicAlloc {
    /// An allocator that has reserved nothing yet.
    pub const fn new() -> Self {
        Self {
            lock: AtomicBool::new(false),
            arena: UnsafeCell::new(Arena { top: 0, end: 0 }),
            reserved: AtomicUsize::new(0),
        }
    }

    /// Bytes reserved from the system so far.
    pub fn reserved_bytes(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    fn with_arena<R>(&self, f: impl FnOnce(&mut Arena) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held, so no other reference to the arena exists.
        let r = f(unsafe { &mut *self.arena.get() });
        self.lock.store(false, Ordering::Release);
        r
    }
}

fn rounded(layout: Layout) -> (usize, usize) {
    let align = layout.align().max(GRANULE);
    let size = layout.size().max(1).next_multiple_of(GRANULE);
    (size, align)
}

// SAFETY: blocks are disjoint ranges of chunks obtained from `System`, never
// returned to it, aligned as requested (or more), and a block is handed out
// again only after its owner freed it.
unsafe impl GlobalAlloc for DeterministicAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, mut align) = rounded(layout);
        if PAGE_FENCE.swap(false, Ordering::Relaxed) {
            align = align.max(PAGE);
        }
        self.with_arena(|arena| {
            let mut start = arena.top.next_multiple_of(align);
            if arena.top == 0 || start.checked_add(size).is_none_or(|e| e > arena.end) {
                let bytes = CHUNK.max(size.saturating_add(align));
                let Ok(chunk_layout) = Layout::from_size_align(bytes, 4096.max(align)) else {
                    return std::ptr::null_mut();
                };
                // SAFETY: the layout has a non-zero size.
                let chunk = unsafe { System.alloc(chunk_layout) };
                if chunk.is_null() {
                    return chunk;
                }
                self.reserved.fetch_add(bytes, Ordering::Relaxed);
                arena.top = chunk as usize;
                arena.end = arena.top + bytes;
                start = arena.top.next_multiple_of(align);
            }
            arena.top = start + size;
            start as *mut u8
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (size, _) = rounded(layout);
        self.with_arena(|arena| {
            if ptr as usize + size == arena.top {
                arena.top = ptr as usize;
            }
        });
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old, align) = rounded(layout);
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let (new, _) = rounded(new_layout);
        // The most recent block grows or shrinks in place when its chunk
        // has room; any other block moves.
        let in_place = self.with_arena(|arena| {
            if ptr as usize + old == arena.top && (ptr as usize) + new <= arena.end {
                arena.top = ptr as usize + new;
                true
            } else {
                new <= old
            }
        });
        if in_place {
            return ptr;
        }
        debug_assert!(align >= layout.align());
        // SAFETY: `new_layout` has a non-zero size; the old block is valid
        // for `layout.size()` bytes and the new one for at least that many.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            moved
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    /// The page fence is process-wide: the tests that allocate take turns,
    /// so one test's fence never lands on another's allocation.
    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        TURN.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_the_last_one_is_reused() {
        let _turn = one_at_a_time();
        let a = DeterministicAlloc::new();
        unsafe {
            let p = a.alloc(layout(10, 4));
            let q = a.alloc(layout(100, 8));
            let r = a.alloc(layout(8, 256));
            for x in [p, q, r] {
                assert!(!x.is_null());
                assert_eq!(x as usize % GRANULE, 0);
            }
            assert_eq!(r as usize % 256, 0);
            assert!(q as usize >= p as usize + 64, "blocks overlap");
            assert!(r as usize >= q as usize + 128, "blocks overlap");
            // Freeing the most recent block makes its space the next block.
            a.dealloc(r, layout(8, 256));
            let s = a.alloc(layout(8, 8));
            assert_eq!(s, r);
            // A block that is not the most recent is not reused.
            a.dealloc(p, layout(10, 4));
            let t = a.alloc(layout(10, 4));
            assert_ne!(t, p);
        }
    }

    #[test]
    fn the_fence_starts_the_next_block_on_a_page() {
        let _turn = one_at_a_time();
        let a = DeterministicAlloc::new();
        unsafe {
            let first = a.alloc(layout(64, 8));
            let _odd = a.alloc(layout(200, 8));
            fence_to_page();
            let p = a.alloc(layout(8, 8));
            assert_eq!(p as usize % PAGE, 0);
            assert!(p as usize > first as usize);
            // Only the next allocation: the one after follows it.
            let q = a.alloc(layout(8, 8));
            assert_eq!(q as usize, p as usize + GRANULE);
        }
    }

    #[test]
    fn realloc_keeps_the_contents() {
        let _turn = one_at_a_time();
        let a = DeterministicAlloc::new();
        unsafe {
            let p = a.alloc(layout(16, 1));
            for i in 0..16 {
                *p.add(i) = i as u8;
            }
            let _other = a.alloc(layout(8, 1));
            // `p` is no longer the most recent block: it moves.
            let q = a.realloc(p, layout(16, 1), 1000);
            assert_ne!(p, q);
            // `q` is the most recent block: it grows in place.
            let r = a.realloc(q, layout(1000, 1), 5000);
            assert_eq!(q, r);
            for i in 0..16 {
                assert_eq!(*r.add(i), i as u8);
            }
        }
    }

    #[test]
    fn blocks_larger_than_a_chunk_get_their_own() {
        let _turn = one_at_a_time();
        let a = DeterministicAlloc::new();
        unsafe {
            let big = layout(CHUNK + 1, 64);
            let p = a.alloc(big);
            assert!(!p.is_null());
            *p.add(CHUNK) = 7;
            assert_eq!(*p.add(CHUNK), 7);
            assert!(a.reserved_bytes() > CHUNK);
        }
    }
}
